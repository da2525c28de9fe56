"""TraceGRPOTrainer in 2 processes, as TRL users launch it: `accelerate launch` with 2 CPU processes on gloo,
against `trl.GRPOTrainer` in the same launch (tests/trl_dist_worker.py runs the trainers one after the other
from the same seed; each writes what it saw per rank).

- Plain data parallel (DistributedType.MULTI_CPU) and DeepSpeed ZeRO-3 (DS_ACCELERATOR=cpu, gloo; the LM head's
  weight is partitioned when the loss starts and the trainer gathers it): 3 steps of dapo with the top-entropy
  mask at quantile 0.5, TRL vs ours, plain, with PEFT LoRA on the attention projections, with gradient
  accumulation 2 (data parallel) and with an untied biased head (ZeRO-3); TRACE trains in the same setups.
- FSDP2: accelerate 1.15 selects FSDP only for accelerator devices (on a CPU its FSDP config gives 2
  independent processes), so torch's fully_shard shards the model (LM head weight a DTensor) and one fixed
  batch per rank goes through `_compute_loss`, against the same batch unsharded and against TRL.

What must agree, in fp32: each rank's loss at every call (same rollouts: same seed, same weights up to
round-off) and the first optimizer step's whole gradient to 2e-5 of each tensor's largest entry, as the
single-process tests (tests/test_trl_losses.py; measured here <= 7e-7); each call's entropy mask exactly,
and it is the quantile over both ranks' entropies (TRL's `get_high_entropy_mask`); the logged metrics to 1e-4
relative (with a floor of 1e-6 absolute for values that are zero up to round-off, such as a loss of -1e-8
from advantages that cancel). The job runs in about a minute on 2 cores (make test-jobs).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from trl_setup import save_tiny_model  # noqa: E402

pytestmark = pytest.mark.job

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "trl_dist_worker.py"
GRAD_TOL, METRIC_TOL, FLOOR = 2e-5, 1e-4, 1e-6
DEEPSPEED_PATH = os.environ.get("TRACE_DEEPSPEED_PATH")  # a folder holding deepspeed (Makefile: .deepspeed)
ZERO3 = dict(compute_environment="LOCAL_MACHINE", distributed_type="DEEPSPEED", mixed_precision="no",
             num_machines=1, num_processes=2, use_cpu=False,
             deepspeed_config=dict(zero_stage=3, offload_optimizer_device="none", offload_param_device="none",
                                   zero3_init_flag=False, zero3_save_16bit_model=False))


def launch(tmp: Path, name: str, trainers: list[str], launch_args: list[str], worker_args: list[str] = (),
           env: dict | None = None) -> Path:
    out = tmp / name
    out.mkdir()
    port = 29500 + os.getpid() % 1000 + len(name)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--main_process_port", str(port),
           str(WORKER), "--model", str(tmp / "model"), "--out", str(out), "--trainers", ",".join(trainers),
           *worker_args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def read(out: Path, name: str) -> list[dict]:
    return [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    save_tiny_model(tmp / "model")
    return launch(tmp, "plain", ["trl", "ours", "trace", "trl+lora", "ours+lora", "trl+ga2", "ours+ga2",
                                 "trl+fsdp2", "ours+fsdp2",
                                 "trl+bias+fsdp2", "ours+bias+fsdp2", "trace+fsdp2"],
                  ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no"], ["--steps", "3"])


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    if DEEPSPEED_PATH is None:
        if os.environ.get("TRACE_REQUIRE_DEEPSPEED"):
            pytest.fail("TRACE_REQUIRE_DEEPSPEED is set but TRACE_DEEPSPEED_PATH is not")
        pytest.skip("DeepSpeed: set TRACE_DEEPSPEED_PATH to a folder holding it (make test-jobs installs one)")
    tmp = tmp_path_factory.mktemp("zero3")
    save_tiny_model(tmp / "model")
    config = tmp / "zero3.json"
    config.write_text(json.dumps(ZERO3))  # accelerate reads a .json config as well as a .yaml one
    return launch(tmp, "zero3", ["trl", "ours", "trace", "trl+bias", "ours+bias", "trl+lora", "ours+lora"],
                  ["--config_file", str(config)], ["--steps", "3", "--no-use-cpu", "--ddp-backend", "gloo"],
                  env={"DS_ACCELERATOR": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{DEEPSPEED_PATH}"})


def close(a: float, b: float, tol: float = METRIC_TOL, floor: float = FLOOR) -> bool:
    return abs(a - b) <= tol * max(abs(a), abs(b)) + floor


def assert_same_run(ref: list[dict], ours: list[dict], *, grads: str = "grads"):
    """TRL's run and ours, rank by rank: losses, entropy masks, the first step's gradient, metrics, parameters."""
    for r, (a, b) in enumerate(zip(ref, ours)):
        assert a["world_size"] == b["world_size"] == 2
        assert len(a["losses"]) == len(b["losses"]) >= 1
        for x, y in zip(a["losses"], b["losses"]):
            assert close(x, y, GRAD_TOL), (r, a["losses"], b["losses"])
        assert len(a["entropy_masks"]) == len(b["entropy_masks"]) == len(a["losses"])
        for ma, mb in zip(a["entropy_masks"], b["entropy_masks"]):
            assert ma["mask"] == mb["mask"]
            ea, eb = torch.tensor(ma["entropies"]), torch.tensor(mb["entropies"])
            assert (ea - eb).abs().max() <= GRAD_TOL * ea.abs().max()
    assert ref[0][grads] is not None and [n for n, _ in ref[0][grads]] == [n for n, _ in ours[0][grads]]
    for (name, ga), (_, gb) in zip(ref[0][grads], ours[0][grads]):
        ga, gb = torch.tensor(ga), torch.tensor(gb)
        assert (ga - gb).abs().max() <= GRAD_TOL * ga.abs().max(), name
    for ha, hb in zip(ref[0].get("logs", []), ours[0].get("logs", [])):
        for key, value in ha.items():
            if isinstance(value, float) and key not in ("step_time", "train_runtime"):
                assert close(value, hb[key]), (key, value, hb[key])
    for a, b in zip(ref, ours):
        for name, (total, size) in a.get("params", {}).items():
            assert close(total, b["params"][name][0], floor=METRIC_TOL * size), name


def assert_cross_rank_quantile(run: list[dict]):
    """Each call's mask is entropy >= the quantile of both ranks' masked entropies together (TRL's definition),
    not of this rank's own."""
    for c0, c1 in zip(run[0]["entropy_masks"], run[1]["entropy_masks"]):
        both = torch.tensor(c0["entropies"] + c1["entropies"])
        threshold = torch.quantile(both, c0["quantile"])
        for c in (c0, c1):
            assert c["mask"] == (torch.tensor(c["entropies"]) >= threshold).tolist()


def assert_trained_in_step(run: list[dict]):
    """Parameters changed, and both ranks hold the same ones (the gradients were reduced)."""
    a, b = run
    assert a["params"] == b["params"]
    assert any(a["params"][n] != a["params0"][n] for n in a["params"])


def assert_trace_ran(run: list[dict]):
    for rank in run:
        assert rank["annotator_calls"] and all(len(jobs) == 4 for jobs in rank["annotator_calls"])  # its own rollouts
        logs = rank["logs"]
        assert logs and all(math.isfinite(h["loss"]) for h in logs)
        assert all(h["trace/lambda"] == 0.5 for h in logs)
        assert any(h["trace/span_fraction"] > 0 and h["trace/teacher_rollouts"] > 0 for h in logs)
    assert_trained_in_step(run)


def test_data_parallel_equals_trl(plain):
    ref, ours = read(plain, "trl"), read(plain, "ours")
    assert ref[0]["distributed_type"] == ours[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert ours[0]["trainer"] == "TraceGRPOTrainer" and ref[0]["trainer"] == "GRPOTrainer"
    assert len(ours[0]["losses"]) == 3
    assert ours[0]["losses"] != ours[1]["losses"]  # each rank its own rollouts
    assert_same_run(ref, ours)
    assert_cross_rank_quantile(ours)
    assert_trained_in_step(ours)


def test_gradient_accumulation_equals_trl(plain):
    """dapo's normaliser across ranks and accumulation steps (num_items_in_batch / processes x GA / steps per
    generation): 2 micro-batches per optimizer step, each rank's loss at each of them as TRL's."""
    ref, ours = read(plain, "trl+ga2"), read(plain, "ours+ga2")
    assert len(ours[0]["losses"]) == 6  # 3 steps x 2 micro-batches
    assert_same_run(ref, ours)
    assert_trained_in_step(ours)


def test_lora_on_the_body_equals_trl(plain):
    ref, ours = read(plain, "trl+lora"), read(plain, "ours+lora")
    assert_same_run(ref, ours)
    for rank in ours:  # only the adapters train: q_proj and v_proj's A and B, 1 layer
        assert set(rank["params"]) and all("lora_" in n for n in rank["params"])
    assert ours[0]["trainable"] < read(plain, "ours")[0]["trainable"]
    assert_trained_in_step(ours)


def test_trace_trains_in_two_processes(plain):
    run = read(plain, "trace")
    assert_trace_ran(run)
    grpo = read(plain, "ours")[0]["params"]
    assert any(not close(v[0], grpo[n][0]) for n, v in run[0]["params"].items())  # the KL terms acted


def assert_sharded_grads_equal_unsharded(run: list[dict]):
    """FSDP2's gradient of the fixed batches against the unsharded one averaged over the ranks by hand."""
    sharded, unsharded = run[0]["grads"], run[0]["unsharded_grads"]
    assert [n for n, _ in sharded] == [n for n, _ in unsharded] and sharded
    for (name, a), (_, b) in zip(sharded, unsharded):
        a, b = torch.tensor(a), torch.tensor(b)
        assert (a - b).abs().max() <= GRAD_TOL * b.abs().max(), name


@pytest.mark.parametrize("variant", ["", "+bias"])
def test_fsdp2_sharded_head_equals_trl_and_unsharded(plain, variant):
    ref, ours = read(plain, f"trl{variant}+fsdp2"), read(plain, f"ours{variant}+fsdp2")
    for run in (ref, ours):
        assert all(rank["head_sharded"] for rank in run)
        for rank in run:  # the sharded call equals the unsharded one on the same batch
            assert close(rank["losses"][0], rank["losses"][1], GRAD_TOL)
    assert_same_run(ref, ours)
    assert_sharded_grads_equal_unsharded(ours)


def test_fsdp2_trace_equals_unsharded(plain):
    run = read(plain, "trace+fsdp2")
    assert all(rank["head_sharded"] for rank in run)
    for rank in run:
        assert close(rank["losses"][0], rank["losses"][1], GRAD_TOL)
    assert_sharded_grads_equal_unsharded(run)


@pytest.mark.parametrize("variant", ["", "+bias", "+lora"])
def test_zero3_equals_trl(zero3, variant):
    ref, ours = read(zero3, f"trl{variant}"), read(zero3, f"ours{variant}")
    assert ours[0]["distributed_type"] == "DistributedType.DEEPSPEED"
    if variant != "+lora":  # partitioned when the loss starts: the trainer gathers it (PEFT's wrapper aside)
        assert set(ours[0]["head_status"]) == {"ZeroParamStatus.NOT_AVAILABLE"}
    assert_same_run(ref, ours)
    assert_cross_rank_quantile(ours)
    assert_trained_in_step(ours)


def test_zero3_trace_trains(zero3):
    assert_trace_ran(read(zero3, "trace"))
