"""A 2-rank FSDP run (torchrun, gloo) with padding-free micro-batches equals the same run padded, on metrics.

Both runs sample the same tokens (rollouts are seeded per rollout and generation does not use the packed
layout); what differs is the round-off of attention over other key lengths (padded keys get exactly zero
weight, but sums run over another count of terms) and, after the first update, weights that differ by that
round-off. Tolerances as for 1 vs 2 ranks (tests/test_train_dist.py): rel 2e-4 on loss / fkl / rkl (differences
of near-equal log-probs), rel 1e-5 on the gradient norm and entropy (sums of O(1) terms); rewards and lengths
exactly. Measured (2026-11-26, 2-core Xeon): packed vs padded differ by at most 1.6e-5 relative on loss / rkl and
2.2e-7 on the gradient norm; with position_ids not restarting (sequences attending to their row neighbours) the
loss moves by 23-35% and the gradient norm by 19-31%.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from launch import EXACT_KEYS, assert_same_metrics, train  # noqa: E402


def _launch(out, *overrides) -> list[dict]:
    return train(out, 2, ["--config", "toy", "train.prompts_per_step=4", "train.rollouts_per_prompt=4",
                          "train.max_new_tokens=12", "train.max_steps=3", "train.lr=3e-4", "train.export_hf=false",
                          *overrides])


def test_two_ranks_packed_equal_padded(tmp_path):
    # a budget of several rollouts per micro-batch (each needs ~80 tokens, teacher included)
    common = ["train.algorithm=trace", "trace.reverse_kl=true", "train.micro_batch_tokens=400"]
    padded = _launch(tmp_path / "padded", "train.packing=false", *common)
    # one row per micro-batch (the varlen layout): every sequence shares its row with others
    packed = _launch(tmp_path / "packed", "train.packing=true", "train.packing_row_tokens=100000", *common)
    assert [m["step"] for m in padded] == [m["step"] for m in packed] == [0, 1, 2]
    assert any(m["fkl"] is not None or m["rkl"] is not None for m in packed)  # the teacher batch was used
    assert all(m["micro_batches"] > 1 for m in packed)
    assert_same_metrics(padded, packed, exact=(*EXACT_KEYS, "micro_batches"))
