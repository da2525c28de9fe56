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

from .model import Batch, check_lm_head, response_hidden, router_aux_loss


class Policy(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        # An MoE model's router load-balancing loss, added as its Hugging Face forward adds it (None: none)
        self.router_aux = router_aux_loss(lm)
        self.last_router_aux: torch.Tensor | None = None  # the last forward's aux loss, unweighted (a metric)
        # the head's logit map (softcapping, scales: heads.py), for student and teacher alike
        self.head_kwargs = check_lm_head(lm).kwargs()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def lm_head_weight(self) -> torch.Tensor:
        return self.lm.get_output_embeddings().weight

    def forward(self, batch: Batch, loss_kwargs: dict, teacher_batch: Batch | None = None,
                teacher_rows: torch.Tensor | None = None, teacher: tuple | None = None,
                advantage_weights=None, router_aux_weight: float = 1.0) -> tk.TraceLossOutput:
        """trace_loss on this micro-batch. The teacher (when distilled rows exist anywhere) is either this
        network on teacher_batch, run first without gradient, or `teacher` = (hidden [M, H], weight [V, H])
        computed by a snapshot. teacher_rows [M] picks the distilled rows out of the teacher's rows.
        advantage_weights: a function of the response tokens' log-probs [N] (from these hidden states, one no-grad
        sweep of the LM head before the loss) giving each token's weight of the GRPO term [N] (an importance
        correction, trace_train.mismatch), applied to the advantages. router_aux_weight: this micro-batch's share of
        the update (its response tokens over the update's), by which an MoE model's router_aux_loss_coef * aux loss
        is added to the loss (the shares of an update sum to 1: one forward over everything adds it once, as
        transformers does)."""
        kw = dict(loss_kwargs)
        if teacher_batch is not None:
            with torch.no_grad():
                th = response_hidden(self.lm, teacher_batch)
            if teacher_rows is not None:
                kw["teacher_hidden"] = th[teacher_rows.to(th.device)]
        elif teacher is not None:
            kw["teacher_hidden"], kw["teacher_weight"] = teacher
        if self.router_aux is None:
            hidden = response_hidden(self.lm, batch)
        else:
            hidden, aux = response_hidden(self.lm, batch, self.router_aux)
        weight = self.lm_head_weight()
        if advantage_weights is not None:
            with torch.no_grad():
                logp = tk.token_logprobs(hidden.detach(), weight.detach(), kw["targets"], kw.get("temperature", 1.0),
                                         **self.head_kwargs)
            kw["advantages"] = kw["advantages"] * advantage_weights(logp).to(kw["advantages"])
        out = tk.trace_loss(hidden, weight, **kw, **self.head_kwargs)
        if self.router_aux is None:
            return out
        self.last_router_aux = aux.detach()
        return out._replace(loss=out.loss + (self.router_aux.coef * router_aux_weight) * aux.to(out.loss))

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
