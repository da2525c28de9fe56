"""Row statistics and logit gradients of one chunk by Triton kernels (`impl="triton"`).

Same interface and mathematics as rows_torch.chunk_rows; the chunk loop, the LM-head GEMMs and the PG
coefficients are shared (chunked.py, pg.py). Each kernel is one program per row sweeping the vocabulary in
BLOCK_V blocks, reading the fp32 raw logits z the GEMM wrote and mapping them to x = softcap(a (z + b)) /
temperature as it loads them (`_load_logits`; the per-logit map of _chunk.py: HAS_BIAS, SOFTCAP).

Student stats (one sweep), with x mapped logits, running max m and s = sum exp(x - m):
    t = sum exp(x - m) (x - m), rescaled like s when m grows: t' = e^(m - m') (t + (m - m') s)
    log p = (x - m) - log s  (m and log s kept apart: an fp32 lse = m + log s at logits of 1e4 is off
    by 1e-3 and would move every probability by 0.1%),  entropy = log s - t / s  (not lse - sum p x,
    which cancels catastrophically at such logits).
KL rows (teacher u of distilled row k, student row s = local_k with its max and log s known):
    sweep 1: lse_u (online);  sweep 2: FKL = sum clamp(-q d), RKL = sum clamp(p d), d = logp - logq, and the
    sums over unclamped terms Sf = sum_U q, Sr = sum_U p (d + 1);  sweep 3 (gradient d loss / d x), over u:
    unclipped: fw (p - q) + rw p (d - RKL);   clipped: fw (p Sf - q [U]) + rw ([U] p (d + 1) - p Sr);
    GRAD_CLIP ("grad" mode: sweep 2 sums the unclipped terms):
    fw clamp(p - q, -c, c) + rw clamp(p (d - RKL), -c, c).
Student gradient:  dx = p (-(g + ew H) - ew logp) + g [v = y] + the dx of the row's distilled rows (read
from u), turned into dz = dx dx/dz (`_logit_grad`: a / temperature, times 1 - tanh^2 = 4e / (1 + e)^2 with
e = exp(-2 |y|) under a cap), times the chunk's scale (HAS_SCALE, fp16),
summed in fp32 and rounded once to the GEMM input dtype as it is stored: over z itself (a 16-bit dz in the
first half of the row's fp32 bytes, stored block by block after a barrier, once every warp has read the block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._chunk import ChunkInputs, ChunkOutputs, PgCallback, dz_scale, piece
from ._gemm import Workspace, narrow_view

STUDENT_ROW_BUFFERS = 1  # the logits buffer only: dz (fp32 or 16-bit) is written over it
SOFTCAP_ROW_BUFFERS = 0  # the map's slope is recomputed from z where it is needed
TEACHER_ROW_BUFFERS = 1  # likewise for the teacher logits
MAX_BLOCK_V = 4096


@triton.jit
def _tanh(y):
    """tanh in fp32 from exp (libdevice's tanh does not run under the interpreter): (1 - e) / (1 + e) with
    e = exp(-2 |y|), and its Taylor series below |y| = 1/4, where 1 - e cancels (<= 3e-7 relative)."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    a2 = a * a
    small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, small, (1.0 - e) / (1.0 + e))
    return tl.where(y < 0, -t, t)


@triton.jit
def _raw_logits(row_ptr, b_ptr, offs, mask, HAS_BIAS: tl.constexpr):
    """z (+ b) of one block of a row of raw logits, fp32, 0 where masked."""
    z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return z


@triton.jit
def _load_logits(row_ptr, b_ptr, offs, mask, pre, post, other, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """The mapped logits x of one block of a row of raw logits (masked entries: `other`): x = post tanh(pre z)
    with SOFTCAP, else pre z (LogitMap in _chunk.py)."""
    z = _raw_logits(row_ptr, b_ptr, offs, mask, HAS_BIAS)
    if SOFTCAP:
        x = post * _tanh(pre * z)
    else:
        x = pre * z
    return tl.where(mask, x, other)


@triton.jit
def _load_logits_slope(row_ptr, b_ptr, offs, mask, pre, post, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """(x, dx/dz) of one block (x as _load_logits, 0 where masked); under a cap the slope is pre post 4e / (1 + e)^2,
    e = exp(-2 |pre z|): relatively exact where tanh is near 1, unlike 1 - tanh^2."""
    z = _raw_logits(row_ptr, b_ptr, offs, mask, HAS_BIAS)
    if SOFTCAP:
        y = pre * z
        e = tl.exp(-2.0 * tl.abs(y))
        x = tl.where(mask, post * _tanh(y), 0.0)
        slope = (4.0 * pre * post) * e / ((1.0 + e) * (1.0 + e))
    else:
        x = tl.where(mask, pre * z, 0.0)
        slope = pre
    return x, slope


@triton.jit
def _logit_grad(dx, slope):
    """d loss / d z from d loss / d x and dx/dz (_load_logits_slope)."""
    return dx * slope


@triton.jit
def _online_softmax_sweep(row_ptr, b_ptr, V, pre, post, BLOCK_V: tl.constexpr, WITH_T: tl.constexpr,
                          HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """One sweep over a row of mapped logits x (_load_logits): (m, s, t) with m = max x, s = sum exp(x - m) and,
    if WITH_T, t = sum exp(x - m) (x - m) (else 0). Each block rescales the running sums by exp(m - m')
    when the max grows; t also picks up (m - m') s. The max starts at -inf, never 0."""
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = _load_logits(row_ptr, b_ptr, offs, mask, pre, post, float("-inf"), HAS_BIAS, SOFTCAP)
        m_new = tl.maximum(m, tl.max(x, 0))
        scale = tl.exp(m - m_new)
        e = tl.where(mask, tl.exp(x - m_new), 0.0)
        if WITH_T:
            shift = tl.where(s > 0, m - m_new, 0.0)  # m - m_new is -inf before the first block, where s = 0
            t = scale * (t + shift * s) + tl.sum(e * tl.where(mask, x - m_new, 0.0), 0)
        s = s * scale + tl.sum(e, 0)
        m = m_new
    return m, s, t


@triton.jit
def _student_stats_kernel(z_ptr, stride_z, b_ptr, targets_ptr, pre, post, max_ptr, logs_ptr, logp_ptr, ent_ptr, V,
                          HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    m, s, t = _online_softmax_sweep(z_row, b_ptr, V, pre, post, BLOCK_V, True, HAS_BIAS, SOFTCAP)
    log_s = tl.log(s)
    y = tl.load(targets_ptr + row)
    z_y = _load_logits(z_row, b_ptr, y, y >= 0, pre, post, 0.0, HAS_BIAS, SOFTCAP)
    tl.store(max_ptr + row, m)
    tl.store(logs_ptr + row, log_s)
    tl.store(logp_ptr + row, (z_y - m) - log_s)
    tl.store(ent_ptr + row, log_s - t / s)


@triton.jit
def _kl_rows_kernel(z_ptr, stride_z, u_ptr, stride_u, b_ptr, bu_ptr, local_ptr, max_ptr, logs_ptr, fw_ptr, rw_ptr,
                    pre, post, clip, fkl_ptr, rkl_ptr, V, HAS_FW: tl.constexpr, HAS_RW: tl.constexpr,
                    CLIP: tl.constexpr, GRAD_CLIP: tl.constexpr, NEED_GRAD: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    # CLIP: the "value" clip (clamped terms, set U); GRAD_CLIP: the "grad" clip (unclipped values, clamped
    # gradient entries). The launcher sets at most one, and GRAD_CLIP only with NEED_GRAD.
    k = tl.program_id(0).to(tl.int64)
    srow = tl.load(local_ptr + k).to(tl.int64)
    z_row = z_ptr + srow * stride_z
    u_row = u_ptr + k * stride_u
    m_s = tl.load(max_ptr + srow)
    logs_s = tl.load(logs_ptr + srow)
    # sweep 1: teacher log-normaliser
    m_u, s_u, _ = _online_softmax_sweep(u_row, bu_ptr, V, pre, post, BLOCK_V, False, HAS_BIAS, SOFTCAP)
    logs_u = tl.log(s_u)
    # sweep 2: both KLs and the sums over unclamped terms
    fkl = tl.zeros((), tl.float32)
    rkl = tl.zeros((), tl.float32)
    sf = tl.zeros((), tl.float32)
    sr = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        logp = (_load_logits(z_row, b_ptr, offs, mask, pre, post, 0.0, HAS_BIAS, SOFTCAP) - m_s) - logs_s
        logq = (_load_logits(u_row, bu_ptr, offs, mask, pre, post, 0.0, HAS_BIAS, SOFTCAP) - m_u) - logs_u
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
        # d loss / d x of the distilled row (the student kernel applies the map's derivative)
        fw = tl.load(fw_ptr + k).to(tl.float32) if HAS_FW else 0.0
        rw = tl.load(rw_ptr + k).to(tl.float32) if HAS_RW else 0.0
        # sweep 3: over u (each element is read before it is written, by the same thread)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            logp = (_load_logits(z_row, b_ptr, offs, mask, pre, post, 0.0, HAS_BIAS, SOFTCAP) - m_s) - logs_s
            logq = (_load_logits(u_row, bu_ptr, offs, mask, pre, post, 0.0, HAS_BIAS, SOFTCAP) - m_u) - logs_u
            p = tl.exp(logp)
            q = tl.exp(logq)
            d = logp - logq
            if CLIP:
                fterm = -q * d
                rterm = p * d
                keep_f = (fterm >= -clip) & (fterm <= clip)
                keep_r = (rterm >= -clip) & (rterm <= clip)
                dz = fw * (p * sf - tl.where(keep_f, q, 0.0)) + rw * (tl.where(keep_r, p * (d + 1.0), 0.0) - p * sr)
            elif GRAD_CLIP:
                gf = tl.minimum(tl.maximum(p - q, -clip), clip)
                gr = tl.minimum(tl.maximum(p * (d - rkl), -clip), clip)
                dz = fw * gf + rw * gr
            else:
                dz = fw * (p - q) + rw * p * (d - rkl)
            tl.store(u_row + offs, dz, mask=mask)


@triton.jit
def _student_grad_kernel(z_ptr, stride_z, dz_ptr, stride_dz, b_ptr, targets_ptr, max_ptr, logs_ptr, ent_ptr, g_ptr,
                         ew_ptr, u_ptr, stride_u, kl_start_ptr, scale_ptr, pre, post, V, HAS_EW: tl.constexpr,
                         HAS_KL: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    dz_row = dz_ptr + row * stride_dz
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
    if HAS_SCALE:
        scale = tl.load(scale_ptr)
    if HAS_KL:  # this row's distilled rows are u rows [k0, k1): local_K is sorted
        k0 = tl.load(kl_start_ptr + row)
        k1 = tl.load(kl_start_ptr + row + 1)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        x, slope = _load_logits_slope(z_row, b_ptr, offs, mask, pre, post, HAS_BIAS, SOFTCAP)
        logp = (x - m) - log_s
        dx = tl.exp(logp) * (a - ew * logp) + tl.where(offs == y, g, 0.0)
        if HAS_KL:
            for k in range(k0, k1):
                dx += tl.load(u_ptr + k * stride_u + offs, mask=mask, other=0.0)
        dz = _logit_grad(dx, slope)
        if HAS_SCALE:
            dz = dz * scale
        # dz may be stored over z (a 16-bit dz over the first half of the row's bytes: block b's store lands on
        # elements of blocks <= b): every warp must have read this block before any warp stores.
        tl.debug_barrier()
        tl.store(dz_row + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def block_and_warps(vocab: int, mapped: bool = False) -> tuple[int, int]:
    """The BLOCK_V and num_warps every kernel of a chunk is launched with. mapped (a bias or a softcap in the
    logit map): at most half of MAX_BLOCK_V, since at 4096 / 8 warps those kernels spill 8-24 bytes on sm_90a
    and sm_80 (benchmarks/results/compile-check-triton3.9-2026-12-02)."""
    block = min(triton.next_power_of_2(vocab), MAX_BLOCK_V // 2 if mapped else MAX_BLOCK_V)
    return block, (8 if block >= 2048 else 4)


def chunk_rows(ws: Workspace, chunk: ChunkInputs, pg: PgCallback) -> ChunkOutputs:
    """Row statistics of one chunk and, with chunk.need_grad, dz (see ChunkOutputs and rows_torch.chunk_rows).
    z_CV and u_KV (fp32 raw logits) are consumed: dz is written over them."""
    z_CV, u_KV, local_K = chunk.z_CV, chunk.u_KV, chunk.local_K
    c, v = z_CV.shape
    device = z_CV.device
    block, warps = block_and_warps(v, mapped=chunk.bias_V is not None or chunk.logit_softcap is not None)
    max_C, logs_C, logp_C, ent_C = (torch.empty(c, dtype=torch.float32, device=device) for _ in range(4))
    targets_C = chunk.targets_C.contiguous()
    lmap, has_bias = chunk.logit_map, chunk.bias_V is not None
    b_V = chunk.bias_V if has_bias else z_CV  # a dummy pointer without a bias
    with piece("stats"):
        _student_stats_kernel[(c,)](z_CV, z_CV.stride(0), b_V, targets_C, lmap.pre, lmap.post, max_C, logs_C, logp_C,
                                    ent_C, v, HAS_BIAS=has_bias, SOFTCAP=lmap.softcap, BLOCK_V=block,
                                    num_warps=warps)
    fkl_K = rkl_K = None
    fw_K, rw_K = chunk.fkl_weight_K, chunk.rkl_weight_K
    kl_grad = chunk.need_grad and u_KV is not None and (fw_K is not None or rw_K is not None)
    if u_KV is not None:
        clip = chunk.kl_term_clip is not None
        k = u_KV.shape[0]
        fkl_K = torch.empty(k, dtype=torch.float32, device=device)
        rkl_K = torch.empty(k, dtype=torch.float32, device=device)
        dummy = fkl_K
        with piece("kl"):
            _kl_rows_kernel[(k,)](
                z_CV, z_CV.stride(0), u_KV, u_KV.stride(0), b_V, chunk.teacher_bias_V if has_bias else b_V,
                local_K.contiguous(), max_C, logs_C, dummy if fw_K is None else fw_K.contiguous(),
                dummy if rw_K is None else rw_K.contiguous(), lmap.pre, lmap.post,
                0.0 if chunk.kl_term_clip is None else chunk.kl_term_clip, fkl_K, rkl_K, v,
                HAS_FW=fw_K is not None, HAS_RW=rw_K is not None, CLIP=clip and chunk.kl_clip_mode == "value",
                GRAD_CLIP=clip and kl_grad and chunk.kl_clip_mode == "grad", NEED_GRAD=kl_grad, HAS_BIAS=has_bias,
                SOFTCAP=lmap.softcap, BLOCK_V=block, num_warps=warps)
    with piece("pg"):
        loss_C, g_C = pg(logp_C, ent_C)
    if not chunk.need_grad:
        return ChunkOutputs(logp_C, ent_C, loss_C, fkl_K, rkl_K, None)
    with piece("grad"):
        ew_C = chunk.entropy_weight_C
        scale = None
        if chunk.dz_scale_for is not None:
            kl_max = u_KV.abs().amax(dim=1) if kl_grad else None
            scale = dz_scale(g_C, ew_C, ent_C, kl_max, local_K, lmap.slope())
        dz_CV = z_CV if chunk.dz_dtype == z_CV.dtype else narrow_view(z_CV, chunk.dz_dtype)
        # u holds the distilled rows' dx only when the KL kernel wrote it; student row c's distilled rows are
        # u rows kl_start[c] to kl_start[c + 1] - 1 (local_K is sorted)
        kl_start = (torch.searchsorted(local_K, torch.arange(c + 1, device=device, dtype=local_K.dtype))
                    if kl_grad else logp_C)
        _student_grad_kernel[(c,)](
            z_CV, z_CV.stride(0), dz_CV, dz_CV.stride(0), b_V, targets_C, max_C, logs_C, ent_C, g_C.contiguous(),
            g_C if ew_C is None else ew_C.contiguous(), u_KV if kl_grad else z_CV,
            u_KV.stride(0) if kl_grad else 0, kl_start, logp_C if scale is None else scale, lmap.pre, lmap.post, v,
            HAS_EW=ew_C is not None, HAS_KL=kl_grad, HAS_SCALE=scale is not None, HAS_BIAS=has_bias,
            SOFTCAP=lmap.softcap, BLOCK_V=block, num_warps=warps)
    return ChunkOutputs(logp_C, ent_C, loss_C, fkl_K, rkl_K, dz_CV, scale)
