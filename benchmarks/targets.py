"""Performance targets of the fused loss (benchmark targets, not timed tests), and their verdict on a
bench_loss results.csv:

    python -m benchmarks.targets OUT/s1/results.csv     # benchmarks/gpu_check.sh runs it on its S1 run

Each target compares two rows of the same case and shape. A target whose rows are missing, skipped or fail
the fp64 check is reported as "not measured", never as met.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    where: str  # the card and shape it is set for
    case: str
    ours: str  # bench_loss impl names
    peer: str
    min_speedup: float  # peer median time / ours
    max_memory_ratio: float  # ours peak extra memory / peer's
    why: str


TARGETS = [
    Target(
        "S1 vs TRL", "H100, S1 = N 16,384 / H 4,096 / V 151,936 / M = N/4, bf16", "trace", "trace_triton", "trl",
        1.5, 1.0,
        "forward+backward in 3 + M/N LM-head GEMM units against TRL's 4 + 12 M/N (ChunkedLogProbFunction: forward "
        "plus a recomputing backward, 4 units; ChunkedDivergenceFunction once per KL direction, each 6 M/N: both "
        "models' tiles forward, both recomputed in the backward, two gradient GEMMs), 3.25 against 7 at M = N/4",
    ),
]


def verdicts(rows: list[dict], card: str = "") -> list[str]:
    """One markdown table row per target."""
    out = []
    for t in TARGETS:
        ours = next((r for r in rows if r["case"] == t.case and r["impl"] == t.ours and r.get("median_s")), None)
        peer = ours and next((r for r in rows if r["case"] == t.case and r["impl"] == t.peer and r.get("median_s")
                              and (r["n"], r["v"]) == (ours["n"], ours["v"])), None)
        goal = f">= {t.min_speedup:g}x faster, memory <= {t.max_memory_ratio:g}x"
        if not ours or not peer or ours["status"] != "ok" or peer["status"] != "ok":
            out.append(f"| {t.name} | {t.where} | {goal} | - | - | not measured |")
            continue
        speedup = float(peer["median_s"]) / float(ours["median_s"])
        memory = float(ours["peak_extra_mb"]) / max(float(peer["peak_extra_mb"]), 1e-9)
        met = speedup >= t.min_speedup and memory <= t.max_memory_ratio
        shape = f"N {ours['n']}, V {ours['v']}"
        out.append(f"| {t.name} | {t.where} | {goal} | {speedup:.2f}x | {memory:.2f}x | "
                   f"{'met' if met else 'NOT met'} ({shape}{', ' + card if card else ''}) |")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rows = []
    if argv:
        with open(argv[0], newline="") as f:
            rows = list(csv.DictReader(f))
    print("| target | set for | goal | measured speedup | measured memory ratio | verdict |")
    print("|---|---|---|---|---|---|")
    print("\n".join(verdicts(rows, argv[1] if len(argv) > 1 else "")))
    for t in TARGETS:
        print(f"\n{t.name}: {t.why}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
