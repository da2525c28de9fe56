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


class DataError(ValueError):
    """A data file that cannot be used: names the file, the line (JSONL, JSON) or record / row, and what is
    wrong, on one line. `python -m trace_train` prints it and exits with status 2."""

    def __init__(self, path: str, where: str, what: str):
        where = f": {where}" if where else ""
        super().__init__(" ".join(f"{path}{where}: {what}".split()))  # one line, whatever the parts hold


FIELDS = ("problem", "solution", "answer")


def _example(path: str, where: str, record) -> Example:
    if not isinstance(record, dict):
        raise DataError(path, where, f"expected an object with {', '.join(FIELDS)}, got {type(record).__name__}")
    for k in FIELDS:
        v = record.get(k)
        if v is None:
            raise DataError(path, where, f"field {k!r} is missing or null (need {', '.join(FIELDS)})")
        if not isinstance(v, (str, int, float)):
            raise DataError(path, where, f"field {k!r} must be a string or a number, got {type(v).__name__}")
    return Example(str(record["problem"]), str(record["solution"]), str(record["answer"]))


def _read_jsonl(path: str) -> list[Example]:
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, f"line {n}", f"not UTF-8 (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"line {n}", f"not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(path, f"line {n}", "not valid JSON (nested too deeply)") from None
            out.append(_example(path, f"line {n}", record))
    return out


def _read_json(path: str) -> list[Example]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        records = json.loads(data)
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno}", f"not valid JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"byte {e.start + 1}", "not UTF-8") from None
    except RecursionError:
        raise DataError(path, "", "not valid JSON (nested too deeply)") from None
    if not isinstance(records, list):
        raise DataError(path, "", f"expected a JSON list of records, got {type(records).__name__}")
    return [_example(path, f"record {i} (from 0)", r) for i, r in enumerate(records)]


def _read_parquet(path: str) -> list[Example]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading Parquet needs pyarrow (pip install 'trace-kernels[train]')") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 -- pyarrow raises several classes for a file it cannot read
        raise DataError(path, "", f"cannot read as Parquet ({type(e).__name__}: {str(e)[:200]})") from None
    missing = [k for k in FIELDS if k not in table.column_names]
    if missing:
        raise DataError(path, "", f"no column {missing} (have {table.column_names[:10]}; need {', '.join(FIELDS)})")
    return [_example(path, f"row {i} (from 0)", r) for i, r in enumerate(table.select(list(FIELDS)).to_pylist())]


def read_examples(path: str) -> list[Example]:
    """Records of a .jsonl / .json (a list) / .parquet file; each needs problem, solution and answer (strings
    or numbers). DataError names the file and the line or record of the first bad one."""
    try:
        if path.endswith(".parquet"):
            out = _read_parquet(path)
        elif path.endswith(".json"):
            out = _read_json(path)
        else:
            out = _read_jsonl(path)
    except OSError as e:
        raise DataError(path, "", f"cannot read ({e.strerror or e})") from None
    if not out:
        raise DataError(path, "", "no records")
    return out


class Task:
    """What the trainer needs from a task. `diagnostics`: the coarse error types an annotator may give."""

    diagnostics: tuple[str, ...] = ()
    has_rule_annotator = False

    def examples(self, seed: int, step: int, n: int, start: int = 0, stop: int | None = None) -> list[Example]:
        """Examples [start, stop) of the n that step `step` trains on (a pure function of seed and step), so
        that a rank builds only its own share: equal to examples(seed, step, n)[start:stop]."""
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

    def examples(self, seed, step, n, start=0, stop=None):
        start, stop = _slice(n, start, stop)
        rng = random.Random(seed * 1_000_003 + step)
        out = []
        # One random stream per step: the examples before `start` are drawn and dropped (microseconds each),
        # which keeps every step's problems those of the whole batch.
        for i in range(stop):
            if self.pool:
                ex = rng.choice(self.pool)
            else:
                ops = rng.randint(self.min_ops, self.max_ops)
                ex = arith.sample_problem(rng, ops)
            if i >= start:
                out.append(ex if self.pool else self.wrap(ex))
        return out

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
            raise DataError("data.train_files", "", "give at least one .jsonl/.parquet path (comma-separated)")
        for p in paths:
            if not os.path.exists(p):
                raise DataError("data.train_files", "", f"{p} does not exist")
        self.items = [ex for p in paths for ex in read_examples(p)]
        self.tokenizer = tokenizer
        self._orders: dict[tuple[int, int], list[int]] = {}  # (seed, epoch) -> the epoch's order

    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        """The shuffled item order of an epoch, computed once (a step reads at most two epochs; the two
        latest orders are kept)."""
        key = (seed, epoch)
        if key not in self._orders:
            order = list(range(len(self.items)))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            while len(self._orders) >= 2:
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = order
        return self._orders[key]

    def examples(self, seed, step, n, start=0, stop=None):
        start, stop = _slice(n, start, stop)
        out = []
        for i in range(step * n + start, step * n + stop):
            epoch, j = divmod(i, len(self.items))
            out.append(self.items[self.epoch_order(seed, epoch)[j]])
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


def _slice(n: int, start: int, stop: int | None) -> tuple[int, int]:
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n:
        raise ValueError(f"examples: need 0 <= start <= stop <= n, got start={start}, stop={stop}, n={n}")
    return start, stop


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
