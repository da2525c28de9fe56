"""Data order and per-rank shares: every task's examples(seed, step, n, start, stop) equals slicing the whole
step, each epoch's shuffled order is computed once, and eval's shards cover every problem once."""

from __future__ import annotations

import json
import random

import pytest

from trace_train.eval import shard_bounds
from trace_train.tasks import ArithTask, MathTask, math_problems


@pytest.fixture
def math_task(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"problem": f"p{i}", "solution": "s", "answer": str(i)}) + "\n"
                            for i in range(7)))
    return MathTask(str(path))


@pytest.mark.parametrize("make", [lambda m: m, lambda m: ArithTask(1, 4), lambda m: ArithTask(1, 2, pool=5)],
                         ids=["math", "arith", "arith-pool"])
def test_examples_slice_equals_slicing_the_step(math_task, make):
    task = make(math_task)
    for seed, step, n in ((0, 0, 8), (3, 5, 6), (1, 11, 3)):
        whole = task.examples(seed, step, n)
        assert len(whole) == n
        for start, stop in ((0, n), (0, n // 2), (n // 2, n), (1, 2), (n, n)):
            assert task.examples(seed, step, n, start, stop) == whole[start:stop], (seed, step, start, stop)
        assert task.examples(seed, step, n, start=2) == whole[2:]
    for bad in ((-1, 2), (3, 2), (0, 9)):
        with pytest.raises(ValueError, match="start"):
            task.examples(0, 0, 8, *bad)


def test_math_epoch_order_computed_once(math_task, monkeypatch):
    shuffles = []

    class Counting(random.Random):
        def shuffle(self, x):
            shuffles.append(len(x))
            super().shuffle(x)

    reference = [e.problem for st in range(6) for e in math_task.examples(2, st, 4)]
    monkeypatch.setattr(math_problems.random, "Random", Counting)
    fresh = MathTask.__new__(MathTask)
    fresh.items, fresh.tokenizer, fresh._orders = math_task.items, None, {}
    got = [e.problem for st in range(6) for e in fresh.examples(2, st, 4)]
    assert got == reference  # same order as before the cache
    # 6 steps x 4 examples over 7 items = epochs 0..3: one shuffle per epoch, not one per example
    assert shuffles == [7, 7, 7, 7]
    # every epoch is a permutation of the items
    for e in range(3):
        assert sorted(got[7 * e:7 * e + 7]) == sorted(ex.problem for ex in math_task.items)


@pytest.mark.parametrize("n, world", [(7, 2), (2, 4), (16, 3), (1, 1)])
def test_eval_shards_cover_every_problem_once(n, world):
    shares = [shard_bounds(n, r, world) for r in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert max(hi - lo for lo, hi in shares) - min(hi - lo for lo, hi in shares) <= 1
