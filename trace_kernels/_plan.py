"""How many rows each chunk of the chunk loop holds (docs/contract.md, "Memory").

On CUDA chunks are planned in rows. Per chunk the weight streams through the logits and d hidden GEMMs, and
the d weight accumulator is read and written once ([V, H] elements, 6 bytes each with the default 24-bit
accumulator, 8 with fp32); a GEMM is FLOP-bound only when 2 C FLOPs per element outweigh those bytes, i.e.
when C exceeds 3-4x the card's ridge point (its GEMM rate over its memory bandwidth). So C is at least
ROW_MULTIPLE x ridge (953 rows on an H100 SXM, 659 on an H200, at the measured rates of CARDS), the rows
are cut into equal chunks (no short last chunk paying a full pass over the weight), and C is capped by half
the device memory free at the call and, when the user sets one, by the chunk budget.

On the CPU the default is a byte budget, DEFAULT_CPU_BUDGET_MB: the smallest budget within 5% of the fastest
setting in the measured sweep of benchmarks/results/chunk-sweep-cpu-2026-12-01, on both of its shapes; row
counts were no faster there (docs/benchmarks.md).

A user budget (TRACE_KERNELS_CHUNK_MB, `chunk_budget`) caps the bytes of one chunk's [rows, V] buffers on
any device; `chunk_rows` (TRACE_KERNELS_CHUNK_ROWS) sets C instead of the card's plan (a tuning knob; the
caps still apply).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Card:
    name: str
    gemm_tflops: float  # measured dense bf16 GEMM rate (FP32 accumulate), TFLOP/s
    hbm_tbps: float  # peak DRAM bandwidth, TB/s (1e12 bytes), NVIDIA's datasheet
    source: str

    @property
    def ridge(self) -> float:
        """FLOPs per byte at which a kernel turns from bandwidth-bound to FLOP-bound."""
        return self.gemm_tflops / self.hbm_tbps


# GEMM rates are measurements (a datasheet's 989 TFLOP/s dense bf16 is not reached by cuBLAS); bandwidths are
# the datasheets' peaks, which keeps the traffic model (benchmarks/traffic.py) a lower bound.
CARDS = {
    "H100 SXM": Card("H100 SXM", 797.5, 3.35,
                     "bf16 torch.matmul 8192^3 on an 'NVIDIA H100 80GB HBM3' (SXM5), torch 2.7.0+cu128: 797.51 "
                     "TFLOP/s, github.com/zzc0721/torch-performance-test-data issue 79 (2025-10-18); "
                     "3.35 TB/s datasheet"),
    "H200": Card("H200", 790.0, 4.8,
                 "bf16 torch matmul 8192^3 on this project's lent H200, 769-798 TFLOP/s on random data "
                 "(2026-10-28, 2026-11-04); 4.8 TB/s datasheet"),
}
ROW_MULTIPLE = 4.0  # C >= ROW_MULTIPLE x ridge
UNKNOWN_CUDA_ROWS = 1024  # a CUDA card not in CARDS
FREE_MEMORY_FRACTION = 0.5  # of the device memory free at the call (driver free + torch's cached blocks)
DEFAULT_CPU_BUDGET_MB = 512.0


def card_for(device_name: str) -> Card | None:
    """The card of a torch.cuda.get_device_name() string, or None for one not in CARDS (H100 PCIe and NVL have
    other peaks)."""
    name = device_name.upper()
    if "H200" in name:
        return CARDS["H200"]
    if "H100" in name and "PCIE" not in name and "NVL" not in name:
        return CARDS["H100 SXM"]
    return None


def card_rows(card: Card | None) -> int:
    """The least rows per chunk on this card: ROW_MULTIPLE x its ridge point."""
    return UNKNOWN_CUDA_ROWS if card is None else math.ceil(ROW_MULTIPLE * card.ridge)


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    return None if value in (None, "") else float(value)


_budget_mb: float | None = _env_float("TRACE_KERNELS_CHUNK_MB")
_rows: int | None = None if _env_float("TRACE_KERNELS_CHUNK_ROWS") is None else int(
    _env_float("TRACE_KERNELS_CHUNK_ROWS"))


def get_chunk_budget_mb() -> float | None:
    """The chunk budget the user set (TRACE_KERNELS_CHUNK_MB, or the innermost `chunk_budget`), in MB; None when
    none is set (the default plan: rows on CUDA, DEFAULT_CPU_BUDGET_MB on the CPU)."""
    return _budget_mb


def get_chunk_rows() -> int | None:
    """The rows per chunk the user set (TRACE_KERNELS_CHUNK_ROWS, or the innermost `chunk_rows`), or None."""
    return _rows


@contextlib.contextmanager
def chunk_budget(megabytes: float):
    """Cap the bytes of one chunk's [rows, V] buffers at `megabytes` inside the block (on any device; the
    environment variable TRACE_KERNELS_CHUNK_MB sets it for the process). A chunk holds at least one row."""
    global _budget_mb
    if isinstance(megabytes, bool) or not isinstance(megabytes, (int, float)) or not megabytes > 0:
        raise ValueError(f"megabytes must be > 0, got {megabytes!r}")
    previous, _budget_mb = _budget_mb, float(megabytes)
    try:
        yield
    finally:
        _budget_mb = previous


@contextlib.contextmanager
def chunk_rows(rows: int):
    """Use chunks of about `rows` student rows inside the block instead of the card's plan (a tuning knob; the
    free-memory cap and a chunk budget still apply). TRACE_KERNELS_CHUNK_ROWS sets it for the process."""
    global _rows
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be an int >= 1, got {rows!r}")
    previous, _rows = _rows, rows
    try:
        yield
    finally:
        _rows = previous


def padded(vocab: int) -> int:
    """Row stride of the [rows, V] buffers: V rounded up to a multiple of 64 elements, so that every row starts
    256-byte aligned (vector loads, TMA)."""
    return -(-vocab // 64) * 64


def split(kl_counts_A: np.ndarray, row_bytes: float, kl_row_bytes: float, *, target_rows: int | None,
          cap_bytes: float | None) -> list[tuple[int, int]]:
    """Cut A compacted rows into [a, b) chunks. With target_rows: floor(A / target_rows) chunks of equal rows
    (each at least target_rows, unless A is smaller); then, with cap_bytes, more chunks until each one's buffers
    (row_bytes per row, kl_row_bytes per distilled row of it) fit. A chunk holds at least one row."""
    a_rows = len(kl_counts_A)
    if a_rows == 0:
        return []
    cost = row_bytes + kl_row_bytes * kl_counts_A.astype(np.float64)
    cum = np.concatenate([[0.0], np.cumsum(cost)])
    n = max(1, a_rows // target_rows) if target_rows else 1
    if cap_bytes is not None:
        n = max(n, math.ceil(cum[-1] / cap_bytes))
    for _ in range(6):
        n = min(n, a_rows)
        bounds = np.linspace(0, a_rows, n + 1).round().astype(np.int64)
        worst = float(np.max(cum[bounds[1:]] - cum[bounds[:-1]]))
        if cap_bytes is None or worst <= cap_bytes or n == a_rows:
            return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        n = math.ceil(n * worst / cap_bytes)
    # Distilled rows bunched on a few student rows: cut greedily by cost instead.
    chunks, a = [], 0
    while a < a_rows:
        b = max(int(np.searchsorted(cum, cum[a] + cap_bytes, side="right")) - 1, a + 1)
        chunks.append((a, b))
        a = b
    return chunks


@functools.cache
def _device_card(index: int) -> Card | None:
    return card_for(torch.cuda.get_device_name(index))


def free_bytes(device: torch.device) -> float | None:
    """Device memory free for the call: the driver's free memory plus the blocks torch's allocator caches."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def plan(device: torch.device, kl_counts_A: np.ndarray, row_bytes: float, kl_row_bytes: float,
         fixed_bytes: float = 0.0) -> list[tuple[int, int]]:
    """The chunks of one call on `device`: see the module docstring. fixed_bytes: what the call allocates
    besides the chunk buffers (taken off the free memory first)."""
    caps = []
    if _budget_mb is not None:
        caps.append(_budget_mb * 2**20)
    if device.type == "cuda":
        target = _rows or card_rows(_device_card(device.index or 0))
        free = free_bytes(device)
        caps.append(max(FREE_MEMORY_FRACTION * (free - fixed_bytes), 1.0))
    else:
        target = _rows
        if _budget_mb is None and _rows is None:
            caps.append(DEFAULT_CPU_BUDGET_MB * 2**20)
    return split(kl_counts_A, row_bytes, kl_row_bytes, target_rows=target, cap_bytes=min(caps) if caps else None)
