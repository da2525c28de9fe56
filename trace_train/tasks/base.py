"""What the trainer needs from a task (`Task`), the record it trains on (`Example`), and the error a data file
that cannot be used raises (`DataError`)."""

from __future__ import annotations

from dataclasses import dataclass, field


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


def slice_bounds(n: int, start: int, stop: int | None) -> tuple[int, int]:
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n:
        raise ValueError(f"examples: need 0 <= start <= stop <= n, got start={start}, stop={stop}, n={n}")
    return start, stop
