"""TRACE's schedule and per-token routing weights (arXiv 2605.10194; docs/training.md), as pure functions.

For a batch of B responses (lengths L_b) laid out as consecutive rows of trace_loss:
- GRPO weight of token t of response b: base_bt = 1 / sum_b L_b (token-mean) or 1 / (B L_b)
  (seq-mean-token-mean); on a span token (1 - lambda / w0) base_bt.
- KL weight of a span token: lambda / (B L_b): each branch is lambda (1/|y|) sum over the response's span
  tokens, averaged over the B responses like the GRPO term.
- trace: forward KL on the key spans of correct responses, reverse KL (optional) on the error spans of
  incorrect ones; opd_all: the KL on every token of every response (the all-token baseline); grpo: none.
B and sum_b L_b are the global batch's (all ranks), passed in, so that FSDP ranks share one normaliser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def lambda_at(step: int, w0: float = 0.5, hold_steps: int = 10, decay_steps: int = 30) -> float:
    """w0 for `hold_steps` steps, then linearly to 0 over `decay_steps` (0 from hold + decay on)."""
    if step < hold_steps:
        return w0
    if decay_steps <= 0 or step >= hold_steps + decay_steps:
        return 0.0
    return w0 * (hold_steps + decay_steps - step) / decay_steps


def cap_spans(spans: list[tuple[int, int]], length: int, cap: float = 0.25) -> list[tuple[int, int]]:
    """Clip [start, end) token spans to the response, merge overlaps, and keep them in order until
    floor(cap * length) tokens are marked, truncating the last one kept."""
    budget = int(cap * length)
    merged: list[list[int]] = []
    for start, end in sorted((max(0, s), min(length, e)) for s, e in spans):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out = []
    for start, end in merged:
        if budget <= 0:
            break
        end = min(end, start + budget)
        out.append((start, end))
        budget -= end - start
    return out


@dataclass
class Routing:
    """trace_loss arguments for B responses packed as N = sum_b L_b rows. M rows carry a KL term."""

    pg_weight_N: torch.Tensor
    kl_index_M: torch.Tensor  # int64 rows with a KL term, ascending
    fkl_weight_M: torch.Tensor
    rkl_weight_M: torch.Tensor
    teacher_responses: list[int]  # responses with at least one KL row (the teacher runs on these only)

    @property
    def has_kl(self) -> bool:
        return self.kl_index_M.numel() > 0


def route(
    lengths: list[int],
    correct: list[bool],
    key_spans: list[list[tuple[int, int]]],
    error_spans: list[list[tuple[int, int]]],
    *,
    algorithm: str,
    lam: float,
    w0: float = 0.5,
    forward_kl: bool = True,
    reverse_kl: bool = False,
    opd_all_direction: str = "reverse",
    aggregation: str = "token-mean",
    global_responses: int | None = None,
    global_tokens: int | None = None,
) -> Routing:
    """Per-token weights for this rank's responses. Spans are [start, end) token offsets in each response,
    already capped. global_responses / global_tokens: the whole batch's B and sum L_b (default: local)."""
    b_total = global_responses or len(lengths)
    n_total = global_tokens or sum(lengths)
    pg, kl_rows, fkl, rkl, teacher = [], [], [], [], []
    offset = 0
    for b, length in enumerate(lengths):
        base = 1.0 / n_total if aggregation == "token-mean" else 1.0 / (b_total * length)
        w = torch.full((length,), base, dtype=torch.float64)
        marked = torch.zeros(length, dtype=torch.bool)
        direction = None
        if lam > 0 and algorithm == "trace":
            spans = []
            if correct[b] and forward_kl:
                spans, direction = key_spans[b], "forward"
            elif not correct[b] and reverse_kl:
                spans, direction = error_spans[b], "reverse"
            for start, end in spans:
                marked[start:end] = True
        elif lam > 0 and algorithm == "opd_all":
            marked[:] = True
            direction = opd_all_direction
        if marked.any():
            w[marked] *= 1.0 - lam / w0
            rows = marked.nonzero().squeeze(1) + offset
            kl_w = torch.full((rows.numel(),), lam / (b_total * length), dtype=torch.float64)
            kl_rows.append(rows)
            fkl.append(kl_w if direction == "forward" else torch.zeros_like(kl_w))
            rkl.append(kl_w if direction == "reverse" else torch.zeros_like(kl_w))
            teacher.append(b)
        pg.append(w)
        offset += length
    def cat(xs, dtype):
        return torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)

    return Routing(
        pg_weight_N=cat(pg, torch.float64).float(),
        kl_index_M=cat(kl_rows, torch.int64),
        fkl_weight_M=cat(fkl, torch.float64).float(),
        rkl_weight_M=cat(rkl, torch.float64).float(),
        teacher_responses=teacher,
    )


def group_advantages(rewards_PK: torch.Tensor, norm: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages for P prompts x K rollouts: reward minus the group mean, divided by the group's
    (unbiased) standard deviation for norm="std"; mean-only for norm="mean"."""
    centred = rewards_PK - rewards_PK.mean(dim=1, keepdim=True)
    if norm == "mean":
        return centred
    if rewards_PK.shape[1] < 2:
        return torch.zeros_like(centred)
    return centred / (rewards_PK.std(dim=1, keepdim=True) + eps)
