"""One micro-batch of rollouts to the TRACE loss, and the token-budget packing into micro-batches.

Teacher and student see the same response token ids after different prompts, so token j of response b
is predicted by student position |student prompt_b| - 1 + j and teacher position |teacher prompt_b| - 1 + j:
the alignment is by response index, never by re-tokenising text.
"""

from __future__ import annotations

import torch

import trace_kernels as tk

from .config import LossConfig
from .model import make_batch, varlen_attention
from .routing import Routing


def teacher_rows_for(routing: Routing, response_lens: list[int]) -> torch.Tensor:
    """[M] row, in the teacher batch made of routing.teacher_responses only, of each distilled row."""
    lens = torch.tensor(response_lens)
    student_start = torch.cumsum(lens, 0) - lens
    teacher_start = torch.full((len(response_lens),), -1, dtype=torch.long)
    teacher_lens = lens[routing.teacher_responses]
    teacher_start[routing.teacher_responses] = torch.cumsum(teacher_lens, 0) - teacher_lens
    response_of_row = torch.repeat_interleave(torch.arange(len(response_lens)), lens)
    b = response_of_row[routing.kl_index_M]
    return teacher_start[b] + routing.kl_index_M - student_start[b]


def pack(seq_tokens: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of sequence indices whose token counts sum to at most `budget` (a longer sequence
    gets a group of its own). budget <= 0: one group."""
    if budget <= 0:
        return [list(range(len(seq_tokens)))] if seq_tokens else []
    groups, cur, used = [], [], 0
    for i, n in enumerate(seq_tokens):
        if cur and used + n > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        groups.append(cur)
    return groups


def batch_logprobs(policy, pad_id: int, prompts: list[list[int]], responses: list[list[int]], *,
                   temperature: float = 1.0, packing: bool = True, packing_row_tokens: int = 0) -> torch.Tensor:
    """[N] log-probs of the response tokens without gradient, in the micro-batch layout `batch_loss` uses (no
    prompts: a one-token dummy, for a rank that must make the same FSDP calls as another); the root's gathered
    parameters are resharded afterwards (a root FSDP module keeps them after a forward)."""
    row_tokens = None if varlen_attention(policy.lm) else packing_row_tokens
    if not prompts:
        prompts = responses = [[pad_id]]
    out = policy.token_logprobs(make_batch(prompts, responses, pad_id, packed=packing, row_tokens=row_tokens),
                                temperature)
    if hasattr(policy, "reshard"):
        policy.reshard()
    return out


def batch_loss(
    policy,
    pad_id: int,
    prompts: list[list[int]],
    responses: list[list[int]],
    advantages: torch.Tensor,
    routing: Routing,
    loss_cfg: LossConfig,
    *,
    teacher_prompts: list[list[int]] | None = None,
    snapshot=None,
    teacher_needed: bool | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    impl: str = "auto",
    packing: bool = True,
    packing_row_tokens: int = 0,
    advantage_weights=None,
    token_weights_N: torch.Tensor | None = None,
    router_aux_weight: float = 1.0,
) -> tk.TraceLossOutput:
    """trace_loss for B rollouts through `policy` (trace_train.policy.Policy, FSDP-sharded or not).
    advantages: [B] per response (broadcast to its tokens); old/ref log-probs [N] per response token;
    teacher_prompts: the privileged prompt of every response (used for routing.teacher_responses);
    snapshot: a frozen Policy as the teacher, or None for the live one. teacher_needed: whether some rank
    runs the teacher on this micro-batch (default: this one does); a rank with no distilled rows then runs
    it on a one-token dummy so that every rank makes the same FSDP calls. packing: padding-free batches
    (trace_train.model.Batch), student and teacher alike; the rows and the loss are those of the padded layout.
    packing_row_tokens: with dense-mask attention (sdpa, eager), the packed rows' width (at least the longest
    sequence; 0: the longest sequence); varlen attention (flash_attention_*) always uses one row.
    router_aux_weight: the micro-batch's share of the update, weighing an MoE model's router aux loss (Policy)."""
    row_tokens = None if varlen_attention(policy.lm) else packing_row_tokens  # one row for varlen kernels

    def make(ps: list[list[int]], rs: list[list[int]]):
        return make_batch(ps, rs, pad_id, packed=packing, row_tokens=row_tokens)

    batch = make(prompts, responses)
    device = policy.device
    lens = torch.tensor(batch.response_lens, device=device)
    kw = dict(
        targets=batch.targets.to(device),
        advantages=torch.repeat_interleave(advantages.to(device, torch.float32), lens)
        * (1 if token_weights_N is None else token_weights_N.to(device, torch.float32)),
        pg_weight=routing.pg_weight_N.to(device), old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        beta=loss_cfg.beta, clip_low=loss_cfg.clip_low, clip_high=loss_cfg.clip_high, temperature=temperature,
        impl=impl,
    )
    if teacher_needed is None:
        teacher_needed = routing.has_kl
    tbatch = rows = None
    if routing.has_kl:
        if teacher_prompts is None:
            raise ValueError("teacher_prompts are required when routing has KL rows")
        sel = routing.teacher_responses
        tbatch = make([teacher_prompts[b] for b in sel], [responses[b] for b in sel])
        rows = teacher_rows_for(routing, batch.response_lens)
        kw.update(kl_index=routing.kl_index_M.to(device), fkl_weight=routing.fkl_weight_M.to(device),
                  rkl_weight=routing.rkl_weight_M.to(device), kl_term_clip=loss_cfg.kl_term_clip or None,
                  kl_clip_mode=loss_cfg.kl_clip_mode)
    elif teacher_needed:
        tbatch = make([[pad_id]], [[pad_id]])
    aw = dict(router_aux_weight=router_aux_weight) if getattr(policy, "router_aux", None) is not None else {}
    if advantage_weights is not None:
        aw["advantage_weights"] = advantage_weights
    if tbatch is None:
        return policy(batch, kw, **aw)
    if snapshot is None:
        return policy(batch, kw, teacher_batch=tbatch, teacher_rows=rows, **aw)
    teacher = snapshot.teacher_outputs(tbatch, rows)
    return policy(batch, kw, teacher=teacher if rows is not None else None, **aw)
