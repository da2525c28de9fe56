"""The chunk loop's shape (trace_kernels/chunked.py): one logits GEMM per chunk when the teacher weight is the
student's, fp32-output d hidden, autocast's GEMM dtype for fp32 weights, and the torch path's entropy formula."""

from __future__ import annotations

import pytest
import torch
from problems import PRECISION, make_problem, reference64, rel_err, run
from torch.utils._python_dispatch import TorchDispatchMode

import trace_kernels as tk


class MatmulShapes(TorchDispatchMode):
    """The output shapes of every aten.mm."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.mm.default or func is torch.ops.aten.mm.out:
            self.shapes.append((tuple(out.shape), out.dtype))
        return out


@pytest.mark.one_block_size
@pytest.mark.parametrize("live", [True, False])
def test_one_logits_gemm_per_chunk_for_the_live_teacher(impl, live):
    n, v, m = 40, 37, 12
    options = ("old_logprobs", "teacher", "fkl", "rkl", "kl_index") + (() if live else ("teacher_weight",))
    dtype = PRECISION[impl][0]
    hidden, weight, targets, advantages, kw = make_problem(n=n, v=v, m=m, options=options, dtype=dtype, seed=1)
    kw["kl_index"] = (10 * torch.arange(4)[:, None] + torch.tensor([0, 3, 6])).reshape(-1)  # 3 in each chunk
    with MatmulShapes() as mode, tk.chunk_rows(10):
        run(impl, hidden, weight, targets, advantages, kw)
    logits = [s for s, _ in mode.shapes if s[1] == v]
    # 4 chunks of 10 rows with 3 distilled rows each: one [13, V] GEMM each, or a [10, V] and a [3, V] one
    assert logits == ([(13, v)] * 4 if live else [(10, v), (3, v)] * 4), logits
    hidden_grads = [(s, d) for s, d in mode.shapes if s == (10, hidden.shape[1])]
    assert len(hidden_grads) == 4 and all(d == PRECISION[impl][0] or d == torch.float32 for _, d in hidden_grads)


def _rounded(t, dtype):
    return t.to(dtype).to(t.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


@pytest.mark.one_block_size
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_fp32_inputs_take_its_dtype_in_the_gemms(impl, dtype):
    """Under torch.autocast("cpu", dtype), fp32 hidden / weight / teacher enter the GEMMs rounded to dtype (the
    logits of the rounded values in fp32), as F.linear does under autocast; the gradients stay fp32 and are
    those of the rounded values. Outside autocast fp32 stays fp32. Tolerance: fp32's (2e-5, test_contract.py);
    on the CPU dz is not rounded (no fp32-output 16-bit GEMM there)."""
    hidden, weight, targets, advantages, kw = make_problem(n=30, h=16, v=53, options=("old_logprobs", "teacher",
                                                           "fkl", "rkl", "kl_index", "teacher_weight"),
                                                           dtype=torch.float32, seed=2, scale=3.0)
    kw_rounded = {k: (_rounded(t, dtype) if k in ("teacher_hidden", "teacher_weight") else t) for k, t in kw.items()}
    with torch.autocast("cpu", dtype=dtype):
        out, gh, gw = run(impl, hidden, weight, targets, advantages, kw)
        ref_autocast, rgh_a, rgw_a = run("reference", hidden.double(), weight.double(), targets, advantages.double(),
                                         {k: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point()
                                              else t) for k, t in kw.items()})
    ref, rgh, rgw = reference64(_rounded(hidden, dtype), _rounded(weight, dtype), targets, advantages, kw_rounded)
    assert out.loss.dtype == torch.float32
    assert rel_err(out.loss, ref.loss, 0.1) < 2e-5 and rel_err(out.logprobs, ref.logprobs) < 2e-5
    assert rel_err(gh, rgh) < 2e-5 and rel_err(gw, rgw) < 2e-5
    # fp64 is not autocast: the reference there stays exact, and differs from the rounded one
    assert rel_err(ref_autocast.logprobs, ref.logprobs) > 1e-4
    plain, pgh, _ = run(impl, hidden, weight, targets, advantages, kw)
    assert rel_err(plain.logprobs, ref_autocast.logprobs) < 2e-5 and rel_err(pgh, rgh_a) < 2e-5


def test_autocast_reference_follows_the_same_rule():
    """The reference too (forward under autocast, backward outside it, as training loops do)."""
    hidden, weight, targets, advantages, kw = make_problem(n=12, h=8, v=21, options=("old_logprobs",),
                                                           dtype=torch.float32, seed=3, scale=3.0)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tk.trace_loss(h, w, targets, advantages, impl="reference", **kw)
    gh, _ = torch.autograd.grad(out.loss, [h, w])
    ref, rgh, rgw = reference64(_rounded(hidden, torch.bfloat16), _rounded(weight, torch.bfloat16), targets,
                                advantages, kw)
    assert gh.dtype == torch.float32 and rel_err(out.logprobs, ref.logprobs) < 2e-5 and rel_err(gh, rgh) < 2e-5


@pytest.mark.one_block_size
def test_entropy_at_qwen3_vocab_in_fp32(impl):
    """The torch path computes the entropy as log s - t / s like the Triton kernel (-sum p log p loses 1.5e-5
    at V 151,936 in fp32); both are within 1e-6 of fp64 here."""
    problem = make_problem(n=3, h=8, v=151_936, options=(), dtype=torch.float32, seed=5, scale=3.0)
    out, _, _ = run(impl, *problem, grad=False)
    ref, _, _ = reference64(*problem)
    assert rel_err(out.entropy, ref.entropy) < 1e-6


def test_logprobs_entropy_backward_keeps_the_forwards_autocast_dtype():
    """logprobs_entropy's backward is a trace_loss call made outside autocast: it re-enters the forward's."""
    hidden, weight, targets, _, _ = make_problem(n=20, h=8, v=31, options=(), dtype=torch.float32, seed=6, scale=3.0)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = tk.logprobs_entropy(h, w, targets, impl="torch")
    gh, gw = torch.autograd.grad((logp * 0.3).sum() + (ent * 0.1).sum(), [h, w])
    hb, wb = (_rounded(t, torch.bfloat16).double().requires_grad_(True) for t in (hidden, weight))
    logp64, ent64 = tk.logprobs_entropy(hb, wb, targets, impl="reference")
    rgh, rgw = torch.autograd.grad((logp64 * 0.3).sum() + (ent64 * 0.1).sum(), [hb, wb])
    assert rel_err(logp, logp64) < 2e-5 and rel_err(gh, rgh) < 2e-5 and rel_err(gw, rgw) < 2e-5
