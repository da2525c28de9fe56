"""Fault injection for the crash tests: the run kills itself with SIGKILL (what an OOM killer or a preempted node
does: no handler, no flush) at a named point of a chosen step.

    TRACE_TRAIN_FAULT=backward@2 python -m trace_train --config toy ...   # dies in step 2's first backward

Points: `rollout` (after step k's generation, before its loss), `backward` (after the first micro-batch's
backward, before the optimizer step), `checkpoint` (after the checkpoint of step k's end is written, before the
marker that names it), `append` (half of step k's metrics line written). Several as `a@1,b@3`. Unset (always, in
real runs) the checks cost one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = ("rollout", "backward", "checkpoint", "append")
ENV = "TRACE_TRAIN_FAULT"


def _faults() -> set[tuple[str, int]]:
    spec = os.environ.get(ENV, "")
    out = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, step = item.partition("@")
        if point not in POINTS or not step.isdigit():
            raise ValueError(f"{ENV}: {item!r} must read POINT@STEP with POINT one of {', '.join(POINTS)}")
        out.add((point, int(step)))
    return out


def check() -> None:
    """ValueError naming the variable when it is set but cannot be read (called before a run starts)."""
    _faults()


def armed(point: str, step: int) -> bool:
    """Whether the fault `point` is set for `step`."""
    return (point, step) in _faults() if ENV in os.environ else False


def crash_if(point: str, step: int) -> None:
    """SIGKILL this process when the fault `point` is set for `step`."""
    if armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)
