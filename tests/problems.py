"""Random `trace_loss` problems and the fp64 comparison every implementation test uses."""

from __future__ import annotations

import torch

import trace_kernels as tk

# Input dtype and normwise tolerance against fp64 for each implementation. The torch path runs in the
# input's precision, so fp64 inputs isolate its algorithm (agreement ~1e-13: 1e-9 catches any wrong term,
# an O(1) error). Triton computes in fp32 whatever the input: one fp32 rounding per GEMM product and per
# softmax term, sums of a few hundred terms give ~1e-6; we allow 2e-5.
PRECISION = {"torch": (torch.float64, 1e-9), "triton": (torch.float32, 2e-5)}

# Every option of the contract, by name; `make_problem(options=...)` turns a subset on.
ALL_OPTIONS = ("pg_weight", "old_logprobs", "ref_logprobs", "dual_clip", "temperature", "clip", "teacher", "fkl",
               "rkl", "kl_term_clip", "entropy_weight", "ignore", "teacher_weight", "kl_index")


def make_problem(n=23, h=13, v=37, m=None, *, options=ALL_OPTIONS, dtype=torch.float64, seed=0, scale=1.0,
                 device="cpu"):
    """Return (hidden, weight, targets, advantages, kwargs) for trace_loss, drawn fresh from `seed`.

    Log-probs for old/ref are drawn near the current policy's (as in real GRPO) so that ratios straddle
    the clip range instead of all being clipped. m: distilled rows (default n // 3 + 1 with kl_index)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    hidden = randn(n, h) * scale
    weight = randn(v, h) / h**0.5
    targets = torch.randint(0, v, (n,), generator=g)
    advantages = randn(n)
    kw = {}
    options = set(options)
    if "ignore" in options and n > 1:
        targets[torch.rand(n, generator=g) < 0.3] = -7
        kw["ignore_index"] = -7
    temperature = 0.7 if "temperature" in options else 1.0
    if "temperature" in options:
        kw["temperature"] = temperature
    with torch.no_grad():
        logits = hidden @ weight.T / temperature
        logp = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    if "old_logprobs" in options:
        kw["old_logprobs"] = logp + 0.3 * randn(n)
    if "ref_logprobs" in options:
        kw["ref_logprobs"] = logp + 0.5 * randn(n)
        kw["beta"] = 0.05
    if "pg_weight" in options:
        kw["pg_weight"] = torch.rand(n, generator=g, dtype=torch.float64) / n
    if "dual_clip" in options:
        kw["dual_clip"] = 1.5
    if "clip" in options:
        kw["clip_low"], kw["clip_high"] = 0.1, 0.15
    if "entropy_weight" in options:
        kw["entropy_weight"] = -0.01 * torch.rand(n, generator=g, dtype=torch.float64)
    if options & {"teacher", "fkl", "rkl"}:
        if "kl_index" in options:
            m = n // 3 + 1 if m is None else m
            kw["kl_index"] = torch.randint(0, n, (m,), generator=g)
        else:
            m = n
        kw["teacher_hidden"] = hidden[kw["kl_index"]] + 0.5 * randn(m, h) if "kl_index" in options else \
            hidden + 0.5 * randn(n, h)
        if "teacher_weight" in options:
            kw["teacher_weight"] = weight + 0.1 * randn(v, h) / h**0.5
        if "fkl" in options:
            kw["fkl_weight"] = torch.rand(m, generator=g, dtype=torch.float64) / n
        if "rkl" in options:
            kw["rkl_weight"] = torch.rand(m, generator=g, dtype=torch.float64) / n
        if "kl_term_clip" in options:
            kw["kl_term_clip"] = 0.05
    kw = {k: (t.to(device=device, dtype=dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
              else t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in kw.items()}
    return (hidden.to(device, dtype), weight.to(device, dtype), targets.to(device), advantages.to(device, dtype), kw)


def run(impl, hidden, weight, targets, advantages, kw, *, grad=True):
    """trace_loss on fresh leaves; returns the output and (d hidden, d weight) as fp64."""
    h = hidden.detach().clone().requires_grad_(grad)
    w = weight.detach().clone().requires_grad_(grad)
    out = tk.trace_loss(h, w, targets, advantages, impl=impl, **kw)
    if not grad:
        return out, None, None
    gh, gw = torch.autograd.grad(out.loss, [h, w])
    return out, gh.double(), gw.double()


def reference64(hidden, weight, targets, advantages, kw):
    """The materialized reference in fp64 on the same (exactly upcast) inputs."""
    kw64 = {k: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for k, t in kw.items()}
    return run("reference", hidden.double(), weight.double(), targets, advantages.double(), kw64)


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """Normwise relative error max|a - e| / max(max|e|, floor) (exact zeros must match exactly if floor=0)."""
    actual, expected = actual.double(), expected.double()
    denom = max(expected.abs().max().item() if expected.numel() else 0.0, floor)
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / denom if denom > 0 else diff


# Values whose rounding error is absolute, not relative to the value, get a floor under the denominator.
# KL and entropy are sums over V of log-prob differences; each log-prob carries the rounding of its logit,
# ~eps * |z| (|z| up to ~10 here: 1e-6 in fp32), however small the KL itself: floor 0.05 nats. The loss is
# a weighted mean of per-token terms of size ~|A| ~ 1 that can cancel to near 0: floor 0.1. With fp32's
# 2e-5 these allow 1e-6 nats and 2e-6 absolute; with fp64's 1e-9, 5e-11 and 1e-10.
FLOOR = {"entropy": 0.05, "fkl": 0.05, "rkl": 0.05, "loss": 0.1}


def assert_matches_reference(impl, problem, *, tol, grad=True):
    """Values (loss, logprobs, entropy, fkl, rkl) and gradients of `impl` against fp64 within `tol`."""
    hidden, weight, targets, advantages, kw = problem
    out, gh, gw = run(impl, hidden, weight, targets, advantages, kw, grad=grad)
    ref, rgh, rgw = reference64(hidden, weight, targets, advantages, kw)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss), out.loss
    checks = {"loss": (out.loss, ref.loss), "logprobs": (out.logprobs, ref.logprobs),
              "entropy": (out.entropy, ref.entropy)}
    if ref.fkl is not None:
        checks["fkl"], checks["rkl"] = (out.fkl, ref.fkl), (out.rkl, ref.rkl)
    else:
        assert out.fkl is None and out.rkl is None
    if grad:
        checks["grad_hidden"], checks["grad_weight"] = (gh, rgh), (gw, rgw)
    for name, (a, e) in checks.items():
        assert a.shape == e.shape, (name, a.shape, e.shape)
        err = rel_err(a, e, FLOOR.get(name, 0.0))
        assert err <= tol, f"{impl} {name}: relative error {err:.3g} > {tol:.3g}"
    for name in ("logprobs", "entropy"):
        assert getattr(out, name).dtype == torch.float32
        assert (getattr(out, name)[targets == kw.get("ignore_index", -100)] == 0).all()
    return out
