"""What a run leaves on disk and resumes from: DCP checkpoints (model, optimizer, scheduler, teacher snapshot)
with a step marker written last, pruning of old ones, the metrics file cut back to the resumed step, and the
Hugging Face export. Also the snapshot teacher's sync, which copies shard by shard like a checkpoint load."""

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


def drop_metrics_from(path: str, step: int) -> None:
    """Keep the metrics of steps before `step` (those after the checkpoint are run again), atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] < step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def export_hf(policy, tok, path: str, d: Dist) -> None:
    """The policy as a Hugging Face folder (safetensors + config + tokenizer), loadable by from_pretrained;
    under FSDP the full state dict is gathered to rank 0 on the CPU."""
    sd = get_model_state_dict(policy.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        policy.lm.save_pretrained(path, state_dict=sd, safe_serialization=True)
        tok.save_pretrained(path)
    d.barrier()
