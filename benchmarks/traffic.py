"""Traffic model of one `trace_loss` call on the CUDA Triton path: bytes moved and FLOPs of every GEMM and
kernel, and the time each takes on a card. A lower bound: ideal caching, no launch latency, no tail effects.

    python -m benchmarks.traffic [--n 16384 --h 4096 --v 151936 --m 4096] [--rows R | --budget-mb B]
                                 [--separate-teacher] [--grad-weight bf24|fp32] [--json]

The call (trace_kernels/chunked.py with rows_triton, bf16 inputs, forward + backward with an incoming
gradient of 1, every row valid, the distilled rows spread evenly; the teacher weight is the student's by
default, as S1 is benchmarked) is cut into chunks by the library's planner for the card (trace_kernels/_plan.py);
per chunk of C student rows and K distilled rows, with Vp the padded row stride:

    gather    the C + K GEMM input rows copied into one [C + K, H] buffer
    logits    [C + K, H] @ W^T        fp32 out (one GEMM; with --separate-teacher, the student's and the teacher's)
    stats     one sweep over z                                      (_student_stats_kernel)
    kl        three sweeps over z and u, dx written over u          (_kl_rows_kernel)
    grad      one sweep over z and the distilled rows' dx, dz written in bf16 over z   (_student_grad_kernel)
    d hidden  dz W                    [C, H] fp32 out, then cast once into the bf16 gradient
    d weight  dW += dz^T h            bf24: the bf16 gradient and its 8-bit plane read and written in the GEMM's
                                      epilogue (gemm_triton.py; the first chunk only writes, the last writes bf16);
                                      fp32: the fp32 accumulator read and written (cuBLAS, beta 1), zeroed before
                                      and cast after the loop

Bytes: every operand read once and every output written once per GEMM or sweep. Time of a piece:
max(FLOPs / GEMM rate, bytes / bandwidth), pieces one after another (one stream). GEMM rates are measured
rates (trace_kernels._plan.CARDS says where each comes from), the same rate as the floor, so the ratio to the
floor counts only what is not GEMM arithmetic; bandwidths are datasheet peaks. The floor is the FLOPs alone,
2 N H V (3 + M / N) at the card's GEMM rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np

from trace_kernels import _plan
from trace_kernels._plan import CARDS, Card, card_for, card_rows

MEMORY_GB = {"H100 SXM": 80, "H200": 141}


@dataclass
class Piece:
    name: str
    flops: float
    bytes: float
    launches: int

    def seconds(self, card: Card) -> float:
        return max(self.flops / (card.gemm_tflops * 1e12), self.bytes / (card.hbm_tbps * 1e12))

    def bound(self, card: Card) -> str:
        return "FLOPs" if self.flops / (card.gemm_tflops * 1e12) >= self.bytes / (card.hbm_tbps * 1e12) else "bytes"


def plan(n: int, v: int, m: int, card: Card | None, *, rows: int | None = None, budget_mb: float | None = None,
         free_gb: float | None = None) -> list[tuple[int, int]]:
    """(C, K) per chunk as the library plans them on this card: N rows, M distilled rows spread evenly. rows /
    budget_mb: the chunk_rows / chunk_budget knobs; free_gb: the device memory free at the call (default: the
    card's memory, which caps nothing at these sizes)."""
    from trace_kernels import rows_triton

    kl_counts = np.bincount((np.arange(m) * n // max(m, 1)) if m else np.zeros(0, dtype=np.int64), minlength=n)
    stride = _plan.padded(v)
    caps = [] if budget_mb is None else [budget_mb * 2**20]
    free = (free_gb if free_gb is not None else MEMORY_GB.get(card.name if card else "", 80)) * 1e9
    caps.append(_plan.FREE_MEMORY_FRACTION * free)
    chunks = _plan.split(kl_counts, rows_triton.STUDENT_ROW_BUFFERS * stride * 4,
                         rows_triton.TEACHER_ROW_BUFFERS * stride * 4, target_rows=rows or card_rows(card),
                         cap_bytes=min(caps))
    return [(b - a, int(kl_counts[a:b].sum())) for a, b in chunks]


def pieces(n: int, h: int, v: int, m: int, card: Card | None, *, rows: int | None = None,
           budget_mb: float | None = None, separate_teacher: bool = False, grad_weight: str = "bf24",
           in_bytes: int = 2) -> list[Piece]:
    """Every GEMM and kernel of one forward+backward, summed over the chunks."""
    chunks = plan(n, v, m, card, rows=rows, budget_mb=budget_mb)
    f4, b, vp = 4, in_bytes, _plan.padded(v)
    names = ["gather", "logits", "teacher", "stats", "kl", "grad", "d hidden", "d weight"]
    tot = {k: [0.0, 0.0, 0] for k in names}

    def add(k, flops, nbytes, launches=1):
        tot[k][0] += flops
        tot[k][1] += nbytes
        tot[k][2] += launches

    last = len(chunks) - 1
    for i, (c, k) in enumerate(chunks):
        merged = k > 0 and not separate_teacher
        rows_in = c + (k if merged else 0)
        add("gather", 0, 2 * (c + k) * h * b, 2 if k else 1)
        add("logits", 2 * rows_in * h * v, rows_in * h * b + v * h * b + f4 * rows_in * vp)
        if k and not merged:
            add("teacher", 2 * k * h * v, k * h * b + v * h * b + f4 * k * vp)
        add("stats", 0, f4 * c * v)
        if k:
            add("kl", 0, f4 * k * v * (1 + 2 + 3))  # sweep 1: u; 2: z, u; 3: z, u read, u written
        add("grad", 0, f4 * c * v + f4 * k * v + b * c * v)  # read z and the distilled dx, write dz over z
        add("d hidden", 2 * c * h * v, b * c * v + v * h * b + f4 * c * h + f4 * c * h + b * c * h, 2)
        if grad_weight == "bf24":
            acc_bytes = (0 if i == 0 else 3) + (2 if i == last else 3)  # hi (2) and lo (1) read, written
        else:
            acc_bytes = 2 * f4
        add("d weight", 2 * c * h * v, b * c * v + c * h * b + acc_bytes * v * h)
    out = [Piece(name, fl, by, la) for name, (fl, by, la) in tot.items() if la]
    if grad_weight == "fp32":
        out.append(Piece("zero + cast dW", 0, v * h * (f4 + f4 + b), 2))
    return out


def floor_seconds(n: int, h: int, v: int, m: int, card: Card) -> float:
    """The FLOP floor: 3 + M/N LM-head GEMMs at the card's GEMM rate."""
    return 2 * n * h * v * (3 + m / n) / (card.gemm_tflops * 1e12)


def memory_bytes(n: int, h: int, v: int, m: int, card: Card | None, *, rows: int | None = None,
                 budget_mb: float | None = None, separate_teacher: bool = False, grad_weight: str = "bf24",
                 in_bytes: int = 2) -> dict:
    """Peak device memory of the call beyond its inputs, itemized; "extra" is what it holds beyond the bf16
    gradients (d weight [V, H] and d hidden [N, H] in the inputs' dtype, which any implementation returns)."""
    chunks = plan(n, v, m, card, rows=rows, budget_mb=budget_mb)
    vp = _plan.padded(v)
    c_max = max(c for c, _ in chunks)
    k_max = max(k for _, k in chunks)
    out = {
        "chunk buffers": 4 * vp * (c_max + k_max),  # z and u rows (fp32); dz is written over them
        "GEMM input rows": (c_max + (0 if separate_teacher else k_max)) * h * in_bytes + k_max * h * in_bytes,
        "d hidden fp32 product": 4 * c_max * h,
        "row vectors": 4 * (10 * n + 6 * m),
    }
    if grad_weight == "bf24":
        out["d weight 8-bit plane"] = v * h
    else:  # the fp32 accumulator, and its cast alive with it at the end of the forward
        out["d weight fp32 accumulator"] = 4 * v * h
    out["extra"] = sum(out.values())
    out["bf16 gradients"] = (v * h + n * h) * in_bytes
    out["total"] = out["extra"] + out["bf16 gradients"]
    return out


def summary(n: int, h: int, v: int, m: int, card: Card, **kw) -> dict:
    """The JSON object of one card."""
    ps = pieces(n, h, v, m, card, **kw)
    chunks = plan(n, v, m, card, rows=kw.get("rows"), budget_mb=kw.get("budget_mb"))
    predicted, floor = sum(p.seconds(card) for p in ps), floor_seconds(n, h, v, m, card)
    mem = memory_bytes(n, h, v, m, card, **kw)
    return {"card": card.name, "predicted_ms": round(predicted * 1e3, 2), "floor_ms": round(floor * 1e3, 2),
            "ratio": round(predicted / floor, 4), "extra_memory_gb": round(mem["extra"] / 1e9, 3),
            "chunks": len(chunks), "rows_per_chunk": max(c for c, _ in chunks),
            "teacher": "separate weight" if kw.get("separate_teacher") else "the student's weight (one GEMM)",
            "grad_weight": kw.get("grad_weight", "bf24"), "gemm_tflops": card.gemm_tflops,
            "hbm_tbps": card.hbm_tbps, "rates_source": card.source, "shape": {"n": n, "h": h, "v": v, "m": m},
            "note": "a lower bound: ideal caching, no launch latency; GEMM pieces at the floor's rate"}


def predict(case: str, n: int, h: int, v: int, m: int, dtype: str, device_name: str,
            budget_mb: float | None = None, rows: int | None = None, separate_teacher: bool = False,
            grad_weight: str = "bf24") -> dict | None:
    """Predicted forward+backward seconds of the Triton path and the FLOP floor on this card, for bench_loss's
    CUDA rows; None for a card or dtype the model does not cover. case "trace" has M distilled rows, "grpo" and
    "logprob" none."""
    card = card_for(device_name)
    if card is None or dtype != "bf16":
        return None
    m = m if case == "trace" else 0
    kw = dict(rows=rows, budget_mb=budget_mb, separate_teacher=separate_teacher, grad_weight=grad_weight)
    try:
        ps = pieces(n, h, v, m, card, **kw)
    except ImportError:  # the planner's buffer counts come from the Triton backend
        return None
    return {"card": card.name, "predicted_s": sum(p.seconds(card) for p in ps),
            "floor_s": floor_seconds(n, h, v, m, card),
            "pieces_s": {p.name: p.seconds(card) for p in ps},
            "memory_bound_mb": memory_bytes(n, h, v, m, card, **kw)["total"] / 2**20}


def table(n: int, h: int, v: int, m: int, **kw) -> str:
    cards = list(CARDS.values())
    per_card = {c.name: pieces(n, h, v, m, c, **kw) for c in cards}
    plans = {c.name: plan(n, v, m, c, rows=kw.get("rows"), budget_mb=kw.get("budget_mb")) for c in cards}
    lines = [f"N {n}, H {h}, V {v}, M {m}, bf16, teacher {'separate' if kw.get('separate_teacher') else 'live'}, "
             f"d weight {kw.get('grad_weight', 'bf24')}: "
             + "; ".join(f"{name} {len(p)} chunks of up to {max(r for r, _ in p)} rows" for name, p in plans.items()),
             "",
             "| piece | " + " | ".join(f"{c.name}: launches, GFLOP, GB, ms (bound)" for c in cards) + " |",
             "|---|" + "---|" * len(cards)]
    names = list(dict.fromkeys(p.name for ps in per_card.values() for p in ps))
    for name in names:
        cells = []
        for c in cards:
            p = next((p for p in per_card[c.name] if p.name == name), None)
            cells.append("" if p is None else f"{p.launches}, {p.flops / 1e9:.0f}, {p.bytes / 1e9:.2f}, "
                         f"{p.seconds(c) * 1e3:.2f} ({p.bound(c)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(p.seconds(c) for p in per_card[c.name]) * 1e3:.1f} ms**"
                                               for c in cards) + " |")
    lines.append("| FLOP floor 2NHV(3 + M/N) | " + " | ".join(
        f"{floor_seconds(n, h, v, m, c) * 1e3:.1f} ms at {c.gemm_tflops:g} TFLOP/s" for c in cards) + " |")
    lines.append("| ratio | " + " | ".join(
        f"{sum(p.seconds(c) for p in per_card[c.name]) / floor_seconds(n, h, v, m, c):.3f}" for c in cards) + " |")
    for c in cards:
        mem = memory_bytes(n, h, v, m, c, **kw)
        lines.append("")
        lines.append(f"{c.name} memory beyond the inputs (GB): " + ", ".join(f"{k} {val / 1e9:.3f}"
                                                                            for k, val in mem.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--m", type=int, default=None, help="distilled rows (default N/4)")
    ap.add_argument("--rows", type=int, default=None, help="rows per chunk (trace_kernels.chunk_rows)")
    ap.add_argument("--budget-mb", type=float, default=None, help="chunk budget (trace_kernels.chunk_budget)")
    ap.add_argument("--separate-teacher", action="store_true", help="the teacher has its own weight (snapshot)")
    ap.add_argument("--grad-weight", default="bf24", choices=["bf24", "fp32"])
    ap.add_argument("--json", action="store_true", help="one JSON object per card, one per line")
    args = ap.parse_args(argv)
    m = args.n // 4 if args.m is None else args.m
    kw = dict(rows=args.rows, budget_mb=args.budget_mb, separate_teacher=args.separate_teacher,
              grad_weight=args.grad_weight)
    if args.json:
        for card in CARDS.values():
            print(json.dumps(summary(args.n, args.h, args.v, m, card, **kw)))
    else:
        print(table(args.n, args.h, args.v, m, **kw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
