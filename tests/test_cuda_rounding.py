"""16-bit gradients at a realistic N with CUDA's roundings forced on the CPU (trace_kernels._gemm.EMULATE_CUDA):
dz rounded to the input dtype before the d hidden / d weight GEMMs, whose products are exact 16-bit products
summed in fp32, the rounding done in torch, outside the kernels (the Triton interpreter truncates 16-bit
casts). Elementwise metrics against fp64, on every entry above 1e-3 of the largest.

Why N matters: with the default pg_weight 1/N, dz = g (onehot - p) has entries near (1/N) p; at N 16,384 and
V 8,192 most are below fp16's smallest normal (6e-5) and many below its smallest subnormal (6e-8). Rounded to
fp16 unscaled they flush or lose their bits (measured here: 39% of d hidden and 30% of d weight entries off by
more than 10%); each chunk's dz is therefore scaled by a power of two before the cast and unscaled through
the GEMM outputs (_chunk.dz_scale), and the fp16 gradients are rounded only after the incoming gradient, a
loss scale, has multiplied them: the test backpropagates 2^16, as a GradScaler would.

Tolerances. bf16 rounds each dz entry to 8 bits (2^-9 relative): measured median elementwise error 1.7e-3
(d hidden) and 1.9e-3 (d weight), with 0.0% and 0.06% of entries off by more than 10%; fp16 (11 bits, scaled)
2.1e-4 and 2.2e-4, none off by more than 10%. We allow twice the bf16 figures for both dtypes' medians
(4e-3), and 0.5% of entries beyond 10% for bf16, 0.1% for fp16: the unscaled fp16 path misses both by
far (test_unscaled_fp16_fails). The reference is impl="torch" in fp64 on the same 16-bit values (it agrees
with the materialized reference to 1e-9: tests/test_contract.py), which keeps [N, V] fp64 tensors out of memory.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from problems import make_problem

import trace_kernels as tk
from trace_kernels import _gemm, rows_torch

LOSS_SCALE = 2.0**16
MEDIAN_TOL = 4e-3
FAR_TOL = {torch.bfloat16: 5e-3, torch.float16: 1e-3}
triton_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on the CPU interpreter")


# The logit map on (trace_loss's logit_scale, logit_softcap, bias): its slope multiplies dz before the rounding.
LOGIT_MAP = dict(logit_scale=1.5, logit_softcap=2.0)


def _problem(n, dtype, pg_weight=None, logit_map=False):
    hidden, weight, targets, adv, kw = make_problem(n=n, h=64, v=8192, options=("old_logprobs",),
                                                    dtype=torch.float64, seed=0)
    if pg_weight is not None:
        kw["pg_weight"] = torch.full((n,), pg_weight, dtype=torch.float64)
    if logit_map:
        kw.update(LOGIT_MAP, bias=torch.randn(8192, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    kw16 = {k: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for k, t in kw.items()}
    return hidden.to(dtype), weight.to(dtype), targets, adv, kw16


def _grads(impl, hidden, weight, targets, adv, kw, *, emulate):
    """(d hidden, d weight) and, with a bias in kw, d bias, as fp64."""
    leaves = [hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)]
    kw = dict(kw)
    if kw.get("bias") is not None:
        kw["bias"] = kw["bias"].detach().clone().requires_grad_(True)
        leaves.append(kw["bias"])
    previous, _gemm.EMULATE_CUDA = _gemm.EMULATE_CUDA, emulate
    try:
        with tk.chunk_rows(953):  # an H100's chunks
            out = tk.trace_loss(leaves[0], leaves[1], targets, adv, impl=impl, **kw)
            grads = torch.autograd.grad(out.loss * LOSS_SCALE, leaves)
    finally:
        _gemm.EMULATE_CUDA = previous
    assert all(g.dtype == x.dtype for g, x in zip(grads, leaves))
    return tuple(g.double() / LOSS_SCALE for g in grads)


def _elementwise(a, e):
    big = e.abs() > 1e-3 * e.abs().max()
    r = ((a - e).abs() / e.abs())[big]
    return r.median().item(), (r > 0.1).double().mean().item()


@functools.cache
def _case(dtype, n, pg_weight=None, logit_map=False):
    """The problem and its fp64 gradients (computed once per case: the fp64 run is most of a test's time)."""
    hidden, weight, targets, adv, kw = _problem(n, dtype, pg_weight, logit_map)
    kw64 = {k: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for k, t in kw.items()}
    return (hidden, weight, targets, adv, kw), _grads("torch", hidden.double(), weight.double(), targets, adv, kw64,
                                                      emulate=False)


def _check(impl, dtype, n, pg_weight=None, logit_map=False):
    (hidden, weight, targets, adv, kw), expected = _case(dtype, n, pg_weight, logit_map)
    grads = _grads(impl, hidden, weight, targets, adv, kw, emulate=True)
    assert len(grads) == len(expected) == (3 if logit_map else 2)
    for name, a, e in zip(("d hidden", "d weight", "d bias"), grads, expected):
        median, far = _elementwise(a, e)
        assert median < MEDIAN_TOL and far < FAR_TOL[dtype], (name, median, far)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_path_at_16k_rows(dtype):
    _check("torch", dtype, 16384)


@triton_only
def test_triton_path_fp16_at_16k_magnitudes():
    """The Triton kernels in a shorter run: 512 rows with the pg_weight of 16,384 (the magnitudes that
    underflow are those of 1/16,384); the full 16,384 rows run in the heavy CI job (the interpreter takes
    minutes)."""
    _check("triton", torch.float16, 512, pg_weight=1 / 16384)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=[triton_only, pytest.mark.heavy])])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logit_map_at_16k_magnitudes(impl, dtype):
    """The same bounds with a logit scale, a softcap and a bias (d bias too: the column sums of the rounded dz),
    512 rows at the pg_weight of 16,384 (the Triton kernels in the heavy job: a minute each in the interpreter)."""
    _check(impl, dtype, 512, pg_weight=1 / 16384, logit_map=True)


@pytest.mark.heavy
@triton_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_path_at_16k_rows(dtype):
    _check("triton", dtype, 16384)


def test_unscaled_fp16_fails(monkeypatch):
    """Without the per-chunk scale, the same check fails: the metric sees the underflow."""
    monkeypatch.setattr(rows_torch, "dz_scale", lambda *args, **kwargs: torch.ones((), dtype=torch.float32))
    with pytest.raises(AssertionError, match="d hidden"):
        _check("torch", torch.float16, 16384)
