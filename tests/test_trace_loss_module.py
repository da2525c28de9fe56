"""`TraceLoss` (padded [B, T] and flat forms) against the materialized fp64 reference of `trace_loss`.

The reference is built by hand from the padded inputs (flatten, mask -> ignore_index, compact the span
rows), so a wrong reshape, a mask applied to the wrong rows or a span row sent to the wrong student row
shows up as an O(1) error. Tolerances as in test_contract.py: 1e-9 in fp64, 2e-5 in fp32.
"""

from __future__ import annotations

import pytest
import torch
from problems import rel_err

import trace_kernels as tk

TOL = {torch.float64: 1e-9, torch.float32: 2e-5}
OPTIONS = dict(beta=0.04, clip_low=0.2, clip_high=0.28, dual_clip=3.0, temperature=0.8, kl_term_clip=0.05)


def padded_problem(b, t, h, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    hidden = randn(b, t, h)
    weight = randn(v, h) / h**0.5
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) < 0.7
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T / OPTIONS["temperature"], -1).gather(-1, targets[..., None])[..., 0]
    batch = dict(
        advantages=randn(b), old_logprobs=logp + 0.2 * randn(b, t), ref_logprobs=logp + 0.3 * randn(b, t),
        pg_weight=torch.rand(b, t, generator=g, dtype=torch.float64) / (b * t),
        entropy_weight=-0.01 * torch.rand(b, t, generator=g, dtype=torch.float64),
        teacher_hidden=hidden + 0.5 * randn(b, t, h), span_mask=torch.rand(b, t, generator=g) < 0.4,
        fkl_weight=torch.rand(b, t, generator=g, dtype=torch.float64), rkl_weight=torch.rand(b, t, generator=g,
                                                                                              dtype=torch.float64))
    batch = {k: x.to(dtype) if x.is_floating_point() else x for k, x in batch.items()}
    return hidden.to(dtype), weight.to(dtype), targets, mask, batch


def reference(hidden, weight, targets, mask, batch):
    """The same loss through the flat materialized reference, in fp64."""
    b, t, h = hidden.shape
    flat_targets = torch.where(mask, targets, -100).reshape(-1)
    span = batch["span_mask"].reshape(-1)
    idx = span.nonzero().squeeze(1)
    hr, wr = hidden.double().clone().requires_grad_(), weight.double().clone().requires_grad_()
    out = tk.trace_loss(
        hr.reshape(-1, h), wr, flat_targets, batch["advantages"].double()[:, None].expand(b, t).reshape(-1),
        pg_weight=batch["pg_weight"].double().reshape(-1), old_logprobs=batch["old_logprobs"].double().reshape(-1),
        ref_logprobs=batch["ref_logprobs"].double().reshape(-1),
        entropy_weight=batch["entropy_weight"].double().reshape(-1),
        teacher_hidden=batch["teacher_hidden"].double().reshape(-1, h)[idx], kl_index=idx,
        fkl_weight=batch["fkl_weight"].double().reshape(-1)[idx],
        rkl_weight=batch["rkl_weight"].double().reshape(-1)[idx], impl="reference", **OPTIONS)
    out.loss.backward()
    return out, idx, hr.grad, wr.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,t", [(1, 1), (3, 7), (4, 1)], ids=str)
def test_padded_batch_with_span_mask(dtype, b, t):
    hidden, weight, targets, mask, batch = padded_problem(b, t, 9, 31, dtype, seed=b * 10 + t)
    mask[0, 0] = True
    ref, idx, gh_ref, gw_ref = reference(hidden, weight, targets, mask, batch)
    h_, w_ = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = tk.TraceLoss(impl="torch", **OPTIONS)(h_, w_, targets, batch.pop("advantages"), mask=mask, **batch)
    out.loss.backward()
    tol = TOL[dtype]
    assert abs(out.loss.item() - ref.loss.item()) <= tol * max(abs(ref.loss.item()), 1e-3)
    assert out.logprobs.shape == out.entropy.shape == out.fkl.shape == out.rkl.shape == (b, t)
    assert rel_err(out.logprobs.reshape(-1), ref.logprobs) < max(tol, 2e-6)
    assert rel_err(out.fkl.reshape(-1)[idx], ref.fkl) < max(tol, 2e-6)
    assert torch.all(out.fkl.reshape(-1)[~batch["span_mask"].reshape(-1)] == 0)
    assert rel_err(h_.grad, gh_ref) < tol and rel_err(w_.grad, gw_ref) < tol


def test_kl_index_form_equals_span_mask_form():
    hidden, weight, targets, mask, batch = padded_problem(3, 5, 7, 19, torch.float64, seed=1)
    loss = tk.TraceLoss(impl="torch", **{**OPTIONS, "beta": 0.0})
    a = loss(hidden, weight, targets, batch["advantages"], mask=mask, teacher_hidden=batch["teacher_hidden"],
             span_mask=batch["span_mask"], fkl_weight=batch["fkl_weight"])
    idx = batch["span_mask"].reshape(-1).nonzero().squeeze(1)
    b = loss(hidden, weight, targets, batch["advantages"], mask=mask,
             teacher_hidden=batch["teacher_hidden"].reshape(-1, 7)[idx], kl_index=idx,
             fkl_weight=batch["fkl_weight"].reshape(-1)[idx])
    assert torch.allclose(a.loss, b.loss, rtol=1e-12, atol=0)
    assert torch.equal(a.fkl.reshape(-1)[idx], b.fkl)


def test_flat_rows_are_trace_loss():
    hidden, weight, targets, mask, batch = padded_problem(2, 6, 5, 13, torch.float64, seed=2)
    h, t, adv = hidden.reshape(12, 5), targets.reshape(12), batch["advantages"].repeat_interleave(6)
    out = tk.TraceLoss(impl="torch", beta=0.0)(h, weight, t, adv, mask=mask.reshape(12))
    ref = tk.trace_loss(h, weight, torch.where(mask.reshape(12), t, -100), adv, impl="reference")
    assert abs(out.loss.item() - ref.loss.item()) < 1e-12 and out.logprobs.shape == (12,)


def test_kl_clip_mode_is_an_option():
    """TraceLoss(kl_clip_mode=...) reaches trace_loss: each mode equals the reference in that mode."""
    hidden, weight, targets, mask, batch = padded_problem(2, 6, 5, 13, torch.float64, seed=3)
    h, t, adv = hidden.reshape(12, 5), targets.reshape(12), batch["advantages"].repeat_interleave(6)
    kl = dict(teacher_hidden=batch["teacher_hidden"].reshape(12, 5), kl_index=torch.arange(12),
              fkl_weight=batch["fkl_weight"].reshape(12), rkl_weight=batch["rkl_weight"].reshape(12))
    losses = {}
    for mode in ("value", "grad"):
        h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
        out = tk.TraceLoss(impl="torch", kl_term_clip=0.01, kl_clip_mode=mode)(h1, weight, t, adv, **kl)
        ref = tk.trace_loss(h2, weight, t, adv, kl_term_clip=0.01, kl_clip_mode=mode, impl="reference", **kl)
        (g1,), (g2,) = torch.autograd.grad(out.loss, h1), torch.autograd.grad(ref.loss, h2)
        assert rel_err(out.loss, ref.loss) < 1e-9 and rel_err(g1, g2) < 1e-9
        losses[mode] = out.loss.item()
    assert abs(losses["value"] - losses["grad"]) > 1e-3


def test_all_tokens_masked_gives_zero_loss_and_gradients():
    hidden, weight, targets, mask, batch = padded_problem(2, 3, 4, 6, torch.float64, seed=3)
    h_ = hidden.clone().requires_grad_()
    out = tk.TraceLoss(impl="torch")(h_, weight, targets, batch["advantages"], mask=torch.zeros_like(mask))
    out.loss.backward()
    assert out.loss.item() == 0 and torch.all(h_.grad == 0)


def test_bad_input_names_the_argument():
    hidden, weight, targets, mask, batch = padded_problem(2, 3, 4, 6, torch.float32, seed=4)
    loss = tk.TraceLoss()
    with pytest.raises(ValueError, match="mask"):
        loss(hidden, weight, targets, batch["advantages"], mask=mask[:, :2])
    with pytest.raises(ValueError, match="advantages"):
        loss(hidden, weight, targets, batch["advantages"][:1])
    with pytest.raises(ValueError, match="span_mask"):
        loss(hidden, weight, targets, batch["advantages"], teacher_hidden=batch["teacher_hidden"])
    with pytest.raises(ValueError, match="teacher_hidden"):
        loss(hidden, weight, targets, batch["advantages"], teacher_hidden=batch["teacher_hidden"][:1],
             span_mask=batch["span_mask"])
    with pytest.raises(ValueError, match="need teacher_hidden"):
        loss(hidden, weight, targets, batch["advantages"], span_mask=batch["span_mask"])
    with pytest.raises(ValueError, match="hidden"):
        loss(hidden[0, 0], weight, targets, batch["advantages"])
    for bad in ({"temperature": -1.0}, {"dual_clip": 0.5}, {"clip_low": -0.1}, {"beta": -1.0},
                {"kl_term_clip": float("nan")}, {"impl": "cuda"}, {"ignore_index": 1.5}, {"kl_clip_mode": "both"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tk.TraceLoss(**bad)
