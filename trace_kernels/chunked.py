"""The chunked algorithm (docs/contract.md, "Memory"), shared by the torch and Triton row backends (the seam:
_chunk.py).

1. Row compaction: only rows that matter (a valid target, or a distilled row's student) are computed.
2. Those rows are cut into chunks (_plan.py: C rows planned for the card on CUDA, a byte budget on the CPU);
   nothing of size N x V is ever allocated.
3. Per chunk: the logits by one GEMM, [C + K, H] @ W^T over the student rows and the chunk's K distilled rows
   when the teacher weight is the student's (self-distillation: the weight is streamed once), else the
   student's and the teacher's for its K rows only; then the row backend (vocabulary sweeps) gives log-probs,
   entropy, KL and d loss / d logits, written over the logits.
4. d hidden (fp32 output, cast once) and d weight (_grad_weight.py) by GEMMs in the same forward; the backward
   only hands them over, scaled in place by the incoming gradient unless it is 1 (3 + M/N LM-head GEMMs in
   all, no recompute).

Host synchronisations per call: check_inputs reads its range checks and the number of valid rows in one
transfer; with a teacher, one more brings the distilled rows' positions (the chunk bounds are shapes, needed
on the host); the backward reads whether the incoming gradient is 1; fp16 on the torch path reads each
chunk's scale. tests/test_cuda.py counts them under torch.cuda.set_sync_debug_mode.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import _plan, rows_torch
from ._chunk import ChunkInputs, piece
from ._gemm import LMHead, Workspace
from ._grad_weight import GradWeight
from ._inputs import TraceInputs
from .output import TraceLossOutput
from .pg import pg_rows


class _LossWithGradients(torch.autograd.Function):
    """Returns a loss computed elsewhere with its gradients, and hands those over in the backward.

    The gradients are in the inputs' dtypes, except for fp16 inputs (fp32: they are rounded to fp16 only here,
    after the incoming gradient, a loss scale, has multiplied them). The backward returns them as they are when
    the incoming gradient is 1 (the usual `loss.backward()`), else scales them in place: it allocates nothing of
    size [V, H] or [N, H] (fp16 aside), and it drops its references first, so that autograd can take the
    tensors as the leaves' .grad without a copy. A second backward through the same graph (retain_graph=True,
    or gradcheck) finds them consumed and recomputes them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss, grads, recompute):
        ctx.grads = grads  # (d hidden, d weight, d bias), None where not needed
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.recompute = recompute
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            grads = ctx.recompute()
        one = torch.equal(grad_out, torch.ones_like(grad_out))  # a host sync, as Liger's check
        scaled = [g if g is None or one else g.mul_(grad_out) for g in grads]
        del grads
        scaled = [g if g is None or g.dtype == dtype else g.to(dtype) for g, dtype in zip(scaled, ctx.dtypes)]
        return scaled[0], scaled[1], scaled[2], None, None, None


def chunked_trace_loss(inp: TraceInputs, backend: str = "torch") -> TraceLossOutput:
    """`trace_loss` by chunks. backend "torch" (rows_torch) or "triton" (rows_triton)."""
    need_h = torch.is_grad_enabled() and inp.hidden_NH.requires_grad
    need_w = torch.is_grad_enabled() and inp.weight_VH.requires_grad
    need_b = torch.is_grad_enabled() and inp.bias_V is not None and inp.bias_V.requires_grad
    need = (need_h, need_w, need_b)
    device_type = inp.hidden_NH.device.type
    # The GEMMs' dtype under autocast is inp.autocast_dtype; our own ops must not be autocast again.
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        loss, out, grads = _forward(inp, backend, *need)
    if any(need):
        def recompute():
            with torch.no_grad(), torch.autocast(device_type, enabled=False):
                return _forward(inp, backend, *need)[2]

        loss = _LossWithGradients.apply(inp.hidden_NH, inp.weight_VH, inp.bias_V, loss, grads, recompute)
    return out._replace(loss=loss)


def _compact(t: torch.Tensor | None, idx: torch.Tensor | None, dtype: torch.dtype | None = None):
    if t is None:
        return None
    t = t if idx is None else t[idx]
    return t if dtype is None else t.to(dtype)


def _bias_acc(b_V: torch.Tensor | None, inp: TraceInputs) -> torch.Tensor | None:
    """A head's bias as the row backends read it: acc dtype, contiguous, rounded to autocast's dtype first."""
    if b_V is None:
        return None
    b_V = b_V.detach()
    if inp.autocast_dtype is not None:
        b_V = b_V.to(inp.autocast_dtype)
    return b_V.to(inp.acc_dtype).contiguous()


def _forward(inp: TraceInputs, backend: str, need_h: bool, need_w: bool, need_b: bool = False):
    """(loss, TraceLossOutput without its loss, (d loss / d hidden, d weight, d bias), each None where not
    needed); the gradients in the dtypes of hidden and weight (fp32 for fp16), d bias in acc."""
    rows = rows_triton() if backend == "triton" else rows_torch
    hidden, acc = inp.hidden_NH, inp.acc_dtype
    (n, h_dim), device = hidden.shape, hidden.device
    need_grad = need_h or need_w or need_b
    inv_t = 1.0 / inp.temperature
    bias_V, teacher_bias_V = _bias_acc(inp.bias_V, inp), _bias_acc(inp.teacher_bias_V, inp)

    head = LMHead(inp.weight_VH, acc, inp.autocast_dtype)
    gemm_in = head.compute_dtype  # the dtype of the GEMMs' row operands
    live = teacher_head = None
    valid_N = inp.valid_N
    m = inp.kl_index_M.numel() if inp.has_teacher else 0
    if inp.has_teacher:
        live = (inp.teacher_weight_VH.data_ptr() == inp.weight_VH.data_ptr()
                and inp.teacher_weight_VH.stride() == inp.weight_VH.stride())
        teacher_head = head if live else LMHead(inp.teacher_weight_VH, acc, inp.autocast_dtype)
        active_N = valid_N.clone()
        active_N[inp.kl_index_M] = True
        # Distilled rows sorted by the compacted position of their student row, so that a chunk's distilled
        # rows are one contiguous slice and each student row's are contiguous in it.
        pos_N = torch.cumsum(active_N, 0) - 1
        kl_pos_M, kl_order_M = torch.sort(pos_N[inp.kl_index_M], stable=True)
        host = torch.cat([active_N.sum().view(1), kl_pos_M]).cpu().numpy()  # the one sync of the plan
        n_active, kl_pos_host = int(host[0]), host[1:]
    else:
        active_N, n_active, kl_pos_host = valid_N, inp.n_valid, np.zeros(0, dtype=np.int64)
    # idx [A]: the active rows in order (None: all N rows, chunks are slices)
    idx = None if n_active == n else torch.argsort((~active_N).to(torch.int8), stable=True)[:n_active]

    targets_A = _compact(torch.where(valid_N, inp.targets_N, 0), idx)
    valid_A = _compact(valid_N, idx)
    adv_A, pgw_A = _compact(inp.advantages_N, idx, acc), _compact(inp.pg_weight_N, idx)
    old_A, ref_A = _compact(inp.old_logprobs_N, idx, acc), _compact(inp.ref_logprobs_N, idx, acc)
    ew_A = _compact(inp.entropy_weight_N, idx)
    if inp.has_teacher:
        fw_S = _compact(inp.fkl_weight_M, kl_order_M, acc)
        rw_S = _compact(inp.rkl_weight_M, kl_order_M, acc)

    stride = _plan.padded(head.vocab)
    kl_counts = np.bincount(kl_pos_host, minlength=n_active)
    fixed = 0.0
    if need_w and inp.weight_VH.dtype == torch.bfloat16:
        fixed += head.vocab * h_dim  # the 24-bit accumulator's 8-bit plane (a bound for the fp32 option's share)
    capped = inp.logit_softcap is not None and need_grad
    student_buffers = rows.STUDENT_ROW_BUFFERS + (rows.SOFTCAP_ROW_BUFFERS if capped else 0)
    chunks = _plan.plan(device, kl_counts, student_buffers * stride * acc.itemsize,
                        rows.TEACHER_ROW_BUFFERS * stride * acc.itemsize, fixed)
    kl_bounds = (np.searchsorted(kl_pos_host, np.array(chunks, dtype=np.int64).reshape(-1), side="left")
                 .reshape(-1, 2) if chunks else np.zeros((0, 2), dtype=np.int64))
    c_max = max((b - a for a, b in chunks), default=0)
    k_max = max((int(hi - lo) for lo, hi in kl_bounds), default=0)
    ws = Workspace(head.vocab, acc, device, student_rows=c_max, teacher_rows=k_max)

    logp_A = torch.empty(n_active, dtype=acc, device=device)
    entropy_A = torch.empty(n_active, dtype=acc, device=device)
    loss_A = torch.empty(n_active, dtype=acc, device=device)
    fkl_S = torch.empty(m, dtype=acc, device=device) if inp.has_teacher else None
    rkl_S = torch.empty(m, dtype=acc, device=device) if inp.has_teacher else None
    grad_h = None
    if need_h:  # fp16: kept in fp32 until the backward (see _LossWithGradients)
        dtype_h = acc if hidden.dtype == torch.float16 else hidden.dtype
        grad_h = (torch.empty if idx is None else torch.zeros)((n, h_dim), dtype=dtype_h, device=device)
    grad_w = GradWeight(inp.weight_VH, head, len(chunks), acc, triton=backend == "triton") if need_w else None
    grad_b = torch.zeros(head.vocab, dtype=acc, device=device) if need_b else None
    dz_dtype = head.kernel_dz_dtype
    scale_for = torch.float16 if need_grad and head.gemm_dtype == torch.float16 else None

    for (a, b), (lo, hi) in zip(chunks, kl_bounds):
        c, k = b - a, int(hi - lo)
        merged = bool(live) and k > 0
        with piece("gather"):
            if merged or idx is not None or hidden.dtype != gemm_in:
                x_RH = ws.rows("x", c + (k if merged else 0), h_dim, gemm_in, capacity=c_max + (k_max if live else 0))
                x_RH[:c].copy_(hidden[a:b] if idx is None else hidden[idx[a:b]])
                h_CH = x_RH[:c]
            else:
                h_CH = hidden[a:b]
            j_K = t_KH = None
            if k:
                j_K = kl_order_M[lo:hi]
                t_KH = inp.teacher_hidden_MH[j_K]
                if merged:
                    x_RH[c:].copy_(t_KH)
                else:
                    t_KH = t_KH.to(gemm_in)
        z_RV = ws.get("z", c + k, capacity=c_max + k_max)
        with piece("logits"):
            head.logits(x_RH if merged else h_CH, z_RV if merged else z_RV[:c])
        if k and not merged:
            with piece("teacher"):
                teacher_head.logits(t_KH, z_RV[c:])
        chunk = ChunkInputs(z_CV=z_RV[:c], targets_C=targets_A[a:b], inv_t=inv_t, kl_term_clip=inp.kl_term_clip,
                            kl_clip_mode=inp.kl_clip_mode, entropy_weight_C=None if ew_A is None else ew_A[a:b],
                            need_grad=need_grad, dz_dtype=dz_dtype, dz_scale_for=scale_for, bias_V=bias_V,
                            logit_scale=inp.logit_scale, logit_softcap=inp.logit_softcap)
        if k:
            chunk.teacher_bias_V = teacher_bias_V
            chunk.u_KV = z_RV[c:]
            chunk.local_K = kl_pos_M[lo:hi] - a
            chunk.fkl_weight_K = None if fw_S is None else fw_S[lo:hi]
            chunk.rkl_weight_K = None if rw_S is None else rw_S[lo:hi]
        pg = functools.partial(
            pg_rows, valid_C=valid_A[a:b], advantages_C=adv_A[a:b], pg_weight_C=pgw_A[a:b],
            old_C=None if old_A is None else old_A[a:b], ref_C=None if ref_A is None else ref_A[a:b],
            entropy_weight_C=chunk.entropy_weight_C, beta=inp.beta, clip_low=inp.clip_low, clip_high=inp.clip_high,
            dual_clip=inp.dual_clip)
        res = rows.chunk_rows(ws, chunk, pg)
        logp_A[a:b], entropy_A[a:b], loss_A[a:b] = res.logp_C, res.entropy_C, res.loss_C
        if k:
            fkl_S[lo:hi], rkl_S[lo:hi] = res.fkl_K, res.rkl_K
        if need_grad:
            dz_CV = head.round_dz(res.dz_CV)
            inv_scale = None if res.dz_scale is None else torch.reciprocal(res.dz_scale)
            if need_h:
                with piece("d hidden"):
                    direct = idx is None and grad_h.dtype == acc
                    d_CH = head.grad_input(dz_CV, out_CH=grad_h[a:b] if direct else None)
                    if inv_scale is not None:
                        d_CH.mul_(inv_scale)
                    if not direct:
                        if idx is None:
                            grad_h[a:b].copy_(d_CH)
                        else:
                            grad_h.index_copy_(0, idx[a:b], d_CH.to(grad_h.dtype))
            if need_w:
                with piece("d weight"):
                    grad_w.add(dz_CV, h_CH, inv_scale)
            if need_b:
                d_V = dz_CV.sum(0, dtype=acc)
                grad_b.add_(d_V if inv_scale is None else d_V.mul_(inv_scale))
        del chunk, res
    del ws

    loss = loss_A.sum()
    if inp.has_teacher:
        if fw_S is not None:
            loss = loss + (fw_S * fkl_S).sum()
        if rw_S is not None:
            loss = loss + (rw_S * rkl_S).sum()
    zero = torch.zeros((), dtype=acc, device=device)

    def expand(t_A):
        if idx is None:
            return t_A
        return torch.zeros(n, dtype=acc, device=device).index_copy_(0, idx, t_A)

    fkl_M = rkl_M = None
    if inp.has_teacher:
        fkl_M = torch.empty_like(fkl_S).index_copy_(0, kl_order_M, fkl_S)
        rkl_M = torch.empty_like(rkl_S).index_copy_(0, kl_order_M, rkl_S)
    out = TraceLossOutput(
        loss=loss,
        logprobs=torch.where(valid_N, expand(logp_A), zero).float(),
        entropy=torch.where(valid_N, expand(entropy_A), zero).float(),
        fkl=None if fkl_M is None else fkl_M.float(),
        rkl=None if rkl_M is None else rkl_M.float(),
    )
    return loss, out, (grad_h, None if grad_w is None else grad_w.result(), grad_b)


def rows_triton():
    """The Triton row backend, imported on first use (triton is optional)."""
    from . import rows_triton as module

    return module

