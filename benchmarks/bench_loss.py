"""Benchmark suite: trace_kernels against the naive loss, torch.compile, Liger-Kernel, TRL's fused kernels and
torch's linear_cross_entropy, on the same inputs, forward+backward.

    python -m benchmarks.bench_loss --quick                      # CPU: 7 minutes on 2 busy cores (2026-11-26)
    python -m benchmarks.bench_loss --device cuda --dtype bf16 --n 16384 --h 4096 --v 151936

Before timing, every implementation is checked against the fp64 reference on a small problem of the
same case (loss and both gradients); a disagreement is reported in the table, never hidden. The chunk plan of
trace_kernels can be set (--chunk-rows, --chunk-mb, --grad-weight); --csv FILE appends each row to FILE as soon
as it is measured (benchmarks/gpu_check.sh: a timeout loses nothing measured). Timings are
medians over --repeats after a warm-up (compilation excluded), with the min-max spread. Peak extra
memory: on CUDA the allocator's peak above the inputs; on the CPU the resident-set high-water mark of a
fresh process per measurement, above the inputs, warm-up (and compilation) included. Ratios are against
the naive loss measured in the same run. On CUDA the achieved TFLOP/s count the LM-head GEMM floor
2NHV (3 + M/N) (the student logits, the two gradient GEMMs, the teacher logits of the M distilled rows),
against the card's measured bf16 matmul rate. The header records the load average (a shared machine's
timings are only as good as its idle cores) and the TRL version. Output: results.csv, results.md (printed
last) and PNG plots in --out.
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

import torch

from .impls import ALL_CASES, IMPLS, make_problem
from .rss import reset_peak, status_kb
from .traffic import predict

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_agreement(name: str, case: str, device: str, dtype: torch.dtype, v: int, n: int = 256) -> float:
    """Normwise relative error of the loss and both gradients against the fp64 reference on a small
    problem (N 256, H 64, the run's V capped at 8192); gradients only for "logprob" (values differ)."""
    import trace_kernels as tk

    small_v = min(v, 8192)
    p = make_problem(case, n, 64, small_v, n // 4, dtype=dtype, device=device, seed=1)
    step = IMPLS[name].build(p)
    loss = step()
    gh, gw = torch.autograd.grad(loss, [p.hidden, p.weight])
    h64 = p.hidden.detach().double().requires_grad_(True)
    w64 = p.weight.detach().double().requires_grad_(True)
    kw64 = {k: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for k, t in p.kwargs.items()}
    ref = tk.trace_loss(h64, w64, p.targets, p.advantages.double(), impl="reference", **kw64).loss
    rgh, rgw = torch.autograd.grad(ref, [h64, w64])

    def err(a, e):
        return ((a.double() - e).abs().max() / e.abs().max().clamp(min=1e-30)).item()

    errors = [err(gh, rgh), err(gw, rgw)]
    if case != "logprob":
        errors.append(abs(loss.item() - ref.item()) / max(abs(ref.item()), 0.1))
    return max(errors)


def matmul_tflops(device: str) -> float | None:
    """The card's bf16 GEMM rate (8192^3, median of 10)."""
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    times = []
    for _ in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times[3:]) / 1e12


def knobs(args):
    """The trace_kernels chunk-plan settings of this run (a context)."""
    import contextlib

    import trace_kernels as tk

    stack = contextlib.ExitStack()
    if getattr(args, "chunk_rows", None):
        stack.enter_context(tk.chunk_rows(args.chunk_rows))
    if getattr(args, "chunk_mb", None):
        stack.enter_context(tk.chunk_budget(args.chunk_mb))
    if getattr(args, "grad_weight", None):
        stack.enter_context(tk.grad_weight_accumulator(args.grad_weight))
    return stack


def forward_backward(name: str, case: str, n: int, h: int, v: int, m: int, device: str, dtype: torch.dtype):
    """(problem, once): once() -> loss, one forward+backward of `name` on a fresh problem of the case (gradients
    reset first, CUDA synchronised after), what the suite times."""
    p = make_problem(case, n, h, v, m, dtype=dtype, device=device)
    step = IMPLS[name].build(p)

    def once():
        p.hidden.grad = p.weight.grad = None
        loss = step()
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.detach()
    return p, once


def measure(name: str, case: str, n: int, h: int, v: int, m: int, device: str, dtype: torch.dtype,
            repeats: int) -> dict:
    """Median time and peak extra memory of forward+backward, in this process."""
    p, step = forward_backward(name, case, n, h, v, m, device, dtype)

    def once():
        return step().item()

    gc.collect()
    if device == "cpu":
        # Reset before the warm-up: memory the warm-up makes resident stays resident (the heap keeps it)
        # and would otherwise never show in the high-water mark.
        base = reset_peak()
    once()  # warm-up: compilation, autotuning, allocator
    if device == "cuda":
        p.hidden.grad = p.weight.grad = None  # the base is the inputs alone, not the warm-up's gradients
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else status_kb("VmHWM") * 1024
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "peak_extra_mb": (peak - base) / 2**20}


def run_fresh(args, name: str, case: str, n: int, v: int, m: int) -> dict:
    """One CPU measurement in a fresh process, so that its peak resident set is its own."""
    cmd = [sys.executable, "-m", f"{__package__}.bench_loss", "--worker", json.dumps(
        {"name": name, "case": case, "n": n, "h": args.h, "v": v, "m": m, "dtype": args.dtype,
         "repeats": args.repeats, "chunk_rows": args.chunk_rows, "chunk_mb": args.chunk_mb,
         "grad_weight": args.grad_weight})]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--case", default="trace", help=f"comma-separated of {ALL_CASES}")
    ap.add_argument("--n", default="16384", help="comma-separated token counts (a sweep in N)")
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--v", default="32000", help="comma-separated vocabulary sizes (a sweep in V)")
    ap.add_argument("--kl-frac", type=float, default=0.25, help="distilled rows M as a fraction of N")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: small shapes, a few minutes")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--csv", default=None, help="append each measured row to this CSV (no --out folder)")
    ap.add_argument("--check-n", type=int, default=256, help="rows of the fp64 agreement check's problem")
    ap.add_argument("--in-process", action="store_true",
                    help="CPU: measure in this process (no fresh process per row: quicker, memory not isolated)")
    ap.add_argument("--chunk-rows", type=int, default=None, help="trace_kernels.chunk_rows for the trace rows")
    ap.add_argument("--chunk-mb", type=float, default=None, help="trace_kernels.chunk_budget for the trace rows")
    ap.add_argument("--grad-weight", default=None, choices=["bf24", "fp32"], help="trace_kernels' d weight sum")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        w = json.loads(args.worker)
        torch.set_num_threads(os.cpu_count() or 1)
        with knobs(argparse.Namespace(**w)):
            print(json.dumps(measure(w["name"], w["case"], w["n"], w["h"], w["v"], w["m"], "cpu", DTYPES[w["dtype"]],
                                     w["repeats"])))
        return 0
    if args.quick:
        args.device, args.n, args.h, args.v, args.repeats = "cpu", "1024,2048,4096", 128, "8192", 3
        args.case = "trace,grpo,logprob" if args.case == "trace" else args.case
        if args.impls == ",".join(IMPLS):
            args.impls = "naive,trace_torch,liger,trl,torch_linear_ce"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    ns, vs = [int(x) for x in args.n.split(",")], [int(x) for x in args.v.split(",")]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ")
    out = None
    if not args.csv:
        out = args.out or os.path.join("benchmarks", "out", f"bench_loss-{args.device}-{stamp}")
        os.makedirs(out, exist_ok=True)
    card = (torch.cuda.get_device_name() if args.device == "cuda"
            else f"{platform.machine()} CPU, {os.cpu_count()} cores")
    rate = matmul_tflops(args.device)
    args.load_start = os.getloadavg()

    rows = []
    for case in args.case.split(","):
        for name in args.impls.split(","):
            why = IMPLS[name].available(case, args.device)
            if why is not None:
                rows.append({"case": case, "impl": name, "status": f"skipped: {why}"})
                continue
            try:
                agreement = check_agreement(name, case, args.device, dtype, max(vs), args.check_n)
            except Exception as e:  # reported, never hidden
                rows.append({"case": case, "impl": name, "status": f"error in check: {type(e).__name__}: {e}"[:200]})
                continue
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            for n in ns:
                for v in vs:
                    m = int(n * args.kl_frac) if case == "trace" else 0
                    print(f"{case} {name} N={n} V={v} ...", flush=True)
                    if args.device == "cpu" and not args.in_process:
                        res = run_fresh(args, name, case, n, v, m)
                    else:
                        try:
                            with knobs(args):
                                res = measure(name, case, n, args.h, v, m, args.device, dtype, args.repeats)
                        except torch.OutOfMemoryError:
                            res = {"error": "out of memory"}
                        torch.cuda.empty_cache()
                    row = {"case": case, "impl": name, "n": n, "h": args.h, "v": v, "m": m, "dtype": args.dtype,
                           "agreement_err": agreement,
                           "status": "ok" if agreement <= tol else f"DISAGREES with the reference ({agreement:.1e})"}
                    if "error" in res:
                        row["status"] = res["error"]
                    else:
                        row.update(res)
                        floor_flops = 2 * n * args.h * v * (3 + m / n)
                        if args.device == "cuda":
                            row["tflops"] = floor_flops / res["median_s"] / 1e12
                            row["floor_s"] = floor_flops / (rate * 1e12)
                            model = predict(case, n, args.h, v, m, args.dtype, card, budget_mb=args.chunk_mb,
                                            rows=args.chunk_rows, grad_weight=args.grad_weight or "bf24")
                            if model:  # benchmarks/traffic.py
                                row["model_s"] = model["predicted_s"]
                                row["model_memory_bound_mb"] = model["memory_bound_mb"]
                    rows.append(row)
                    if args.csv:
                        append_csv(args.csv, dict(row, card=card, stamp=stamp, chunk_rows=args.chunk_rows,
                                                  chunk_mb=args.chunk_mb, grad_weight=args.grad_weight))

    for r in rows:
        base = next((b for b in rows if b["impl"] == "naive" and b["case"] == r["case"] and b.get("n") == r.get("n")
                     and b.get("v") == r.get("v") and "median_s" in b), None)
        if base and "median_s" in r:
            r["time_vs_naive"] = r["median_s"] / base["median_s"]
            r["memory_vs_naive"] = r["peak_extra_mb"] / max(base["peak_extra_mb"], 1e-9)
    write_outputs(rows, out, card, rate, stamp, args)
    return 0


CSV_COLUMNS = ["stamp", "card", "case", "impl", "n", "h", "v", "m", "dtype", "chunk_rows", "chunk_mb", "grad_weight",
               "median_s", "min_s", "max_s", "peak_extra_mb", "tflops", "floor_s", "model_s", "model_memory_bound_mb",
               "agreement_err", "status"]


def append_csv(path: str, row: dict) -> None:
    """Append one row (flushed to disk) to a CSV shared by several runs; the header once."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def write_outputs(rows, out, card, rate, stamp, args):
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("case", "impl", "n", "v"), k))
    if out:
        with open(os.path.join(out, "results.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    head = (f"bench_loss, {stamp}, {card}, torch {torch.__version__}, {args.dtype}, H={args.h}, "
            f"M/N={args.kl_frac} (trace case), forward+backward, median of {args.repeats}")
    if rate:
        head += f", measured bf16 matmul {rate:.0f} TFLOP/s"
    head += ", load average (1, 5, 15 min) at start {:.2f} {:.2f} {:.2f}, at end {:.2f} {:.2f} {:.2f}".format(
        *args.load_start, *os.getloadavg())
    if any(r["impl"] == "trl" and "median_s" in r for r in rows):
        from . import trl_impl
        k = trl_impl.kernels()
        head += f", trl {k.version} ({'package import' if k.how == 'trl' else k.how})"
    lines = [head, "", "| case | impl | N | V | median s (min-max) | peak extra MB | time / naive | memory / naive "
             "| TFLOP/s (floor s) | check err | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "median_s" not in r:
            lines.append(f"| {r['case']} | {r['impl']} | {r.get('n', '')} | {r.get('v', '')} | | | | | | "
                         f"{r.get('agreement_err', float('nan')):.1e} | {r['status']} |")
            continue
        tf = f"{r['tflops']:.0f} ({r['floor_s'] * 1e3:.1f} ms)" if "tflops" in r else "-"
        tf += f", model {r['model_s'] * 1e3:.1f} ms" if "model_s" in r else ""
        lines.append(
            f"| {r['case']} | {r['impl']} | {r['n']} | {r['v']} | {r['median_s']:.3f} ({r['min_s']:.3f}-"
            f"{r['max_s']:.3f}) | {r['peak_extra_mb']:.0f} | {r.get('time_vs_naive', float('nan')):.3f} | "
            f"{r.get('memory_vs_naive', float('nan')):.3f} | {tf} | {r['agreement_err']:.1e} | {r['status']} |")
    table = "\n".join(lines)
    if out:
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(table + "\n")
        if not args.no_plots:
            plot(rows, out)
    print(table)
    print(f"\nwritten to {out or args.csv}")


def plot(rows, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install -e '.[bench]')")
        return
    for case in sorted({r["case"] for r in rows}):
        for axis in ("n", "v"):
            sel = [r for r in rows if r["case"] == case and "median_s" in r]
            if len({r[axis] for r in sel}) < 2:
                continue
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
            for name in sorted({r["impl"] for r in sel}):
                pts = sorted((r[axis], r["median_s"], r["min_s"], r["max_s"], r["peak_extra_mb"])
                             for r in sel if r["impl"] == name)
                xs = [p[0] for p in pts]
                ax_t.errorbar(xs, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                              marker="o", label=name, capsize=3)
                ax_m.plot(xs, [p[4] for p in pts], marker="o", label=name)
            for ax, label in ((ax_t, "median forward+backward (s)"), (ax_m, "peak extra memory (MB)")):
                ax.set_xlabel(axis.upper())
                ax.set_ylabel(label)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.grid(alpha=0.3)
            ax_t.legend(fontsize=8)
            fig.suptitle(f"{case}: time and memory against {axis.upper()}")
            fig.tight_layout()
            fig.savefig(os.path.join(out, f"{case}_vs_{axis}.png"), dpi=110)
            plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
