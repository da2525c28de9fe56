"""The chunk planner (trace_kernels/_plan.py): rows on CUDA (at least 4x the card's ridge point, equal chunks,
capped by memory and by a user budget), a byte budget on the CPU, and the knobs that set them."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from problems import ALL_OPTIONS, PRECISION, assert_matches_reference, make_problem

import trace_kernels as tk
from trace_kernels import _plan

S1 = dict(n=16384, v=151_936, m=4096)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kl_counts(n, m):
    return np.bincount(np.arange(m) * n // max(m, 1), minlength=n)


def _sizes(chunks):
    return [b - a for a, b in chunks]


def test_card_rows_are_four_times_the_ridge_at_measured_rates():
    h100, h200 = _plan.card_for("NVIDIA H100 80GB HBM3"), _plan.card_for("NVIDIA H200")
    assert _plan.card_rows(h100) == 953 and _plan.card_rows(h200) == 659
    assert _plan.card_for("NVIDIA H100 PCIe") is None and _plan.card_rows(None) == _plan.UNKNOWN_CUDA_ROWS
    for card in (h100, h200):
        assert _plan.card_rows(card) >= _plan.ROW_MULTIPLE * card.gemm_tflops / card.hbm_tbps


@pytest.mark.parametrize("target", [953, 659])
def test_s1_equal_chunks_of_at_least_the_target(target):
    stride = _plan.padded(S1["v"]) * 4
    chunks = _plan.split(_kl_counts(S1["n"], S1["m"]), stride, stride, target_rows=target, cap_bytes=None)
    sizes = _sizes(chunks)
    assert sum(sizes) == S1["n"] and chunks[0][0] == 0 and all(b == a2 for (_, b), (a2, _) in zip(chunks, chunks[1:]))
    assert min(sizes) >= target and max(sizes) - min(sizes) <= 1
    assert len(chunks) == S1["n"] // target  # 17 on an H100, 24 on an H200


def test_caps_add_chunks_until_each_fits():
    counts = _kl_counts(1000, 250)
    chunks = _plan.split(counts, 100.0, 100.0, target_rows=400, cap_bytes=100 * 150)
    assert max((b - a) * 100 + counts[a:b].sum() * 100 for a, b in chunks) <= 100 * 150
    assert max(_sizes(chunks)) - min(_sizes(chunks)) <= 1
    # a budget smaller than one row: one row per chunk
    assert _sizes(_plan.split(counts, 100.0, 100.0, target_rows=None, cap_bytes=1.0)) == [1] * 1000


def test_bunched_distilled_rows_fall_back_to_a_greedy_cut():
    counts = np.zeros(100, dtype=np.int64)
    counts[:5] = 40  # 200 distilled rows on the first five student rows
    cap = 10 * 1.0 + 40 * 1.0 * 2
    chunks = _plan.split(counts, 1.0, 1.0, target_rows=None, cap_bytes=cap)
    assert sum(_sizes(chunks)) == 100
    assert all((b - a) + counts[a:b].sum() <= cap or b - a == 1 for a, b in chunks)


def test_cpu_default_is_the_byte_budget_and_knobs_override_it():
    cpu = torch.device("cpu")
    counts = np.zeros(10_000, dtype=np.int64)
    row = 4 * _plan.padded(32000)
    rows_per_chunk = int(_plan.DEFAULT_CPU_BUDGET_MB * 2**20 // row)
    assert tk.get_chunk_budget_mb() is None and tk.get_chunk_rows() is None
    assert max(_sizes(_plan.plan(cpu, counts, row, row))) <= rows_per_chunk
    with tk.chunk_budget(1):
        assert tk.get_chunk_budget_mb() == 1
        assert max(_sizes(_plan.plan(cpu, counts, row, row))) == 2**20 // row
    with tk.chunk_rows(300):
        assert tk.get_chunk_rows() == 300 and min(_sizes(_plan.plan(cpu, counts, row, row))) >= 300
        with tk.chunk_budget(1):  # the budget still caps
            assert max(_sizes(_plan.plan(cpu, counts, row, row))) == 2**20 // row
    assert tk.get_chunk_budget_mb() is None and tk.get_chunk_rows() is None


@pytest.mark.parametrize("bad", [0, -1, True, "2"])
def test_knob_errors(bad):
    with pytest.raises(ValueError, match="megabytes"):
        with tk.chunk_budget(bad):
            pass
    with pytest.raises(ValueError, match="rows"):
        with tk.chunk_rows(bad):
            pass


def test_environment_variables_set_the_knobs():
    code = "import trace_kernels as tk; print(tk.get_chunk_budget_mb(), tk.get_chunk_rows())"
    env = {**os.environ, "TRACE_KERNELS_CHUNK_MB": "64", "TRACE_KERNELS_CHUNK_ROWS": "512"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["64.0", "512"]


def test_workspace_rows_are_padded_to_64():
    ws = tk.chunked.Workspace(1001, torch.float32, torch.device("cpu"), student_rows=3, teacher_rows=2)
    z = ws.get("z", 3)
    assert z.shape == (3, 1001) and z.stride(0) == 1024 and z.stride(0) % 64 == 0


@pytest.mark.one_block_size
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_chunk_rows_does_not_change_the_result(impl, rows):
    dtype, tol = PRECISION[impl]
    problem = make_problem(n=41, v=61, m=30, options=ALL_OPTIONS, seed=8, dtype=dtype)
    with tk.chunk_rows(rows):
        assert_matches_reference(impl, problem, tol=tol)
