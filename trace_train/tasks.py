"""Where prompts come from and how responses are scored: the synthetic arithmetic task, or math problems
from local JSONL / Parquet files.

File format (one record per line in .jsonl, one row in .parquet; OpenThoughts-style math sets fit it):

    {"problem": "What is 1/2 + 1/4?", "solution": "1/2 + 1/4 = 3/4 ...", "answer": "\\frac{3}{4}"}

`problem` is shown to the student, `solution` (the reference solution) and the diagnostic type only to the
teacher, `answer` is checked with math-verify against the response's last \\boxed{...}. Other fields are
kept and ignored. Prompts use the tokenizer's chat template when it has one.

Every step's problems are a pure function of (seed, step): files are read in a shuffled order per epoch,
so the data position is the step and a resumed run sees what the uninterrupted one saw.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

from . import arith

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MATH_DIAGNOSTICS = ("arithmetic or algebra slip", "wrong method or formula", "misread the problem",
                    "missing case or step", "final answer not supported by the work")


@dataclass(frozen=True)
class Example:
    problem: str
    solution: str
    answer: str
    source: object = field(default=None, compare=False)  # the arith.Problem of the synthetic task


def read_examples(path: str) -> list[Example]:
    """Records of a .jsonl / .json (a list) / .parquet file; each needs problem, solution and answer."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading Parquet needs pyarrow (pip install 'trace-kernels[train]')") from e
        records = pq.read_table(path).to_pylist()
    elif path.endswith(".json"):
        with open(path) as f:
            records = json.load(f)
    else:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    out = []
    for i, r in enumerate(records):
        missing = [k for k in ("problem", "solution", "answer") if not isinstance(r.get(k), (str, int, float))]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {missing} (need problem, solution, answer)")
        out.append(Example(str(r["problem"]), str(r["solution"]), str(r["answer"])))
    if not out:
        raise ValueError(f"{path}: no records")
    return out


class Task:
    """What the trainer needs from a task. `diagnostics`: the coarse error types an annotator may give."""

    diagnostics: tuple[str, ...] = ()
    has_rule_annotator = False

    def examples(self, seed: int, step: int, n: int) -> list[Example]:
        raise NotImplementedError

    def chat(self, content: str) -> str:
        """A user turn as the model's prompt text (MathTask: the tokenizer's chat template)."""
        return f"{content}\n"

    def student_text(self, ex: Example) -> str:
        raise NotImplementedError

    def teacher_text(self, ex: Example, diagnostic: str | None) -> str:
        raise NotImplementedError

    def reward(self, response: str, ex: Example) -> float:
        raise NotImplementedError


class ArithTask(Task):
    """The synthetic chain of mod-10 operations (trace_train.arith); min_ops..max_ops operations each.
    pool > 0: every step draws from the same `pool` problems (fixed by pool_seed), the classic sanity check
    that RL can fit a handful of problems."""

    diagnostics = arith.DIAGNOSTICS
    has_rule_annotator = True

    def __init__(self, min_ops: int = 1, max_ops: int = 3, pool: int = 0, pool_seed: int = 0):
        if not 1 <= min_ops <= max_ops:
            raise ValueError(f"data.min_ops / data.max_ops: need 1 <= min <= max, got {min_ops}, {max_ops}")
        if pool < 0:
            raise ValueError(f"data.pool_size must be >= 0, got {pool}")
        self.min_ops, self.max_ops = min_ops, max_ops
        rng = random.Random(pool_seed + 31_337)
        self.pool = [self.wrap(arith.sample_problem(rng, rng.randint(min_ops, max_ops))) for _ in range(pool)]

    @staticmethod
    def wrap(p: arith.Problem) -> Example:
        return Example(p.text, p.solution, str(p.answer), source=p)

    def examples(self, seed, step, n):
        rng = random.Random(seed * 1_000_003 + step)
        if self.pool:
            return [rng.choice(self.pool) for _ in range(n)]
        return [self.wrap(arith.sample_problem(rng, rng.randint(self.min_ops, self.max_ops))) for _ in range(n)]

    def student_text(self, ex):
        return arith.student_prompt(ex.source)

    def teacher_text(self, ex, diagnostic):
        return arith.teacher_prompt(ex.source, diagnostic)

    def reward(self, response, ex):
        return arith.reward(response, ex.source)

    def annotate(self, response: str, ex: Example) -> arith.Annotation:
        return arith.annotate(response, ex.source)


class MathTask(Task):
    """Math word problems from files, rewarded by math-verify on the boxed answer."""

    diagnostics = MATH_DIAGNOSTICS

    def __init__(self, files: str, tokenizer=None):
        paths = [p.strip() for p in files.split(",") if p.strip()]
        if not paths:
            raise ValueError("data.train_files: give at least one .jsonl/.parquet path (comma-separated)")
        for p in paths:
            if not os.path.exists(p):
                raise ValueError(f"data.train_files: {p} does not exist")
        self.items = [ex for p in paths for ex in read_examples(p)]
        self.tokenizer = tokenizer

    def examples(self, seed, step, n):
        out, pos = [], step * n
        for i in range(pos, pos + n):
            epoch, j = divmod(i, len(self.items))
            order = list(range(len(self.items)))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            out.append(self.items[order[j]])
        return out

    def chat(self, content: str) -> str:
        tok = self.tokenizer
        if tok is not None and getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
        return f"{content}\n"

    def student_text(self, ex):
        return self.chat(f"{ex.problem}\n\n{MATH_INSTRUCTION}")

    def teacher_text(self, ex, diagnostic):
        hint = f"\n\nA previous attempt made this kind of mistake: {diagnostic}." if diagnostic else ""
        return self.chat(f"{ex.problem}\n\nReference solution:\n{ex.solution}{hint}\n\n{MATH_INSTRUCTION}")

    def reward(self, response, ex):
        return math_reward(response, ex.answer)


def math_reward(response: str, answer: str) -> float:
    """1.0 when the response's final answer is mathematically equal to `answer` (math-verify)."""
    from math_verify import parse, verify

    gold = parse(answer if "\\boxed" in answer or "$" in answer else f"${answer}$")
    pred = parse(response)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred) else 0.0


def make_task(data_cfg, tokenizer=None) -> Task:
    if data_cfg.task == "arith":
        return ArithTask(data_cfg.min_ops, data_cfg.max_ops, data_cfg.pool_size)
    if data_cfg.task == "math":
        return MathTask(data_cfg.train_files, tokenizer)
    raise ValueError(f"data.task: unknown {data_cfg.task!r} (arith | math)")
