"""Run logging (`train.report_to`): TensorBoard event files that TensorBoard's own reader parses, with the run's
metrics at their steps and, after a crash and resume, each step once; Weights & Biases without an API key: an
offline run folder holding the metrics and the config. A backend asked for but unknown is a config error."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from trace_train.config import load_config  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ARGS = ["--config", "toy", "train.prompts_per_step=2", "train.rollouts_per_prompt=2", "train.max_new_tokens=4",
        "train.export_hf=false", "train.checkpoint_every=1"]


def _run(out, extra: list[str], fault: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "TRACE_TRAIN_FAULT"}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **({"TRACE_TRAIN_FAULT": fault} if fault else {}))
    return subprocess.run([sys.executable, "-m", "trace_train", *ARGS, f"train.output_dir={out}", *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ValueError, match="train.report_to: unknown 'mlflow'"):
        load_config("toy", ["train.report_to=tensorboard,mlflow"])


@pytest.mark.job
def test_tensorboard_events_hold_the_metrics_each_step_once_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # killed after step 1's checkpoint is written but before its marker: step 1 is logged, then run again
    killed = _run(tmp_path, ["train.max_steps=3", "train.report_to=tensorboard"], fault="checkpoint@1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _run(tmp_path, ["train.max_steps=3", "train.report_to=tensorboard", "train.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("reward", "loss", "entropy", "grad_norm", "clip_fraction", "lambda"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [0, 1, 2], (key, [e.step for e in events])
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6, abs=1e-12), key
    assert "config" in "".join(acc.Tags().get("tensors", [])), acc.Tags()


@pytest.mark.job
def test_wandb_without_a_key_writes_an_offline_run_folder(tmp_path):
    pytest.importorskip("wandb")
    proc = _run(tmp_path, ["train.max_steps=2", "train.report_to=wandb", "train.wandb_project=trace-test"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = open(tmp_path / "wandb_id").read().strip()
    folders = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}"))
    assert len(folders) == 1, os.listdir(tmp_path / "wandb")
    data = open(os.path.join(folders[0], f"run-{run_id}.wandb"), "rb").read()
    # the run's records: every logged metric name and the config's keys are in the file W&B syncs later
    for name in (b"reward", b"clip_fraction", b"grad_norm", b"micro_batch_tokens", b"kl_term_clip", b"trace-test"):
        assert name in data, name
