"""The synthetic long-horizon task: a chain of single-digit operations mod 10, solved with every
intermediate step written out, which a tiny model can learn on the CPU.

    problem   "3+4*2-5"
    solution  "3+4=7,7*2=4,4-5=9;9"        (left to right, each result mod 10, answer after ';')

Everything about it is exact: the reward (answer match), the reference solution (the teacher's privileged
context), and the annotator: key spans of a correct response are the step results; the error span of an
incorrect one is the first wrong or malformed step, with a coarse diagnostic type. Spans are character
ranges [start, end) of the response text; the trainer maps them to tokens through the tokenizer's offsets.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..annotate import Annotation  # the annotators' result type (also importable from here)
from .base import Example, Task, slice_bounds

OPS = {"+": lambda a, b: (a + b) % 10, "-": lambda a, b: (a - b) % 10, "*": lambda a, b: (a * b) % 10}
STEP = re.compile(r"(\d)([+\-*])(\d)=(\d)")
# Coarse diagnostic types given to the teacher (never the span text itself).
DIAGNOSTICS = ("carried a wrong value into a step", "arithmetic slip in a step", "steps missing or malformed",
               "final answer does not match the last step")


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def text(self) -> str:
        return str(self.start) + "".join(f"{op}{b}" for op, b in self.ops)

    def steps(self) -> list[tuple[int, str, int, int]]:
        out, a = [], self.start
        for op, b in self.ops:
            c = OPS[op](a, b)
            out.append((a, op, b, c))
            a = c
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3] if self.ops else self.start

    @property
    def solution(self) -> str:
        return ",".join(f"{a}{op}{b}={c}" for a, op, b, c in self.steps()) + f";{self.answer}"


def sample_problem(rng: random.Random, n_steps: int) -> Problem:
    return Problem(rng.randrange(10), tuple((rng.choice("+-*"), rng.randrange(10)) for _ in range(n_steps)))


def parse_answer(response: str) -> int | None:
    """The digit after the last ';' (the response may continue with end-of-text padding)."""
    m = re.search(r";(\d)(?!.*;)", response)
    return int(m.group(1)) if m else None


def reward(response: str, problem: Problem) -> float:
    return 1.0 if parse_answer(response) == problem.answer else 0.0


def annotate(response: str, problem: Problem) -> Annotation:
    """Exact rule-based annotation of one response (character spans)."""
    body_end = response.find(";")
    body = response if body_end < 0 else response[:body_end]
    expected, pos, prev = problem.steps(), 0, problem.start
    result_spans = []
    for i, chunk in enumerate(body.split(",")):
        m = STEP.fullmatch(chunk)
        span = (pos, pos + len(chunk))
        if m is None or i >= len(expected):
            return _error(response, problem, span if chunk else (pos, min(pos + 1, len(response))), DIAGNOSTICS[2])
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        if a != prev or (op, b) != expected[i][1:3]:
            return _error(response, problem, span, DIAGNOSTICS[0])
        if c != OPS[op](a, b):
            return _error(response, problem, (pos + len(chunk) - 1, pos + len(chunk)), DIAGNOSTICS[1])
        result_spans.append((pos + len(chunk) - 1, pos + len(chunk)))
        prev, pos = c, pos + len(chunk) + 1
    if len(result_spans) != len(expected):
        return _error(response, problem, (max(pos - 1, 0), min(pos, len(response))), DIAGNOSTICS[2])
    answer = parse_answer(response)
    if answer != prev:
        # the ';' and its digit, or, with no answer at all, the last character (where ';' should follow)
        span = (body_end, min(body_end + 2, len(response))) if body_end >= 0 else (max(len(response) - 1, 0),
                                                                                  len(response))
        return _error(response, problem, span, DIAGNOSTICS[3])
    return Annotation(key_spans=result_spans + [(body_end + 1, body_end + 2)], error_spans=[], diagnostic=None)


def _error(response: str, problem: Problem, span: tuple[int, int], diagnostic: str) -> Annotation:
    if reward(response, problem) == 1.0:
        # A right answer reached through a wrong step is still a correct rollout for the reward; its
        # key spans are unreliable, so it gets none.
        return Annotation(key_spans=[], error_spans=[], diagnostic=None)
    return Annotation(key_spans=[], error_spans=[span], diagnostic=diagnostic)


def student_prompt(problem: Problem) -> str:
    return f"Q:{problem.text}\nA:"


def teacher_prompt(problem: Problem, diagnostic: str | None) -> str:
    """The privileged context: the problem, its reference solution and a coarse diagnostic type."""
    hint = f"\nD:{diagnostic}" if diagnostic else ""
    return f"Q:{problem.text}\nR:{problem.solution}{hint}\nA:"


class ArithTask(Task):
    """The synthetic chain of mod-10 operations (this module); min_ops..max_ops operations each.
    pool > 0: every step draws from the same `pool` problems (fixed by pool_seed), the classic sanity check
    that RL can fit a handful of problems."""

    diagnostics = DIAGNOSTICS
    has_rule_annotator = True

    def __init__(self, min_ops: int = 1, max_ops: int = 3, pool: int = 0, pool_seed: int = 0):
        if not 1 <= min_ops <= max_ops:
            raise ValueError(f"data.min_ops / data.max_ops: need 1 <= min <= max, got {min_ops}, {max_ops}")
        if pool < 0:
            raise ValueError(f"data.pool_size must be >= 0, got {pool}")
        self.min_ops, self.max_ops = min_ops, max_ops
        rng = random.Random(pool_seed + 31_337)
        self.pool = [self.wrap(sample_problem(rng, rng.randint(min_ops, max_ops))) for _ in range(pool)]

    @staticmethod
    def wrap(p: Problem) -> Example:
        return Example(p.text, p.solution, str(p.answer), source=p)

    def examples(self, seed, step, n, start=0, stop=None):
        start, stop = slice_bounds(n, start, stop)
        rng = random.Random(seed * 1_000_003 + step)
        out = []
        # One random stream per step: the examples before `start` are drawn and dropped (microseconds each),
        # which keeps every step's problems those of the whole batch.
        for i in range(stop):
            if self.pool:
                ex = rng.choice(self.pool)
            else:
                ops = rng.randint(self.min_ops, self.max_ops)
                ex = sample_problem(rng, ops)
            if i >= start:
                out.append(ex if self.pool else self.wrap(ex))
        return out

    def student_text(self, ex):
        return student_prompt(ex.source)

    def teacher_text(self, ex, diagnostic):
        return teacher_prompt(ex.source, diagnostic)

    def reward(self, response, ex):
        return reward(response, ex.source)

    def annotate(self, response: str, ex: Example) -> Annotation:
        return annotate(response, ex.source)
