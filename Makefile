# The two commands a newcomer runs: `make demo` (the main job) and `make test` (the tests, then the
# installed-wheel check); `make bench` and `make bench-memory` are the CPU benchmarks. Each sets itself up:
# a virtual environment in .venv with torch (CPU build by default) and this package installed.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test pytest test-other-cpu wheel-check gpu-dry-run test-heavy test-triton36 demo study bench bench-memory \
	lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,bench,train,trl]"
	touch $(STAMP)

test: pytest test-other-cpu wheel-check gpu-dry-run

pytest: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=15 -m "not heavy" tests

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
		TRITON_INTERPRET=1 $(PY) -m pytest -q -m cpu_outcome tests

# The artifact, not the checkout: the wheel built, installed with its `train` extra into a fresh venv (the
# same torch), imported and run for two training steps from a directory outside the repository.
wheel-check:
	TORCH="$(TORCH)" .ci/check_wheel.sh

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

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(T36) *.egg-info build dist
