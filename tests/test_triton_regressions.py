"""Regressions peer libraries shipped in fused LM-head kernels, checked on every implementation
(the Triton ones under TRITON_INTERPRET=1 on the CPU, or on CUDA)."""

from __future__ import annotations

import pytest
import torch
from problems import ALL_OPTIONS, PRECISION, assert_matches_reference, make_problem, reference64, rel_err, run

import trace_kernels as tk


@pytest.mark.one_block_size
@pytest.mark.parametrize("v", [4096 * 2 + 37, 151_936])
def test_large_vocab_not_a_multiple_of_the_block(impl, v):
    """Qwen3's vocabulary (151,936 = 37 x 4096 + 512) and a ragged 8,229 on a few rows."""
    dtype, tol = PRECISION[impl]
    problem = make_problem(n=3, h=8, v=v, m=2, options=ALL_OPTIONS, dtype=dtype, seed=v)
    assert_matches_reference(impl, problem, tol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_gradient_keeps_one_rounding_over_many_chunks(impl, dtype):
    """256 chunks of one row: accumulating d weight in the input dtype would add ~256 roundings of 2^-9
    (bf16); the 24-bit accumulator (bf16) and the fp32 one (fp16) leave only the final rounding, within one ulp
    of the input dtype (tests/test_grad_weight.py compares the accumulators)."""
    hidden, weight, targets, advantages, kw = make_problem(n=256, h=16, v=40, options=("old_logprobs",),
                                                           dtype=dtype, seed=1)
    with tk.chunk_budget(40 * 4 * 2 / 2**20):  # two fp32 rows of V: one student row per chunk
        out, gh, gw = run(impl, hidden, weight, targets, advantages, kw)
    _, _, rgw = reference64(hidden, weight, targets, advantages, kw)
    assert rel_err(gw, rgw) < 2 * torch.finfo(dtype).eps
