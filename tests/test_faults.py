"""A run killed with SIGKILL at chosen points (mid-rollout, mid-backward, mid-checkpoint, mid-append of the
metrics line; trace_train.faults) and resumed with train.resume=true ends with every step's metrics once and the
uninterrupted run's metrics and final weights, bit for bit (one process, one machine: the same kernels run the
same operations in the same order). A CI job of its own (`make test-faults`): nine short training runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

pytestmark = pytest.mark.job

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ARGS = ["--config", "toy", "train.max_steps=4", "train.checkpoint_every=1", "train.prompts_per_step=2",
        "train.rollouts_per_prompt=4", "train.max_new_tokens=8", "trace.reverse_kl=true", "trace.hold_steps=2",
        "trace.decay_steps=4", "train.micro_batch_tokens=60"]


def _run(out, fault: str = "", resume: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop("TRACE_TRAIN_FAULT", None)
    if fault:
        env["TRACE_TRAIN_FAULT"] = fault
    cmd = [sys.executable, "-m", "trace_train", *ARGS, f"train.output_dir={out}", f"train.resume={str(resume).lower()}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time_")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _rows(out), load_file(os.path.join(out, "hf", "model.safetensors"))


@pytest.mark.parametrize("point", ["rollout", "backward", "checkpoint", "append"])
def test_killed_and_resumed_equals_the_uninterrupted_run(point, uninterrupted, tmp_path):
    rows, weights = uninterrupted
    killed = _run(tmp_path, fault=f"{point}@2")
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    logged = open(tmp_path / "metrics.jsonl").read()
    if point == "append":  # the crash left half a line, which resume must drop
        assert not logged.endswith("\n") and logged.count("\n") == 2
    marker = json.load(open(tmp_path / "latest.json"))
    # the checkpoint of step 2's end was written but not its marker: resume starts from step 2 again
    assert marker["next_step"] == 2, marker
    resumed = _run(tmp_path, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = _rows(tmp_path)
    assert [r["step"] for r in again] == [0, 1, 2, 3]
    assert [_untimed(r) for r in again] == [_untimed(r) for r in rows]
    final = load_file(os.path.join(tmp_path, "hf", "model.safetensors"))
    assert final.keys() == weights.keys()
    assert all(final[k].equal(weights[k]) for k in weights)
    assert not os.path.exists(tmp_path / "hf.tmp") and not os.path.exists(tmp_path / "hf.old")


def test_a_fault_spec_that_cannot_be_read_is_an_error(tmp_path):
    proc = _run(tmp_path, fault="nowhere@1")
    assert proc.returncode == 1 and "TRACE_TRAIN_FAULT" in proc.stderr and "rollout" in proc.stderr
