"""The benchmark suite's `trl` rows (TRL's ChunkedLogProbFunction / ChunkedDivergenceFunction composed to
trace_loss's loss) pass the same fp64 check the suite runs before timing, and that check catches a
composition that gets TRL's KL convention wrong. CPU, fp32, N 256 / H 64 / V 512 (M 64 in the trace case).

Tolerance: the suite's own fp32 threshold, 1e-4 normwise relative error on the loss and both gradients; the
composition measures ~1e-6 (fp32 rounding); swapping forward and reverse KL (reverse-KL weight made 20x the
forward one, so that the swap changes the loss) errs by ~1e-2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl.kernels.chunked_logprob")

from benchmarks import bench_loss, trl_impl  # noqa: E402
from benchmarks.impls import IMPLS, Impl, make_problem  # noqa: E402

TOL = 1e-4  # bench_loss's fp32 threshold for "ok"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("case", ["trace", "grpo", "logprob"])
def test_trl_rows_pass_the_fp64_check(case):
    assert IMPLS["trl"].available(case, "cpu") is None
    assert bench_loss.check_agreement("trl", case, "cpu", torch.float32, 512) <= TOL


def test_the_check_catches_swapped_kl_directions(monkeypatch):
    # The benchmark's forward and reverse KL weights are equal, which would hide a swap: make them differ.
    def unequal_kl_weights(*args, **kwargs):
        p = make_problem(*args, **kwargs)
        p.kwargs["rkl_weight"] = 20 * p.kwargs["rkl_weight"]
        return p

    monkeypatch.setattr(bench_loss, "make_problem", unequal_kl_weights)
    monkeypatch.setitem(IMPLS, "trl_swapped", Impl(
        "trl_swapped", lambda p: trl_impl.build(p, fkl_beta=1.0, rkl_beta=0.0), ("trace",), needs="trl"))
    assert bench_loss.check_agreement("trl", "trace", "cpu", torch.float32, 512) <= TOL
    assert bench_loss.check_agreement("trl_swapped", "trace", "cpu", torch.float32, 512) > 10 * TOL


def test_unreproduced_arguments_are_refused():
    p = make_problem("grpo", 16, 8, 32, 0, dtype=torch.float32, device="cpu")
    p.kwargs["entropy_weight"] = torch.full((16,), 0.01)
    with pytest.raises(ValueError, match="entropy_weight"):
        trl_impl.build(p)


def test_standalone_load_without_trl_trainer_dependencies():
    """The GPU image lacks `datasets` (imported by trl.trainer.utils): the kernel files then load on their own and
    still pass the check. Run in a fresh process where importing `datasets` fails."""
    code = (
        "import sys, importlib.abc, torch\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'datasets':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from benchmarks import bench_loss, trl_impl\n"
        "k = trl_impl.kernels()\n"
        "assert k.how.startswith('standalone'), k.how\n"
        "assert 'trl.trainer.utils' not in sys.modules\n"
        "print(bench_loss.check_agreement('trl', 'trace', 'cpu', torch.float32, 512))\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) <= TOL
