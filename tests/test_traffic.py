"""The traffic model (benchmarks/traffic.py) counts the call the library makes: its chunks are the planner's for
the card, its GEMM FLOPs add up to the 3 + M/N floor, a card it does not know gets no prediction, and at S1 its
default plan meets the target on paper (ratio <= 1.25 to the floor, <= 2 GB beyond the bf16 gradients)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")  # the planner's buffer counts come from the Triton backend
from benchmarks import traffic  # noqa: E402

S1 = dict(n=16384, h=4096, v=151_936, m=4096)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("card", list(traffic.CARDS.values()), ids=lambda c: c.name)
def test_chunks_cover_every_row_once_in_equal_chunks(card):
    chunks = traffic.plan(S1["n"], S1["v"], S1["m"], card)
    sizes = [c for c, _ in chunks]
    assert sum(sizes) == S1["n"] and sum(k for _, k in chunks) == S1["m"]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= traffic.card_rows(card)
    with_budget = traffic.plan(S1["n"], S1["v"], S1["m"], card, budget_mb=256)
    assert max(c for c, _ in with_budget) * 4 * 151_936 <= 256 * 2**20


def test_gemm_flops_are_the_floor_and_the_prediction_is_above_it():
    card = traffic.CARDS["H100 SXM"]
    for kw in ({}, {"separate_teacher": True}, {"grad_weight": "fp32"}, {"budget_mb": 256}):
        ps = traffic.pieces(**S1, card=card, **kw)
        assert sum(p.flops for p in ps) == 2 * S1["n"] * S1["h"] * S1["v"] * (3 + S1["m"] / S1["n"])
        assert sum(p.seconds(card) for p in ps) > traffic.floor_seconds(**S1, card=card)
    default = sum(p.seconds(card) for p in traffic.pieces(**S1, card=card))
    small = sum(p.seconds(card) for p in traffic.pieces(**S1, card=card, budget_mb=256))
    separate = sum(p.seconds(card) for p in traffic.pieces(**S1, card=card, separate_teacher=True))
    assert default < separate < small  # rows planned beat a 256 MB budget; one logits GEMM beats two


def test_json_meets_the_target_on_both_cards():
    res = subprocess.run([sys.executable, "-m", "benchmarks.traffic", "--json"], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["card"] for r in rows] == ["H100 SXM", "H200"]
    for r in rows:
        assert {"card", "predicted_ms", "floor_ms", "ratio", "extra_memory_gb"} <= set(r)
        assert r["ratio"] == pytest.approx(r["predicted_ms"] / r["floor_ms"], rel=1e-3)
        assert r["ratio"] <= 1.25 and r["extra_memory_gb"] <= 2.0, r
        assert "lower bound" in r["note"]
    assert rows[1]["floor_ms"] == pytest.approx(66.28e12 / 790e12 * 1e3, rel=1e-3)


def test_memory_items():
    card = traffic.CARDS["H100 SXM"]
    mem = traffic.memory_bytes(**S1, card=card)
    assert mem["d weight 8-bit plane"] == S1["v"] * S1["h"]
    assert mem["bf16 gradients"] == (S1["v"] + S1["n"]) * S1["h"] * 2
    fp32 = traffic.memory_bytes(**S1, card=card, grad_weight="fp32")
    assert fp32["extra"] - mem["extra"] == 3 * S1["v"] * S1["h"]


def test_predict_knows_h100_and_h200_only():
    assert traffic.predict("trace", **S1, dtype="bf16", device_name="NVIDIA H100 80GB HBM3")["card"] == "H100 SXM"
    h200 = traffic.predict("trace", **S1, dtype="bf16", device_name="NVIDIA H200")
    h100 = traffic.predict("trace", **S1, dtype="bf16", device_name="NVIDIA H100 80GB HBM3")
    assert h200["predicted_s"] < h100["predicted_s"]
    assert traffic.predict("grpo", **S1, dtype="bf16", device_name="NVIDIA H200")["floor_s"] < h200["floor_s"]
    assert traffic.predict("trace", **S1, dtype="bf16", device_name="NVIDIA A100-SXM4-80GB") is None
    assert traffic.predict("trace", **S1, dtype="fp32", device_name="NVIDIA H200") is None
    assert set(h100["pieces_s"]) >= {"logits", "stats", "kl", "grad", "d hidden", "d weight"}
