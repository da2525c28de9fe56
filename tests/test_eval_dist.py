"""trace_train.eval under torchrun: problems sharded across ranks, results gathered, equal to one process."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from launch import launch  # noqa: E402

from trace_train import eval as ev  # noqa: E402
from trace_train.config import ModelConfig  # noqa: E402
from trace_train.dist import Dist  # noqa: E402
from trace_train.model import build_char_tokenizer, build_tiny_model  # noqa: E402
from trace_train.rollout import Rollouts  # noqa: E402
from trace_train.tasks import ArithTask  # noqa: E402


class FakeEngine:
    """Answers each rollout from its seed alone (as the real engines do), recording what it was asked."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def generate(self, prompts, k, seeds):
        self.calls.append((prompts, list(seeds)))
        responses = [self.tok(f";{s % 10}", add_special_tokens=False)["input_ids"][: 1 + s % 2] for s in seeds]
        return Rollouts([p for p in prompts for _ in range(k)], responses, [torch.zeros(len(r)) for r in responses],
                        [s % 3 > 0 for s in seeds])


def test_evaluate_shards_by_rank_and_gathers_in_order(monkeypatch):
    tok = build_char_tokenizer()
    task = ArithTask(1, 1)
    examples = task.examples(0, 0, 7)
    one_engine = FakeEngine(tok)
    one = ev.evaluate(one_engine, tok, task, examples, k=2, seed=5, prompts_per_batch=3)
    all_seeds = [s for _, seeds in one_engine.calls for s in seeds]
    engines = [FakeEngine(tok), FakeEngine(tok)]
    shares = [ev.score_share(engines[r], tok, task, examples, 2, 5, *ev.shard_bounds(7, r, 2), prompts_per_batch=3)
              for r in (0, 1)]
    # each rank generated only its own problems (3 and 4 of 7), with the seeds one process gives them
    assert [len(p) for e in engines for p, _ in e.calls] == [3, 3, 1]
    assert [s for _, seeds in engines[0].calls for s in seeds] == all_seeds[:6]
    assert [s for _, seeds in engines[1].calls for s in seeds] == all_seeds[6:]

    def fake_gather(out, obj):  # gloo's all_gather_object as rank 1 sees it
        assert obj == shares[1]
        out[:] = shares

    monkeypatch.setattr(torch.distributed, "all_gather_object", fake_gather)
    two = ev.evaluate(FakeEngine(tok), tok, task, examples, k=2, seed=5, prompts_per_batch=3, d=Dist(1, 2))
    assert two == one and one["problems"] == 7
    assert 0 < one["avg_at_k"] < 1 or 0 < one["truncated"] < 1  # the fake's answers vary: the order matters


def _eval(model_dir, out, nproc):
    args = ["--model", str(model_dir), "--arith-ops", "1-2", "--problems", "7", "--k", "2", "--max-new-tokens", "10",
            "--temperature", "1.0", "--engine", "hf", "--out", str(out)]
    launch("trace_train.eval", args, nproc)
    return json.loads(open(out).read())


def test_eval_two_ranks_gloo_equal_one_process(tmp_path):
    """7 problems on 2 ranks (3 + 4): the gathered scores equal one process's. Each rollout samples with its
    own seed, so only round-off of other left-padding widths could differ, far from flipping a sampled token
    of this tiny model (which would change the lengths, compared exactly)."""
    tok = build_char_tokenizer()
    build_tiny_model(ModelConfig(), tok, seed=3).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    one = _eval(tmp_path / "m", tmp_path / "one.json", 1)
    two = _eval(tmp_path / "m", tmp_path / "two.json", 2)
    assert one["problems"] == two["problems"] == 7
    assert two == one
    assert 0 < one["response_length"]
