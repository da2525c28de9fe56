#!/usr/bin/env bash
# Checks the artifact, not the checkout: builds the wheel from the files a clone has, installs it with its
# `train` extra into a fresh virtual environment, and from a directory outside the repository imports both
# packages, runs every console command's --help and two training steps of the shipped toy config.
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

step "trace-train --config toy train.max_steps=2"
"$WORK/venv/bin/trace-train" --config toy train.max_steps=2 "train.output_dir=$WORK/out" > "$WORK/train.log" 2>&1 \
    || { tail -n 30 "$WORK/train.log" >&2; exit 1; }
"$VPY" - "$WORK/out/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
assert len(rows) == 2, f"metrics.jsonl has {len(rows)} rows, expected 2"
assert [r["step"] for r in rows] == [0, 1], [r["step"] for r in rows]
assert all(r["loss"] == r["loss"] and 0 <= r["reward"] <= 1 for r in rows), rows  # finite-ish, in range
print("metrics.jsonl: 2 rows, steps 0 and 1")
EOF
step "ok"
