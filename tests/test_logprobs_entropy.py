"""`logprobs_entropy` (values and gradients) against the materialized fp64 reference.

Tolerances: the outputs are fp32 by contract, so values agree with fp64 to fp32 round-off (rel 1e-6;
we allow 2e-6 in fp64 inputs, 2e-5 for fp32 inputs whose GEMM rounds too). Gradients: with fp64 inputs the
chunked backward differs from autograd on the reference only in summation order (~1e-13), given the
same fp32 upstream gradients, so 1e-9 catches any wrong term; fp32 inputs 2e-5 as in test_contract.py.
"""

from __future__ import annotations

import pytest
import torch
from problems import rel_err

import trace_kernels as tk

TOL = {torch.float64: (2e-6, 1e-9), torch.float32: (2e-5, 2e-5)}


def reference(hidden, weight, targets, temperature, ignore_index=-100):
    logp_NV = torch.log_softmax(hidden.double() @ weight.double().T / temperature, -1)
    valid = targets != ignore_index
    logp = logp_NV.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    entropy = -(logp_NV.exp() * logp_NV).sum(-1)
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def problem(n, h, v, dtype, seed, ignore=0.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore] = -100
    dlogp, dent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return hidden.to(dtype), weight.to(dtype), targets, dlogp, dent


def check(impl, n, h, v, dtype, seed, temperature=1.0, ignore=0.0):
    hidden, weight, targets, dlogp, dent = problem(n, h, v, dtype, seed, ignore)
    hr, wr = hidden.double().clone().requires_grad_(), weight.double().clone().requires_grad_()
    logp_r, ent_r = reference(hr, wr, targets, temperature)
    (logp_r * dlogp.double() + ent_r * dent.double()).sum().backward()

    h_, w_ = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = tk.logprobs_entropy(h_, w_, targets, temperature, impl=impl)
    assert logp.shape == ent.shape == (n,)
    (logp * dlogp + ent * dent).sum().backward()
    vtol, gtol = TOL[dtype]
    assert rel_err(logp.double(), logp_r.detach()) < vtol
    assert rel_err(ent.double(), ent_r.detach()) < vtol
    assert rel_err(h_.grad.double(), hr.grad) < gtol
    assert rel_err(w_.grad.double(), wr.grad) < gtol
    assert h_.grad.dtype == dtype and w_.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,h,v", [(1, 1, 1), (1, 7, 3), (29, 17, 97), (5, 3, 2)], ids=str)
def test_values_and_gradients(impl, dtype, n, h, v):
    if impl == "triton" and dtype == torch.float64:
        pytest.skip("triton computes in fp32")
    check(impl, n, h, v, dtype, seed=n + v)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_temperature_and_ignored_rows(impl, dtype):
    if impl == "triton" and dtype == torch.float64:
        pytest.skip("triton computes in fp32")
    check(impl, 23, 13, 37, dtype, seed=3, temperature=0.7, ignore=0.4)


def test_chunking_does_not_change_the_result():
    with tk.chunk_budget(1e-4):  # one row per chunk
        check("torch", 19, 11, 41, torch.float64, seed=5, ignore=0.3)


def test_all_rows_ignored_gives_zeros():
    hidden, weight, targets, *_ = problem(6, 5, 7, torch.float64, 1)
    targets[:] = -100
    h_, w_ = hidden.requires_grad_(), weight.requires_grad_()
    logp, ent = tk.logprobs_entropy(h_, w_, targets, impl="torch")
    (logp.sum() + ent.sum()).backward()
    assert torch.all(logp == 0) and torch.all(ent == 0)
    assert torch.all(h_.grad == 0) and torch.all(w_.grad == 0)


def test_only_one_output_used_and_one_input_needing_grad():
    """Unused outputs and inputs without requires_grad are the common case (TRL uses logp, verl both)."""
    hidden, weight, targets, dlogp, _ = problem(9, 6, 11, torch.float64, 2)
    hr = hidden.clone().requires_grad_()
    logp_r, _ = reference(hr, weight, targets, 1.0)
    (logp_r * dlogp.double()).sum().backward()
    h_ = hidden.clone().requires_grad_()
    logp, _ = tk.logprobs_entropy(h_, weight, targets, impl="torch")
    (logp * dlogp).sum().backward()
    assert rel_err(h_.grad, hr.grad) < 1e-9


def test_no_grad_matches_token_logprobs():
    hidden, weight, targets, *_ = problem(7, 5, 9, torch.float32, 4)
    logp, ent = tk.logprobs_entropy(hidden, weight, targets, impl="torch")
    logp2, ent2 = tk.token_logprobs(hidden, weight, targets, return_entropy=True, impl="torch")
    assert torch.equal(logp, logp2) and torch.equal(ent, ent2)


def test_bad_input_raises_before_any_kernel():
    hidden, weight, targets, *_ = problem(4, 3, 5, torch.float32, 0)
    with pytest.raises(ValueError, match="targets"):
        tk.logprobs_entropy(hidden.requires_grad_(), weight, targets[:3])
    with pytest.raises(ValueError, match="temperature"):
        tk.logprobs_entropy(hidden, weight, targets, 0.0)
