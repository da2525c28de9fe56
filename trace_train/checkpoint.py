"""What a run leaves on disk and resumes from: DCP checkpoints (model, optimizer, scheduler, teacher snapshot)
with a step marker written last, pruning of old ones, the append-only metrics file (cut back to the resumed step,
a torn last line dropped), and the Hugging Face export (swapped in whole). Also the snapshot teacher's sync,
which copies shard by shard like a checkpoint load.

A run killed anywhere (SIGKILL included: tests/test_faults.py kills it at chosen points) resumes from the last
checkpoint whose marker was written, reruns the steps after it, and ends with every step's metrics once."""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .dist import Dist
from .faults import armed, crash_if


@torch.no_grad()
def sync_snapshot(snapshot, policy) -> None:
    """Copy the live weights into the frozen teacher (shard by shard under FSDP: same layout)."""
    for m in (snapshot, policy):
        if hasattr(m, "reshard"):  # FSDP keeps a root's gathered parameters after a forward; shard them back
            m.reshard()
    for s, p in zip(snapshot.parameters(), policy.parameters()):
        s.copy_(p)


def _state(policy, opt, snapshot, sched=None) -> dict:
    model_sd, optim_sd = get_state_dict(policy, opt)
    state = {"model": model_sd, "optim": optim_sd}
    if snapshot is not None:
        state["snapshot"] = get_model_state_dict(snapshot)
    if sched is not None:
        state["scheduler"] = sched.state_dict()
    return state


CHECKPOINT_RE = re.compile(r"checkpoint-(\d{6,})$")


def save_checkpoint(policy, opt, snapshot, out_dir: str, next_step: int, d: Dist, sched=None, keep: int = 0) -> None:
    """DCP checkpoint of model, optimizer, scheduler (and teacher snapshot), then the step marker, written last
    by rank 0: a crash mid-save leaves the previous checkpoint as the one resumed from. Data position and
    sampling are functions of the step, so the step is all the loop's state besides these.

    keep > 0: once the marker names the new checkpoint, step checkpoints other than the latest `keep` are
    removed (a crash between the two leaves extra ones, never fewer)."""
    path = os.path.join(out_dir, f"checkpoint-{next_step:06d}")
    dcp.save(_state(policy, opt, snapshot, sched), checkpoint_id=path)
    d.barrier()
    crash_if("checkpoint", next_step - 1)
    if d.main:
        tmp = os.path.join(out_dir, "latest.tmp")
        with open(tmp, "w") as f:
            json.dump({"next_step": next_step, "path": path}, f)
        os.replace(tmp, os.path.join(out_dir, "latest.json"))
        if keep > 0:
            prune_checkpoints(out_dir, keep, protect=path)
    d.barrier()


def prune_checkpoints(out_dir: str, keep: int, protect: str) -> list[str]:
    """Remove the step checkpoints of out_dir but the `keep` latest (and `protect`, the one latest.json
    names); returns the removed paths."""
    steps = sorted((int(m.group(1)), name) for name in os.listdir(out_dir)
                   if (m := CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(out_dir, name)))
    removed = []
    for _, name in steps[:-keep]:
        path = os.path.join(out_dir, name)
        if os.path.abspath(path) != os.path.abspath(protect):
            shutil.rmtree(path)
            removed.append(path)
    return removed


def load_checkpoint(policy, opt, snapshot, out_dir: str, sched=None) -> int:
    """Restore the latest checkpoint; returns the step to continue from (0 when there is none)."""
    marker = os.path.join(out_dir, "latest.json")
    if not os.path.exists(marker):
        return 0
    with open(marker) as f:
        latest = json.load(f)
    state = _state(policy, opt, snapshot, sched)
    dcp.load(state, checkpoint_id=latest["path"])
    set_state_dict(policy, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if snapshot is not None:
        set_model_state_dict(snapshot, state["snapshot"])
    if sched is not None:
        sched.load_state_dict(state["scheduler"])
    return latest["next_step"]


def append_metrics(path: str, row: dict) -> None:
    """One step's metrics as one JSON line, in a single write, flushed to disk before the step's checkpoint (a
    crash leaves at most a torn last line, which drop_metrics_from discards on resume)."""
    line = json.dumps(row) + "\n"
    with open(path, "a") as f:
        if armed("append", row["step"]):
            f.write(line[: len(line) // 2])
            f.flush()
            os.fsync(f.fileno())
            crash_if("append", row["step"])
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def drop_metrics_from(path: str, step: int) -> None:
    """Keep the metrics of steps before `step` (those after the checkpoint are run again), atomically. A last
    line that is not JSON (torn by a crash mid-append) is dropped; a bad line before the last is an error naming
    the file and line (the file is append-only, so that is damage from elsewhere, and nothing is guessed)."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8", errors="replace").splitlines(keepends=True)
    kept = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break  # the torn tail of a crash mid-append
            raise ValueError(f"{path}: line {n} is not JSON (only a torn last line is dropped on resume)") from None
        if row["step"] < step:
            kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def write_json_atomic(path: str, obj) -> None:
    """`obj` as JSON at `path`, whole or not at all (written beside it, then renamed over it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export_hf(policy, tok, path: str, d: Dist) -> None:
    """The policy as a Hugging Face folder (safetensors + config + tokenizer), loadable by from_pretrained;
    under FSDP the full state dict is gathered to rank 0 on the CPU."""
    sd = get_model_state_dict(policy.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        # Written beside the target and swapped in: a crash mid-export leaves the previous export (or none)
        # and a stray .tmp folder, never a folder that from_pretrained would half-read.
        tmp, old = path + ".tmp", path + ".old"
        for p in (tmp, old):
            shutil.rmtree(p, ignore_errors=True)
        policy.lm.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        tok.save_pretrained(tmp)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    d.barrier()
