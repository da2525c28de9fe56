"""Where prompts come from and how responses are scored: the synthetic arithmetic task, or math problems
from local JSONL / Parquet files.

File format (one record per line in .jsonl, one row in .parquet; OpenThoughts-style math sets fit it):

    {"problem": "What is 1/2 + 1/4?", "solution": "1/2 + 1/4 = 3/4 ...", "answer": "\\frac{3}{4}"}

`problem` is shown to the student, `solution` (the reference solution) and the diagnostic type only to the
teacher, `answer` is checked with math-verify against the response's last \\boxed{...}. Other fields are
kept and ignored. Prompts use the tokenizer's chat template when it has one. A file that cannot be used
raises DataError naming the file, the line (JSONL, JSON) or the record / row (from 0), and what is wrong.

Every step's problems are a pure function of (seed, step): files are read in a shuffled order per epoch,
so the data position is the step and a resumed run sees what the uninterrupted one saw.
"""

from __future__ import annotations

from .arith import ArithTask
from .base import DataError, Example, Task
from .files import read_examples
from .math_problems import MATH_DIAGNOSTICS, MATH_INSTRUCTION, MathTask, math_reward

__all__ = ["ArithTask", "DataError", "Example", "MATH_DIAGNOSTICS", "MATH_INSTRUCTION", "MathTask", "Task",
           "make_task", "math_reward", "read_examples"]


def make_task(data_cfg, tokenizer=None) -> Task:
    if data_cfg.task == "arith":
        return ArithTask(data_cfg.min_ops, data_cfg.max_ops, data_cfg.pool_size)
    if data_cfg.task == "math":
        return MathTask(data_cfg.train_files, tokenizer)
    raise ValueError(f"data.task: unknown {data_cfg.task!r} (arith | math)")
