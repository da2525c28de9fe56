"""Row statistics and logit gradients of one chunk in plain PyTorch ops (the CPU path and the fallback).

Given the chunk's raw student logits z [C, V] (in the accumulation dtype) and the raw teacher logits u [K, V]
of its K distilled rows, maps both to x = softcap(a (z + b)) / temperature (`_map_logits_`, _chunk.py's
per-logit map) and computes, with p = softmax(x),
q = softmax(x_u), s = local student row of each distilled row, d = log p_s - log q:

    logp_c = log p_c[y_c]                   entropy_c = log S - T / S  (S = sum e, T = sum e (x - max),
                                                                        e = exp(x - max): as the Triton kernel)
    FKL_k  = sum_v q (log q - log p_s)      RKL_k = sum_v p_s d        (terms clamped with kl_term_clip
                                                                        in "value" mode)

and, when asked, dloss/dx (docs/contract.md, "Gradients"):

    dx_c = g_c (onehot(y_c) - p_c) - ew_c p_c (log p_c + entropy_c)
         + sum_{k: s_k = c} fw_k (p_c - q_k) + rw_k p_c (d_k - RKL_k)      (unclipped)

With a clip c in "value" mode, only the unclamped terms U count:
    forward:  -q [v in U] + p sum_{w in U} q_w
    reverse:  [v in U] p (d + 1) - p sum_{w in U} p_w (d_w + 1)
In "grad" mode FKL and RKL stay unclipped and each distilled row's unclipped terms are clamped entrywise
before its weight multiplies them: fw_k clamp(p_c - q_k, -c, c) + rw_k clamp(p_c (d_k - RKL_k), -c, c).

The dz returned is dx times the map's derivative (a / temperature, times 1 - tanh^2 with a softcap: `_chain_`),
the gradient with respect to the raw logits h W^T (+ b), times the chunk's scale for fp16. Every [rows, V]
tensor is a Workspace buffer reused across chunks; a 16-bit dz is written over z (the first half of each of its
fp32 rows).
"""

from __future__ import annotations

import torch

from ._chunk import ChunkInputs, ChunkOutputs, LogitMap, PgCallback, dz_scale, piece
from ._gemm import Workspace, narrow_view

# [V] accumulation-dtype buffers per student row (z, p; a 16-bit dz is written over z) and per distilled row
# (u, q, ps, d, dzk and two bool masks, rounded up); the chunk planner sizes chunks with these.
STUDENT_ROW_BUFFERS = 2
TEACHER_ROW_BUFFERS = 8
# with a logit softcap and gradients: the map's derivative per student logit
SOFTCAP_ROW_BUFFERS = 1


_ROWDOT_TEMP_ELEMENTS = 2**20


def _rowdot(a_CV: torch.Tensor, b_CV: torch.Tensor) -> torch.Tensor:
    """sum_v a * b per row without a [C, V] temporary. On the CPU by column blocks (a temporary of at most 2^20
    elements) each summed pairwise: the CPU's torch.bmm sums such long dot products one term after another (2e-4
    relative error at V 151,936 in fp32, which moved the entropy by 1e-3). On CUDA by torch.bmm (cuBLAS sums in
    tiles; blocks would cost hundreds of launches per chunk)."""
    if a_CV.is_cuda:
        return torch.bmm(a_CV.unsqueeze(1), b_CV.unsqueeze(2)).view(-1)
    c, v = a_CV.shape
    step = max(1024, _ROWDOT_TEMP_ELEMENTS // max(c, 1))
    out = None
    for v0 in range(0, v, step):
        part = (a_CV[:, v0:v0 + step] * b_CV[:, v0:v0 + step]).sum(1)
        out = part if out is None else out.add_(part)
    return out if out is not None else a_CV.new_zeros(c)


def _map_logits_(z_CV: torch.Tensor, lmap: LogitMap, b_V: torch.Tensor | None,
                 slope_CV: torch.Tensor | None = None) -> torch.Tensor:
    """Raw logits -> the mapped logits x the loss is defined on, in place (see _chunk.py); with a softcap and
    slope_CV, the map's derivative dx/dz = pre post / cosh(y)^2 (y = pre z) is written there: relatively exact
    where tanh is near 1, unlike 1 - tanh^2 (as the Triton kernel's 4e / (1 + e)^2)."""
    if b_V is not None:
        z_CV.add_(b_V)
    if not lmap.softcap:
        return z_CV if lmap.pre == 1.0 else z_CV.mul_(lmap.pre)
    y_CV = z_CV.mul_(lmap.pre)
    if slope_CV is not None:
        torch.cosh(y_CV, out=slope_CV).square_().reciprocal_().mul_(lmap.pre * lmap.post)
    return y_CV.tanh_().mul_(lmap.post)


def _chain_(dx_CV: torch.Tensor, lmap: LogitMap, slope_CV: torch.Tensor | None,
            scale: torch.Tensor | None) -> torch.Tensor:
    """d loss / d x -> d loss / d z (times the chunk's scale), in place."""
    if slope_CV is not None:
        dx_CV.mul_(slope_CV)
    elif lmap.pre != 1.0:
        dx_CV.mul_(lmap.pre)
    return dx_CV if scale is None else dx_CV.mul_(scale)


def _softmax_stats(x_CV: torch.Tensor, p_CV: torch.Tensor, with_entropy: bool = False) -> torch.Tensor | None:
    """Write softmax(x) into p_CV and log-softmax over x_CV in place, without another [C, V] buffer; with
    with_entropy, return the entropy [C] as log s - t / s, t = sum e (x - max), e = exp(x - max).

    log p = (x - max) - log s, never x - lse: at logits of 1e4 an fp32 lse is off by ulp(1e4) = 1e-3,
    which would move every probability by 0.1%. The entropy by log s - t / s (the Triton kernel's formula)
    rather than -sum p log p, whose terms carry the rounding of p and log p: at V 151,936 in fp32 the error
    against fp64 is 9.7e-8 relative, against 1.1e-5 (tests/test_chunk_loop.py)."""
    x_CV.sub_(x_CV.amax(dim=1, keepdim=True))
    torch.exp(x_CV, out=p_CV)
    s_C = p_CV.sum(dim=1, keepdim=True)
    entropy_C = None
    if with_entropy:
        entropy_C = s_C.log().squeeze(1) - _rowdot(p_CV, x_CV) / s_C.squeeze(1)
    p_CV.div_(s_C)
    x_CV.sub_(s_C.log_())
    return entropy_C


def _kl_rows(ws: Workspace, logp_CV, p_CV, u_KV, local_K, fkl_w_K, rkl_w_K, clip, need_grad, clip_mode="value"):
    """FKL, RKL [K] and, if need_grad, the distilled rows' gradient d loss / d x [K, V] (x the mapped student
    logits, so that a "grad" clamp acts on d KL / d x, the logits after the temperature). u_KV (mapped) is
    consumed."""
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


def chunk_rows(ws: Workspace, chunk: ChunkInputs, pg: PgCallback) -> ChunkOutputs:
    """Row statistics of one chunk and, with chunk.need_grad, dz (see ChunkOutputs). z_CV and u_KV are
    consumed (overwritten)."""
    z_CV, u_KV, lmap = chunk.z_CV, chunk.u_KV, chunk.logit_map
    with piece("stats"):
        slope_CV = ws.get("slope", z_CV.shape[0]) if lmap.softcap and chunk.need_grad else None
        x_CV = _map_logits_(z_CV, lmap, chunk.bias_V, slope_CV)
        p_CV = ws.get("p", x_CV.shape[0])
        entropy_C = _softmax_stats(x_CV, p_CV, with_entropy=True)
        logp_CV = x_CV
        logp_C = logp_CV.gather(1, chunk.targets_C[:, None]).squeeze(1)

    fkl_K = rkl_K = dz_KV = None
    if u_KV is not None:
        with piece("kl"):
            x_KV = _map_logits_(u_KV, lmap, chunk.teacher_bias_V)
            fkl_K, rkl_K, dz_KV = _kl_rows(ws, logp_CV, p_CV, x_KV, chunk.local_K, chunk.fkl_weight_K,
                                           chunk.rkl_weight_K, chunk.kl_term_clip, chunk.need_grad, chunk.kl_clip_mode)

    with piece("pg"):
        loss_C, g_C = pg(logp_C, entropy_C)
    if not chunk.need_grad:
        return ChunkOutputs(logp_C, entropy_C, loss_C, fkl_K, rkl_K, None)
    with piece("grad"):
        ew_C = chunk.entropy_weight_C
        scale = None
        if chunk.dz_scale_for is not None:
            kl_max = None if dz_KV is None else dz_KV.abs().amax(dim=1)
            scale = dz_scale(g_C, ew_C, entropy_C, kl_max, chunk.local_K, lmap.slope())
        # dx = p * (-(g + ew H) - ew log p) + g onehot(y), built in the p buffer.
        if ew_C is None:
            dx_CV = p_CV.mul_(-g_C[:, None])
        else:
            ew = ew_C[:, None]
            dx_CV = p_CV.mul_(logp_CV.mul_(-ew).sub_(g_C[:, None] + ew * entropy_C[:, None]))
        dx_CV.scatter_add_(1, chunk.targets_C[:, None], g_C[:, None])
        if dz_KV is not None:
            dx_CV.index_add_(0, chunk.local_K, dz_KV)
        dz_CV = _chain_(dx_CV, lmap, slope_CV, scale)
        if chunk.dz_dtype != dz_CV.dtype:  # over z, which is no longer needed
            dz_CV = narrow_view(z_CV, chunk.dz_dtype).copy_(dz_CV)
    return ChunkOutputs(logp_C, entropy_C, loss_C, fkl_K, rkl_K, dz_CV, scale)
