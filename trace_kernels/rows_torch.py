"""Row statistics and logit gradients of one chunk in plain PyTorch ops (the CPU path and the fallback).

Given the chunk's student logits z [C, V] (already divided by the temperature, in the accumulation
dtype) and the teacher logits u [K, V] of its K distilled rows, computes, with p = softmax(z), q =
softmax(u), s = local student row of each distilled row, d = log p_s - log q:

    logp_c = log p_c[y_c]                   entropy_c = -sum_v p log p
    FKL_k  = sum_v q (log q - log p_s)      RKL_k = sum_v p_s d        (terms clamped with kl_term_clip
                                                                        in "value" mode)

and, when asked, dloss/dz (docs/contract.md, "Gradients"):

    dz_c = g_c (onehot(y_c) - p_c) - ew_c p_c (log p_c + entropy_c)
         + sum_{k: s_k = c} fw_k (p_c - q_k) + rw_k p_c (d_k - RKL_k)      (unclipped)

With a clip c in "value" mode, only the unclamped terms U count:
    forward:  -q [v in U] + p sum_{w in U} q_w
    reverse:  [v in U] p (d + 1) - p sum_{w in U} p_w (d_w + 1)
In "grad" mode FKL and RKL stay unclipped and each distilled row's unclipped terms are clamped entrywise
before its weight multiplies them: fw_k clamp(p_c - q_k, -c, c) + rw_k clamp(p_c (d_k - RKL_k), -c, c).

The dz returned is this times 1/temperature (the gradient with respect to the unscaled logits h W^T),
applied by scaling the [C] and [K] row weights rather than a [C, V] tensor. Every [rows, V] tensor is a
Workspace buffer reused across chunks.
"""

from __future__ import annotations

import torch

from ._chunk import ChunkInputs, ChunkOutputs, PgCallback
from ._gemm import Workspace

# [V] buffers per student row and per distilled row (fp32 ones, and bool masks counted as a quarter);
# the chunk planner sizes chunks with these so that a chunk stays under the memory budget.
STUDENT_ROW_BUFFERS = 2
TEACHER_ROW_BUFFERS = 8


def _rowdot(a_CV: torch.Tensor, b_CV: torch.Tensor) -> torch.Tensor:
    """sum_v a * b per row without a [C, V] temporary."""
    return torch.bmm(a_CV.unsqueeze(1), b_CV.unsqueeze(2)).view(-1)


def _softmax_stats(z_CV: torch.Tensor, p_CV: torch.Tensor) -> None:
    """Write softmax(z) into p_CV and log-softmax over z_CV in place, without another [C, V] buffer.

    log p = (z - max) - log s, never z - lse: at logits of 1e4 an fp32 lse is off by ulp(1e4) = 1e-3,
    which would move every probability by 0.1%."""
    z_CV.sub_(z_CV.amax(dim=1, keepdim=True))
    torch.exp(z_CV, out=p_CV)
    s_C = p_CV.sum(dim=1, keepdim=True)
    p_CV.div_(s_C)
    z_CV.sub_(s_C.log_())


def _kl_rows(ws: Workspace, logp_CV, p_CV, u_KV, local_K, fkl_w_K, rkl_w_K, clip, need_grad, clip_mode="value"):
    """FKL, RKL [K] and, if need_grad, the distilled rows' logit gradient dz [K, V]. u_KV is consumed.
    The weights carry 1/temperature, so a "grad" clamp (applied before them) acts on d KL / d z, z scaled."""
    k = u_KV.shape[0]
    q_KV = ws.get("q", k, teacher=True)
    _softmax_stats(u_KV, q_KV)  # u is now log q
    ps_KV = torch.index_select(p_CV, 0, local_K, out=ws.get("ps", k, teacher=True))
    d_KV = torch.index_select(logp_CV, 0, local_K, out=ws.get("d", k, teacher=True)).sub_(u_KV)
    dz_KV = ws.get("dzk", k, teacher=True).zero_() if need_grad else None
    tmp_KV = u_KV  # log q is no longer needed: its buffer becomes scratch
    if clip is None or clip_mode == "grad":
        grad_clip = clip  # None: unclipped

        def clamped(t_KV):
            return t_KV if grad_clip is None else t_KV.clamp_(-grad_clip, grad_clip)

        fkl_K = -_rowdot(q_KV, d_KV)
        rkl_K = _rowdot(ps_KV, d_KV)
        if need_grad and fkl_w_K is not None:
            dz_KV.add_(clamped(torch.sub(ps_KV, q_KV, out=tmp_KV)).mul_(fkl_w_K[:, None]))
        if need_grad and rkl_w_K is not None:
            dz_KV.add_(clamped(torch.sub(d_KV, rkl_K[:, None], out=tmp_KV).mul_(ps_KV)).mul_(rkl_w_K[:, None]))
        return fkl_K, rkl_K, dz_KV
    keep_KV = ws.get("keep", k, teacher=True, dtype=torch.bool)
    upper_KV = ws.get("upper", k, teacher=True, dtype=torch.bool)

    def unclamped(t_KV):  # U = {-clip <= t <= clip}, where clamp passes the gradient
        torch.ge(t_KV, -clip, out=keep_KV)
        return keep_KV.logical_and_(torch.le(t_KV, clip, out=upper_KV))

    # forward KL terms -q d
    torch.mul(q_KV, d_KV, out=tmp_KV).neg_()
    unclamped(tmp_KV)
    fkl_K = tmp_KV.clamp_(-clip, clip).sum(1)
    if need_grad and fkl_w_K is not None:
        qkeep_KV = q_KV.mul_(keep_KV)
        dz_KV.add_(torch.mul(ps_KV, qkeep_KV.sum(1, keepdim=True), out=tmp_KV).sub_(qkeep_KV)
                   .mul_(fkl_w_K[:, None]))
    # reverse KL terms p d
    torch.mul(ps_KV, d_KV, out=tmp_KV)
    unclamped(tmp_KV)
    rkl_K = tmp_KV.clamp_(-clip, clip).sum(1)
    if need_grad and rkl_w_K is not None:
        w_KV = d_KV.add_(1).mul_(ps_KV).mul_(keep_KV)  # [v in U] p (d + 1)
        dz_KV.add_(torch.mul(ps_KV, w_KV.sum(1, keepdim=True), out=tmp_KV).neg_().add_(w_KV)
                   .mul_(rkl_w_K[:, None]))
    return fkl_K, rkl_K, dz_KV


def row_buffers(dz_bytes_ratio: float) -> tuple[float, float]:
    """[V] accumulation-dtype buffers per student row and per distilled row, for the chunk planner;
    dz_bytes_ratio is the size of a dz element over an accumulation element (0 without gradient, 1 when
    dz stays in the accumulation dtype: it is then written over p)."""
    return STUDENT_ROW_BUFFERS + (dz_bytes_ratio if dz_bytes_ratio < 1 else 0.0), TEACHER_ROW_BUFFERS


def chunk_rows(ws: Workspace, chunk: ChunkInputs, pg: PgCallback) -> ChunkOutputs:
    """Row statistics of one chunk and, with chunk.need_grad, dz (see ChunkOutputs). z_CV and u_KV are
    consumed (overwritten)."""
    z_CV, u_KV, inv_t = chunk.z_CV, chunk.u_KV, chunk.inv_t
    if inv_t != 1.0:
        z_CV.mul_(inv_t)
        if u_KV is not None:
            u_KV.mul_(inv_t)
    p_CV = ws.get("p", z_CV.shape[0])
    _softmax_stats(z_CV, p_CV)
    logp_CV = z_CV
    logp_C = logp_CV.gather(1, chunk.targets_C[:, None]).squeeze(1)
    entropy_C = -_rowdot(p_CV, logp_CV)

    # dz with respect to the unscaled logits is inv_t times dz with respect to the scaled ones, and dz is
    # linear in the row weights g, ew, fw, rw: scaling those [C] / [K] vectors applies the temperature.
    def scaled(w):
        return w if w is None or inv_t == 1.0 else w * inv_t

    fkl_K = rkl_K = dz_KV = None
    if u_KV is not None:
        fkl_K, rkl_K, dz_KV = _kl_rows(ws, logp_CV, p_CV, u_KV, chunk.local_K, scaled(chunk.fkl_weight_K),
                                       scaled(chunk.rkl_weight_K), chunk.kl_term_clip, chunk.need_grad,
                                       chunk.kl_clip_mode)

    loss_C, g_C = pg(logp_C, entropy_C)
    if not chunk.need_grad:
        return ChunkOutputs(logp_C, entropy_C, loss_C, fkl_K, rkl_K, None)
    g_C = scaled(g_C)
    # dz = p * (-(g + ew H) - ew log p) + g onehot(y), built in the p buffer.
    if chunk.entropy_weight_C is None:
        dz_CV = p_CV.mul_(-g_C[:, None])
    else:
        ew = scaled(chunk.entropy_weight_C)[:, None]
        dz_CV = p_CV.mul_(logp_CV.mul_(-ew).sub_(g_C[:, None] + ew * entropy_C[:, None]))
    dz_CV.scatter_add_(1, chunk.targets_C[:, None], g_C[:, None])
    if dz_KV is not None:
        dz_CV.index_add_(0, chunk.local_K, dz_KV)
    if chunk.dz_dtype != dz_CV.dtype:
        dz_CV = ws.get("dz", dz_CV.shape[0], dtype=chunk.dz_dtype).copy_(dz_CV)
    return ChunkOutputs(logp_C, entropy_C, loss_C, fkl_K, rkl_K, dz_CV)
