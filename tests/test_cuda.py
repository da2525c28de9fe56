"""The implementations on CUDA (the Triton kernels compiled for the card, cuBLAS fp32-output GEMMs),
against the fp64 reference on the same device. Skipped without a GPU; run by benchmarks/gpu_check.sh.

Tolerances. fp32 inputs (TF32 off, torch's default for matmul): as on the CPU, 2e-5. bf16 inputs: the
logits come from fp32-output GEMMs of the exact bf16 values, so values keep 2e-5; the gradients pass
through two bf16 roundings (dz before the backward GEMMs, the result after), each at most 2^-9 relative
per element, and the backward GEMM's sum over V can cancel, so we allow 2^-6. That bound is stated, not
yet measured on a card (see benchmarks/results/).
"""

from __future__ import annotations

import pytest
import torch
from problems import ALL_OPTIONS, FLOOR, make_problem, reference64, rel_err, run

import trace_kernels as tk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

VALUE_TOL = 2e-5
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2.0**-6}


def _check(impl, problem, dtype):
    out, gh, gw = run(impl, *problem)
    ref, rgh, rgw = reference64(*problem)
    for name in ("loss", "logprobs", "entropy", "fkl", "rkl"):
        if getattr(ref, name) is not None:
            err = rel_err(getattr(out, name), getattr(ref, name), FLOOR.get(name, 0.0))
            assert err < VALUE_TOL, (name, err)
    assert rel_err(gh, rgh) < GRAD_TOL[dtype], rel_err(gh, rgh)
    assert rel_err(gw, rgw) < GRAD_TOL[dtype], rel_err(gw, rgw)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_cuda_all_options(impl, dtype, seed):
    with tk.chunk_budget(4):
        _check(impl, make_problem(n=300, h=128, v=5003, m=80, options=ALL_OPTIONS, dtype=dtype, seed=seed,
                                  device="cuda", scale=2.0), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kl_clip_mode_grad(dtype):
    """The Triton kernel's GRAD_CLIP specialization (kl_clip_mode="grad") compiled for the card."""
    problem = make_problem(n=300, h=128, v=5003, m=80, options=ALL_OPTIONS, dtype=dtype, seed=5, device="cuda",
                           scale=2.0)
    problem[4].update(kl_term_clip=0.01, kl_clip_mode="grad")
    with tk.chunk_budget(4):
        _check("triton", problem, dtype)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_qwen3_vocab(impl, dtype):
    _check(impl, make_problem(n=64, h=256, v=151_936, m=16, options=ALL_OPTIONS, dtype=dtype, device="cuda"), dtype)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_cuda_grad_weight_accumulates_in_fp32(impl):
    problem = make_problem(n=512, h=64, v=1000, options=("old_logprobs",), dtype=torch.bfloat16, device="cuda")
    with tk.chunk_budget(1000 * 4 * 2 / 2**20):
        out, gh, gw = run(impl, *problem)
    _, _, rgw = reference64(*problem)
    assert rel_err(gw, rgw) < 2 * torch.finfo(torch.bfloat16).eps


def test_auto_follows_the_verified_flag():
    from trace_kernels import loss

    expected = "triton" if loss.AUTO_USES_TRITON_ON_CUDA else "torch"
    assert loss._resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == expected
