"""For the tests that compare runs: a trainer command in a fresh process (one process, or K ranks under
torchrun on gloo), and the comparison of two runs' metrics with the tolerances that tests/test_train_dist.py
justifies."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
# Exactly equal in two runs that sample the same tokens: counts and rewards, not floating-point sums.
EXACT_KEYS = ("reward", "response_length", "truncated", "span_fraction", "teacher_rollouts", "annotated_rollouts")


def launch(module: str, args: list[str], nproc: int = 1) -> None:
    """`python -m module args` (nproc 1) or `torchrun --nproc_per_node=nproc -m module args`; asserts it exits 0."""
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *args]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(module: str, args: list[str], nnodes: int, timeout: float = 300) -> None:
    """`torchrun --nnodes=nnodes --nproc_per_node=1 --node_rank=r --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:PORT
    -m module args` for each node r, all at once on loopback (what one runs on each machine of a cluster)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(nnodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc_per_node=1",
               f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=trace-nodes-test", "--local_addr=127.0.0.1", "-m", module, *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]


def train(out, nproc: int, args: list[str]) -> list[dict]:
    """`trace_train` with `args` (output in `out`); its metrics.jsonl rows."""
    launch("trace_train", [*args, f"train.output_dir={out}"], nproc)
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]


def train_nodes(out, nnodes: int, args: list[str]) -> list[dict]:
    """`trace_train` as nnodes torchrun nodes of one process each (c10d rendezvous on loopback)."""
    launch_nodes("trace_train", [*args, f"train.output_dir={out}"], nnodes)
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]


def assert_same_metrics(one: list[dict], two: list[dict], exact=EXACT_KEYS) -> None:
    """Same steps; `exact` keys equal; loss / fkl / rkl to rel 2e-4 (differences of near-equal log-probs),
    grad_norm and entropy to rel 1e-5 (sums of O(1) terms)."""
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        for k in exact:
            assert a[k] == b[k], (a["step"], k)
        for k in ("loss", "grad_norm", "entropy", "fkl", "rkl"):
            if a[k] is None or b[k] is None:
                assert a[k] is b[k], (a["step"], k)
                continue
            rel = 2e-4 if k in ("loss", "fkl", "rkl") else 1e-5
            assert b[k] == pytest.approx(a[k], rel=rel, abs=1e-12), (a["step"], k)
