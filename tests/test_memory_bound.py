"""The chunked paths never allocate anything of size N x V: the bytes of every tensor an op produces are
recorded (bytes, not elements: the Triton interpreter copies kernel arguments as raw byte storages)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from problems import ALL_OPTIONS, PRECISION, make_problem
from torch.utils._python_dispatch import TorchDispatchMode

import trace_kernels as tk


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.one_block_size
@pytest.mark.parametrize("budget_mb", [0.05, 0.2])
def test_no_tensor_of_size_n_by_v(impl, budget_mb):
    n, h, v = 1024, 8, 500  # N x V fp32 = 2 MB, well above both budgets
    hidden, weight, targets, advantages, kw = make_problem(n=n, h=h, v=v, m=n // 4, options=ALL_OPTIONS,
                                                           dtype=torch.float32)
    h_, w_ = hidden.requires_grad_(True), weight.requires_grad_(True)
    with tk.chunk_budget(budget_mb), LargestTensor() as mode:
        tk.trace_loss(h_, w_, targets, advantages, impl=impl, **kw).loss.backward()
    budget_bytes = budget_mb * 2**20
    assert mode.largest <= max(budget_bytes, 4 * v * h), (mode.largest, 4 * n * v)
    assert mode.largest < 4 * n * v / 4


def test_the_probe_sees_the_materialized_reference():
    """The probe itself works: the reference does allocate N x V."""
    n, v = 64, 300
    hidden, weight, targets, advantages, kw = make_problem(n=n, h=8, v=v, options=(), dtype=torch.float32)
    with LargestTensor() as mode:
        tk.trace_loss(hidden, weight, targets, advantages, impl="reference")
    assert mode.largest >= 4 * n * v


class Allocations(TorchDispatchMode):
    """Weak references to every tensor of at least `numel` elements an op returns."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.refs = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                self.refs.append(weakref.ref(t))
        return out

    def alive_storages(self, exclude: set[int]) -> dict[int, torch.Tensor]:
        gc.collect()
        live = (r() for r in self.refs)
        return {t.untyped_storage().data_ptr(): t for t in live
                if t is not None and t.untyped_storage().data_ptr() not in exclude}


@pytest.mark.one_block_size
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_scale", [1.0, 3.0])
def test_weight_gradient_memory(impl, dtype, grad_scale):
    """Between forward and backward one [V, H] buffer of the weight's dtype is held (d weight summed in fp32,
    cast at the end of the forward); the backward allocates nothing of V x H elements or more, whether the
    incoming gradient is 1 (handed over as is) or not (scaled in place), and autograd takes it as .grad."""
    if impl != "torch" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not compute bf16")
    n, h, v = 64, 24, 101  # V x H = 2424 elements, above every chunk buffer at this budget
    hidden, weight, targets, advantages, kw = make_problem(n=n, h=h, v=v, m=n // 4, options=ALL_OPTIONS, dtype=dtype)
    h_, w_ = hidden.requires_grad_(True), weight.requires_grad_(True)
    inputs = {t.untyped_storage().data_ptr() for t in (h_, w_, targets, advantages, *kw.values())
              if isinstance(t, torch.Tensor)}
    with tk.chunk_budget(v * 4 * 6 / 2**20), Allocations(v * h) as fwd:
        loss = tk.trace_loss(h_, w_, targets, advantages, impl=impl, **kw).loss
    held = fwd.alive_storages(inputs)
    assert [(tuple(t.shape), t.dtype) for t in held.values()] == [((v, h), dtype)], held
    grad_ptr = next(iter(held))
    del held
    with Allocations(v * h) as bwd:
        (loss * grad_scale if grad_scale != 1.0 else loss).backward()
    new = bwd.alive_storages(inputs | {grad_ptr})
    assert not new and all(r() is None or r().untyped_storage().data_ptr() in inputs | {grad_ptr}
                           for r in bwd.refs), [(tuple(r().shape), r().dtype) for r in bwd.refs if r() is not None]
    assert w_.grad.untyped_storage().data_ptr() == grad_ptr  # no copy on the way to .grad


def test_second_backward_recomputes(impl):
    """The first backward hands its gradients over; a second one through the same graph (retain_graph)
    recomputes them rather than returning tensors the caller may have changed."""
    hidden, weight, targets, advantages, kw = make_problem(n=9, h=5, v=11, m=3, dtype=PRECISION[impl][0])
    h_, w_ = hidden.requires_grad_(True), weight.requires_grad_(True)
    loss = tk.trace_loss(h_, w_, targets, advantages, impl=impl, **kw).loss
    gh1, gw1 = torch.autograd.grad(loss * 2.0, [h_, w_], retain_graph=True)
    gh2, gw2 = torch.autograd.grad(loss, [h_, w_])
    torch.testing.assert_close(gh1, 2 * gh2)
    torch.testing.assert_close(gw1, 2 * gw2)
