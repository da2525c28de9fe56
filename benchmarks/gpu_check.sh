#!/usr/bin/env bash
# GPU check and tuning run for an H100/H200 machine in at most 6 minutes (each step has its own timeout; the
# optional last step runs only if 70 s are left), ordered so that a timeout cuts the least useful part:
#   (a) the CUDA tests (tests/test_cuda.py): fp16 at N 16,384 (elementwise against fp64), bf16 over several
#       chunks at V 151,936, a chunk whose offsets pass 2^31 elements; then every option on both paths against
#       fp64 and the count of host synchronisations;
#   (b) the tuning sweep (benchmarks/gpu_tune.py): impl="triton" at S1 (N 16,384, H 4,096, V 151,936, M = N/4,
#       bf16) over chunk plans x d weight accumulators x live / separate teacher, in one process, with CUDA-event
#       times per piece beside the traffic model's prediction;
#   (c) each baseline once at S1 (trace_torch, Liger's composition, TRL's kernels; the log-prob case with
#       torch's linear_cross_entropy), the naive loss at N 2,048 only (at S1 it would need ~80 GB);
#   (d) if time is left: one `trace-train --config toy` step on CUDA (torchrun, NCCL, world 1, bf16 mixed
#       precision) and two TraceGRPOTrainer steps under bf16 autocast.
# Problems are drawn on the GPU with one cached weight; every measured row is flushed to its CSV at once.
# Output, flat in OUT_DIR (7 files; at most 8 come back from the GPU machine): card.txt, tests.log, tune.csv,
# bench.csv, train.log, summary.md (everything in one page: benchmarks/gpu_summary.py), run.log (all output).
#
# Usage (repo root): benchmarks/gpu_check.sh OUT_DIR             on the GPU machine (its python3)
#                    benchmarks/gpu_check.sh --dry-run OUT_DIR   the same steps on the CPU at tiny shapes, under
#                                                                the Triton interpreter (make test runs it)
# On the GPU image liger-kernel, trl and datasets (with dill, multiprocess) are used when their wheels lie in
# .whl/ (pure Python; carry .whl, which git ignores):
#   pip download --no-deps -d .whl liger-kernel==0.8.5 trl==1.16.0 datasets dill multiprocess
# otherwise their rows and the TRL steps are reported as skipped. Exits non-zero when the tests fail.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$OUT/run.log") 2>&1
START=$SECONDS
if [ "$DRY" = 1 ]; then
  # The interpreter is slow and a shared CPU slower: the dry run checks the commands, not the time limits.
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  DEVICE=cpu DTYPE=fp32 S1="--n 16 --h 16 --v 128" SMALL="--n 16 --h 16 --v 128" REPEATS="1 --check-n 16 --in-process"
  TUNE="--dry-run" TOY="train.prompts_per_step=2 train.rollouts_per_prompt=2 train.max_new_tokens=4"
  BUDGET=3600 SCALE=10
else
  DEVICE=cuda DTYPE=bf16 S1="--n 16384 --h 4096 --v 151936" SMALL="--n 2048 --h 4096 --v 151936" REPEATS=3
  TUNE="" TOY="model.compute_dtype=bfloat16"
  BUDGET=360 SCALE=1
fi
left() { echo $((BUDGET - (SECONDS - START))); }
t() { echo $(($1 * SCALE)); }  # a step's timeout
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/trace_site \
    .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/trace_site"
fi
{
  date -u +"date: %Y-%m-%dT%H:%MZ"
  [ "$DRY" = 1 ] && echo "dry run: CPU, Triton interpreter, tiny shapes"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.limit --format=csv,noheader 2>/dev/null \
    | sed 's/^/card: /'
  $PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
  $PY -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" \
    2>/dev/null || echo "liger-kernel: not installed (its rows are reported as skipped)"
  $PY -c "from benchmarks import trl_impl; k = trl_impl.kernels(); print('trl', k.version, '| kernels:', k.how)" \
    2>/dev/null || echo "trl: kernels not importable (its rows are reported as skipped)"
  $PY -m benchmarks.traffic --json 2>/dev/null | sed 's/^/model: /'
} | tee "$OUT/card.txt"

echo "== (a) CUDA tests"
timeout $(t 100) $PY -m pytest -q tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== (b) chunk plans at S1 (impl=triton), $(left) s left"
timeout $(t 110) $PY -m benchmarks.gpu_tune --out "$OUT" $TUNE

echo "== (c) baselines at S1 once each, the naive loss small, $(left) s left"
BENCH="$PY -m benchmarks.bench_loss --device $DEVICE --dtype $DTYPE --repeats $REPEATS --csv $OUT/bench.csv"
timeout $(t 80) $BENCH --case trace $S1 --kl-frac 0.25 --impls trace_triton,trace_torch,liger,trl
timeout $(t 35) $BENCH --case logprob $S1 --impls trace_triton,torch_linear_ce,trl
timeout $(t 25) $BENCH --case trace $SMALL --kl-frac 0.25 --impls naive,trace_triton

echo "== (d) training steps, $(left) s left"
: > "$OUT/train.log"
if [ "$(left)" -ge 70 ]; then
  TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1"
  timeout $(t 40) $TORCHRUN -m trace_train --config toy train.max_steps=1 train.export_hf=false \
    train.output_dir=/tmp/trace_gpu_check_toy $TOY 2>&1 | tail -n 15 | tee -a "$OUT/train.log"
  echo "trace-train toy: exit ${PIPESTATUS[0]}" | tee -a "$OUT/train.log"
  if [ "$(left)" -ge 30 ]; then
    timeout "$(( $(left) - 5 ))" $PY -m benchmarks.gpu_trl_check $([ "$DRY" = 1 ] && echo --dry-run) 2>&1 \
      | grep -v Warning | tail -n 6 | tee -a "$OUT/train.log"
  fi
else
  echo "skipped: $(left) s left" | tee -a "$OUT/train.log"
fi

echo "== summary ($((SECONDS - START)) s)"
$PY -m benchmarks.gpu_summary "$OUT" > /dev/null
cat "$OUT/summary.md"
echo "tests: exit $tests_rc ($(tail -n 1 "$OUT/tests.log"))"
exit "$tests_rc"
