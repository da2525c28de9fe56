"""The CPU chunk plan, measured: forward+backward time and peak extra memory of impl="torch" over chunk budgets
(bytes of one chunk's [rows, V] buffers) and chunk row counts, each setting in a fresh process.

    python -m benchmarks.chunk_sweep_cpu [--shapes 4096x256x32000,1024x256x151936] [--budgets-mb 16,...]
                                          [--rows 64,...] [--repeats 3] [--out DIR]

The trace case of benchmarks/problem.py (GRPO + k3, both KL branches with the 0.05 clip on M = N/4 distilled
rows), fp32. Settings are run in an interleaved order, twice (--rounds), so that a load change on a shared
machine spreads over all of them; the table gives the median over rounds of each round's median. Its verdict
is the setting trace_kernels/_plan.py's DEFAULT_CPU_BUDGET_MB should hold: the smallest budget within 5% of
the fastest, per shape.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from .rss import reset_peak, status_kb


def worker(spec: dict) -> dict:
    import torch

    import trace_kernels as tk

    from .problem import make_inputs

    torch.set_num_threads(os.cpu_count() or 1)
    kw = make_inputs(spec["n"], spec["h"], spec["v"], spec["n"] // 4, seed=0)
    hidden = kw.pop("hidden").requires_grad_(True)
    weight = kw.pop("weight").requires_grad_(True)
    targets, advantages = kw.pop("targets"), kw.pop("advantages")
    knob = tk.chunk_budget(spec["value"]) if spec["kind"] == "budget_mb" else tk.chunk_rows(int(spec["value"]))
    gc.collect()
    rss0 = reset_peak()
    times = []
    with knob:
        for i in range(spec["repeats"] + 1):
            t0 = time.perf_counter()
            tk.trace_loss(hidden, weight, targets, advantages, impl="torch", **kw).loss.backward()
            hidden.grad = weight.grad = None
            if i:
                times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "peak_extra_mb": (status_kb("VmHWM") * 1024 - rss0) / 2**20,
            "torch": torch.__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x256x32000,1024x256x151936", help="NxHxV, comma-separated")
    ap.add_argument("--budgets-mb", default="32,64,128,256,512,1024")
    ap.add_argument("--rows", default="64,256,1024")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ")
    out = args.out or os.path.join("benchmarks", "out", f"chunk-sweep-cpu-{stamp}")
    os.makedirs(out, exist_ok=True)
    settings = [("budget_mb", float(b)) for b in args.budgets_mb.split(",") if b] + [
        ("rows", float(r)) for r in args.rows.split(",") if r]
    load_start = os.getloadavg()
    results: dict[tuple, list] = {}
    for shape in args.shapes.split(","):
        n, h, v = (int(x) for x in shape.split("x"))
        for rnd in range(args.rounds):
            for kind, value in (settings if rnd % 2 == 0 else settings[::-1]):
                spec = {"n": n, "h": h, "v": v, "kind": kind, "value": value, "repeats": args.repeats}
                print(f"N {n} H {h} V {v} {kind} {value:g} (round {rnd + 1}) ...", flush=True)
                res = subprocess.run([sys.executable, "-m", f"{__package__}.chunk_sweep_cpu", "--worker",
                                      json.dumps(spec)], capture_output=True, text=True)
                if res.returncode:
                    print(res.stderr[-2000:], file=sys.stderr)
                    return 1
                results.setdefault((n, h, v, kind, value), []).append(json.loads(res.stdout.splitlines()[-1]))
    rows = []
    for (n, h, v, kind, value), runs in results.items():
        rows.append({"n": n, "h": h, "v": v, "knob": kind, "value": value,
                     "median_s": statistics.median(r["median_s"] for r in runs),
                     "round_medians_s": " ".join(f"{r['median_s']:.2f}" for r in runs),
                     "peak_extra_mb": max(r["peak_extra_mb"] for r in runs)})
    verdicts = []
    for shape in sorted({(r["n"], r["h"], r["v"]) for r in rows}):
        sel = [r for r in rows if (r["n"], r["h"], r["v"]) == shape]
        best = min(r["median_s"] for r in sel)
        ok = sorted((r for r in sel if r["knob"] == "budget_mb" and r["median_s"] <= 1.05 * best),
                    key=lambda r: r["value"])
        pick = f"{ok[0]['value']:g} MB" if ok else "a row count (no budget within 5% of the fastest)"
        verdicts.append(f"N {shape[0]} H {shape[1]} V {shape[2]}: fastest {best:.2f} s; smallest budget within 5%: "
                        f"{pick}")
    head = (f"chunk_sweep_cpu, {stamp}, {platform.machine()} {platform.processor() or ''} CPU, {os.cpu_count()} "
            f"cores, torch {rows[0] and results[next(iter(results))][0]['torch']}, fp32, trace case (M = N/4), "
            f"forward+backward, median of {args.repeats} per process, {args.rounds} rounds (interleaved); load "
            "average (1, 5, 15 min) at start {:.2f} {:.2f} {:.2f}, at end {:.2f} {:.2f} {:.2f}".format(
                *load_start, *os.getloadavg()))
    lines = [head, "", "| N | H | V | knob | value | median s | per round | peak extra MB |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['h']} | {r['v']} | {r['knob']} | {r['value']:g} | {r['median_s']:.2f} | "
              f"{r['round_medians_s']} | {r['peak_extra_mb']:.0f} |" for r in rows]
    lines += ["", *verdicts]
    with open(os.path.join(out, "chunk_sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "chunk_sweep.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
