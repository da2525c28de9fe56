#!/usr/bin/env bash
# One-shot GPU check for an H100/H200 machine, in at most 8.5 minutes (the timeouts below sum to 510 s):
#   (a) the CUDA tests (tests/test_cuda.py: Triton and torch paths, fp32 and bf16, against fp64, V = 151,936),
#   (b) the card's bf16 matmul rate, (c) forward+backward of the headline shape S1 (N 16,384, H 4,096,
#   V 151,936, M = N/4 distilled rows with both KL weights, bf16) for impl="triton", impl="torch", the naive
#   loss, Liger-Kernel's composition and TRL's (ChunkedLogProbFunction + ChunkedDivergenceFunction), plus the
#   GRPO-only and log-prob-only cases at the same shape, and a sweep in N for linearity,
#   (d) markdown tables and CSVs under the folder given as argument, and the performance targets'
#   verdicts (benchmarks/targets.py) on the S1 run.
# Usage (repo root): benchmarks/gpu_check.sh OUT_DIR
# Needs only the card's Python image (torch >= 2.4, triton, pytest). liger-kernel and trl (>= 1.16) are used
# when importable or when their wheels lie in .whl/ (both pure Python, under 1 MB each:
#   pip download --no-deps -d .whl liger-kernel==0.8.5 trl==1.16.0
# and carry .whl, which git ignores); otherwise their rows are reported as skipped. An image without `datasets`
# (which trl.trainer.utils imports) still runs TRL's kernels: benchmarks/trl_impl.py then loads the two kernel
# files on their own and card.txt says so. Exits non-zero when the tests fail.
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
  python3 -c "from benchmarks import trl_impl; k = trl_impl.kernels(); print('trl', k.version, '| kernels:', k.how)" \
    2>/dev/null || echo "trl: kernels not importable (its rows are reported as skipped)"
} | tee "$OUT/card.txt"

echo "== (a) CUDA tests"
timeout 180 python3 -m pytest -q tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== (b, c) S1, the GRPO-only and the log-prob-only cases"
timeout 250 python3 -m benchmarks.bench_loss --device cuda --dtype bf16 --case trace,grpo,logprob --n 16384 \
  --h 4096 --v 151936 --kl-frac 0.25 --repeats 5 \
  --impls trace_triton,trace_torch,naive,liger,liger_triton_grpo,trl,torch_linear_ce \
  --no-plots --out "$OUT/s1" 2>&1 | tee "$OUT/s1.log"

echo "== sweep in N (trace case, Triton and torch)"
timeout 80 python3 -m benchmarks.bench_loss --device cuda --dtype bf16 --case trace --n 2048,4096,8192,16384,32768 \
  --h 4096 --v 151936 --impls trace_triton,trace_torch --repeats 3 --out "$OUT/sweep_n" 2>&1 | tail -n 14

echo "== summary"
cat "$OUT/card.txt"
echo "tests: exit $tests_rc ($(tail -n 1 "$OUT/tests.log"))"
cat "$OUT/s1/results.md" 2>/dev/null || echo "S1: no results (see $OUT/s1.log)"
echo "== performance targets (benchmarks/targets.py)"
python3 -m benchmarks.targets "$OUT/s1/results.csv" "$(sed -n 's/^card: //p' "$OUT/card.txt" | cut -d, -f1)" \
  2>&1 | tee "$OUT/targets.md"
exit "$tests_rc"
