"""pytest-benchmark micro-benchmarks of the CPU paths (not part of `make test`, which collects tests/ only):

    .venv/bin/python -m pytest benchmarks/test_micro_cpu.py --benchmark-only

Forward+backward of trace_loss per case at N 2048, H 128, V 8192 (M = N/4 for the trace case), the naive
loss beside each for a same-run ratio."""

from __future__ import annotations

import pytest
import torch

from .impls import IMPLS, make_problem


@pytest.mark.parametrize("case", ["trace", "grpo", "logprob"])
@pytest.mark.parametrize("name", ["trace_torch", "naive"])
def test_forward_backward(benchmark, case, name):
    torch.manual_seed(0)
    p = make_problem(case, 2048, 128, 8192, 512, dtype=torch.float32, device="cpu")
    step = IMPLS[name].build(p)

    def run():
        p.hidden.grad = p.weight.grad = None
        loss = step()
        loss.backward()
        return loss

    loss = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert torch.isfinite(loss)
