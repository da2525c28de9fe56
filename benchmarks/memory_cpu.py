"""Peak memory and time of trace_loss forward+backward on the CPU: impl="torch" against the naive loss.

    python -m benchmarks.memory_cpu [--n 16384 --h 256 --v 32000 --m 4096 --repeats 3 --out DIR]

Each implementation runs in a fresh process (so one's allocations cannot hide in another's peak). Peak
memory is the process's resident-set high-water mark (VmHWM, reset after the inputs are built) minus the
resident set at that point: the extra memory the loss needs, gradients included. Time is the median of
--repeats forward+backward passes after one warm-up pass. The naive loss is `impl="reference"`: every
[N, V] tensor materialized, gradients by autograd.
"""

from __future__ import annotations

import argparse
import contextlib
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

IMPLS = {"naive": "reference", "trace_torch": "torch"}


def worker(args) -> dict:
    import torch

    import trace_kernels as tk

    from .problem import make_inputs

    torch.set_num_threads(os.cpu_count() or 1)
    kw = make_inputs(args.n, args.h, args.v, args.m, seed=args.seed)
    hidden = kw.pop("hidden").requires_grad_(True)
    weight = kw.pop("weight").requires_grad_(True)
    targets, advantages = kw.pop("targets"), kw.pop("advantages")

    def step():
        out = tk.trace_loss(hidden, weight, targets, advantages, impl=IMPLS[args.worker], **kw)
        out.loss.backward()
        loss = out.loss.item()
        hidden.grad = weight.grad = None
        return loss

    gc.collect()
    rss0 = reset_peak()
    times, loss = [], None
    budget = float(args.budget_mb)  # 0: the library's default plan
    with tk.chunk_budget(budget) if budget else contextlib.nullcontext():
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            loss = step()
            if i:  # the first pass warms up allocator and thread pool
                times.append(time.perf_counter() - t0)
    return {"impl": args.worker, "loss": loss, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "peak_extra_mb": (status_kb("VmHWM") * 1024 - rss0) / 2**20,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-mb", default="128,256",
                   help="chunk memory budgets of trace_torch (comma-separated: one row each)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--out", default=None, help="results folder (default benchmarks/out/memory_cpu-<date>)")
    p.add_argument("--worker", choices=list(IMPLS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ")
    out_dir = args.out or os.path.join("benchmarks", "out", f"memory_cpu-{stamp}")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    runs = [(name, budget) for name in args.impls.split(",")
            for budget in (args.budget_mb.split(",") if name != "naive" else ["0"])]
    for name, budget in runs:
        cmd = [sys.executable, "-m", f"{__package__}.memory_cpu", "--worker", name, f"--budget-mb={budget}"] + [
            f"--{k}={getattr(args, k)}" for k in ("n", "h", "v", "m", "repeats", "seed")]
        print(f"running {name} (budget {budget} MB) in a fresh process ...", flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(res.stdout, res.stderr, file=sys.stderr)
            return res.returncode
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["budget_mb"] = float(budget) if name != "naive" else None
        rows.append(row)

    base = next((r for r in rows if r["impl"] == "naive"), None)
    for r in rows:
        r["time_vs_naive"] = r["median_s"] / base["median_s"] if base else None
        r["memory_vs_naive"] = r["peak_extra_mb"] / base["peak_extra_mb"] if base else None
        r["loss_rel_diff_vs_naive"] = abs(r["loss"] - base["loss"]) / abs(base["loss"]) if base else None
    header = (f"CPU memory benchmark, {stamp}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {rows[0]['torch']}: N={args.n} H={args.h} V={args.v} M={args.m} fp32, forward+backward, "
              f"median of {args.repeats} after one warm-up pass")
    lines = [header, "",
             "| impl | chunk budget MB | median s (min-max) | peak extra MB | time / naive | memory / naive "
             "| loss rel. diff |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = "-" if r["budget_mb"] is None else f"{r['budget_mb']:g}"
        lines.append(f"| {r['impl']} | {budget} | {r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) | "
                     f"{r['peak_extra_mb']:.0f} | {r['time_vs_naive']:.3f} | {r['memory_vs_naive']:.4f} | "
                     f"{r['loss_rel_diff_vs_naive']:.1e} |")
    table = "\n".join(lines)
    with open(os.path.join(out_dir, "memory_cpu.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "memory_cpu.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(table)
    print(f"\nwritten to {out_dir}/memory_cpu.md and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
