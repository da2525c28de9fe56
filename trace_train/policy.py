"""The policy as one module whose forward is the loss: hidden states of the response rows (the LM head is
never run), the teacher's on the distilled rows, and trace_loss on the LM-head weight.

Under FSDP2 this module is the root: `fully_shard` per decoder layer, then on it, so the root group holds
the embedding, the final norm and the LM head (one group, tied or not). Its forward all-gathers them
before trace_loss reads `lm_head.weight`, and backward reduce-scatters that weight's gradient like any
other. `generate` and `teacher_outputs` are registered as forward methods for the same reason.
"""

from __future__ import annotations

import torch
from torch import nn

import trace_kernels as tk

from .model import Batch, check_lm_head, response_hidden


class Policy(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        # the head's logit map (softcapping, scales: heads.py), for student and teacher alike
        self.head_kwargs = check_lm_head(lm).kwargs()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def lm_head_weight(self) -> torch.Tensor:
        return self.lm.get_output_embeddings().weight

    def forward(self, batch: Batch, loss_kwargs: dict, teacher_batch: Batch | None = None,
                teacher_rows: torch.Tensor | None = None, teacher: tuple | None = None) -> tk.TraceLossOutput:
        """trace_loss on this micro-batch. The teacher (when distilled rows exist anywhere) is either this
        network on teacher_batch, run first without gradient, or `teacher` = (hidden [M, H], weight [V, H])
        computed by a snapshot. teacher_rows [M] picks the distilled rows out of the teacher's rows."""
        kw = dict(loss_kwargs)
        if teacher_batch is not None:
            with torch.no_grad():
                th = response_hidden(self.lm, teacher_batch)
            if teacher_rows is not None:
                kw["teacher_hidden"] = th[teacher_rows.to(th.device)]
        elif teacher is not None:
            kw["teacher_hidden"], kw["teacher_weight"] = teacher
        hidden = response_hidden(self.lm, batch)
        return tk.trace_loss(hidden, self.lm_head_weight(), **kw, **self.head_kwargs)

    def teacher_outputs(self, batch: Batch, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [M, H], LM-head weight [V, H]) of a frozen copy, without gradient; the weight is cloned
        because FSDP frees its gathered copy after this call."""
        with torch.no_grad():
            h = response_hidden(self.lm, batch)
            return (h[rows.to(h.device)] if rows is not None else h[:0]), self.lm_head_weight().detach().clone()

    def token_logprobs(self, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
        """[N] log-prob of each response token of `batch` at `temperature`, without gradient (the lift metric's
        forward after the optimizer step)."""
        with torch.no_grad():
            hidden = response_hidden(self.lm, batch)
            return tk.token_logprobs(hidden, self.lm_head_weight(), batch.targets.to(hidden.device), temperature,
                                     **self.head_kwargs)

    def generate(self, *args, **kwargs):
        return self.lm.generate(*args, **kwargs)
