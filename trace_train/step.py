"""One batch of rollouts to the TRACE loss: student hidden states of the response tokens, the teacher's
(same network, privileged prompt, no gradient) on the distilled rows only, and trace_loss.

Teacher and student see the same response token ids after different prompts, so token j of response b
is predicted by student position |student prompt_b| - 1 + j and teacher position |teacher prompt_b| - 1 + j:
the alignment is by response index, never by re-tokenising text.
"""

from __future__ import annotations

import torch

import trace_kernels as tk

from .config import LossConfig
from .model import lm_head_weight, make_batch, response_hidden
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


def batch_loss(
    model,
    pad_id: int,
    prompts: list[list[int]],
    responses: list[list[int]],
    advantages: torch.Tensor,
    routing: Routing,
    loss_cfg: LossConfig,
    *,
    teacher_prompts: list[list[int]] | None = None,
    teacher_model=None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    impl: str = "auto",
) -> tk.TraceLossOutput:
    """trace_loss for B rollouts. advantages: [B] per response (broadcast to its tokens); old/ref log-probs
    [N] per response token; teacher_prompts: the privileged prompt of every response (used for those in
    routing.teacher_responses); teacher_model: a snapshot, or None for the live policy."""
    batch = make_batch(prompts, responses, pad_id)
    hidden = response_hidden(model, batch)
    device = hidden.device
    lens = torch.tensor(batch.response_lens, device=device)
    kw = {}
    if routing.has_kl:
        if teacher_prompts is None:
            raise ValueError("teacher_prompts are required when routing has KL rows")
        teacher = teacher_model or model
        sel = routing.teacher_responses
        tbatch = make_batch([teacher_prompts[b] for b in sel], [responses[b] for b in sel], pad_id)
        with torch.no_grad():
            teacher_hidden = response_hidden(teacher, tbatch)
        kw = dict(
            teacher_hidden=teacher_hidden[teacher_rows_for(routing, batch.response_lens).to(device)],
            teacher_weight=None if teacher_model is None else lm_head_weight(teacher_model).detach(),
            kl_index=routing.kl_index_M.to(device), fkl_weight=routing.fkl_weight_M.to(device),
            rkl_weight=routing.rkl_weight_M.to(device), kl_term_clip=loss_cfg.kl_term_clip,
        )
    weight = lm_head_weight(model)
    return tk.trace_loss(
        hidden, weight, batch.targets.to(device),
        torch.repeat_interleave(advantages.to(device, torch.float32), lens),
        pg_weight=routing.pg_weight_N.to(device), old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        beta=loss_cfg.beta, clip_low=loss_cfg.clip_low, clip_high=loss_cfg.clip_high, temperature=temperature,
        impl=impl, **kw,
    )
