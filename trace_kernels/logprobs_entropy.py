"""`logprobs_entropy`: differentiable per-token log-probs and entropy from hidden states and the LM head.

This is the slot that other trainers' fused heads fill (TRL's `fused_lm_head` forward, verl's fused
kernels): they take hidden states, return log p(target) and the entropy per token, and let the trainer
write its own loss on top. Here the forward is one no-grad sweep (`token_logprobs`), and the backward is
`trace_loss` itself: for incoming gradients dlogp and dH, the gradient of sum(dlogp * logp + dH * H)
is that of `trace_loss` with advantage -dlogp, pg_weight 1 and entropy_weight dH, on-policy (the ratio is
exactly 1 there, so the PG slope is -advantage = dlogp). Memory stays bounded by the chunk budget in
both passes; the cost is one LM-head GEMM forward and three in the backward.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

from .loss import token_logprobs, trace_loss


class _LogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, temperature, ignore_index, impl, bias_V, logit_map):
        logp_N, entropy_N = token_logprobs(hidden_NH, weight_VH, targets_N, temperature, return_entropy=True,
                                           ignore_index=ignore_index, impl=impl, bias=bias_V, **logit_map)
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N, bias_V)
        ctx.options = (temperature, ignore_index, impl, logit_map)
        device_type = hidden_NH.device.type
        # The backward's GEMMs take the forward's autocast dtype (backward passes run outside autocast).
        ctx.autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        return logp_N, entropy_N

    @staticmethod
    @once_differentiable  # the backward is itself a fused kernel call: no double backward
    def backward(ctx, dlogp_N, dentropy_N):
        hidden_NH, weight_VH, targets_N, bias_V = ctx.saved_tensors
        temperature, ignore_index, impl, logit_map = ctx.options
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias_V is not None and ctx.needs_input_grad[6]
        n = hidden_NH.shape[0]
        if dlogp_N is None:
            dlogp_N = hidden_NH.new_zeros(n, dtype=torch.float32)
        h = hidden_NH.detach().requires_grad_(need_h)
        w = weight_VH.detach().requires_grad_(need_w)
        b = None if bias_V is None else bias_V.detach().requires_grad_(need_b)
        autocast = (torch.autocast(h.device.type, dtype=ctx.autocast) if ctx.autocast is not None
                    else contextlib.nullcontext())
        with torch.enable_grad(), autocast:
            out = trace_loss(h, w, targets_N, -dlogp_N, pg_weight=torch.ones_like(dlogp_N),
                             entropy_weight=dentropy_N, temperature=temperature, ignore_index=ignore_index,
                             impl=impl, bias=b, **logit_map)
            inputs = [t for t, need in ((h, need_h), (w, need_w), (b, need_b)) if need]
            grads = iter(torch.autograd.grad(out.loss, inputs)) if inputs else iter(())
        grad_h = next(grads) if need_h else None
        grad_w = next(grads) if need_w else None
        grad_b = next(grads) if need_b else None
        return grad_h, grad_w, None, None, None, None, grad_b, None


def logprobs_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    bias: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable (log p(targets) [N], entropy [N]), fp32 (fp64 for fp64 inputs' gradients), 0 on rows
    whose target is ignore_index, with z = hidden @ weight.T / temperature; never holds [N, V] logits.

    hidden [N, H], weight [V, H] (same dtype), targets [N] int64; logit_scale, logit_softcap and bias [V]: the
    head's logit map, as in `trace_loss`. Gradients flow to hidden, weight and bias;
    both outputs may receive gradients. Bad arguments raise ValueError before any kernel runs (the checks
    of `trace_loss`)."""
    logit_map = dict(logit_scale=logit_scale, logit_softcap=logit_softcap)
    if not torch.is_grad_enabled() or not (getattr(hidden, "requires_grad", False)
                                           or getattr(weight, "requires_grad", False)
                                           or getattr(bias, "requires_grad", False)):
        return token_logprobs(hidden, weight, targets, temperature, return_entropy=True,
                              ignore_index=ignore_index, impl=impl, bias=bias, **logit_map)
    return _LogprobsEntropy.apply(hidden, weight, targets, temperature, ignore_index, impl, bias, logit_map)
