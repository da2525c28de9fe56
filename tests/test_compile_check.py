"""The Triton kernels compile for Hopper (sm_90a) without a GPU, in every specialization the launchers
make for vocabularies of 4,096 and more and the d weight GEMM, with no register spills
(benchmarks/compile_check.py; the full table over every block size and sm_80 is committed under
benchmarks/results/). Minutes of ptxas on two cores: a CI job (`make test-jobs` under triton 3.9, `make test-triton36`
under 3.6), not `make test`."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.job
def test_kernels_compile_for_sm90a_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # make test sets it
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "--arch", "sm_90a", "--subset",
                          "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    with open(tmp_path / "compile_check.csv") as f:
        rows = list(csv.DictReader(f))
    # 1 student-stats + 17 KL-flag (14 + 3 with GRAD_CLIP) + 16 student-grad (flags x (dz dtype, scale))
    # specializations, unaligned, without a logit map at BLOCK_V 4096 and with a bias and a cap at 2048 (the
    # launcher's largest blocks), and 6 of the d weight GEMM (4 of the 24-bit pair, 2 fp32 scaled)
    assert len(rows) == 2 * 34 + 6, res.stdout + res.stderr
    assert sum("GRAD_CLIP=1" in r["flags"] for r in rows) == 2 * 3
    mapped = [r for r in rows if "HAS_BIAS=1 SOFTCAP=1" in r["flags"]]
    assert len(mapped) == 34 and {r["block_v"] for r in mapped} == {"2048"}
    assert sum(r["kernel"] == "grad_weight_kernel" for r in rows) == 6
    assert {r["kernel"] for r in rows} == {"student_stats_kernel", "kl_rows_kernel", "student_grad_kernel",
                                           "grad_weight_kernel"}
    bad = [r for r in rows if r["status"] != "ok" or int(r["spill_bytes"]) != 0]
    assert not bad, bad
    assert all(0 < int(r["registers"]) <= 255 for r in rows)
    assert res.returncode == 0, res.stderr[-2000:]
