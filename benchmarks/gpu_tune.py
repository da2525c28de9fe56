"""The chunk plan on a GPU, measured: impl="triton" forward+backward at one shape over a sweep of chunk plans, in
one process, with the time of every piece of the chunk loop (CUDA events, trace_kernels._chunk.TIMER) beside the
traffic model's prediction for the same plan (benchmarks/traffic.py).

    python -m benchmarks.gpu_tune --out OUT_DIR [--plans default,rows:512,...,mb:256] [--grad-weight bf24,fp32]
                                  [--teacher live,separate] [--n 16384 --h 4096 --v 151936 --m 4096] [--repeats 3]
    python -m benchmarks.gpu_tune --dry-run --out OUT_DIR      # the same on the CPU (Triton interpreter), tiny

Each row of OUT_DIR/tune.csv is written and flushed as soon as it is measured; the table is printed last. The
problem is benchmarks/problem.py's trace case drawn once on the device (teacher "separate" gives the teacher
its own weight: the snapshot teacher of the Qwen3 recipes); per plan one warm-up, then --repeats timed calls.
Pieces: gather (the GEMM input rows), logits (and teacher: the separate teacher's GEMM), stats, kl, pg, grad
(the row kernels), d hidden, d weight; "total" is the whole call (forward and backward) between two events.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import statistics
import sys
import time

import torch

import trace_kernels as tk
from trace_kernels import _chunk

from .problem import make_inputs
from .traffic import predict

PIECES = ["gather", "logits", "teacher", "stats", "kl", "pg", "grad", "d hidden", "d weight"]


class _CpuTimer:
    """_chunk.TIMER's interface with host clocks (the dry run: the CPU runs synchronously)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def piece(self, name):
        t0 = time.perf_counter()
        yield
        self.totals[name] = self.totals.get(name, 0.0) + (time.perf_counter() - t0) * 1e3
        self.counts[name] = self.counts.get(name, 0) + 1

    def totals_ms(self):
        out, self.totals = self.totals, {}
        return out


def _knobs(plan: str, grad_weight: str):
    stack = contextlib.ExitStack()
    kind, _, value = plan.partition(":")
    if kind == "rows":
        stack.enter_context(tk.chunk_rows(int(value)))
    elif kind == "mb":
        stack.enter_context(tk.chunk_budget(float(value)))
    elif kind != "default":
        raise ValueError(f"--plans: expected default, rows:R or mb:B, got {plan!r}")
    stack.enter_context(tk.grad_weight_accumulator(grad_weight))
    return stack


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--plans", default="default,rows:512,rows:768,rows:1024,rows:1536,rows:2048,mb:256")
    ap.add_argument("--grad-weight", default="bf24,fp32")
    ap.add_argument("--teacher", default="live,separate")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--m", type=int, default=None, help="distilled rows (default N/4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes, no warm-up")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        args.n, args.h, args.v, args.repeats = 16, 16, 128, 1
        args.plans = "default,rows:8,mb:0.002"
        device, dtype, card = "cpu", torch.float32, "NVIDIA H200 (dry run: prediction only)"
    else:
        if not torch.cuda.is_available():
            print("gpu_tune: no CUDA device (use --dry-run on the CPU)", file=sys.stderr)
            return 2
        device, dtype, card = "cuda", torch.bfloat16, torch.cuda.get_device_name()
    m = args.n // 4 if args.m is None else args.m
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tune.csv")
    columns = ["card", "n", "h", "v", "m", "teacher", "grad_weight", "plan", "chunks", "total_ms", "total_min_ms",
               "model_ms", "peak_extra_mb", "status"] + [f"{p}_ms" for p in PIECES] + [f"{p}_model_ms" for p in PIECES]
    timer = _CpuTimer() if device == "cpu" else _chunk._Timer()
    base_kw = make_inputs(args.n, args.h, args.v, m, dtype=dtype, device=device)
    rows = []
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        out.writeheader()
        f.flush()
        for teacher in args.teacher.split(","):
            kw = dict(base_kw)
            if teacher == "separate":
                kw["teacher_weight"] = kw["weight"] * 1.01  # a snapshot's own weight
            hidden = kw.pop("hidden").detach().requires_grad_(True)
            weight = kw.pop("weight").detach().requires_grad_(True)
            targets, advantages = kw.pop("targets"), kw.pop("advantages")
            for grad_weight in args.grad_weight.split(","):
                for plan in args.plans.split(","):
                    row = {"card": card, "n": args.n, "h": args.h, "v": args.v, "m": m, "teacher": teacher,
                           "grad_weight": grad_weight, "plan": plan, "status": "ok"}
                    try:
                        row.update(_measure(hidden, weight, targets, advantages, kw, plan, grad_weight, timer,
                                            args.repeats, device, warm_up=not args.dry_run))
                    except torch.OutOfMemoryError:
                        row["status"] = "out of memory"
                    except Exception as e:  # reported in the row, the sweep goes on
                        row["status"] = f"error: {type(e).__name__}: {e}"[:200]
                    kind, _, value = plan.partition(":")
                    model = predict("trace", args.n, args.h, args.v, m, "bf16", card,
                                    budget_mb=float(value) if kind == "mb" else None,
                                    rows=int(value) if kind == "rows" else None,
                                    separate_teacher=teacher == "separate", grad_weight=grad_weight)
                    if model:
                        row["model_ms"] = round(model["predicted_s"] * 1e3, 4)
                        for p, s in model["pieces_s"].items():
                            row[f"{p}_model_ms"] = round(s * 1e3, 4)
                    rows.append(row)
                    out.writerow(row)
                    f.flush()
                    os.fsync(f.fileno())
                    print(f"{teacher} {grad_weight} {plan}: {row.get('total_ms', '-')} ms (model "
                          f"{row.get('model_ms', '-')} ms) {row['status']}", flush=True)
                    if device == "cuda":
                        torch.cuda.empty_cache()
    print(_table(rows))
    return 0


def _measure(hidden, weight, targets, advantages, kw, plan, grad_weight, timer, repeats, device,
             warm_up=True) -> dict:
    def once():
        hidden.grad = weight.grad = None
        tk.trace_loss(hidden, weight, targets, advantages, impl="triton", **kw).loss.backward()

    with _knobs(plan, grad_weight):
        if warm_up:
            once()  # compilation, allocator
        hidden.grad = weight.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        totals, pieces = [], []
        timer.counts = {}
        for _ in range(repeats):
            _chunk.TIMER = timer
            try:
                if device == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    once()
                    end.record()
                    torch.cuda.synchronize()
                    totals.append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    once()
                    totals.append((time.perf_counter() - t0) * 1e3)
            finally:
                _chunk.TIMER = None
            pieces.append(timer.totals_ms())
    res = {"total_ms": round(statistics.median(totals), 3), "total_min_ms": round(min(totals), 3),
           "chunks": timer.counts.get("logits", 0) // repeats}
    for p in PIECES:
        values = [d.get(p, 0.0) for d in pieces]
        res[f"{p}_ms"] = round(statistics.median(values), 3)
    if device == "cuda":
        res["peak_extra_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    return res


def _table(rows) -> str:
    head = ["teacher", "d weight", "plan", "chunks", "total ms (model)"] + [f"{p} (model)" for p in PIECES] + [
        "peak extra MB", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["teacher"], r["grad_weight"], r["plan"], str(r.get("chunks", "")),
                 f"{r.get('total_ms', '-')} ({r.get('model_ms', '-')})"]
        cells += [f"{r.get(p + '_ms', '-')} ({r.get(p + '_model_ms', '-')})" for p in PIECES]
        cells += [str(r.get("peak_extra_mb", "-")), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
