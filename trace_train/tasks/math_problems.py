"""Math word problems from files, rewarded by math-verify on the response's last \\boxed{...}; the reference
solution and the diagnostic type go to the teacher's prompt only."""

from __future__ import annotations

import os
import random

from .base import DataError, Task, slice_bounds
from .files import read_examples

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MATH_DIAGNOSTICS = ("arithmetic or algebra slip", "wrong method or formula", "misread the problem",
                    "missing case or step", "final answer not supported by the work")


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
        start, stop = slice_bounds(n, start, stop)
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


def math_reward(response: str, answer: str) -> float:
    """1.0 when the response's final answer is mathematically equal to `answer` (math-verify)."""
    from math_verify import parse, verify

    gold = parse(answer if "\\boxed" in answer or "$" in answer else f"${answer}$")
    pred = parse(response)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred) else 0.0
