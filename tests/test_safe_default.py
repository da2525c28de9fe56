"""impl="auto" keeps to the torch path on CUDA until the Triton kernels have passed on a real GPU
(trace_kernels.loss.AUTO_USES_TRITON_ON_CUDA); impl="triton" stays one argument away."""

from __future__ import annotations

import pathlib

import torch

from trace_kernels import loss


def test_auto_takes_torch_on_cuda_until_verified(monkeypatch):
    cuda = torch.device("cuda")  # a device object needs no GPU; nothing runs on it here
    monkeypatch.setattr(loss, "triton_available", lambda: True)
    monkeypatch.setattr(loss, "AUTO_USES_TRITON_ON_CUDA", False)
    assert loss._resolve_impl("auto", cuda, torch.bfloat16) == "torch"
    assert loss._resolve_impl("triton", cuda, torch.bfloat16) == "triton"
    monkeypatch.setattr(loss, "AUTO_USES_TRITON_ON_CUDA", True)
    assert loss._resolve_impl("auto", cuda, torch.bfloat16) == "triton"
    assert loss._resolve_impl("auto", cuda, torch.float64) == "torch"
    assert loss._resolve_impl("auto", torch.device("cpu"), torch.bfloat16) == "torch"


def test_flag_is_on_only_with_a_committed_gpu_run():
    """Flip the flag only together with the gpu_check.sh results that justify it."""
    results = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    assert not loss.AUTO_USES_TRITON_ON_CUDA or sorted(results.glob("gpu-check-*")), (
        "AUTO_USES_TRITON_ON_CUDA is True but no benchmarks/results/gpu-check-* is committed")
