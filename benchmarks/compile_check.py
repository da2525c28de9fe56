"""Compile every Triton kernel of trace_kernels (rows_triton.py, gemm_triton.py) for NVIDIA GPUs, without a GPU.

    python -m benchmarks.compile_check [--arch sm_90a,sm_80] [--out DIR] [--subset] [--blocks B,...]
                                       [--maps all|plain|mapped] [--jobs J]

Each kernel is compiled in every specialization its launcher (rows_triton.chunk_rows, gemm_triton.grad_weight)
can produce: the constexpr flags it can pass, the dz dtypes (with the fp16 scale), the logit map's flags of the
row kernels (HAS_BIAS, SOFTCAP: MAP_VARIANTS), and for the row kernels the (BLOCK_V, num_warps) pairs that
rows_triton.block_and_warps gives for vocabularies from 1 to 262,144 (151,936 included), each twice:
with every pointer and integer argument known to be a multiple of 16 (Triton's launch-time
specialization for 16-byte aligned tensors and a vocabulary such as 151,936) and with none known so (a
vocabulary such as 50,257, a tensor sliced at an odd row: more registers, no vectorized loads).
`triton.compile` goes to a cubin through Triton's own ptxas call; its `ptxas -v` log
(TRITON_DUMP_PTXAS_LOG) gives the registers and spill bytes of exactly that cubin, and the compiled
metadata gives the shared memory (Triton's own allocation, without the 1 KB per block the driver
reserves on sm_90). Output: compile_check.csv and compile_check.md in --out; the exit status is 1 on a
compile error or a spill. --subset compiles the largest block only (8 warps: BLOCK_V 4096 without a bias or a
cap, 2048 with both, the launch of every large vocabulary) and the d weight GEMM, unaligned (the
register-heavier case): what tests/test_compile_check.py runs. --blocks keeps the row kernels' launches of those
BLOCK_V only, --maps plain / mapped those without / with a bias or a cap (a re-run of changed kernels).

Must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels by Python functions).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import os
import re
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

# Vocabularies whose launch parameters are compiled: every power of two up to 2^18 covers every BLOCK_V
# the launcher can choose; Qwen3's 151,936 and 262,144 are the large ones that matter.
VOCABS = [2**i for i in range(19)] + [151_936]
# (dz dtype, HAS_SCALE) the student-gradient kernel is launched with: fp32 (CPU, or fp32 weights; scaled in
# the CPU's emulation of CUDA's fp16 rounding), bf16, fp16 (always scaled)
DZ_VARIANTS = (("fp32", False), ("fp32", True), ("bf16", False), ("fp16", True))
# The row kernels' logit map (HAS_BIAS, SOFTCAP): plain, bias, cap, both. With a bias or a cap the launcher
# halves the largest block (rows_triton.block_and_warps: at 4096 they spilled). --subset compiles plain at 4096
# and both at 2048, each the launch of every large vocabulary.
MAP_VARIANTS = ((False, False), (True, False), (False, True), (True, True))
SUBSET_MAPS = ((False, False), (True, True))
# d weight GEMM: (MODE, FIRST, LAST, HAS_SCALE, dz dtype, accumulator dtype): the 24-bit pair of a bf16 weight
# (first / middle / last / the only chunk), and the fp32 accumulator of an fp16 chunk (scaled)
GEMM_VARIANTS = [(1, first, last, False, "bf16", "bf16") for first in (True, False) for last in (True, False)] + [
    (0, first, True, True, "fp16", "fp32") for first in (True, False)]

# Argument types as the launcher passes them (ints as i32: strides and V are below 2^31).
_TYPES = {
    "stride_z": "i32", "stride_u": "i32", "stride_dz": "i32", "stride_h": "i32", "stride_w": "i32", "V": "i32",
    "C": "i32", "H": "i32", "targets_ptr": "*i64", "local_ptr": "*i64", "kl_start_ptr": "*i64", "lo_ptr": "*u8",
    "pre": "fp32", "post": "fp32", "clip": "fp32",
}


def kl_flag_sets():
    """The (HAS_FW, HAS_RW, CLIP, GRAD_CLIP, NEED_GRAD) the launcher can pass: NEED_GRAD needs a KL weight;
    GRAD_CLIP (the "grad" clip mode) needs NEED_GRAD and excludes CLIP (the "value" mode)."""
    for fw, rw, clip, grad_clip, grad in itertools.product((False, True), repeat=5):
        if (not grad or fw or rw) and not (grad_clip and (clip or not grad)):
            yield {"HAS_FW": fw, "HAS_RW": rw, "CLIP": clip, "GRAD_CLIP": grad_clip, "NEED_GRAD": grad}


def specializations(subset: bool = False, only_blocks: set[int] | None = None, only_maps: bool | None = None):
    """(kernel name, constexpr flags, argument types (those not in _TYPES), BLOCK_V, num_warps, aligned) for
    every launch the launchers can make; BLOCK_V is 0 for the GEMM (its blocks are fixed)."""
    from trace_kernels import gemm_triton
    from trace_kernels.rows_triton import block_and_warps

    alignments = (False,) if subset else (True, False)
    maps = SUBSET_MAPS if subset else MAP_VARIANTS
    if only_maps is not None:
        maps = [m for m in maps if any(m) == only_maps]
    for bias, cap in maps:
        blocks = sorted({block_and_warps(v, mapped=bias or cap) for v in VOCABS})
        if subset:  # the launch of every large vocabulary
            blocks = blocks[-1:]
        if only_blocks:
            blocks = [b for b in blocks if b[0] in only_blocks]
        yield from _row_specializations(blocks, alignments, {"HAS_BIAS": bias, "SOFTCAP": cap})
    # The d weight GEMM is launched only on 16-byte aligned tensors with H and the strides multiples of 16
    # (gemm_triton.usable); C and V are arbitrary.
    for mode, first, last, scale, dz, acc in GEMM_VARIANTS:
        yield ("_grad_weight_kernel", {"MODE": mode, "FIRST": first, "LAST": last, "HAS_SCALE": scale,
                                       "BLOCK_V": gemm_triton.BLOCK_V, "BLOCK_H": gemm_triton.BLOCK_H,
                                       "BLOCK_C": gemm_triton.BLOCK_C},
               {"dz_ptr": f"*{dz}", "h_ptr": f"*{dz}", "acc_ptr": f"*{acc}"}, 0, gemm_triton.NUM_WARPS, True)


def _row_specializations(blocks, alignments, lmap):
    for (block, warps), aligned in itertools.product(blocks, alignments):
        yield "_student_stats_kernel", dict(lmap), {}, block, warps, aligned
        for flags in kl_flag_sets():
            yield "_kl_rows_kernel", dict(flags, **lmap), {}, block, warps, aligned
        for ew, kl, (dz, scale) in itertools.product((False, True), (False, True), DZ_VARIANTS):
            yield ("_student_grad_kernel", {"HAS_EW": ew, "HAS_KL": kl, "HAS_SCALE": scale, **lmap},
                   {"dz_ptr": f"*{dz}"}, block, warps, aligned)


def _parse_arch(arch: str) -> int:
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise ValueError(f"--arch: expected names like sm_90a or sm_80, got {arch!r}")
    return int(m.group(1))


def compile_one(kernel: str, flags: dict, types: dict, block: int, warps: int, aligned: bool, arch: str) -> dict:
    """Compile one specialization; returns a table row (errors are reported in the row, not raised)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from trace_kernels import gemm_triton, rows_triton

    gemm = kernel == "_grad_weight_kernel"
    fn = getattr(gemm_triton if gemm else rows_triton, kernel)
    constexprs = dict(flags) if gemm else dict(flags, BLOCK_V=block)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = types.get(name) or _TYPES.get(name, "*fp32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if aligned and signature[name] != "constexpr" and not signature[name].startswith("fp")
             and not (gemm and name in ("C", "V"))}
    shown = {k: v for k, v in flags.items() if not k.startswith("BLOCK_")}
    row = {"kernel": kernel.strip("_"), "flags": " ".join(f"{k}={int(v)}" for k, v in shown.items()) or "-",
           "dz_dtype": types.get("dz_ptr", "-").lstrip("*"), "block_v": block or "-", "warps": warps,
           "aligned": int(aligned), "arch": arch}
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", _parse_arch(arch), 32),
                                      options={"num_warps": warps, "num_stages": gemm_triton.NUM_STAGES} if gemm
                                      else {"num_warps": warps})
    except Exception as e:  # reported in the table
        row.update(status=f"error: {type(e).__name__}: {str(e).strip().splitlines()[-1][:160]}")
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spill is None:
        row.update(status="error: no ptxas -v log (a cached kernel? set TRITON_CACHE_DIR to an empty folder)")
        return row
    row.update(registers=int(regs.group(1)), spill_bytes=int(spill.group(1)) + int(spill.group(2)),
               shared_bytes=compiled.metadata.shared, status="ok")
    if row["spill_bytes"]:
        row["status"] = "SPILLS"
    return row


def _compile_job(args):
    return compile_one(*args)


def _init_worker(cache_dir: str):
    # An empty cache: a cached kernel would skip ptxas, and with it the log the registers come from.
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.pop("TRITON_INTERPRET", None)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # the runtime leaves it unset too


COLUMNS = ["kernel", "flags", "dz_dtype", "block_v", "warps", "aligned", "arch", "registers", "spill_bytes",
           "shared_bytes", "compile_s", "status"]


def write_tables(rows: list[dict], out: str, header: str) -> str:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compile_check.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    ok = [r for r in rows if r["status"] in ("ok", "SPILLS")]
    lines = [header, ""]
    for arch in sorted({r["arch"] for r in rows}):
        sel = [r for r in ok if r["arch"] == arch]
        n_bad = sum(r["status"] != "ok" for r in rows if r["arch"] == arch)
        if sel:
            top = max(sel, key=lambda r: r["registers"])
            lines.append(f"- {arch}: {len(sel)} compiled, {n_bad} failed or spilling; registers max "
                         f"{top['registers']} ({top['kernel']} {top['flags']} dz {top['dz_dtype']} BLOCK_V "
                         f"{top['block_v']} / {top['warps']} warps, aligned {top['aligned']}), spill bytes max "
                         f"{max(r['spill_bytes'] for r in sel)}, shared memory max "
                         f"{max(r['shared_bytes'] for r in sel)} B, compile time total "
                         f"{sum(r['compile_s'] for r in sel):.0f} s")
        else:
            lines.append(f"- {arch}: nothing compiled ({n_bad} failed)")
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "compile_check.md"), "w") as f:
        f.write(table)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90a,sm_80", help="comma-separated, e.g. sm_90a,sm_80")
    ap.add_argument("--out", default=os.path.join("benchmarks", "out", "compile_check"))
    ap.add_argument("--subset", action="store_true", help="BLOCK_V 4096 unaligned only (what the test runs)")
    ap.add_argument("--blocks", default="", help="comma-separated BLOCK_V values: the row kernels' launches of "
                    "those blocks only")
    ap.add_argument("--maps", choices=("all", "plain", "mapped"), default="all",
                    help="the row kernels without (plain) or with (mapped) a bias or a softcap, or both")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the kernels)", file=sys.stderr)
        return 2
    arches = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in arches:
        _parse_arch(a)
    import triton

    only = {int(b) for b in args.blocks.split(",") if b.strip()}
    only_maps = {"all": None, "plain": False, "mapped": True}[args.maps]
    jobs = [(*spec, arch) for arch in arches for spec in specializations(args.subset, only, only_maps)]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        with ProcessPoolExecutor(max_workers=args.jobs, initializer=_init_worker, initargs=(cache,)) as pool:
            rows = list(pool.map(_compile_job, jobs))
    header = (f"compile_check: triton {triton.__version__}, {len(jobs)} specializations "
              f"({'subset' if args.subset else 'all'}{f', BLOCK_V {args.blocks}' if only else ''}"
              f"{'' if args.maps == 'all' else ', maps ' + args.maps}), "
              f"arch {','.join(arches)}, "
              f"{time.strftime('%Y-%m-%d', time.gmtime())}, wall {time.perf_counter() - t0:.0f} s on "
              f"{args.jobs} processes; registers and spills from Triton's own ptxas -v")
    table = write_tables(rows, args.out, header)
    print(table.split("\n\n| ")[0])
    print(f"written to {args.out}/")
    bad = [r for r in rows if r["status"] != "ok"]
    for r in bad:
        print(f"FAILED: {r}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
