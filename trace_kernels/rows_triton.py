"""Row statistics and logit gradients of one chunk by Triton kernels (`impl="triton"`).

Same interface and mathematics as rows_torch.chunk_rows; the chunk loop, the LM-head GEMMs and the PG
coefficients are shared (chunked.py, pg.py). Each kernel is one program per row sweeping the
vocabulary in BLOCK_V blocks, reading the fp32 logits the GEMM wrote and folding in 1/temperature.

Student stats (one sweep), with z scaled logits, running max m and s = sum exp(z - m):
    t = sum exp(z - m) (z - m), rescaled like s when m grows: t' = e^(m - m') (t + (m - m') s)
    log p = (z - m) - log s  (m and log s kept apart: an fp32 lse = m + log s at logits of 1e4 is off
    by 1e-3 and would move every probability by 0.1%),  entropy = log s - t / s  (not lse - sum p z,
    which cancels catastrophically at such logits).
KL rows (teacher u of distilled row k, student row s = local_k with its max and log s known):
    sweep 1: lse_u (online);  sweep 2: FKL = sum clamp(-q d), RKL = sum clamp(p d), d = logp - logq, and the
    sums over unclamped terms Sf = sum_U q, Sr = sum_U p (d + 1);  sweep 3 (gradient), written over u:
    unclipped: fw (p - q) + rw p (d - RKL);   clipped: fw (p Sf - q [U]) + rw ([U] p (d + 1) - p Sr).
Student gradient, written over z:  dz = p (-(g + ew H) - ew logp) + g [v = y].
The distilled rows' dz are then added to their student rows (index_add_, duplicates allowed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._gemm import Workspace

STUDENT_ROW_BUFFERS = 1  # the logits buffer only: dz is written over it
TEACHER_ROW_BUFFERS = 1  # likewise for the teacher logits
MAX_BLOCK_V = 4096


@triton.jit
def _student_stats_kernel(z_ptr, stride_z, targets_ptr, inv_t, max_ptr, logs_ptr, logp_ptr, ent_ptr, V,
                          BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, 0))
        scale = tl.exp(m - m_new)
        e = tl.where(mask, tl.exp(z - m_new), 0.0)
        shift = tl.where(s > 0, m - m_new, 0.0)  # m - m_new is -inf before the first block, where s = 0
        t = scale * (t + shift * s) + tl.sum(e * tl.where(mask, z - m_new, 0.0), 0)
        s = s * scale + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    y = tl.load(targets_ptr + row)
    z_y = tl.load(z_row + y).to(tl.float32) * inv_t
    tl.store(max_ptr + row, m)
    tl.store(logs_ptr + row, log_s)
    tl.store(logp_ptr + row, (z_y - m) - log_s)
    tl.store(ent_ptr + row, log_s - t / s)


@triton.jit
def _kl_rows_kernel(z_ptr, stride_z, u_ptr, stride_u, local_ptr, max_ptr, logs_ptr, fw_ptr, rw_ptr, inv_t, clip,
                    fkl_ptr, rkl_ptr, V, HAS_FW: tl.constexpr, HAS_RW: tl.constexpr, CLIP: tl.constexpr,
                    NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    srow = tl.load(local_ptr + k).to(tl.int64)
    z_row = z_ptr + srow * stride_z
    u_row = u_ptr + k * stride_u
    m_s = tl.load(max_ptr + srow)
    logs_s = tl.load(logs_ptr + srow)
    # sweep 1: teacher log-normaliser
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        u = tl.load(u_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(u, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(mask, tl.exp(u - m_new), 0.0), 0)
        m = m_new
    m_u = m
    logs_u = tl.log(s)
    # sweep 2: both KLs and the sums over unclamped terms
    fkl = tl.zeros((), tl.float32)
    rkl = tl.zeros((), tl.float32)
    sf = tl.zeros((), tl.float32)
    sr = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        logp = (tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t - m_s) - logs_s
        logq = (tl.load(u_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t - m_u) - logs_u
        p = tl.where(mask, tl.exp(logp), 0.0)
        q = tl.where(mask, tl.exp(logq), 0.0)
        d = logp - logq
        fterm = -q * d
        rterm = p * d
        if CLIP:
            keep_f = (fterm >= -clip) & (fterm <= clip)
            keep_r = (rterm >= -clip) & (rterm <= clip)
            fkl += tl.sum(tl.minimum(tl.maximum(fterm, -clip), clip), 0)
            rkl += tl.sum(tl.minimum(tl.maximum(rterm, -clip), clip), 0)
            sf += tl.sum(tl.where(keep_f, q, 0.0), 0)
            sr += tl.sum(tl.where(keep_r, p * (d + 1.0), 0.0), 0)
        else:
            fkl += tl.sum(fterm, 0)
            rkl += tl.sum(rterm, 0)
    tl.store(fkl_ptr + k, fkl)
    tl.store(rkl_ptr + k, rkl)
    if NEED_GRAD:
        fw = tl.load(fw_ptr + k).to(tl.float32) if HAS_FW else 0.0
        rw = tl.load(rw_ptr + k).to(tl.float32) if HAS_RW else 0.0
        # sweep 3: dz of the distilled row, over u (each program reads its u block before writing it)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            logp = (tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t - m_s) - logs_s
            logq = (tl.load(u_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t - m_u) - logs_u
            p = tl.exp(logp)
            q = tl.exp(logq)
            d = logp - logq
            if CLIP:
                fterm = -q * d
                rterm = p * d
                keep_f = (fterm >= -clip) & (fterm <= clip)
                keep_r = (rterm >= -clip) & (rterm <= clip)
                dz = fw * (p * sf - tl.where(keep_f, q, 0.0)) + rw * (tl.where(keep_r, p * (d + 1.0), 0.0) - p * sr)
            else:
                dz = fw * (p - q) + rw * p * (d - rkl)
            tl.store(u_row + offs, dz, mask=mask)


@triton.jit
def _student_grad_kernel(z_ptr, stride_z, targets_ptr, max_ptr, logs_ptr, ent_ptr, g_ptr, ew_ptr, inv_t, V,
                         HAS_EW: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    m = tl.load(max_ptr + row)
    log_s = tl.load(logs_ptr + row)
    g = tl.load(g_ptr + row).to(tl.float32)
    y = tl.load(targets_ptr + row)
    if HAS_EW:
        ew = tl.load(ew_ptr + row).to(tl.float32)
        a = -(g + ew * tl.load(ent_ptr + row))
    else:
        ew = 0.0
        a = -g
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        logp = (tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t - m) - log_s
        dz = tl.exp(logp) * (a - ew * logp) + tl.where(offs == y, g, 0.0)
        tl.store(z_row + offs, dz, mask=mask)


def _block(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), MAX_BLOCK_V)


def chunk_rows(
    ws: Workspace,
    z_CV: torch.Tensor,
    inv_t: float,
    targets_C: torch.Tensor,
    u_KV: torch.Tensor | None,
    local_K: torch.Tensor | None,
    fkl_w_K: torch.Tensor | None,
    rkl_w_K: torch.Tensor | None,
    kl_term_clip: float | None,
    entropy_weight_C: torch.Tensor | None,
    coefficients: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    need_grad: bool,
):
    """Return (logp_C, entropy_C, fkl_K, rkl_K, dz_CV); see rows_torch.chunk_rows. z_CV, u_KV: unscaled
    fp32 logits, consumed (dz is written over them)."""
    c, v = z_CV.shape
    block = _block(v)
    warps = 8 if block >= 2048 else 4
    max_C, logs_C, logp_C, ent_C = (torch.empty(c, dtype=torch.float32, device=z_CV.device) for _ in range(4))
    targets_C = targets_C.contiguous()
    _student_stats_kernel[(c,)](z_CV, z_CV.stride(0), targets_C, inv_t, max_C, logs_C, logp_C, ent_C, v,
                                BLOCK_V=block, num_warps=warps)
    fkl_K = rkl_K = None
    kl_grad = need_grad and u_KV is not None and (fkl_w_K is not None or rkl_w_K is not None)
    if u_KV is not None:
        k = u_KV.shape[0]
        fkl_K = torch.empty(k, dtype=torch.float32, device=z_CV.device)
        rkl_K = torch.empty(k, dtype=torch.float32, device=z_CV.device)
        dummy = fkl_K
        _kl_rows_kernel[(k,)](
            z_CV, z_CV.stride(0), u_KV, u_KV.stride(0), local_K.contiguous(), max_C, logs_C,
            dummy if fkl_w_K is None else fkl_w_K.contiguous(), dummy if rkl_w_K is None else rkl_w_K.contiguous(),
            inv_t, 0.0 if kl_term_clip is None else kl_term_clip, fkl_K, rkl_K, v,
            HAS_FW=fkl_w_K is not None, HAS_RW=rkl_w_K is not None, CLIP=kl_term_clip is not None,
            NEED_GRAD=kl_grad, BLOCK_V=block, num_warps=warps)
    g_C = coefficients(logp_C, ent_C)
    if not need_grad:
        return logp_C, ent_C, fkl_K, rkl_K, None
    _student_grad_kernel[(c,)](z_CV, z_CV.stride(0), targets_C, max_C, logs_C, ent_C, g_C.contiguous(),
                               g_C if entropy_weight_C is None else entropy_weight_C.contiguous(), inv_t, v,
                               HAS_EW=entropy_weight_C is not None, BLOCK_V=block, num_warps=warps)
    if kl_grad:  # u holds the distilled rows' dz only when the KL kernel wrote it
        z_CV.index_add_(0, local_K, u_KV)
    return logp_C, ent_C, fkl_K, rkl_K, z_CV
