"""benchmarks/targets.py: a target is met only when both rows were measured, passed the fp64 check and beat the
goal; missing or failing rows read "not measured"."""

from __future__ import annotations

from benchmarks.targets import TARGETS, verdicts


def row(impl, median_s, peak_mb, status="ok", case="trace", n="16384", v="151936"):
    return {"case": case, "impl": impl, "n": n, "v": v, "median_s": str(median_s), "peak_extra_mb": str(peak_mb),
            "status": status}


def test_verdicts():
    t = TARGETS[0]
    assert (t.ours, t.peer, t.min_speedup, t.max_memory_ratio) == ("trace_triton", "trl", 1.5, 1.0)
    [met] = verdicts([row("trace_triton", 0.1, 900), row("trl", 0.2, 1000)])
    assert "| 2.00x | 0.90x | met" in met
    [slow] = verdicts([row("trace_triton", 0.1, 900), row("trl", 0.14, 1000)])
    assert "NOT met" in slow
    [heavy] = verdicts([row("trace_triton", 0.1, 1100), row("trl", 0.2, 1000)])
    assert "NOT met" in heavy
    for rows in ([row("trace_triton", 0.1, 900)],
                 [row("trace_triton", 0.1, 900), row("trl", 0.2, 1000, status="DISAGREES with the reference")],
                 [row("trace_triton", 0.1, 900), row("trl", 0.2, 1000, n="8192")],
                 [row("trace_triton", 0.1, 900, case="grpo"), row("trl", 0.2, 1000, case="grpo")]):
        [v] = verdicts(rows)
        assert v.endswith("not measured |")
