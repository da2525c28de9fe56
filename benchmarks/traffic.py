"""Traffic model of one `trace_loss` call on the CUDA Triton path: bytes moved and FLOPs of every GEMM and
kernel, and the time each takes at a card's published peaks.

    python -m benchmarks.traffic [--n 16384 --h 4096 --v 151936 --m 4096 --budget-mb 256 --dtype bf16]

The call (trace_kernels/chunked.py with rows_triton, bf16 or fp16 inputs, forward + backward, every row
valid, the distilled rows spread evenly) is cut into chunks by the library's own planner; per chunk:

    logits    z = h W^T              [C, V] fp32 out (cuBLAS fp32-output GEMM)
    teacher   u = h_t W_t^T          [K, V] fp32 out, for the chunk's K distilled rows
    stats     one sweep over z                                      (_student_stats_kernel)
    kl        three sweeps over z and u, dz written over u          (_kl_rows_kernel)
    grad      one sweep over z and u, dz written in bf16            (_student_grad_kernel)
    d hidden  dz W                   [C, H] bf16 out
    d weight  dW += dz^T h           [V, H] fp32, read and written  (addmm with fp32 output, beta 1)

and once per call: zeroing the fp32 accumulator and casting it to the weight's dtype. The backward
scales nothing when the incoming gradient is 1 (the bench's case). Bytes: every operand read once and
every output written once per GEMM or sweep (ideal caching: real GEMMs re-read tiles through L2, so the
model is a lower bound). Time of a piece: max(FLOPs / peak FLOP/s, bytes / peak bandwidth), pieces one
after another (one stream). The floor the benchmarks compare against is the FLOPs alone,
2 N H V (3 + M / N) at the card's bf16 rate.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Card:
    name: str
    bf16_tflops: float  # dense bf16 tensor-core peak, FP32 accumulate
    hbm_tbps: float  # peak DRAM bandwidth, TB/s (1e12 bytes)


# NVIDIA's datasheet figures (the bf16 ones are quoted "with sparsity", 1,979 TFLOP/s: dense is half).
CARDS = {
    "H100 SXM": Card("H100 SXM", 989.4, 3.35),
    "H200": Card("H200 SXM", 989.4, 4.8),
}


def card_for(device_name: str) -> Card | None:
    """The card of a torch.cuda.get_device_name() string, or None for one the model does not know."""
    name = device_name.upper()
    if "H200" in name:
        return CARDS["H200"]
    if "H100" in name and "PCIE" not in name and "NVL" not in name:
        return CARDS["H100 SXM"]
    return None


@dataclass
class Piece:
    name: str
    flops: float
    bytes: float
    launches: int

    def seconds(self, card: Card) -> float:
        return max(self.flops / (card.bf16_tflops * 1e12), self.bytes / (card.hbm_tbps * 1e12))

    def bound(self, card: Card) -> str:
        return "FLOPs" if self.flops / (card.bf16_tflops * 1e12) >= self.bytes / (card.hbm_tbps * 1e12) else "bytes"


def plan(n: int, v: int, m: int, budget_mb: float, in_bytes: int = 2) -> list[tuple[int, int]]:
    """(C, K) per chunk as the library plans them: N rows, M distilled rows spread evenly."""
    from trace_kernels.chunked import plan_chunks
    from trace_kernels.rows_triton import row_buffers

    kl_counts = np.bincount((np.arange(m) * n // max(m, 1)) if m else np.zeros(0, dtype=np.int64), minlength=n)
    chunks = plan_chunks(kl_counts, v, 4, int(budget_mb * 2**20), *row_buffers(in_bytes / 4))
    return [(b - a, int(kl_counts[a:b].sum())) for a, b in chunks]


def pieces(n: int, h: int, v: int, m: int, *, budget_mb: float = 256, in_bytes: int = 2) -> list[Piece]:
    """Every GEMM and kernel of one forward+backward, summed over the chunks."""
    chunks = plan(n, v, m, budget_mb, in_bytes)
    f4, b = 4, in_bytes
    tot = {k: [0.0, 0.0, 0] for k in ("logits", "teacher", "stats", "kl", "grad", "d hidden", "d weight")}

    def add(k, flops, nbytes):
        tot[k][0] += flops
        tot[k][1] += nbytes
        tot[k][2] += 1

    for c, k in chunks:
        add("logits", 2 * c * h * v, c * h * b + v * h * b + c * v * f4)
        if k:
            add("teacher", 2 * k * h * v, k * h * b + v * h * b + k * v * f4)
            add("kl", 0, k * v * f4 * (1 + 2 + 3))  # sweep 1: u; 2: z, u; 3: z, u, write u
        add("stats", 0, c * v * f4)
        add("grad", 0, c * v * f4 + k * v * f4 + c * v * b)  # read z and the distilled dz, write dz
        add("d hidden", 2 * c * h * v, c * v * b + v * h * b + c * h * b)
        add("d weight", 2 * c * h * v, c * v * b + c * h * b + 2 * v * h * f4)
    out = [Piece(name, fl, by, la) for name, (fl, by, la) in tot.items() if la]
    out.append(Piece("zero + cast dW", 0, v * h * (f4 + f4 + b), 2))
    return out


def floor_seconds(n: int, h: int, v: int, m: int, card: Card) -> float:
    """The FLOP floor: 3 + M/N LM-head GEMMs at the card's peak."""
    return 2 * n * h * v * (3 + m / n) / (card.bf16_tflops * 1e12)


def memory_bound_bytes(n: int, h: int, v: int, m: int, *, budget_mb: float = 256, in_bytes: int = 2) -> dict:
    """Peak extra device memory of the call, beyond its inputs: the chunk buffers the planner sized (at
    most the budget, or one row's when a single row is larger), the fp32 d weight accumulator and, at the
    end of the forward, its cast (both alive for an instant), d hidden, and O(N) row vectors."""
    chunks = plan(n, v, m, budget_mb, in_bytes)
    c_max = max(c for c, _ in chunks)
    k_max = max(k for _, k in chunks)
    chunk = v * 4 * (c_max + k_max) + v * in_bytes * c_max  # z, u (fp32) and the bf16 dz
    grad_w = v * h * (4 + (in_bytes if in_bytes != 4 else 0))
    grad_h = n * h * in_bytes
    rows = (6 * n + 4 * m) * 4
    return {"chunk": chunk, "d weight": grad_w, "d hidden": grad_h, "rows": rows,
            "total": chunk + grad_w + grad_h + rows, "held after forward": v * h * in_bytes + grad_h}


def predict(case: str, n: int, h: int, v: int, m: int, dtype: str, device_name: str,
            budget_mb: float | None = None) -> dict | None:
    """Predicted forward+backward seconds of the Triton path and the FLOP floor on this card, for
    bench_loss's CUDA rows; None for a card or dtype the model does not cover. case "trace" has M distilled
    rows, "grpo" and "logprob" none."""
    card = card_for(device_name)
    if card is None or dtype not in ("bf16", "fp16"):
        return None
    if budget_mb is None:
        from trace_kernels import get_chunk_budget_mb

        budget_mb = get_chunk_budget_mb()
    m = m if case == "trace" else 0
    try:
        ps = pieces(n, h, v, m, budget_mb=budget_mb)
    except ImportError:  # the planner's buffer counts come from the Triton backend
        return None
    return {"card": card.name, "predicted_s": sum(p.seconds(card) for p in ps),
            "floor_s": floor_seconds(n, h, v, m, card),
            "memory_bound_mb": memory_bound_bytes(n, h, v, m, budget_mb=budget_mb)["total"] / 2**20}


def table(n: int, h: int, v: int, m: int, budget_mb: float, in_bytes: int = 2) -> str:
    ps = pieces(n, h, v, m, budget_mb=budget_mb, in_bytes=in_bytes)
    chunks = plan(n, v, m, budget_mb, in_bytes)
    lines = [f"N {n}, H {h}, V {v}, M {m}, {8 * in_bytes}-bit inputs, chunk budget {budget_mb:g} MB: "
             f"{len(chunks)} chunks of up to {max(c for c, _ in chunks)} rows", "",
             "| piece | launches | GFLOP | GB moved | " + " | ".join(f"{c.name} ms (bound)" for c in CARDS.values())
             + " |", "|---|---|---|---|" + "---|" * len(CARDS)]
    for p in ps:
        lines.append(f"| {p.name} | {p.launches} | {p.flops / 1e9:.0f} | {p.bytes / 1e9:.2f} | "
                     + " | ".join(f"{p.seconds(c) * 1e3:.2f} ({p.bound(c)})" for c in CARDS.values()) + " |")
    lines.append(f"| **total** | {sum(p.launches for p in ps)} | {sum(p.flops for p in ps) / 1e9:.0f} | "
                 f"{sum(p.bytes for p in ps) / 1e9:.2f} | "
                 + " | ".join(f"**{sum(p.seconds(c) for p in ps) * 1e3:.1f}**" for c in CARDS.values()) + " |")
    lines.append("| FLOP floor 2NHV(3 + M/N) | | | | "
                 + " | ".join(f"{floor_seconds(n, h, v, m, c) * 1e3:.1f}" for c in CARDS.values()) + " |")
    mem = memory_bound_bytes(n, h, v, m, budget_mb=budget_mb, in_bytes=in_bytes)
    lines += ["", "Peak extra memory (MB): " + ", ".join(f"{k} {val / 2**20:.0f}" for k, val in mem.items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--m", type=int, default=None, help="distilled rows (default N/4)")
    ap.add_argument("--budget-mb", default="256", help="comma-separated chunk budgets")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = ap.parse_args(argv)
    m = args.n // 4 if args.m is None else args.m
    for budget in args.budget_mb.split(","):
        print(table(args.n, args.h, args.v, m, float(budget)))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
