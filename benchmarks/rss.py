"""The process's resident set from /proc (Linux): the CPU memory measure of the benchmarks."""

from __future__ import annotations


def status_kb(field: str) -> int:
    """A /proc/self/status field in kB (VmRSS: now, VmHWM: peak since the last reset_peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Reset VmHWM to the current resident set and return that resident set in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kb("VmRSS") * 1024
