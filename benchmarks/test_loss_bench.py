"""The benchmark suite under pytest-benchmark: the CLI's cases and implementations (benchmarks/impls.py), its problem
builders and its fp64 check, for a JSON history across commits and `--benchmark-compare`.

    make bench-pytest                                  # the quick CPU default, saved as JSON (docs/benchmarks.md)
    .venv/bin/python -m pytest benchmarks/test_loss_bench.py --benchmark-only --benchmark-autosave
    BENCH_DEVICE=cuda BENCH_DTYPE=bf16 BENCH_N=16384 BENCH_H=4096 BENCH_V=151936 .venv/bin/python -m pytest ...

One test per (case, implementation): forward+backward of the loss on hidden states [N, H] and the LM head [V, H]
(M = N/4 distilled rows in the "trace" case). Before it is timed, each implementation is checked against the fp64
reference on a small problem of the same case (bench_loss.check_agreement: loss and both gradients, normwise), and a
disagreement beyond the suite's tolerance fails the test: a wrong implementation is never timed. One that cannot
run here (not installed, CUDA only, no such case) is skipped with the reason. extra_info holds the shape, the check's
error, the peak memory above the inputs (CUDA: the allocator's peak; CPU: the resident-set high-water mark of this
process, warm-up included, after returning freed heap to the system; memory the allocator still holds from earlier
rows can hide part of a row's peak, so this is a lower bound beside the CLI's fresh-process figure) and the load
average. The shape and the rows come from the environment (defaults: the quick CPU run):
BENCH_DEVICE (cuda when there is one, else cpu), BENCH_DTYPE (fp32 | bf16 | fp16), BENCH_N, BENCH_H, BENCH_V,
BENCH_IMPLS and BENCH_CASES (comma-separated), BENCH_ROUNDS, BENCH_CHUNK_MB (trace_kernels.chunk_budget for the
trace rows). trace_triton runs on CUDA only here (the Triton interpreter is a correctness tool, not a timing).
"""

from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch

from .bench_loss import DTYPES, check_agreement, forward_backward
from .impls import ALL_CASES, IMPLS
from .rss import reset_peak, status_kb

pytest.importorskip("pytest_benchmark")

DEVICE = os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = os.environ.get("BENCH_DTYPE", "fp32")
N, H, V = (int(os.environ.get(f"BENCH_{k}", d)) for k, d in (("N", 2048), ("H", 128), ("V", 8192)))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 5))
CHUNK_MB = float(os.environ["BENCH_CHUNK_MB"]) if os.environ.get("BENCH_CHUNK_MB") else None
CASES = os.environ.get("BENCH_CASES", ",".join(ALL_CASES)).split(",")
NAMES = os.environ.get("BENCH_IMPLS", ",".join(IMPLS)).split(",")
# The fp64 check's bound on the normwise relative error: fp32 rounding over sums of V terms, or 16-bit inputs
# (bench_loss's own, so that the CLI and this suite pass and fail the same rows).
TOL = 1e-4 if DTYPE == "fp32" else 2e-2


def why_not(name: str, case: str) -> str | None:
    if name == "trace_triton" and DEVICE != "cuda":
        return "trace_triton is timed on CUDA only (the Triton interpreter is not a timing)"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return "BENCH_DEVICE=cuda: no CUDA device"
    return IMPLS[name].available(case, DEVICE)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_loss_forward_backward(benchmark, name, case):
    why = why_not(name, case)
    if why:
        pytest.skip(why)
    dtype = DTYPES[DTYPE]
    err = check_agreement(name, case, DEVICE, dtype, V)
    assert err <= TOL, f"{name} on {case}: {err:.1e} from the fp64 reference (tolerance {TOL:.0e}): not timed"

    import trace_kernels as tk

    m = N // 4 if case == "trace" else 0
    _, once = forward_backward(name, case, N, H, V, m, DEVICE, dtype)

    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _trim_heap()  # what earlier rows freed goes back to the system, so that this row's peak is its own
        base = reset_peak()
    with tk.chunk_budget(CHUNK_MB) if CHUNK_MB else contextlib.nullcontext():
        loss = benchmark.pedantic(once, rounds=ROUNDS, warmup_rounds=1)
    peak = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else status_kb("VmHWM") * 1024
    assert torch.isfinite(loss).all()
    benchmark.extra_info.update(
        case=case, impl=name, device=DEVICE, dtype=DTYPE, n=N, h=H, v=V, m=m, chunk_mb=CHUNK_MB,
        agreement_err=err, peak_extra_mb=(peak - base) / 2**20,
        peak_memory=("CUDA allocator peak above the inputs" if DEVICE == "cuda"
                     else "resident-set high-water mark above the start, this process"),
        load_average=list(os.getloadavg()), torch=torch.__version__)


def _trim_heap() -> None:
    """glibc's malloc_trim: freed heap pages returned to the system (no-op elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
