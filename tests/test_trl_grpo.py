"""`TraceGRPOTrainer` with a plain `GRPOConfig` against TRL's own `GRPOTrainer._compute_loss`.

Both trainers load the same tiny Qwen3 from one folder and score the same micro-batch. The loss and
every parameter gradient must agree to fp32 round-off: the two compute the same sums in different
orders (TRL: [B, T] tensors and a chunked head; here: trace_loss's closed-form gradient), each term
rounded once in fp32 (eps 6e-8) over a few hundred summands, so ~1e-6 relative; we allow 2e-5 of each
tensor's largest entry. A wrong weight, a missing term or a mis-scaled accumulation is O(1).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from trl import GRPOTrainer  # noqa: E402
from trl_setup import loss_and_grads, make_trainer, random_batch, save_tiny_model  # noqa: E402

from trace_train.integrations.trl import TraceGRPOTrainer  # noqa: E402
from trace_train.integrations.trl_loss import unsupported_options  # noqa: E402

TOL = 2e-5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


CASES = [  # loss_type, beta, delta, accumulation, off-policy old log-probs, extra config
    ("grpo", 0.0, None, 1, False, {}),
    ("bnpo", 0.0, None, 1, False, {}),
    ("dr_grpo", 0.0, None, 1, False, {}),
    ("dapo", 0.0, None, 1, False, {}),
    ("grpo", 0.04, 1.5, 2, True, {}),
    ("bnpo", 0.04, 1.5, 2, True, {}),
    ("dr_grpo", 0.04, None, 2, True, {}),
    ("dapo", 0.04, 1.5, 3, True, {"steps_per_generation": 3, "gradient_accumulation_steps": 3}),
    ("grpo", 0.04, None, 1, False, {}),  # on-policy, bias-corrected k3 (the prepass)
    ("bnpo", 0.04, 2.0, 2, True, {"use_bias_correction_kl": False}),  # k3 inside trace_loss
    ("dapo", 0.0, 1.5, 1, True, {"temperature": 0.7}),
    ("grpo", 0.04, None, 2, True, {"entropy_coef": 0.05}),  # entropy bonus, through the prepass
    ("dapo", 0.0, None, 2, False, {"entropy_coef": 0.05}),  # entropy bonus as trace_loss's entropy_weight
]


def _case_id(c):
    extra = "".join(f"-{k}" for k in c[5])
    return f"{c[0]}-beta{c[1]}-delta{c[2]}-ga{c[3]}-{'off' if c[4] else 'on'}{extra}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_loss_and_gradients_equal_trl(model_path, tmp_path, case):
    loss_type, beta, delta, accumulation, off_policy, extra = case
    config = dict(loss_type=loss_type, beta=beta, delta=delta, epsilon=0.2, epsilon_high=0.28, **extra)
    ref = make_trainer(GRPOTrainer, model_path, tmp_path / "trl", **config)
    ours = make_trainer(TraceGRPOTrainer, model_path, tmp_path / "ours", **config)
    inputs = random_batch(len(ours._tokenizer), seed=len(loss_type) + int(beta * 100))
    if off_policy or beta:
        with torch.no_grad():
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            logp, _, _ = ref._get_per_token_logps_and_entropies(ref.model, ids, att, ids.shape[1] - 5)
        g = torch.Generator().manual_seed(1)
        if off_policy:  # ratios spread over and beyond the clip range, so every clip branch is taken
            inputs["old_per_token_logps"] = logp + 0.4 * torch.randn(logp.shape, generator=g)
        if beta:
            inputs["ref_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)
    loss_ref, grads_ref = loss_and_grads(ref, inputs, accumulation)
    loss, grads = loss_and_grads(ours, inputs, accumulation)
    assert torch.isfinite(loss_ref) and loss_ref.abs() > 1e-4
    assert abs(loss.item() - loss_ref.item()) <= TOL * abs(loss_ref.item())
    assert grads.keys() == grads_ref.keys() and len(grads) > 5
    for name, g_ref in grads_ref.items():
        assert (grads[name] - g_ref).abs().max() <= TOL * g_ref.abs().max(), name
    for key in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl", "policy_loss",
                "entropy_coef"):
        if key in ref._metrics["train"]:
            assert ours._metrics["train"][key] == pytest.approx(ref._metrics["train"][key], rel=1e-4, abs=1e-6), key


def test_vllm_importance_sampling_ratio_equal_trl(model_path, tmp_path):
    """TRL multiplies the PG term by vLLM's importance-sampling ratio (a pg_weight factor when beta = 0;
    the prepass when beta > 0). The ratio is injected as vLLM would hand it over."""
    for beta in (0.0, 0.04):
        ref = make_trainer(GRPOTrainer, model_path, tmp_path / f"trl{beta}", beta=beta)
        ours = make_trainer(TraceGRPOTrainer, model_path, tmp_path / f"ours{beta}", beta=beta)
        for t in (ref, ours):
            t.use_vllm, t.vllm_importance_sampling_correction = True, True
        inputs = random_batch(len(ours._tokenizer), seed=5)
        g = torch.Generator().manual_seed(2)
        inputs["importance_sampling_ratio"] = 0.5 + torch.rand(inputs["completion_ids"].shape, generator=g)
        if beta:
            inputs["ref_per_token_logps"] = -3 + torch.randn(inputs["completion_ids"].shape, generator=g)
        loss_ref, grads_ref = loss_and_grads(ref, inputs, 1)
        loss, grads = loss_and_grads(ours, inputs, 1)
        assert abs(loss.item() - loss_ref.item()) <= TOL * abs(loss_ref.item())
        for name, g_ref in grads_ref.items():
            assert (grads[name] - g_ref).abs().max() <= TOL * g_ref.abs().max(), name


def test_unsupported_models_are_named(model_path, tmp_path):
    """Softcapping, scales and an LM-head bias are trace_loss options now (tests/test_heads.py: both trainers on
    Gemma 2, Cohere, Granite, Falcon-H1 and a biased head); a transform not verified for the model type is refused,
    naming the config attribute."""
    trainer = make_trainer(TraceGRPOTrainer, model_path, tmp_path)
    model, args = trainer.model, trainer.args
    assert unsupported_options(args, model) == []
    model.config.final_logit_softcapping = 30.0
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    assert unsupported_options(args, model) == []
    model.config.logit_scale = 0.5  # Cohere multiplies by it, MPT's forward ignores it: unknown for Qwen3
    assert any("logit_scale" in e for e in unsupported_options(args, model))
    model.config.logit_scale = 1.0
    model.config.logits_scaling = 8.0  # Granite divides by it, HyperCLOVA X multiplies: unknown for Qwen3
    assert any("logits_scaling" in e for e in unsupported_options(args, model))
    # a model without its modeling module's load_balancing_loss_func has no aux loss to add
    assert any("router_aux_loss_coef" in e for e in unsupported_options(args, model, aux_loss_enabled=True))
    args.loss_type = "not_a_loss"
    assert any("loss_type" in e for e in unsupported_options(args, model))


def test_annotator_without_trace_config_raises(model_path, tmp_path):
    with pytest.raises(ValueError, match="TraceGRPOConfig"):
        make_trainer(TraceGRPOTrainer, model_path, tmp_path, trainer_kwargs=dict(annotator=lambda *a: ([], 0)))


def test_two_grpo_steps_train(model_path, tmp_path):
    trainer = make_trainer(TraceGRPOTrainer, model_path, tmp_path, max_steps=2, beta=0.04)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all(k in logs[0] for k in ("entropy", "kl", "clip_ratio/region_mean", "reward"))
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
