"""The torchrun trainer across nodes: `trace-train` as 2 nodes x 1 process (torchrun per node, c10d rendezvous
on 127.0.0.1, a free port) trains what 1 node x 2 processes trains.

Both are a world of 2 gloo ranks running the same collectives; only the rendezvous differs (and with it which
node's process becomes rank 0), so the metrics agree within launch.py's tolerances and the exported weights
within test_train_dist.py's (1% of the largest move 2 AdamW steps can make)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
# Minutes of process start-up: `make test-jobs` runs it, `make test` does not.
pytestmark = pytest.mark.job

from launch import assert_same_metrics, train, train_nodes  # noqa: E402

from trace_train.config import ModelConfig  # noqa: E402
from trace_train.model import load_policy  # noqa: E402

ARGS = ["--config", "toy", "train.prompts_per_step=4", "train.rollouts_per_prompt=2", "train.max_new_tokens=8",
        "train.max_steps=2", "train.lr=3e-4", "train.algorithm=trace", "trace.reverse_kl=true"]


def _weights(path) -> dict[str, torch.Tensor]:
    model, _ = load_policy(ModelConfig(path=str(path)))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_two_nodes_equal_one_node_with_two_processes(tmp_path):
    nodes = train_nodes(tmp_path / "nodes", 2, ARGS)
    local = train(tmp_path / "local", 2, ARGS)
    assert [m["step"] for m in nodes] == [0, 1]
    assert_same_metrics(local, nodes)
    w_local, w_nodes = _weights(tmp_path / "local" / "hf"), _weights(tmp_path / "nodes" / "hf")
    assert w_local.keys() == w_nodes.keys()
    for k in w_local:
        torch.testing.assert_close(w_nodes[k], w_local[k], rtol=0, atol=0.01 * 2 * 3e-4, msg=k)
