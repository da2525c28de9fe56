"""The chunked paths never allocate anything of size N x V: the bytes of every tensor an op produces are
recorded (bytes, not elements: the Triton interpreter copies kernel arguments as raw byte storages)."""

from __future__ import annotations

import pytest
import torch
from problems import ALL_OPTIONS, make_problem
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
