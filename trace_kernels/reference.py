"""The materialized reference of `trace_loss`: every [N, V] and [M, V] tensor held at once, gradients by autograd.

Written straight from the formulas of docs/contract.md and independent of the chunked paths (which
use closed-form gradients), so that comparing the two tests both. For tests and small problems only.
With kl_clip_mode="grad" the clamped per-entry KL gradient is still autograd's (of the unclipped KL),
clamped in a custom backward: no closed form is shared with the chunked paths there either.
"""

from __future__ import annotations

import torch

from ._inputs import TraceInputs
from .output import TraceLossOutput


def _kl_rows(zs_MV: torch.Tensor, logq_MV: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Unclipped FKL_j (reverse=False) or RKL_j [M] of student logits zs_MV against teacher log-probs."""
    logp_MV = torch.log_softmax(zs_MV, dim=-1)
    if reverse:
        return (logp_MV.exp() * (logp_MV - logq_MV)).sum(-1)
    return (logq_MV.exp() * (logq_MV - logp_MV)).sum(-1)


class _GradClippedKL(torch.autograd.Function):
    """KL_j [M] unclipped in the forward; in the backward, each entry of d KL_j / d zs_j (obtained by autograd
    of the unclipped KL) clamped to [-clip, clip] before the incoming gradient (the row's weight) scales it.

    Deliberately not the gradient of the forward: that is the "grad" clip mode of the contract."""

    @staticmethod
    def forward(ctx, zs_MV, logq_MV, clip, reverse):
        ctx.save_for_backward(zs_MV, logq_MV)
        ctx.clip, ctx.reverse = clip, reverse
        return _kl_rows(zs_MV, logq_MV, reverse)

    @staticmethod
    def backward(ctx, grad_M):
        zs_MV, logq_MV = ctx.saved_tensors
        with torch.enable_grad():
            z = zs_MV.detach().requires_grad_(True)
            (dkl_MV,) = torch.autograd.grad(_kl_rows(z, logq_MV, ctx.reverse).sum(), z)
        return grad_M[:, None] * dkl_MV.clamp(-ctx.clip, ctx.clip), None, None, None


def _gemm_operand(t: torch.Tensor, inp: TraceInputs) -> torch.Tensor:
    """t in the accumulation dtype, rounded to autocast's dtype first when the contract says so, with the
    gradient passed straight through (the chunked paths' gradients are fp32 products, not rounded)."""
    t_acc = t.to(inp.acc_dtype)
    if inp.autocast_dtype is None:
        return t_acc
    return t_acc + (t.to(inp.autocast_dtype).to(inp.acc_dtype) - t_acc).detach()


class _Softcap(torch.autograd.Function):
    """c tanh(y / c), whose derivative is taken as 1 / cosh(y / c)^2: autograd's tanh backward, 1 - tanh^2 from
    the output, loses its relative precision where tanh is near 1 (3e-4 at |y| / c = 15 in fp64)."""

    @staticmethod
    def forward(ctx, y, c):
        ctx.save_for_backward(y)
        ctx.c = c
        return c * torch.tanh(y / c)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad / torch.cosh(y / ctx.c) ** 2, None


def _logits(h_RH: torch.Tensor, w_VH: torch.Tensor, b_V: torch.Tensor | None, inp: TraceInputs) -> torch.Tensor:
    """The mapped logits softcap(logit_scale (h W^T + b)) / temperature, as HF's heads compute them."""
    y_RV = _gemm_operand(h_RH, inp) @ _gemm_operand(w_VH, inp).T
    if b_V is not None:
        y_RV = y_RV + _gemm_operand(b_V, inp)
    y_RV = y_RV * inp.logit_scale
    if inp.logit_softcap is not None:
        y_RV = _Softcap.apply(y_RV, inp.logit_softcap)
    return y_RV / inp.temperature


def reference_trace_loss(inp: TraceInputs) -> TraceLossOutput:
    """Materialized `trace_loss` in the accumulation dtype (fp64 when the inputs are fp64)."""
    with torch.autocast(inp.hidden_NH.device.type, enabled=False):
        return _reference(inp)


def _reference(inp: TraceInputs) -> TraceLossOutput:
    acc = inp.acc_dtype
    valid = inp.valid_N
    z_NV = _logits(inp.hidden_NH, inp.weight_VH, inp.bias_V, inp)
    logp_NV = torch.log_softmax(z_NV, dim=-1)
    p_NV = logp_NV.exp()
    safe_targets = torch.where(valid, inp.targets_N, 0)
    logp_N = logp_NV.gather(1, safe_targets[:, None]).squeeze(1)
    entropy_N = -(p_NV * logp_NV).sum(-1)

    # Padded rows get neutral values so that no NaN or Inf there can reach the loss or its gradient.
    zero = torch.zeros((), dtype=acc, device=z_NV.device)
    adv = torch.where(valid, inp.advantages_N.to(acc), zero)
    old = logp_N.detach() if inp.old_logprobs_N is None else torch.where(valid, inp.old_logprobs_N.to(acc),
                                                                          logp_N.detach())
    ratio = torch.exp(logp_N - old)
    pg = torch.maximum(-ratio * adv, -torch.clamp(ratio, 1 - inp.clip_low, 1 + inp.clip_high) * adv)
    if inp.dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -inp.dual_clip * adv), pg)
    if inp.beta != 0:
        ref = torch.where(valid, inp.ref_logprobs_N.to(acc), logp_N.detach())
        delta = ref - logp_N
        pg = pg + inp.beta * (torch.exp(delta) - delta - 1)
    loss = torch.where(valid, inp.pg_weight_N * pg, zero).sum()
    if inp.entropy_weight_N is not None:
        loss = loss + torch.where(valid, inp.entropy_weight_N * entropy_N, zero).sum()

    fkl_M = rkl_M = None
    if inp.has_teacher:
        u_MV = _logits(inp.teacher_hidden_MH, inp.teacher_weight_VH, inp.teacher_bias_V, inp)
        logq_MV = torch.log_softmax(u_MV, dim=-1)
        q_MV = logq_MV.exp()
        if inp.kl_term_clip is not None and inp.kl_clip_mode == "grad":
            zs_MV = z_NV[inp.kl_index_M]
            fkl_M = _GradClippedKL.apply(zs_MV, logq_MV, inp.kl_term_clip, False)
            rkl_M = _GradClippedKL.apply(zs_MV, logq_MV, inp.kl_term_clip, True)
        else:
            logps_MV = logp_NV[inp.kl_index_M]
            ps_MV = p_NV[inp.kl_index_M]
            fkl_terms = q_MV * (logq_MV - logps_MV)
            rkl_terms = ps_MV * (logps_MV - logq_MV)
            if inp.kl_term_clip is not None:
                fkl_terms = torch.clamp(fkl_terms, -inp.kl_term_clip, inp.kl_term_clip)
                rkl_terms = torch.clamp(rkl_terms, -inp.kl_term_clip, inp.kl_term_clip)
            fkl_M, rkl_M = fkl_terms.sum(-1), rkl_terms.sum(-1)
        if inp.fkl_weight_M is not None:
            loss = loss + (inp.fkl_weight_M.to(acc) * fkl_M).sum()
        if inp.rkl_weight_M is not None:
            loss = loss + (inp.rkl_weight_M.to(acc) * rkl_M).sum()
        fkl_M, rkl_M = fkl_M.detach().float(), rkl_M.detach().float()

    return TraceLossOutput(
        loss=loss,
        logprobs=torch.where(valid, logp_N.detach(), zero).float(),
        entropy=torch.where(valid, entropy_N.detach(), zero).float(),
        fkl=fkl_M,
        rkl=rkl_M,
    )
