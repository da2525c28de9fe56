"""The chunked algorithm (docs/contract.md, "Memory"), shared by the torch and Triton row backends.

1. Row compaction: only rows that matter (a valid target, or a distilled row's student) are computed.
2. Those rows are cut into chunks whose [C, V] and [K, V] fp32 buffers fit a memory budget; nothing of
   size N x V is ever allocated.
3. Per chunk: student logits by one GEMM, teacher logits for the chunk's K distilled rows only, then the
   row backend (vocabulary sweeps) gives log-probs, entropy, KL and dloss/dlogits.
4. d hidden and d weight by GEMMs in the same forward; the backward only scales them by the incoming
   gradient (3 + M/N LM-head GEMMs in all, no recompute).
"""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import torch

from . import rows_torch
from ._gemm import LMHead, Workspace
from ._inputs import TraceInputs
from .output import TraceLossOutput
from .pg import pg_rows

_budget_bytes = int(float(os.environ.get("TRACE_KERNELS_CHUNK_MB", "256")) * 2**20)


def get_chunk_budget_mb() -> float:
    return _budget_bytes / 2**20


@contextlib.contextmanager
def chunk_budget(megabytes: float):
    """Temporarily set the memory budget of one chunk's vocabulary buffers (default 256 MB, or the
    TRACE_KERNELS_CHUNK_MB environment variable)."""
    global _budget_bytes
    if not megabytes > 0:
        raise ValueError(f"megabytes must be > 0, got {megabytes}")
    previous, _budget_bytes = _budget_bytes, int(megabytes * 2**20)
    try:
        yield
    finally:
        _budget_bytes = previous


def plan_chunks(kl_counts_A: np.ndarray, vocab: int, elem_bytes: int, budget_bytes: int,
                student_buffers: int, teacher_buffers: int) -> list[tuple[int, int]]:
    """Cut A compacted rows into [a, b) ranges whose buffers (student_buffers [V] rows per row, plus
    teacher_buffers per distilled row of it) fit budget_bytes; a chunk holds at least one row."""
    cost = student_buffers + teacher_buffers * kl_counts_A.astype(np.int64)
    capacity = max(budget_bytes // (vocab * elem_bytes), 1)
    cum = np.cumsum(cost)
    chunks, a, base = [], 0, 0
    while a < len(cost):
        b = max(int(np.searchsorted(cum, base + capacity, side="right")), a + 1)
        chunks.append((a, b))
        base, a = int(cum[b - 1]), b
    return chunks


class _LossWithGradients(torch.autograd.Function):
    """Returns a loss computed elsewhere; its backward scales the gradients computed with it."""

    @staticmethod
    def forward(ctx, hidden, weight, loss, grad_hidden, grad_weight):
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = None if grad_hidden is None else (grad_hidden * grad_out).to(ctx.dtypes[0])
        gw = None if grad_weight is None else (grad_weight * grad_out).to(ctx.dtypes[1])
        return gh, gw, None, None, None


def _rows(t: torch.Tensor | None, rows: torch.Tensor | slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


def chunked_trace_loss(inp: TraceInputs, backend: str = "torch") -> TraceLossOutput:
    """`trace_loss` by chunks. backend "torch" (rows_torch) or "triton" (rows_triton)."""
    if backend == "triton":
        from . import rows_triton as rows
    else:
        rows = rows_torch
    hidden, acc = inp.hidden_NH, inp.acc_dtype
    n, device = hidden.shape[0], hidden.device
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and inp.weight_VH.requires_grad
    need_grad = need_h or need_w
    inv_t = 1.0 / inp.temperature

    with torch.no_grad():
        head = LMHead(inp.weight_VH.detach(), acc)
        teacher_head = None
        active_N = inp.valid_N.clone()
        if inp.has_teacher:
            active_N[inp.kl_index_M] = True
            same = (inp.teacher_weight_VH.data_ptr() == inp.weight_VH.data_ptr()
                    and inp.teacher_weight_VH.stride() == inp.weight_VH.stride())
            teacher_head = head if same else LMHead(inp.teacher_weight_VH, acc)
        active_idx = active_N.nonzero().squeeze(1)
        n_active = active_idx.numel()
        all_active = n_active == n
        # Distilled rows sorted by the compacted position of their student row, so that a chunk's
        # distilled rows are one contiguous slice.
        if inp.has_teacher:
            pos_N = torch.full((n,), -1, dtype=torch.int64, device=device)
            pos_N[active_idx] = torch.arange(n_active, device=device)
            kl_pos_M = pos_N[inp.kl_index_M]
            kl_pos_sorted, kl_order = torch.sort(kl_pos_M, stable=True)
            kl_pos_host = kl_pos_sorted.cpu().numpy()
        else:
            kl_pos_host = np.zeros(0, dtype=np.int64)
        kl_counts = np.bincount(kl_pos_host, minlength=n_active)
        chunks = plan_chunks(kl_counts, head.vocab, torch.finfo(acc).bits // 8, _budget_bytes,
                             rows.STUDENT_ROW_BUFFERS, rows.TEACHER_ROW_BUFFERS)
        kl_bounds = np.searchsorted(kl_pos_host, np.array(chunks, dtype=np.int64).reshape(-1), side="left"
                                    ).reshape(-1, 2) if chunks else np.zeros((0, 2), dtype=np.int64)
        ws = Workspace(head.vocab, acc, device, student_rows=max((b - a for a, b in chunks), default=0),
                       teacher_rows=max((int(hi - lo) for lo, hi in kl_bounds), default=0))

        logp_N = torch.zeros(n, dtype=acc, device=device)
        entropy_N = torch.zeros(n, dtype=acc, device=device)
        loss_rows_N = torch.zeros(n, dtype=acc, device=device)
        m = inp.kl_index_M.numel() if inp.has_teacher else 0
        fkl_M = torch.zeros(m, dtype=acc, device=device) if inp.has_teacher else None
        rkl_M = torch.zeros(m, dtype=acc, device=device) if inp.has_teacher else None
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(inp.weight_VH.shape, dtype=acc, device=device) if need_w else None
        safe_targets_N = torch.where(inp.valid_N, inp.targets_N, 0)

        for (a, b), (lo, hi) in zip(chunks, kl_bounds):
            rows_C = slice(a, b) if all_active else active_idx[a:b]
            h_CH = hidden[rows_C]
            z_CV = head.logits(h_CH, ws.get("z", b - a))
            u_KV = local_K = fw_K = rw_K = j_K = None
            if inp.has_teacher:
                if hi > lo:
                    j_K = kl_order[lo:hi]
                    local_K = kl_pos_sorted[lo:hi] - a
                    u_KV = teacher_head.logits(inp.teacher_hidden_MH[j_K], ws.get("u", hi - lo, teacher=True))
                    fw_K = _rows(inp.fkl_weight_M, j_K)
                    rw_K = _rows(inp.rkl_weight_M, j_K)
                    fw_K = None if fw_K is None else fw_K.to(acc)
                    rw_K = None if rw_K is None else rw_K.to(acc)
            valid_C = inp.valid_N[rows_C]
            ew_C = _rows(inp.entropy_weight_N, rows_C)
            coefficients = functools.partial(
                _coefficients, loss_rows_N=loss_rows_N, rows_C=rows_C, valid_C=valid_C,
                advantages_C=inp.advantages_N[rows_C], pg_weight_C=inp.pg_weight_N[rows_C],
                old_C=_rows(inp.old_logprobs_N, rows_C), ref_C=_rows(inp.ref_logprobs_N, rows_C),
                entropy_weight_C=ew_C, inp=inp)
            logp_C, ent_C, fkl_K, rkl_K, dz_CV = rows.chunk_rows(
                ws, z_CV, inv_t, safe_targets_N[rows_C], u_KV, local_K, fw_K, rw_K, inp.kl_term_clip, ew_C,
                coefficients, need_grad)
            logp_N[rows_C] = logp_C
            entropy_N[rows_C] = ent_C
            if j_K is not None:
                fkl_M[j_K] = fkl_K
                rkl_M[j_K] = rkl_K
            if need_h:
                dh_CH = head.grad_input(dz_CV)
                grad_h[rows_C] = dh_CH.mul_(inv_t) if inv_t != 1.0 else dh_CH
            if need_w:
                head.accumulate_grad_weight(grad_w, dz_CV, h_CH)
            del z_CV, u_KV, dz_CV
        del ws

        loss = loss_rows_N.sum()
        if inp.has_teacher:
            if inp.fkl_weight_M is not None:
                loss = loss + (inp.fkl_weight_M.to(acc) * fkl_M).sum()
            if inp.rkl_weight_M is not None:
                loss = loss + (inp.rkl_weight_M.to(acc) * rkl_M).sum()
        if need_w and inv_t != 1.0:
            grad_w.mul_(inv_t)

    if need_grad:
        loss = _LossWithGradients.apply(hidden, inp.weight_VH, loss, grad_h, grad_w)
    zero = torch.zeros((), dtype=acc, device=device)
    return TraceLossOutput(
        loss=loss,
        logprobs=torch.where(inp.valid_N, logp_N, zero).float(),
        entropy=torch.where(inp.valid_N, entropy_N, zero).float(),
        fkl=None if fkl_M is None else fkl_M.float(),
        rkl=None if rkl_M is None else rkl_M.float(),
    )


def _coefficients(logp_C, entropy_C, *, loss_rows_N, rows_C, valid_C, advantages_C, pg_weight_C, old_C, ref_C,
                  entropy_weight_C, inp: TraceInputs):
    """PG coefficient g_C for the row backend; records each row's loss contribution on the way."""
    loss_C, g_C = pg_rows(logp_C, entropy_C, valid_C, advantages_C, pg_weight_C, old_C, ref_C, entropy_weight_C,
                          beta=inp.beta, clip_low=inp.clip_low, clip_high=inp.clip_high, dual_clip=inp.dual_clip)
    loss_rows_N[rows_C] = loss_C
    return g_C
