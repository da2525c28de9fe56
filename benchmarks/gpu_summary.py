"""summary.md of a benchmarks/gpu_check.sh run, from the files it wrote (card.txt, tests.log, tune.csv, bench.csv,
train.log): what ran, the tuning table (measured ms per piece beside the model's), the baselines and the
performance targets' verdicts (benchmarks/targets.py).

    python -m benchmarks.gpu_summary OUT_DIR
"""

from __future__ import annotations

import csv
import os
import sys

from .targets import verdicts

TUNE_PIECES = ["logits", "teacher", "stats", "kl", "grad", "d hidden", "d weight"]


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tail(path: str, lines: int) -> str:
    if not os.path.exists(path):
        return "(missing)"
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:]).rstrip()


def summary(out: str) -> str:
    card = _tail(os.path.join(out, "card.txt"), 20)
    parts = ["# gpu_check summary", "", "```", card, "```", "", "## CUDA tests (tail of tests.log)", "", "```",
             _tail(os.path.join(out, "tests.log"), 12), "```", ""]
    tune = _read(os.path.join(out, "tune.csv"))
    parts += ["## Chunk plans (tune.csv): measured ms (traffic model's ms)", ""]
    if tune:
        head = ["teacher", "d weight", "plan", "chunks", "total", *TUNE_PIECES, "peak extra MB", "status"]
        parts += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in tune:
            cells = [r["teacher"], r["grad_weight"], r["plan"], r.get("chunks", ""),
                     f"{r.get('total_ms') or '-'} ({r.get('model_ms') or '-'})"]
            cells += [f"{r.get(p + '_ms') or '-'} ({r.get(p + '_model_ms') or '-'})" for p in TUNE_PIECES]
            cells += [r.get("peak_extra_mb") or "-", r["status"]]
            parts.append("| " + " | ".join(cells) + " |")
    else:
        parts.append("(no tune.csv)")
    bench = _read(os.path.join(out, "bench.csv"))
    parts += ["", "## Baselines (bench.csv)", ""]
    if bench:
        head = ["case", "impl", "N", "median s", "peak extra MB", "TFLOP/s", "model s", "check err", "status"]
        parts += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in bench:
            parts.append("| " + " | ".join([r["case"], r["impl"], r.get("n", ""), r.get("median_s", ""),
                                             r.get("peak_extra_mb", ""), r.get("tflops", ""), r.get("model_s", ""),
                                             r.get("agreement_err", ""), r["status"]]) + " |")
        parts += ["", "| target | set for | goal | measured speedup | measured memory ratio | verdict |",
                  "|---|---|---|---|---|---|", *verdicts(bench)]
    else:
        parts.append("(no bench.csv)")
    parts += ["", "## Training steps (tail of train.log)", "", "```", _tail(os.path.join(out, "train.log"), 8), "```"]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = summary(argv[0])
    with open(os.path.join(argv[0], "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
