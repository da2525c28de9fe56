"""The sampler / trainer mismatch (trace_train.mismatch): TRL 1.16's four importance-sampling modes against TRL's
own computation written out on padded [B, T] tensors, the correction through trace_loss's advantages against a
materialized fp64 loss (values and gradients, with the k3 penalty, the PPO clip and the dual clip), through the
policy's loss forward, and the metrics' sums against direct formulas."""

from __future__ import annotations

import math

import pytest
import torch

import trace_kernels as tk
from trace_train.mismatch import IS_MODES, Correction, importance_weights, mismatch_sums, summarize


def trl_is_ratio(old_BT, sampling_BT, mask_BT, mode, clip_min, clip_max):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, the vllm_importance_sampling_* block, as written
    there (padded [B, T], completion mask; a [B, 1] ratio for the sequence modes)."""
    per_token_logps_diff = (old_BT - sampling_BT) * mask_BT
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    if mode in ["sequence_mask", "sequence_truncate"]:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    return ratio


def padded(flat_N, lens, fill=0.0):
    out = torch.full((len(lens), max(max(lens), 1)), fill, dtype=flat_N.dtype)
    mask = torch.zeros(out.shape, dtype=torch.bool)
    start = 0
    for b, n in enumerate(lens):
        out[b, :n] = flat_N[start:start + n]
        mask[b, :n] = True
        start += n
    return out, mask


def random_logprobs(lens, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    trainer = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    return trainer + scale * torch.randn(n, generator=g, dtype=torch.float64), trainer


@pytest.mark.parametrize("mode", [m for m in IS_MODES if m != "none"])
@pytest.mark.parametrize("clip_min,clip_max", [(None, 3.0), (0.5, 2.0), (0.8, None), (0.9, 1.1)])
def test_importance_weights_are_trls(mode, clip_min, clip_max):
    lens = [5, 1, 0, 9, 3, 7]
    for scale in (0.01, 0.3):  # both regimes: few and many tokens outside the bounds
        sampler, trainer = random_logprobs(lens, scale, seed=int(scale * 100))
        sampler[3] = float("nan")  # a token the engine could not score: ratio 1, as in TRL
        w = importance_weights(sampler, trainer, lens, mode, clip_min=clip_min, clip_max=clip_max)
        s_BT, mask = padded(sampler, lens)
        t_BT, _ = padded(trainer, lens)
        ref = trl_is_ratio(t_BT, s_BT, mask.double(), mode, clip_min, clip_max)
        ref_N = ref.expand_as(mask)[mask].float()
        assert w.dtype == torch.float32 and w.shape == trainer.shape
        torch.testing.assert_close(w, ref_N, rtol=1e-6, atol=0)
    assert torch.equal(importance_weights(sampler, trainer, lens, "none"), torch.ones(sum(lens)))


def test_importance_weights_errors():
    s, t = random_logprobs([2, 3], 0.1)
    with pytest.raises(ValueError, match="unknown"):
        importance_weights(s, t, [2, 3], "token_clip")
    with pytest.raises(ValueError, match="clip_min or clip_max"):
        importance_weights(s, t, [2, 3], "token_truncate", clip_min=None, clip_max=None)
    with pytest.raises(ValueError, match="lens"):
        importance_weights(s, t, [2, 2], "token_mask")
    with pytest.raises(ValueError, match="same"):
        importance_weights(s[:4], t, [2, 3], "token_mask")


def materialized_pg_loss(h, W, y, A, w, pg, old, ref, beta, clip_low, clip_high, dual_clip):
    """sum_i pg_i (w_i L_pg_i + beta k3_i) from the full logits, fp64: TRL's per-token loss times its importance
    ratio, the k3 penalty added after (unweighted)."""
    logp = torch.log_softmax(h @ W.T, -1).gather(1, y[:, None])[:, 0]
    old = logp.detach() if old is None else old
    r = torch.exp(logp - old)
    pg_loss = torch.maximum(-r * A, -r.clamp(1 - clip_low, 1 + clip_high) * A)
    if dual_clip is not None:
        pg_loss = torch.where(A < 0, torch.minimum(pg_loss, -dual_clip * A), pg_loss)
    k3 = torch.exp(ref - logp) - (ref - logp) - 1
    return (pg * (w * pg_loss + beta * k3)).sum()


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("off_policy", [False, True])
@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_correction_through_the_advantages_is_the_weighted_grpo_term(impl, off_policy, mode):
    """advantages * w gives w * L_pg for every row (w >= 0 commutes with the clip's max and the dual clip's min),
    the k3 penalty untouched: values and gradients against the materialized loss, fp64."""
    torch.manual_seed(0)
    lens = [4, 7, 1, 5]
    n, h_dim, v = sum(lens), 16, 37
    h = torch.randn(n, h_dim, dtype=torch.float64, requires_grad=True)
    W = torch.randn(v, h_dim, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, v, (n,))
    A = torch.randn(n, dtype=torch.float64)
    pg = torch.rand(n, dtype=torch.float64) / n
    ref = -torch.rand(n, dtype=torch.float64) * 4
    with torch.no_grad():
        logp0 = torch.log_softmax(h @ W.T, -1).gather(1, y[:, None])[:, 0]
    old = logp0 + 0.3 * torch.randn(n, dtype=torch.float64) if off_policy else None
    sampler = logp0 + 0.4 * torch.randn(n, dtype=torch.float64)
    w = importance_weights(sampler, logp0 if old is None else old, lens, mode, clip_min=0.8, clip_max=1.25).double()
    assert (w == (1.25 if mode == "token_truncate" else 0)).any() and (w != w[0]).any()
    kw = dict(beta=0.1, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    out = tk.trace_loss(h, W, y, A * w, pg_weight=pg, old_logprobs=old, ref_logprobs=ref, impl=impl, **kw)
    gh, gW = torch.autograd.grad(out.loss, (h, W))
    want = materialized_pg_loss(h, W, y, A, w, pg, old, ref, kw["beta"], kw["clip_low"], kw["clip_high"],
                                kw["dual_clip"])
    rh, rW = torch.autograd.grad(want, (h, W))
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gh, rh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gW, rW, rtol=1e-9, atol=1e-12)


def test_policy_forward_applies_the_correction_from_its_own_logprobs():
    """Policy.forward with a Correction: the weights come from the loss forward's hidden states (one no-grad
    sweep), the loss and every parameter's gradient equal the materialized weighted loss; the weights are kept."""
    pytest.importorskip("transformers")
    from trace_train.config import ModelConfig
    from trace_train.model import build_char_tokenizer, build_tiny_model, make_batch, response_hidden
    from trace_train.policy import Policy

    tok = build_char_tokenizer()
    lm = build_tiny_model(ModelConfig(tiny_layers=1, tiny_hidden=16, tiny_heads=2, dtype="float64"), tok)
    policy = Policy(lm)
    g = torch.Generator().manual_seed(3)
    prompts = [[5, 6, 7], [8, 9]]
    responses = [[10, 11, 12, 13], [14, 15, 16]]
    lens = [len(r) for r in responses]
    batch = make_batch(prompts, responses, tok.pad_token_id, packed=True)
    A = torch.repeat_interleave(torch.tensor([0.7, -1.2], dtype=torch.float64), torch.tensor(lens))
    with torch.no_grad():
        hid = response_hidden(lm, batch)
        logp0 = torch.log_softmax(hid @ policy.lm_head_weight().T / 0.8, -1).gather(1, batch.targets[:, None])[:, 0]
    sampler = (logp0 + 0.2 * torch.randn(logp0.shape, generator=g, dtype=torch.float64)).float()
    corr = Correction(sampler, lens, "token_mask", clip_min=0.8, clip_max=1.25)
    kw = dict(targets=batch.targets, advantages=A, temperature=0.8, impl="torch")
    out = policy(batch, kw, advantage_weights=corr)
    grads = torch.autograd.grad(out.loss, list(policy.parameters()))
    # the weights of the trainer's log-probs (token_logprobs: fp32 statistics), kept as applied
    w_ref = importance_weights(sampler, logp0, lens, "token_mask", clip_min=0.8, clip_max=1.25)
    torch.testing.assert_close(corr.weights_N, w_ref, rtol=1e-5, atol=0)
    w = corr.weights_N.double()
    assert (w == 0).any() and (w > 0).any()
    hid = response_hidden(lm, batch)
    logp = torch.log_softmax(hid @ policy.lm_head_weight().T / 0.8, -1).gather(1, batch.targets[:, None])[:, 0]
    want = (-(w * A * torch.exp(logp - logp.detach())) / logp.numel()).sum()
    for a, b in zip(grads, torch.autograd.grad(want, list(policy.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(out.loss, want.detach(), rtol=1e-10, atol=1e-13)


def test_mismatch_sums_and_summary():
    lens = [3, 0, 4, 2]
    sampler, trainer = random_logprobs(lens, 0.2, seed=5)
    sampler[4] = float("nan")
    w = importance_weights(sampler, trainer, lens, "token_mask", clip_min=0.9, clip_max=1.1)
    sums = mismatch_sums(sampler, trainer, lens, w)
    d = trainer - sampler
    ok = ~torch.isnan(d)
    a = d[ok].abs()
    per_seq = [x for x in (d[0:3].abs(), d[3:7].abs(), d[7:9].abs())]
    seq_max = [x[~torch.isnan(x)].max().item() for x in per_seq]
    tot = {**sums}
    m = summarize(tot, tokens=9, corrected=True)
    assert m["mismatch_logp_abs_mean"] == pytest.approx(a.mean().item())
    assert m["mismatch_logp_abs_max"] == pytest.approx(a.max().item())
    assert m["mismatch_logp_seq_max_mean"] == pytest.approx(sum(seq_max) / 3)
    assert m["mismatch_ratio_mean"] == pytest.approx(torch.exp(d[ok]).mean().item())
    assert m["mismatch_ratio_min"] == pytest.approx(torch.exp(d[ok]).min().item())
    assert m["mismatch_ratio_max"] == pytest.approx(torch.exp(d[ok]).max().item())
    assert m["mismatch_is_weight_mean"] == pytest.approx(w.double().sum().item() / 9)
    assert m["mismatch_is_zeroed_fraction"] == pytest.approx((w == 0).sum().item() / 9)
    assert summarize(tot, tokens=9, corrected=False)["mismatch_is_weight_mean"] is None
    empty = mismatch_sums(torch.zeros(0), torch.zeros(0), [0, 0])
    assert summarize(empty, tokens=0, corrected=True)["mismatch_logp_abs_max"] is None


def test_config_keys_of_the_correction():
    from trace_train.config import load_config

    cfg = load_config("toy", ["loss.is_correction=sequence_mask", "loss.is_clip_min=0.5", "loss.is_clip_max=2"])
    assert (cfg.loss.is_correction, cfg.loss.is_clip_min, cfg.loss.is_clip_max) == ("sequence_mask", 0.5, 2.0)
    assert load_config("toy").loss.is_correction == "none"
    with pytest.raises(ValueError, match="loss.is_correction: unknown"):
        load_config("toy", ["loss.is_correction=tis"])
    with pytest.raises(ValueError, match="loss.is_clip_min"):
        load_config("toy", ["loss.is_correction=token_mask", "loss.is_clip_min=2", "loss.is_clip_max=2"])
    with pytest.raises(ValueError, match="needs loss.is_clip_min or loss.is_clip_max"):
        load_config("toy", ["loss.is_correction=token_truncate", "loss.is_clip_max=0"])
    with pytest.raises(ValueError, match="loss.is_clip_max must be"):
        load_config("toy", ["loss.is_clip_max=-1"])
