"""Evaluation during training (data.eval_files, train.eval_every): avg@k / pass@k on the eval problems every few
steps and after the last, in the step's metrics; 2 FSDP ranks score what one process scores, also when a rank's
share of the problems is empty (one problem, two ranks: every rank must make as many generate calls)."""

from __future__ import annotations

import json

import pytest
from launch import train

pytest.importorskip("transformers")


@pytest.mark.job
def test_eval_during_training_two_ranks_equal_one_process(tmp_path):
    data = tmp_path / "math.jsonl"
    with open(data, "w") as f:
        for a, b in ((1, 2), (3, 4)):
            f.write(json.dumps({"problem": f"what is {a}+{b}", "solution": f"{a}+{b}={a + b}", "answer": a + b}) + "\n")
    args = ["--config", "toy", "data.task=math", f"data.train_files={data}", f"data.eval_files={data}",
            "trace.annotator=self", "train.max_steps=3", "train.eval_every=2", "train.eval_k=3",
            "train.eval_problems=1", "train.prompts_per_step=2", "train.rollouts_per_prompt=2",
            "train.max_new_tokens=6", "train.export_hf=false"]
    one = train(tmp_path / "one", 1, args)
    two = train(tmp_path / "two", 2, args)
    evaluated = [r["step"] for r in one if "eval_avg_at_k" in r]
    assert evaluated == [1, 2]  # every 2 steps (after step index 1) and after the last
    for a, b in zip(one, two):
        for k in ("eval_avg_at_k", "eval_pass_at_k", "eval_response_length", "eval_truncated", "eval_problems"):
            assert a.get(k) == b.get(k), (a["step"], k)
    assert one[-1]["eval_problems"] == 1 and one[-1]["eval_k"] == 3
