"""Every loss-changing `GRPOConfig` option of TRL 1.16 in `TraceGRPOTrainer`, against TRL's own
`GRPOTrainer._compute_loss` on the same micro-batch (masked tokens, off-policy old log-probs).

Most of these options have no `trace_loss` term of their own and go through the prepass
(trl_loss.fused_path): the log-probs measured without gradient, TRL's loss differentiated in closed form,
then `trace_loss` on-policy; vLLM's ratio without a KL term and the MoE aux loss stay in the fused pass.
The two trainers compute the same sums in different orders, each term rounded once in fp32 (eps 6e-8)
over a few hundred summands, so ~1e-6 relative (the largest measured over CASES: 1.0e-6); we allow 2e-5
of each gradient's largest entry (as tests/test_trl_grpo.py), and of the loss or, where its terms cancel,
of their size. A wrong mask, weight, clip or normaliser is O(1) in some gradient entry.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from trl import GRPOTrainer  # noqa: E402
from trl_setup import (  # noqa: E402
    PROMPTS,
    assert_logs_agree,
    loss_and_grads,
    make_trainer,
    random_batch,
    save_tiny_model,
)

from trace_train.integrations.trl import TraceGRPOTrainer  # noqa: E402

TOL = 2e-5
METRICS = ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
           "clip_ratio/high_max", "kl", "policy_loss", "entropy_coef", "cispo_clip_ratio", "vespo/phi_seq_mean",
           "aux_loss")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def _save_seeded(model_cls, config, tok, folder) -> str:
    """The model built from `config` under seed 0 (the caller's RNG untouched), saved with `tok` to `folder`."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_cls(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    """A tiny Qwen3-MoE (4 experts, top 2) with the character tokenizer, saved like the dense one."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from trace_train.model import build_char_tokenizer

    folder = tmp_path_factory.mktemp("moe")
    tok = build_char_tokenizer()
    config = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
                            tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            bos_token_id=None)
    return _save_seeded(Qwen3MoeForCausalLM, config, tok, folder)


@pytest.fixture(scope="module")
def gpt_oss_path(tmp_path_factory):
    """A tiny GPT-OSS (4 experts, top 2, sliding and full attention, untied head), whose config enables the
    aux loss by default (router_aux_loss_coef 0.001)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    from trace_train.model import build_char_tokenizer

    folder = tmp_path_factory.mktemp("gpt_oss")
    tok = build_char_tokenizer()
    config = GptOssConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                          sliding_window=8, max_position_embeddings=512, tie_word_embeddings=False,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return _save_seeded(GptOssForCausalLM, config, tok, folder)


def _assert_equal(ref, ours, loss_ref, grads_ref, loss, grads, scale):
    """`scale`: the size of the loss's summands (mean |advantage| / accumulation): a sum of signed terms
    that cancel is rounded at the terms' size, not at the sum's."""
    assert torch.isfinite(loss_ref) and loss_ref.abs() > 1e-4
    assert abs(loss.item() - loss_ref.item()) <= TOL * max(abs(loss_ref.item()), scale), (loss.item(), loss_ref.item())
    assert grads.keys() == grads_ref.keys() and len(grads) > 5
    for name, g_ref in grads_ref.items():
        assert g_ref.abs().max() > 0, name
        assert (grads[name] - g_ref).abs().max() <= TOL * g_ref.abs().max(), name
    logged = [k for k in METRICS if k in ref._metrics["train"]]
    assert "entropy" in logged
    for key in logged:
        assert ours._metrics["train"][key] == pytest.approx(ref._metrics["train"][key], rel=1e-4, abs=1e-6), key


def _scale(inputs, accumulation):
    return inputs["advantages"].abs().mean().item() / accumulation


def _measured_logps(trainer, inputs):
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att,
                                                                inputs["completion_ids"].shape[1])
    return logp


def vllm_ratio(old_BT, sampling_BT, mask_BT, mode, clip_min, clip_max):
    """vLLM's importance-sampling ratio as TRL 1.16's `_generate_and_score_completions` hands it to the loss:
    exp(old - sampling) per token, or summed per sequence ([B, 1]); clamped (truncate) or zeroed outside
    [clip_min, clip_max] (mask)."""
    diff = (old_BT - sampling_BT) * mask_BT
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    return ratio.masked_fill((ratio < low) | (ratio > clip_max), 0.0)


CASES = {  # id: (config, accumulation, batch extras)
    "cispo-eps5-beta": (dict(loss_type="cispo", epsilon_high=5.0, beta=0.04), 2, {}),
    "cispo-eps1.1": (dict(loss_type="cispo", epsilon_high=1.1), 1, {}),
    "sapo": (dict(loss_type="sapo"), 1, {}),
    "sapo-beta-nobias": (dict(loss_type="sapo", beta=0.04, use_bias_correction_kl=False), 2, {}),
    "luspo-gspo": (dict(loss_type="luspo", importance_sampling_level="sequence"), 2, {}),
    "luspo-token-beta": (dict(loss_type="luspo", beta=0.04), 1, {}),
    "vespo": (dict(loss_type="vespo"), 2, {}),
    "gspo-grpo-beta": (dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04), 1, {}),
    "gspo-dapo": (dict(loss_type="dapo", importance_sampling_level="sequence"), 1, {}),
    "opsm-dapo": (dict(loss_type="dapo", off_policy_mask_threshold=0.05), 1, {}),
    "opsm-grpo-sampling-logps": (dict(loss_type="grpo", off_policy_mask_threshold=0.05), 2, {"sampling": True}),
    "top-entropy-0.5-bonus": (dict(loss_type="grpo", top_entropy_quantile=0.5, entropy_coef=0.05), 1, {}),
    "top-entropy-0.3-dapo-beta": (dict(loss_type="dapo", top_entropy_quantile=0.3, beta=0.04), 2, {}),
    "delta-1.1-bnpo": (dict(loss_type="bnpo", delta=1.1), 1, {}),
    "delta-1.05-grpo-beta": (dict(loss_type="grpo", delta=1.05, beta=0.04, use_bias_correction_kl=False), 2, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_option_loss_and_gradients_equal_trl(model_path, tmp_path, case):
    config, accumulation, extras = CASES[case]
    config = dict(dict(epsilon=0.2, epsilon_high=0.28), **config)
    ref = make_trainer(GRPOTrainer, model_path, tmp_path / "trl", **config)
    ours = make_trainer(TraceGRPOTrainer, model_path, tmp_path / "ours", **config)
    inputs = random_batch(len(ours._tokenizer), seed=sum(map(ord, case)) % 97)
    logp = _measured_logps(ref, inputs)
    g = torch.Generator().manual_seed(1)
    # ratios spread over and beyond the clip range, so every clip branch and mask value is taken
    inputs["old_per_token_logps"] = logp + 0.4 * torch.randn(logp.shape, generator=g)
    if config.get("beta"):
        inputs["ref_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)
    if extras.get("sampling"):  # vLLM's log-probs, which OPSM prefers; mostly negative advantages
        inputs["sampling_per_token_logps"] = logp + 0.4 * torch.randn(logp.shape, generator=g)
        inputs["advantages"] = -inputs["advantages"]
    loss_ref, grads_ref = loss_and_grads(ref, inputs, accumulation)
    loss, grads = loss_and_grads(ours, inputs, accumulation)
    _assert_equal(ref, ours, loss_ref, grads_ref, loss, grads, _scale(inputs, accumulation))


def test_masks_take_both_values(model_path, tmp_path):
    """The OPSM and entropy-mask cases above are not vacuous: on their batches the masks keep some and drop some."""
    for case in ("opsm-dapo", "opsm-grpo-sampling-logps", "top-entropy-0.5-bonus"):
        config, _, extras = CASES[case]
        ref = make_trainer(GRPOTrainer, model_path, tmp_path / case, **config)
        inputs = random_batch(len(ref._tokenizer), seed=sum(map(ord, case)) % 97)
        logp = _measured_logps(ref, inputs)
        g = torch.Generator().manual_seed(1)
        old = logp + 0.4 * torch.randn(logp.shape, generator=g)
        mask = inputs["completion_mask"].float()
        adv = inputs["advantages"][:, None]
        if case.startswith("opsm"):
            sampling = old
            if extras.get("sampling"):
                sampling, adv = logp + 0.4 * torch.randn(logp.shape, generator=g), -adv
            kept = ref.get_off_policy_mask(adv, logp, sampling, mask, config["off_policy_mask_threshold"])
        else:
            with torch.no_grad():
                ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
                att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
                _, ent, _ = ref._get_per_token_logps_and_entropies(ref.model, ids, att, mask.shape[1],
                                                                   compute_entropy=True)
            kept = ref.get_high_entropy_mask(ent, mask, 0.5)[mask.bool()]
        assert 0 < kept.float().sum() < kept.numel(), (case, kept)


MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@pytest.mark.parametrize("mode,loss_type,beta", [(m, "dapo", 0.0) for m in MODES] + [(m, "grpo", 0.04) for m in MODES]
                         + [(m, "vespo", 0.0) for m in MODES[:2]])
def test_vllm_importance_sampling_modes_equal_trl(model_path, tmp_path, mode, loss_type, beta):
    """vLLM's ratio in each of TRL's modes (token / sequence level, truncate / mask), with a fused loss
    (dapo, beta 0: a pg_weight factor), a prepass one (grpo with bias-corrected k3) and vespo (folded into
    its gamma weights; TRL allows vespo only with the token modes)."""
    config = dict(loss_type=loss_type, beta=beta, vllm_importance_sampling_mode=mode,
                  vllm_importance_sampling_correction=True)
    ref = make_trainer(GRPOTrainer, model_path, tmp_path / "trl", **config)
    ours = make_trainer(TraceGRPOTrainer, model_path, tmp_path / "ours", **config)
    for t in (ref, ours):  # vLLM itself is not run here: the ratio is injected as TRL would hand it over
        t.use_vllm = True
    inputs = random_batch(len(ours._tokenizer), seed=7)
    logp = _measured_logps(ref, inputs)
    g = torch.Generator().manual_seed(3)
    mask = inputs["completion_mask"].float()
    old = logp + 0.3 * torch.randn(logp.shape, generator=g)
    sampling = old + (0.5 if mode.startswith("token") else 0.3) * torch.randn(logp.shape, generator=g)
    clip_min = 0.5 if mode.endswith("mask") else None
    ratio = vllm_ratio(old, sampling, mask, mode, clip_min, 2.0)
    if mode.endswith("mask"):
        assert (ratio == 0).any() and (ratio > 0).any()
    inputs.update(old_per_token_logps=old, sampling_per_token_logps=sampling, importance_sampling_ratio=ratio)
    if beta:
        inputs["ref_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)
    loss_ref, grads_ref = loss_and_grads(ref, inputs, 1)
    loss, grads = loss_and_grads(ours, inputs, 1)
    _assert_equal(ref, ours, loss_ref, grads_ref, loss, grads, _scale(inputs, 1))


@pytest.mark.parametrize("quantile", [1.0, 0.6])
def test_adaptive_entropy_controller_equal_trl_over_steps(model_path, tmp_path, quantile):
    """The controller is stateful: each optimizer step's entropy moves entropy_coef for the next, and the
    bonus applies only while the last step's entropy is at or below the target. Five steps on different
    batches, with a target between the batches' entropies, so the gate opens and closes; with all tokens
    (the fused pass) and with the high-entropy ones (the prepass; the controller measures those)."""
    config = dict(loss_type="grpo", use_adaptive_entropy=True, entropy_coef=0.02, entropy_coef_delta=0.01,
                  top_entropy_quantile=quantile, entropy_target=float("nan"))
    ref = make_trainer(GRPOTrainer, model_path, tmp_path / "trl", **{**config, "entropy_target": 0.2})
    batches = [random_batch(len(ref._tokenizer), seed=20 + i) for i in range(5)]
    entropies = []
    for inputs in batches:
        with torch.no_grad():
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            _, ent, _ = ref._get_per_token_logps_and_entropies(ref.model, ids, att, 7, compute_entropy=True)
        mask = inputs["completion_mask"].bool()
        entropies.append(ent[mask].mean().item())
    # the high-entropy tokens' mean sits above the all-token mean: a target that makes the gate flip
    target = sorted(entropies)[2] + (0.3 if quantile < 1 else 0.0)
    config["entropy_target"] = target
    ref = make_trainer(GRPOTrainer, model_path, tmp_path / "trl", **config)
    ours = make_trainer(TraceGRPOTrainer, model_path, tmp_path / "ours", **config)
    gates = []
    for inputs in batches:
        gates.append(ref._last_world_entropy <= target)
        loss_ref, grads_ref = loss_and_grads(ref, inputs, 1)
        loss, grads = loss_and_grads(ours, inputs, 1)
        _assert_equal(ref, ours, loss_ref, grads_ref, loss, grads, _scale(inputs, 1))
        assert ours.entropy_coef == pytest.approx(ref.entropy_coef, abs=1e-12)
        assert ours._last_world_entropy == pytest.approx(ref._last_world_entropy, rel=1e-5)
    assert any(gates) and not all(gates), (gates, ref._metrics["train"]["entropy_coef"])
    assert len(set(ref._metrics["train"]["entropy_coef"])) > 1


@pytest.mark.parametrize("family,loss_type,accumulation,coef", [("moe", "grpo", 2, 0.5), ("moe", "dapo", 1, 0.5),
                                                                 ("gpt_oss", "grpo", 1, None)])
def test_router_aux_loss_equal_trl(request, tmp_path, family, loss_type, accumulation, coef):
    """Qwen3-MoE and GPT-OSS (its own default coefficient): TRL adds router_aux_loss_coef x the load-balancing
    loss of the router logits (scaled for accumulation)."""
    path = request.getfixturevalue(f"{family}_path")
    config = dict(loss_type=loss_type, router_aux_loss_coef=coef, beta=0.04 if loss_type == "dapo" else 0.0,
                  use_bias_correction_kl=False)
    ref = make_trainer(GRPOTrainer, path, tmp_path / "trl", **config)
    ours = make_trainer(TraceGRPOTrainer, path, tmp_path / "ours", **config)
    assert ref.aux_loss_enabled and ours.aux_loss_enabled
    inputs = random_batch(len(ours._tokenizer), seed=11)
    logp = _measured_logps(ref, inputs)
    g = torch.Generator().manual_seed(4)
    inputs["old_per_token_logps"] = logp + 0.4 * torch.randn(logp.shape, generator=g)
    if config["beta"]:
        inputs["ref_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)
    loss_ref, grads_ref = loss_and_grads(ref, inputs, accumulation)
    loss, grads = loss_and_grads(ours, inputs, accumulation)
    _assert_equal(ref, ours, loss_ref, grads_ref, loss, grads, _scale(inputs, accumulation))
    assert ours._metrics["train"]["aux_loss"][-1] > 0
    router = [n for n in grads_ref if "gate.weight" in n or "router.weight" in n]
    assert router, "the router gets the aux loss's gradient"


CHAT_ROWS = {"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]}
RUNS = {  # a union of the options above, each trained a few steps by both trainers
    # conversational prompts (the tokenizer's chat template), the dense model
    "sapo-gspo-opsm-entropy": ("dense", dict(dataset_rows=CHAT_ROWS, loss_type="sapo",
                                            importance_sampling_level="sequence", off_policy_mask_threshold=0.02,
                                            top_entropy_quantile=0.5, use_adaptive_entropy=True, entropy_coef=0.01,
                                            entropy_target=5.0, beta=0.04, num_iterations=2)),
    # SGD: Adam divides each entry by sqrt(v) + 1e-8, so the entries of experts that got almost no tokens
    # (gradients near round-off) move by amounts set by round-off; SGD's update is lr x the gradient.
    "cispo-moe-aux": ("moe", dict(loss_type="cispo", epsilon_high=1.2, router_aux_loss_coef=0.1,
                                  gradient_accumulation_steps=2, steps_per_generation=2, optim="sgd",
                                  learning_rate=0.5)),
}


@pytest.mark.cpu_outcome
@pytest.mark.parametrize("run", list(RUNS))
def test_few_steps_train_like_trl(model_path, moe_path, tmp_path, run):
    """Both trainers train 3 optimizer steps from the same model and seed: the same completions (TRL's own
    generation), so every logged metric agrees to 1e-4 relative, and the parameters move the same way."""
    kind, config = RUNS[run]
    path = model_path if kind == "dense" else moe_path
    trainers = []
    for cls in (GRPOTrainer, TraceGRPOTrainer):  # built and trained in turn: each __init__ seeds the RNG
        trainers.append(make_trainer(cls, path, tmp_path / cls.__name__, max_steps=3, **config))
        if cls is GRPOTrainer:
            before = {n: p.detach().clone() for n, p in trainers[0].model.named_parameters()}
        trainers[-1].train()
    logs = [[h for h in t.state.log_history if "loss" in h] for t in trainers]
    assert_logs_agree(*logs, steps=3)
    params = [dict(t.model.named_parameters()) for t in trainers]
    moved = [n for n, p in params[0].items() if not torch.equal(p, before[n])]
    assert len(moved) > 5
    worst = 0.0
    for name in moved:
        delta_ref = params[0][name].detach() - before[name]
        delta = params[1][name].detach() - before[name]
        worst = max(worst, ((delta - delta_ref).norm() / delta_ref.norm()).item())
    assert worst <= 1e-4  # per tensor, normwise; measured 5.5e-6 (Adam, dense) and 4.7e-6 (SGD, MoE)
    assert ("aux_loss" in logs[1][0]) == (kind == "moe")
