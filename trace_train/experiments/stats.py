"""Means with Student-t 95% intervals over seeds, and paired differences (no scipy needed)."""

from __future__ import annotations

import math
import statistics

# The two-sided 95% quantile t_{0.975, df} for df = 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959964


def t975(df: int) -> float:
    """t_{0.975, df}: the table up to df 30, then the Cornish-Fisher expansion around the normal quantile
    (error < 1e-3 from df 30 on)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values: list[float]) -> dict:
    """{"mean", "lo", "hi", "n", "values"}: the mean and its 95% t-interval (lo = hi = None for one value)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "values": []}
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return {"mean": m, "lo": None, "hi": None, "n": 1, "values": vals}
    half = t975(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
    return {"mean": m, "lo": m - half, "hi": m + half, "n": len(vals), "values": vals}


def paired_diff(a: list[float], b: list[float]) -> dict:
    """mean_ci of a_i - b_i over the pairs where both exist (the same seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired values of unequal length ({len(a)} vs {len(b)})")
    return mean_ci([x - y for x, y in zip(a, b) if x is not None and y is not None])


def fmt(ci: dict, digits: int = 3, signed: bool = False) -> str:
    """'m [lo, hi]' (or 'm' for one value, '-' for none)."""
    if ci["mean"] is None:
        return "-"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    if ci["lo"] is None:
        return f.format(ci["mean"])
    return f"{f.format(ci['mean'])} [{f.format(ci['lo'])}, {f.format(ci['hi'])}]"
