"""Per-token GRPO (+ k3) loss and its closed-form derivative g_i = d loss / d logp_i.

O(rows) work between the vocabulary sweeps of the chunked paths; the reference uses autograd instead.

    r = exp(logp - old);  L = max(-r A, -clamp(r, 1 - eps_low, 1 + eps_high) A)
    dL/dlogp = -r A where the unclipped branch is the max (ties happen only where clamp(r) == r, and
    then both branches have this slope), 0 where the clipped branch wins (clamp has zero slope there).
    dual clip c, A < 0: L = min(L, -c A), slope 0 where the cap is taken.
    k3 = exp(ref - logp) - (ref - logp) - 1;  dk3/dlogp = 1 - exp(ref - logp)  (both through expm1).
"""

from __future__ import annotations

import torch


def pg_rows(
    logp_C: torch.Tensor,
    entropy_C: torch.Tensor,
    valid_C: torch.Tensor,
    advantages_C: torch.Tensor,
    pg_weight_C: torch.Tensor,
    old_C: torch.Tensor | None,
    ref_C: torch.Tensor | None,
    entropy_weight_C: torch.Tensor | None,
    *,
    beta: float,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (loss_C, g_C): each row's weighted contribution to the loss (PG, k3 and entropy terms) and
    g_C = d loss / d logp_C. Both are 0 on ignored rows. Inputs in the accumulation dtype of logp_C."""
    acc = logp_C.dtype
    zero = torch.zeros((), dtype=acc, device=logp_C.device)
    adv = torch.where(valid_C, advantages_C.to(acc), zero)
    # On-policy (old = current, detached) the ratio is 1, but written as logp - logp so that a non-finite
    # log-prob still makes the loss non-finite, as the contract requires.
    old = logp_C if old_C is None else old_C.to(acc)
    log_ratio = torch.where(valid_C, logp_C - old, zero)
    ratio = torch.exp(log_ratio)
    unclipped = -ratio * adv
    clipped = -torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    use_unclipped = unclipped >= clipped
    loss = torch.where(use_unclipped, unclipped, clipped)
    slope = torch.where(use_unclipped, unclipped, zero)
    if dual_clip is not None:
        cap = -dual_clip * adv
        capped = (adv < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
        slope = torch.where(capped, zero, slope)
    if beta != 0:
        delta = torch.where(valid_C, ref_C.to(acc) - logp_C, zero)
        # expm1: exp(d) - d - 1 is ~d^2/2, and in fp32 the 1 cancels all but ~1e-3 of it at |d| ~ 1e-2
        em1 = torch.expm1(delta)
        loss = loss + beta * (em1 - delta)
        slope = slope - beta * em1
    loss = torch.where(valid_C, pg_weight_C * loss, zero)
    g = torch.where(valid_C, pg_weight_C * slope, zero)
    if entropy_weight_C is not None:
        loss = loss + torch.where(valid_C, entropy_weight_C * entropy_C, zero)
    return loss, g
