"""The d weight accumulators (trace_kernels/_grad_weight.py, gemm_triton.py) against fp64.

The default for bf16 weights, "bf24", sums the chunks' fp32 products in a 24-bit float (the bf16 gradient and
an 8-bit plane) and rounds to bf16 once at the end; "fp32" sums in an fp32 [V, H] buffer and casts at the end.
Both carry the error of that final rounding, at most half a bf16 ulp (2^-9 relative) per entry, plus 2^-16
relative per chunk for bf24: so bf24's error must stay within 2x of fp32's, normwise and elementwise, however
many chunks (measured here: about 1.0x). bf16 accumulation (what cuBLAS's beta = 1 into the bf16 gradient would
do), one rounding per chunk, is the counterexample the measure must see.
"""

from __future__ import annotations

import os

import pytest
import torch
from problems import make_problem, reference64, rel_err, run

import trace_kernels as tk
from trace_kernels._grad_weight import bf24_add_


def _elementwise_median(a, e):
    big = e.abs() > 1e-3 * e.abs().max()
    return ((a - e).abs() / e.abs())[big].median().item()


def _grad_w(problem, mode, rows):
    with tk.grad_weight_accumulator(mode), tk.chunk_rows(rows):
        return run("torch", *problem)[2]


@pytest.mark.parametrize("rows", [4, 64, 300])
def test_bf24_is_within_2x_of_the_fp32_accumulator(rows):
    """Chunks of 4 rows (256 of them), 64 rows and 300 (3 chunks), bf16, against fp64."""
    problem = make_problem(n=1024, h=32, v=300, options=("old_logprobs", "teacher", "fkl", "kl_index"), m=256,
                           dtype=torch.bfloat16, seed=2)
    _, _, rgw = reference64(*problem)
    errs = {mode: (rel_err(_grad_w(problem, mode, rows), rgw), _elementwise_median(_grad_w(problem, mode, rows), rgw))
            for mode in ("bf24", "fp32")}
    assert errs["bf24"][0] <= 2 * errs["fp32"][0] and errs["bf24"][1] <= 2 * errs["fp32"][1], errs
    assert errs["fp32"][0] < 2 * torch.finfo(torch.bfloat16).eps


def test_the_measure_sees_bf16_accumulation():
    """Summing the same products in bf16, one rounding per chunk, errs well beyond 2x of the fp32 accumulator."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(200, 64, generator=g, dtype=torch.float64) for _ in range(64)]
    exact = sum(parts)
    acc = torch.zeros(200, 64, dtype=torch.bfloat16)
    hi, lo = torch.empty(200, 64, dtype=torch.bfloat16), torch.empty(200, 64, dtype=torch.uint8)
    for i, p in enumerate(parts):
        acc = (acc.float() + p.float()).bfloat16()
        bf24_add_(hi, lo, p.float(), i == 0, i == len(parts) - 1)
    fp32 = sum(p.float() for p in parts).bfloat16()
    e_fp32, e_bf16, e_bf24 = (_elementwise_median(t.double(), exact) for t in (fp32, acc, hi))
    assert e_bf16 > 2 * e_fp32 and e_bf24 <= 1.1 * e_fp32, (e_fp32, e_bf16, e_bf24)


def test_bf24_pair_holds_the_sum_to_16_bits():
    g = torch.Generator().manual_seed(1)
    hi, lo = torch.empty(1000, dtype=torch.bfloat16), torch.empty(1000, dtype=torch.uint8)
    total = torch.zeros(1000, dtype=torch.float64)
    for i in range(20):
        p = torch.randn(1000, generator=g) * 10 ** (i % 4)
        total += p.double()
        bf24_add_(hi, lo, p, i == 0, False)
        value = ((hi.view(torch.int16).to(torch.int32) << 16) | (lo.to(torch.int32) << 8)).view(torch.float32)
        # each step rounds to a 16-bit significand: 2^-16 relative, 20 steps of it at most
        assert ((value.double() - total).abs() / total.abs().max()).max() < (i + 1) * 2.0**-16


def test_fp32_option_matches_the_fp32_accumulator_cast_once():
    problem = make_problem(n=200, h=16, v=50, options=("old_logprobs",), dtype=torch.bfloat16, seed=3)
    gw = _grad_w(problem, "fp32", 7)
    assert tk.get_grad_weight_accumulator() == "bf24"
    _, _, rgw = reference64(*problem)
    assert rel_err(gw, rgw) < 2 * torch.finfo(torch.bfloat16).eps
    with pytest.raises(ValueError, match="mode"):
        with tk.grad_weight_accumulator("bf16"):
            pass


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on the CPU interpreter")
@pytest.mark.parametrize("over_fp32", [False, True])
def test_triton_grad_weight_kernel(over_fp32):
    """The CUDA d weight GEMM under the interpreter (fp16 operands: the interpreter's bf16 dot is wrong): the
    24-bit pair after each chunk equals the torch form's to its 16-bit resolution; the last chunk's bf16 is the
    pair's sum cast (truncated by the interpreter, rounded on CUDA); fp32 mode with a scale adds scale * P.
    dz has a padded row stride, as the chunk loop hands it over; over_fp32: written over fp32 logits."""
    from trace_kernels._gemm import narrow_view
    from trace_kernels.gemm_triton import grad_weight

    g = torch.Generator().manual_seed(4)
    c, v, h = 70, 130, 80  # H a multiple of 16, as the kernel requires (gemm_triton.usable); C and V ragged
    hi, lo = torch.empty(v, h, dtype=torch.bfloat16), torch.empty(v, h, dtype=torch.uint8)
    hi2, lo2 = torch.empty_like(hi), torch.empty_like(lo)
    acc, total = torch.zeros(v, h), torch.zeros(v, h, dtype=torch.float64)
    scale = torch.tensor(0.25)

    def value(a, b):
        return ((a.view(torch.int16).to(torch.int32) << 16) | (b.to(torch.int32) << 8)).view(torch.float32)

    for i in range(3):
        dz = torch.randn(c, v, generator=g).half()
        buf = torch.empty(c, 192)[:, :v] if over_fp32 else torch.empty(c, 144, dtype=torch.float16)[:, :v]
        dz = (narrow_view(buf, torch.float16) if over_fp32 else buf).copy_(dz)
        x = torch.randn(c, h, generator=g).half()
        p = dz.float().T @ x.float()
        total += p.double()
        last = i == 2
        if last:
            before = value(hi2, lo2).double() + p.double()
        grad_weight(hi, lo, dz, x, None, first=i == 0, last=last)
        bf24_add_(hi2, lo2, p.clone(), i == 0, last)
        grad_weight(acc, None, dz, x, scale, first=i == 0, last=True)
        if not last:
            assert ((value(hi, lo) - value(hi2, lo2)).abs().max() / total.abs().max()) < 2 * 2.0**-16
    truncated = (before.float().view(torch.int32) & ~0xFFFF).view(torch.float32)
    # `before` is the torch form's sum, whose fp32 order (and so its last bits) depends on the thread count: where
    # it lies within that rounding of a bf16 boundary, the kernel's truncation may land on the boundary's other
    # side, and then hi sits at the exact sum (within the pair's resolution), not a bf16 step away.
    tol = total.abs().max()
    off = (hi.float() - truncated).abs() / tol >= 2.0**-14
    assert ((hi.double() - before)[off].abs() / tol < 2 * 2.0**-16).all()
    assert off.float().mean() < 0.01
    assert ((acc.double() - 0.25 * total).abs().max() / total.abs().max()) < 1e-6
