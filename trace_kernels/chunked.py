"""The chunked algorithm (docs/contract.md, "Memory"), shared by the torch and Triton row backends (the seam:
_chunk.py).

1. Row compaction: only rows that matter (a valid target, or a distilled row's student) are computed.
2. Those rows are cut into chunks whose [C, V] and [K, V] fp32 buffers fit a memory budget; nothing of
   size N x V is ever allocated.
3. Per chunk: student logits by one GEMM, teacher logits for the chunk's K distilled rows only, then the
   row backend (vocabulary sweeps) gives log-probs, entropy, KL and dloss/dlogits.
4. d hidden and d weight by GEMMs in the same forward; the backward only hands them over, scaled in place
   by the incoming gradient unless it is 1 (3 + M/N LM-head GEMMs in all, no recompute).

Memory (docs/memory.md): the chunk budget, plus d weight summed in fp32 over the chunks ([V, H] fp32) and,
for bf16/fp16 weights, its cast to the weight's dtype at the end of the forward; between forward and
backward only [V, H] and [N, H] gradients in the inputs' dtypes are held.
"""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import torch

from . import rows_torch
from ._chunk import ChunkInputs
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
                student_buffers: float, teacher_buffers: float) -> list[tuple[int, int]]:
    """Cut A compacted rows into [a, b) ranges whose buffers (student_buffers [V] rows per row, plus
    teacher_buffers per distilled row of it) fit budget_bytes; a chunk holds at least one row."""
    cost = student_buffers + teacher_buffers * kl_counts_A.astype(np.float64)
    capacity = max(budget_bytes / (vocab * elem_bytes), 1.0)
    cum = np.cumsum(cost)
    chunks, a, base = [], 0, 0.0
    while a < len(cost):
        b = max(int(np.searchsorted(cum, base + capacity, side="right")), a + 1)
        chunks.append((a, b))
        base, a = float(cum[b - 1]), b
    return chunks


class _LossWithGradients(torch.autograd.Function):
    """Returns a loss computed elsewhere with its gradients, and hands those over in the backward.

    The gradients are already in the inputs' dtypes. The backward returns them as they are when the
    incoming gradient is 1 (the usual `loss.backward()`), else scales them in place: it allocates nothing
    of size [V, H] or [N, H], and it drops its references first, so that autograd can take the tensors as
    the leaves' .grad without a copy. A second backward through the same graph (retain_graph=True, or
    gradcheck) finds them consumed and recomputes them."""

    @staticmethod
    def forward(ctx, hidden, weight, loss, grad_hidden, grad_weight, recompute):
        ctx.grads = (grad_hidden, grad_weight)
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
        return scaled[0], scaled[1], None, None, None, None


def _rows(t: torch.Tensor | None, rows: torch.Tensor | slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


def chunked_trace_loss(inp: TraceInputs, backend: str = "torch") -> TraceLossOutput:
    """`trace_loss` by chunks. backend "torch" (rows_torch) or "triton" (rows_triton)."""
    need_h = torch.is_grad_enabled() and inp.hidden_NH.requires_grad
    need_w = torch.is_grad_enabled() and inp.weight_VH.requires_grad
    with torch.no_grad():
        loss, out, grad_h, grad_w = _forward(inp, backend, need_h, need_w)
    if need_h or need_w:
        def recompute():
            with torch.no_grad():
                return _forward(inp, backend, need_h, need_w)[2:]

        loss = _LossWithGradients.apply(inp.hidden_NH, inp.weight_VH, loss, grad_h, grad_w, recompute)
    return out._replace(loss=loss)


def _forward(inp: TraceInputs, backend: str, need_h: bool, need_w: bool):
    """(loss, TraceLossOutput without its loss, d loss / d hidden or None, d loss / d weight or None);
    the gradients in the dtypes of hidden and weight."""
    rows = rows_triton() if backend == "triton" else rows_torch
    hidden, acc = inp.hidden_NH, inp.acc_dtype
    n, device = hidden.shape[0], hidden.device
    need_grad = need_h or need_w
    inv_t = 1.0 / inp.temperature

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
    # distilled rows are one contiguous slice and each student row's are contiguous in it.
    if inp.has_teacher:
        pos_N = torch.full((n,), -1, dtype=torch.int64, device=device)
        pos_N[active_idx] = torch.arange(n_active, device=device)
        kl_pos_M = pos_N[inp.kl_index_M]
        kl_pos_sorted, kl_order = torch.sort(kl_pos_M, stable=True)
        kl_pos_host = kl_pos_sorted.cpu().numpy()
    else:
        kl_pos_host = np.zeros(0, dtype=np.int64)
    kl_counts = np.bincount(kl_pos_host, minlength=n_active)
    dz_dtype = head.gemm_dtype
    dz_ratio = (dz_dtype.itemsize / acc.itemsize) if need_grad else 0.0
    chunks = plan_chunks(kl_counts, head.vocab, acc.itemsize, _budget_bytes, *rows.row_buffers(dz_ratio))
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
    # d weight is summed over chunks in acc (fp32): in bf16, every chunk would add a rounding of 2^-9.
    grad_w_acc = torch.zeros(inp.weight_VH.shape, dtype=acc, device=device) if need_w else None
    safe_targets_N = torch.where(inp.valid_N, inp.targets_N, 0)

    for (a, b), (lo, hi) in zip(chunks, kl_bounds):
        rows_C = slice(a, b) if all_active else active_idx[a:b]
        h_CH = hidden[rows_C]
        chunk = ChunkInputs(z_CV=head.logits(h_CH, ws.get("z", b - a)), targets_C=safe_targets_N[rows_C],
                            inv_t=inv_t, kl_term_clip=inp.kl_term_clip, kl_clip_mode=inp.kl_clip_mode,
                            entropy_weight_C=_rows(inp.entropy_weight_N, rows_C), need_grad=need_grad,
                            dz_dtype=dz_dtype)
        j_K = None
        if inp.has_teacher and hi > lo:
            j_K = kl_order[lo:hi]
            chunk.local_K = kl_pos_sorted[lo:hi] - a
            chunk.u_KV = teacher_head.logits(inp.teacher_hidden_MH[j_K], ws.get("u", hi - lo, teacher=True))
            fw_K, rw_K = _rows(inp.fkl_weight_M, j_K), _rows(inp.rkl_weight_M, j_K)
            chunk.fkl_weight_K = None if fw_K is None else fw_K.to(acc)
            chunk.rkl_weight_K = None if rw_K is None else rw_K.to(acc)
        pg = functools.partial(
            pg_rows, valid_C=inp.valid_N[rows_C], advantages_C=inp.advantages_N[rows_C],
            pg_weight_C=inp.pg_weight_N[rows_C], old_C=_rows(inp.old_logprobs_N, rows_C),
            ref_C=_rows(inp.ref_logprobs_N, rows_C), entropy_weight_C=chunk.entropy_weight_C, beta=inp.beta,
            clip_low=inp.clip_low, clip_high=inp.clip_high, dual_clip=inp.dual_clip)
        res = rows.chunk_rows(ws, chunk, pg)
        logp_N[rows_C] = res.logp_C
        entropy_N[rows_C] = res.entropy_C
        loss_rows_N[rows_C] = res.loss_C
        if j_K is not None:
            fkl_M[j_K] = res.fkl_K
            rkl_M[j_K] = res.rkl_K
        if need_h:
            grad_h[rows_C] = head.grad_input(res.dz_CV)
        if need_w:
            head.accumulate_grad_weight(grad_w_acc, res.dz_CV, h_CH)
        del chunk, res
    del ws

    loss = loss_rows_N.sum()
    if inp.has_teacher:
        if inp.fkl_weight_M is not None:
            loss = loss + (inp.fkl_weight_M.to(acc) * fkl_M).sum()
        if inp.rkl_weight_M is not None:
            loss = loss + (inp.rkl_weight_M.to(acc) * rkl_M).sum()
    grad_w = None
    if need_w:  # one buffer of the weight's dtype is what the backward gets
        grad_w = grad_w_acc if grad_w_acc.dtype == inp.weight_VH.dtype else grad_w_acc.to(inp.weight_VH.dtype)
        del grad_w_acc
    zero = torch.zeros((), dtype=acc, device=device)
    out = TraceLossOutput(
        loss=loss,
        logprobs=torch.where(inp.valid_N, logp_N, zero).float(),
        entropy=torch.where(inp.valid_N, entropy_N, zero).float(),
        fkl=None if fkl_M is None else fkl_M.float(),
        rkl=None if rkl_M is None else rkl_M.float(),
    )
    return loss, out, grad_h, grad_w


def rows_triton():
    """The Triton row backend, imported on first use (triton is optional)."""
    from . import rows_triton as module

    return module
