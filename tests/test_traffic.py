"""The traffic model (benchmarks/traffic.py) counts the call the library makes: its chunks are the
planner's, its GEMM FLOPs add up to the 3 + M/N floor, and a card it does not know gets no prediction."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("triton")  # the planner's buffer counts come from the Triton backend
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import traffic  # noqa: E402

S1 = dict(n=16384, h=4096, v=151_936, m=4096)


def test_chunks_cover_every_row_once_and_fit_the_budget():
    chunks = traffic.plan(S1["n"], S1["v"], S1["m"], budget_mb=256)
    assert sum(c for c, _ in chunks) == S1["n"] and sum(k for _, k in chunks) == S1["m"]
    mem = traffic.memory_bound_bytes(**S1, budget_mb=256)
    assert mem["chunk"] <= 256 * 2**20
    assert mem["held after forward"] == S1["v"] * S1["h"] * 2 + S1["n"] * S1["h"] * 2


def test_gemm_flops_are_the_floor_and_the_prediction_is_above_it():
    ps = traffic.pieces(**S1, budget_mb=256)
    assert sum(p.flops for p in ps) == 2 * S1["n"] * S1["h"] * S1["v"] * (3 + S1["m"] / S1["n"])
    card = traffic.CARDS["H100 SXM"]
    total = sum(p.seconds(card) for p in ps)
    assert total > traffic.floor_seconds(**S1, card=card)
    # a larger budget means fewer re-reads of the weight: never slower
    bigger = sum(p.seconds(card) for p in traffic.pieces(**S1, budget_mb=2048))
    assert bigger < total


def test_predict_knows_h100_and_h200_only():
    assert traffic.predict("trace", **S1, dtype="bf16", device_name="NVIDIA H100 80GB HBM3")["card"] == "H100 SXM"
    h200 = traffic.predict("trace", **S1, dtype="bf16", device_name="NVIDIA H200", budget_mb=256)
    h100 = traffic.predict("trace", **S1, dtype="bf16", device_name="NVIDIA H100 80GB HBM3", budget_mb=256)
    assert h200["predicted_s"] < h100["predicted_s"] and h200["floor_s"] == h100["floor_s"]
    assert traffic.predict("grpo", **S1, dtype="bf16", device_name="NVIDIA H200")["floor_s"] < h200["floor_s"]
    assert traffic.predict("trace", **S1, dtype="bf16", device_name="NVIDIA A100-SXM4-80GB") is None
    assert traffic.predict("trace", **S1, dtype="fp32", device_name="NVIDIA H200") is None
