#!/usr/bin/env bash
# One-shot GPU check for an H100/H200 machine, in at most 8 minutes:
#   (a) the CUDA tests (tests/test_cuda.py: Triton and torch paths, fp32 and bf16, against fp64, V = 151,936),
#   (b) the card's bf16 matmul rate, (c) forward+backward of the headline shape S1 (N 16,384, H 4,096,
#   V 151,936, M = N/4 distilled rows with both KL weights, bf16) for impl="triton", impl="torch", the naive
#   loss and Liger-Kernel's composition, plus the GRPO-only case, and a sweep in N for linearity,
#   (d) markdown tables and CSVs under the folder given as argument.
# Usage (repo root): benchmarks/gpu_check.sh OUT_DIR
# Needs only the card's Python image (torch >= 2.4, triton, pytest). liger-kernel is used when importable or
# when its wheel lies in .whl/ (pip download --no-deps liger-kernel -d .whl); otherwise it is reported as
# skipped. Exits non-zero when the tests fail.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/trace_site \
    .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/trace_site"
fi
{
  date -u +"date: %Y-%m-%dT%H:%MZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/card: /'
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
  python3 -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" \
    2>/dev/null || echo "liger-kernel: not installed (its rows are reported as skipped)"
} | tee "$OUT/card.txt"

echo "== (a) CUDA tests"
timeout 180 python3 -m pytest -q tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== (b, c) S1 and the GRPO-only case"
timeout 200 python3 -m benchmarks.bench_loss --device cuda --dtype bf16 --case trace,grpo --n 16384 --h 4096 \
  --v 151936 --kl-frac 0.25 --impls trace_triton,trace_torch,naive,liger,liger_triton_grpo --repeats 5 \
  --no-plots --out "$OUT/s1" 2>&1 | tee "$OUT/s1.log"

echo "== sweep in N (trace case, Triton and torch)"
timeout 80 python3 -m benchmarks.bench_loss --device cuda --dtype bf16 --case trace --n 2048,4096,8192,16384,32768 \
  --h 4096 --v 151936 --impls trace_triton,trace_torch --repeats 3 --out "$OUT/sweep_n" 2>&1 | tail -n 14

echo "== summary"
cat "$OUT/card.txt"
echo "tests: exit $tests_rc ($(tail -n 1 "$OUT/tests.log"))"
cat "$OUT/s1/results.md" 2>/dev/null || echo "S1: no results (see $OUT/s1.log)"
exit "$tests_rc"
