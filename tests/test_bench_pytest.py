"""The pytest-benchmark suite's gate (benchmarks/test_loss_bench.py): an implementation that disagrees with the fp64
reference fails before it is timed, and one that cannot run here is skipped with its reason (make bench-smoke runs
a correct one end to end)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks import impls, test_loss_bench  # noqa: E402


class NeverTimed:
    def pedantic(self, *args, **kwargs):
        raise AssertionError("timed")


def test_a_wrong_implementation_fails_before_timing(monkeypatch):
    right = impls.IMPLS["trace_torch"].build

    def build(p):  # the loss and its gradients 1% off: a scaling bug
        step = right(p)
        return lambda: 1.01 * step()

    monkeypatch.setitem(impls.IMPLS, "off_by_1pct", impls.Impl("off_by_1pct", build, impls.ALL_CASES))
    with pytest.raises(AssertionError, match=r"off_by_1pct on grpo: 1\.0e-02 from the fp64 reference.*not timed"):
        test_loss_bench.test_loss_forward_backward(NeverTimed(), "off_by_1pct", "grpo")


def test_what_cannot_run_is_skipped_with_the_reason():
    if not torch.cuda.is_available():
        assert "CUDA only" in test_loss_bench.why_not("trace_triton", "trace")
        assert test_loss_bench.why_not("liger_triton_grpo", "grpo") == "not on cpu"
    assert test_loss_bench.why_not("torch_linear_ce", "trace") == "no trace case"
