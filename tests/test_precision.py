"""bf16 / fp16 inputs against the fp64 reference on the same (exactly upcast) values, and gradcheck in fp64.

Tolerances (normwise relative). Logits, log-softmax, KL and the weight-gradient sum are all computed in
fp32 from the exact low-precision inputs, so values carry fp32 error only (~1e-6; allowed 2e-5). The
gradients are returned in the input dtype: one round-to-nearest of each element costs at most 2^-9
relative in bf16 (8-bit mantissa) and 2^-12 in fp16, so we allow 2^-8 and 2^-11 (one rounding, twice
over, plus the fp32 error). A wrong term, or bf16 logits before the fp32 cast, exceeds these by far.
"""

from __future__ import annotations

import pytest
import torch
from problems import ALL_OPTIONS, make_problem, reference64, rel_err, run

import trace_kernels as tk

GRAD_TOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(3))
def test_low_precision_inputs_against_fp64(impl, dtype, seed):
    hidden, weight, targets, advantages, kw = make_problem(n=33, h=24, v=151, options=ALL_OPTIONS, dtype=dtype,
                                                           seed=seed, scale=3.0)
    with tk.chunk_budget(0.01):
        out, gh, gw = run(impl, hidden, weight, targets, advantages, kw)
    ref, rgh, rgw = reference64(hidden, weight, targets, advantages, kw)
    assert out.loss.dtype == torch.float32
    for name in ("loss", "logprobs", "entropy", "fkl", "rkl"):
        assert rel_err(getattr(out, name), getattr(ref, name)) < 2e-5, name
    assert rel_err(gh, rgh) < GRAD_TOL[dtype]
    assert rel_err(gw, rgw) < GRAD_TOL[dtype]


def test_bf16_logits_rounding_would_be_caught():
    """The bf16 tolerance is tight enough to see logits rounded to bf16 before the fp32 cast."""
    hidden, weight, targets, advantages, kw = make_problem(n=33, h=24, v=151, options=(), dtype=torch.bfloat16,
                                                           scale=3.0)
    ref, _, _ = reference64(hidden, weight, targets, advantages, kw)
    logits_rounded = (hidden @ weight.T).float()  # bf16 GEMM output, the pitfall
    logp = torch.log_softmax(logits_rounded, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    assert rel_err(logp, ref.logprobs) > 2e-5


@pytest.mark.parametrize("options", [("old_logprobs", "ref_logprobs", "dual_clip", "temperature", "entropy_weight",
                                      "ignore", "pg_weight"),
                                     ("old_logprobs", "teacher", "fkl", "rkl", "kl_index", "teacher_weight"),
                                     ("old_logprobs", "teacher", "fkl", "rkl", "kl_term_clip", "entropy_weight",
                                      "teacher_weight")],
                         ids=["pg", "kl", "kl_clip"])
def test_gradcheck_fp64(options):
    # Every case is off-policy: on-policy (old = current, detached) the PG value is constant while its
    # gradient is not, which finite differences cannot see. The teacher has its own weight: with
    # teacher_weight=None it would move with `weight` under finite differences but is constant by contract.
    hidden, weight, targets, advantages, kw = make_problem(n=5, h=3, v=7, m=4, options=options, seed=3)
    if "kl_term_clip" in kw:
        kw["kl_term_clip"] = 0.02  # some terms clamped, some not; finite differences stay off the kinks
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    with tk.chunk_budget(1e-4):
        assert torch.autograd.gradcheck(
            lambda a, b: tk.trace_loss(a, b, targets, advantages, impl="torch", **kw).loss, (h, w),
            eps=1e-6, atol=1e-7, rtol=1e-5)
