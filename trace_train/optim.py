"""AdamW and its learning-rate schedule from `[train]`: linear warmup, then constant, cosine or linear decay
to `min_lr_ratio * lr` at the last optimizer update (train.warmup_steps and train.lr_decay_steps count updates:
train.mini_batches x train.epochs of them per step). The schedule is a pure function of the step (`lr_factor`); the
LambdaLR that applies it is saved in checkpoints with the optimizer, so a resumed run continues exactly."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The multiplier of lr at optimizer step `step` (0-based). Warmup: (step + 1) / warmup_steps, so the
    first step already moves; then 1 (constant) or a decay from 1 at step warmup_steps to min_lr_ratio at
    step total_steps - 1 and after (cosine: half a cosine period; linear: a straight line); the first
    step after warmup always has the full lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = total_steps - 1 - warmup_steps
    progress = min(1.0, (step - warmup_steps) / span) if span > 0 else float(step > warmup_steps)
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"lr_schedule: unknown {schedule!r} (constant | cosine | linear)")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_optimizer(params, t: TrainConfig) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """(AdamW, its scheduler): call scheduler.step() after each optimizer.step()."""
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                            weight_decay=t.weight_decay)
    # The schedule counts optimizer updates: train.mini_batches x train.epochs per rollout batch (step).
    total = t.lr_decay_steps or t.max_steps * t.mini_batches * t.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, t.lr_schedule, t.warmup_steps, total, t.min_lr_ratio))
    return opt, sched
