"""The d weight GEMM of the Triton path (CUDA): dW += dz^T h with the accumulator update in its epilogue.

cuBLAS can add a product into an fp32 matrix in place (beta = 1), but not into the 24-bit accumulator of
_grad_weight.py (the bf16 gradient plus an 8-bit plane), and it takes an fp16 chunk's scale only as a host
number. This kernel does both without a host round trip: one program per [BLOCK_V, BLOCK_H] tile of dW sums
dz[:, v]^T h[:, h] over the chunk's C rows in fp32 on the tensor cores, multiplies by the chunk's inverse scale
(read from device memory) and then, MODE 1 (bf24): hi:lo = round24(hi:lo + P), or on the last chunk
hi = bf16(hi:lo + P); MODE 0 (fp32): acc += P. FIRST skips reading the accumulator (it is not initialised).
Programs walk the hidden dimension fastest, so the dz tile of a vocabulary block is read from DRAM once and
served from L2 to its neighbours; h (C x H) stays in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V, BLOCK_H, BLOCK_C = 128, 128, 64
NUM_WARPS, NUM_STAGES = 8, 3


@triton.jit
def _bf24_update(p, hi_ptrs, lo_ptrs, mask, FIRST: tl.constexpr, LAST: tl.constexpr):
    """Store round24(hi:lo + p) (or bf16(hi:lo + p) when LAST) for an fp32 tile p."""
    if not FIRST:
        hi = tl.load(hi_ptrs, mask=mask, other=0.0)
        lo = tl.load(lo_ptrs, mask=mask, other=0)
        bits = (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16) | (lo.to(tl.int32) << 8)
        p += bits.to(tl.float32, bitcast=True)
    if LAST:
        tl.store(hi_ptrs, p.to(tl.bfloat16), mask=mask)
    else:
        bits = p.to(tl.int32, bitcast=True) + 0x80  # round the magnitude to nearest at bit 8
        tl.store(hi_ptrs, (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
        tl.store(lo_ptrs, ((bits >> 8) & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def _grad_weight_kernel(dz_ptr, stride_dz, h_ptr, stride_h, acc_ptr, lo_ptr, stride_w, scale_ptr, C, V, H,
                        MODE: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, HAS_SCALE: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    n_h = tl.cdiv(H, BLOCK_H)
    pid_v = pid // n_h
    pid_h = pid % n_h
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_v = offs_v < V
    mask_h = offs_h < H
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        rows_c = offs_c.to(tl.int64)
        a = tl.load(dz_ptr + rows_c[:, None] * stride_dz + offs_v[None, :], mask=mask_c[:, None] & mask_v[None, :],
                    other=0.0)
        b = tl.load(h_ptr + rows_c[:, None] * stride_h + offs_h[None, :], mask=mask_c[:, None] & mask_h[None, :],
                    other=0.0)
        acc = tl.dot(tl.trans(a), b, acc)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr)
    w_offs = offs_v[:, None] * stride_w + offs_h[None, :]
    mask = mask_v[:, None] & mask_h[None, :]
    if MODE == 1:
        _bf24_update(acc, acc_ptr + w_offs, lo_ptr + w_offs, mask, FIRST, LAST)
    else:
        if not FIRST:
            acc += tl.load(acc_ptr + w_offs, mask=mask, other=0.0)
        tl.store(acc_ptr + w_offs, acc, mask=mask)


def usable(h_CH: torch.Tensor) -> bool:
    """Whether the kernel takes this chunk's operands: H and every row stride a multiple of 16 elements, so that
    every tile row is 16-byte aligned (the specializations benchmarks/compile_check.py compiles without spills;
    the chunk loop's buffers are aligned; other shapes take the torch form)."""
    return h_CH.shape[1] % 16 == 0 and h_CH.stride(0) % 16 == 0 and h_CH.data_ptr() % 16 == 0


def grad_weight(acc_VH: torch.Tensor, lo_VH: torch.Tensor | None, dz_CV: torch.Tensor, h_CH: torch.Tensor,
                inv_scale: torch.Tensor | None, *, first: bool, last: bool) -> None:
    """acc_VH (bf16 with lo_VH, the 24-bit pair; or fp32) += inv_scale * dz_CV.T @ h_CH, dz_CV and h_CH 16-bit
    with unit column stride (dz may be a strided view: padded rows, or written over the fp32 logits)."""
    c, v = dz_CV.shape
    h = h_CH.shape[1]
    if c == 0:
        return
    assert dz_CV.stride(1) == 1 and h_CH.stride(1) == 1 and acc_VH.is_contiguous() and usable(h_CH)
    assert dz_CV.stride(0) % 16 == 0 and dz_CV.data_ptr() % 16 == 0 and acc_VH.data_ptr() % 16 == 0
    bf24 = acc_VH.dtype == torch.bfloat16
    lo = lo_VH if lo_VH is not None else acc_VH  # unread when FIRST and LAST (a one-chunk call)
    grid = (triton.cdiv(v, BLOCK_V) * triton.cdiv(h, BLOCK_H),)
    _grad_weight_kernel[grid](dz_CV, dz_CV.stride(0), h_CH, h_CH.stride(0), acc_VH, lo, acc_VH.stride(0),
                              acc_VH if inv_scale is None else inv_scale, c, v, h, MODE=1 if bf24 else 0,
                              FIRST=first, LAST=last or not bf24, HAS_SCALE=inv_scale is not None, BLOCK_V=BLOCK_V,
                              BLOCK_H=BLOCK_H, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
