"""loss.beta > 0: a frozen reference policy (the initial weights) and the k3 penalty through trace_loss's
ref_logprobs. At step 0 the policy is the reference: k3 and its gradient vanish, so the step equals beta = 0's;
the update is the same, so at step 1 the two runs score the same rollouts and their losses differ by exactly
beta * kl_ref (GRPO with token-mean weights: every token has pg_weight 1/n). The untrained toy model earns no
reward (zero advantages), so the policy moves away from the reference by AdamW's weight decay alone."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from trace_train.config import load_config  # noqa: E402
from trace_train.memory_plan import ARCHS, plan  # noqa: E402
from trace_train.train import run  # noqa: E402

BASE = ["train.algorithm=grpo", "train.max_steps=2", "train.prompts_per_step=2", "train.rollouts_per_prompt=4",
        "train.max_new_tokens=8", "train.export_hf=false", "train.lr=5e-2", "train.weight_decay=1.0"]


def test_beta_adds_exactly_beta_times_kl_ref(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    beta = 0.5
    plain = run(load_config("toy", [*BASE, f"train.output_dir={tmp_path / 'plain'}"]))
    with_ref = run(load_config("toy", [*BASE, f"train.output_dir={tmp_path / 'ref'}", f"loss.beta={beta}"]))
    assert plain[0]["kl_ref"] is None and with_ref[0]["kl_ref"] == 0.0
    assert with_ref[0]["loss"] == plain[0]["loss"] and with_ref[0]["grad_norm"] == plain[0]["grad_norm"]
    step1 = with_ref[1]
    assert step1["kl_ref"] > 1e-5 and step1["response_length"] == plain[1]["response_length"]
    assert step1["loss"] - plain[1]["loss"] == pytest.approx(beta * step1["kl_ref"], rel=1e-5)


def test_the_reference_policy_is_in_the_memory_plan():
    cfg = load_config("qwen3-8b-trace-fkl")
    with_ref = plan(load_config("qwen3-8b-trace-fkl", ["loss.beta=0.04"]), ARCHS["qwen3-8b"], 8)
    without = plan(cfg, ARCHS["qwen3-8b"], 8)
    extra = with_ref["training_total"] - without["training_total"]
    assert with_ref["components"]["reference policy for loss.beta (sharded)"] == ARCHS["qwen3-8b"].params() * 4 / 8
    assert extra > with_ref["components"]["reference policy for loss.beta (sharded)"]  # + its forward
    assert with_ref["rollout_resident"] - without["rollout_resident"] == ARCHS["qwen3-8b"].params() * 4 / 8
