#!/usr/bin/env bash
# Checks the artifact, not the checkout: builds the wheel from the files a clone has, installs it with its
# `train` extra into a fresh virtual environment, checks that it installs no top-level name but trace_kernels and
# trace_train, and from a directory outside the repository imports both packages, runs every console command's
# --help, one tiny case of the benchmark suite, and two training steps of the shipped toy config with 1 and with
# 2 ranks (torchrun on gloo), whose metrics agree.
#
#   .ci/check_wheel.sh            (`make wheel-check`; `make test` runs it)
#
# Env: PYTHON (the interpreter that makes the venv, default python3), TORCH (pip arguments for the torch
# installed first, default torch==2.13.0, the build the Makefile's venv has; word-split, so it may carry
# e.g. --index-url https://download.pytorch.org/whl/cpu), installed first so that the wheel's requirements
# never pull another torch.
# Exits non-zero on the first failure; the temporary directory is removed either way.
set -euo pipefail
unset PYTHONPATH  # the installed wheel must be what imports, never the checkout
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/trace-wheel-check.XXXXXX")
t0=$(date +%s)
step() { echo "[wheel-check $(( $(date +%s) - t0 ))s] $*"; }
trap 'rm -rf "$WORK"; step "removed $WORK"' EXIT

# The source as a clone has it (tracked and new files, nothing ignored), so no stale build/ or egg-info
# of the checkout can leak into the wheel.
mkdir "$WORK/src" "$WORK/dist" "$WORK/run"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
    | tar --null --files-from=- --ignore-failed-read -cf -) | tar -xf - -C "$WORK/src"

step "fresh venv, $TORCH"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
# shellcheck disable=SC2086  # TORCH may hold several pip arguments
"$VPY" -m pip install -q $TORCH

step "build the wheel"
"$VPY" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK/dist"/trace_kernels-*.whl)
step "top-level names in $(basename "$WHEEL")"
"$VPY" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
assert top == {"trace_kernels", "trace_train"}, f"the wheel installs {sorted(top)} at the top of site-packages"
assert "trace_train/benchmarks/bench_loss.py" in names, "the benchmark suite is missing from the wheel"
meta = [n for n in names if n.endswith(".dist-info/top_level.txt")]
assert not meta or set(zipfile.ZipFile(sys.argv[1]).read(meta[0]).decode().split()) == top, meta
print("top level:", ", ".join(sorted(top)))
EOF
step "install $(basename "$WHEEL")[train]"
"$VPY" -m pip install -q "$WHEEL[train]"

cd "$WORK/run"  # outside the repository: only the installed packages can import
step "import from $(pwd)"
"$VPY" - "$WORK/venv" <<'EOF'
import os, sys
import trace_kernels, trace_train
for mod in (trace_kernels, trace_train):
    assert os.path.realpath(mod.__file__).startswith(os.path.realpath(sys.argv[1])), f"{mod.__name__} from {mod.__file__}"
from importlib.metadata import version
assert version("trace-kernels") == trace_kernels.__version__, (version("trace-kernels"), trace_kernels.__version__)
from trace_train.config import resolve_config, shipped_configs
assert {"toy", "demo", "qwen3-1.7b-trace-rkl", "qwen3-8b-trace-fkl"} <= set(shipped_configs()), shipped_configs()
print("trace_kernels", trace_kernels.__version__, "from", os.path.dirname(trace_kernels.__file__))
EOF
for cmd in trace-train trace-train-demo trace-study trace-eval trace-bench; do
    "$WORK/venv/bin/$cmd" --help > /dev/null || { echo "$cmd --help failed" >&2; exit 1; }
done

step "trace-bench: one tiny case"
"$WORK/venv/bin/trace-bench" --case trace --n 64 --h 32 --v 300 --impls trace_torch,naive --repeats 1 --no-plots \
    --out "$WORK/bench" > "$WORK/bench.log" 2>&1 || { tail -n 30 "$WORK/bench.log" >&2; exit 1; }
"$VPY" - "$WORK/bench/results.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
assert [r["impl"] for r in rows] == ["trace_torch", "naive"] and all(r["status"] == "ok" for r in rows), rows
print("trace-bench: 2 rows, status ok")
EOF

export OMP_NUM_THREADS=1  # two ranks on a small shared machine: far faster than oversubscribed threads
step "trace-train --config toy train.max_steps=2 (1 process)"
"$WORK/venv/bin/trace-train" --config toy train.max_steps=2 "train.output_dir=$WORK/out1" > "$WORK/train1.log" 2>&1 \
    || { tail -n 30 "$WORK/train1.log" >&2; exit 1; }
step "torchrun --nproc_per_node=2 trace-train --config toy train.max_steps=2 (2 ranks, gloo)"
"$WORK/venv/bin/torchrun" --standalone --nproc_per_node=2 "$WORK/venv/bin/trace-train" --config toy \
    train.max_steps=2 "train.output_dir=$WORK/out2" > "$WORK/train2.log" 2>&1 \
    || { tail -n 30 "$WORK/train2.log" >&2; exit 1; }
"$VPY" - "$WORK/out1/metrics.jsonl" "$WORK/out2/metrics.jsonl" <<'EOF'
import json, math, sys
one, two = ([json.loads(line) for line in open(p) if line.strip()] for p in sys.argv[1:3])
for rows in (one, two):
    assert [r["step"] for r in rows] == [0, 1], [r["step"] for r in rows]
    assert all(math.isfinite(r["loss"]) and 0 <= r["reward"] <= 1 for r in rows), rows
# 2 ranks sample what 1 process samples (seeded per rollout): counts equal, sums to float tolerance
for a, b in zip(one, two):
    assert (a["reward"], a["response_length"]) == (b["reward"], b["response_length"]), (a, b)
    assert math.isclose(a["loss"], b["loss"], rel_tol=2e-4, abs_tol=1e-9), (a["loss"], b["loss"])
print("metrics.jsonl: steps 0 and 1 in both; 2 ranks equal 1 process (reward, length exact; loss rel 2e-4)")
EOF
step "ok"
