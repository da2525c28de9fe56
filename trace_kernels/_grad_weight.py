"""d weight summed over the chunks of one call: which accumulator, and its torch form.

For a bf16 weight the default accumulator is "bf24": a 24-bit float made of the bf16 gradient itself (the
upper 16 bits: sign, 8-bit exponent, 7 mantissa bits) and an 8-bit plane of further mantissa bits, [V, H]
uint8. Each chunk adds its fp32 product P to the pair, hi:lo = round24(hi:lo + P), the sum taken in fp32 and
rounded to nearest at the 24-bit boundary (error <= 2^-16 relative per chunk); the last chunk rounds to bf16
(round to nearest even) and the plane is freed. So the gradient carries the error of one bf16 rounding, like
an fp32 accumulator cast at the end (tests/test_grad_weight.py measures both against fp64), for V H extra
bytes during the forward instead of the fp32 accumulator's 4 V H plus its 2 V H cast. The traffic is also
lower: 6 bytes per element and chunk (hi, lo read and written) against 8.

"fp32" (TRACE_KERNELS_GRAD_WEIGHT=fp32, or `grad_weight_accumulator("fp32")`): the fp32 [V, H] accumulator
cast to bf16 at the end of the forward (4 V H + 2 V H bytes at that moment).

fp16 weights always sum in fp32, and keep the fp32 sum until the backward (their dz is scaled per chunk and
the gradient is rounded to fp16 only once the incoming gradient, a GradScaler's scale, has multiplied it);
fp32 weights (and fp32 weights under autocast) accumulate in their own gradient.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ._gemm import GRAD_WEIGHT_TEMP_BYTES, LMHead

MODES = ("bf24", "fp32")
_mode = os.environ.get("TRACE_KERNELS_GRAD_WEIGHT", "bf24") or "bf24"
if _mode not in MODES:
    raise ValueError(f"TRACE_KERNELS_GRAD_WEIGHT must be one of {MODES}, got {_mode!r}")


def get_grad_weight_accumulator() -> str:
    return _mode


@contextlib.contextmanager
def grad_weight_accumulator(mode: str):
    """Sum a bf16 weight's gradient in `mode` ("bf24", the default, or "fp32") inside the block."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


def bf24_add_(hi_VH: torch.Tensor, lo_VH: torch.Tensor, p_VH: torch.Tensor, first: bool, last: bool) -> None:
    """hi:lo = round24(hi:lo + p) in place (p, fp32, is consumed); on the last chunk hi = bf16(hi:lo + p)."""
    if not first:
        bits = (hi_VH.view(torch.int16).to(torch.int32) << 16) | (lo_VH.to(torch.int32) << 8)
        p_VH += bits.view(torch.float32)
    if last:
        hi_VH.copy_(p_VH)
        return
    bits = p_VH.view(torch.int32).add_(0x80)  # round the magnitude to nearest at bit 8
    hi_VH.view(torch.int16).copy_(bits >> 16)
    lo_VH.copy_((bits >> 8) & 0xFF)


class GradWeight:
    """The d weight accumulator of one call. add() once per chunk, in order; result() after the last."""

    def __init__(self, weight_VH: torch.Tensor, head: LMHead, n_chunks: int, acc: torch.dtype, triton: bool):
        self.head, self.n_chunks, self.done = head, n_chunks, 0
        self.out_dtype = weight_VH.dtype
        shape, device = weight_VH.shape, weight_VH.device
        if weight_VH.dtype == acc:  # fp32 / fp64 weights (autocast included): the gradient is the accumulator
            self.mode = "native"
        elif weight_VH.dtype == torch.bfloat16 and _mode == "bf24":
            self.mode = "bf24"
        else:
            self.mode = "fp32"
        # The Triton GEMM (gemm_triton.py) on CUDA: the 24-bit pair in its epilogue, or an fp16 chunk's scale.
        self.triton = triton and weight_VH.is_cuda and head.fp32_output
        if n_chunks == 0:
            self.buf = torch.zeros(shape, dtype=weight_VH.dtype if self.mode == "bf24" else acc, device=device)
            self.lo = None
        elif self.mode == "bf24":
            self.buf = torch.empty(shape, dtype=torch.bfloat16, device=device)
            self.lo = torch.empty(shape, dtype=torch.uint8, device=device) if n_chunks > 1 else None
        else:
            self.buf = torch.zeros(shape, dtype=acc, device=device)
            self.lo = None

    def add(self, dz_CV: torch.Tensor, h_CH: torch.Tensor, inv_scale: torch.Tensor | None) -> None:
        """Add dz_CV.T @ h_CH (times inv_scale, a 0-d fp32 tensor, when dz was scaled) for the next chunk."""
        first, last = self.done == 0, self.done == self.n_chunks - 1
        self.done += 1
        head = self.head
        if self.triton and (self.mode == "bf24" or inv_scale is not None):
            from . import gemm_triton

            if gemm_triton.usable(h_CH) and dz_CV.stride(0) % 16 == 0:
                gemm_triton.grad_weight(self.buf, self.lo, dz_CV, h_CH, inv_scale, first=first, last=last)
                return
        if self.mode == "bf24":
            step = max(1, GRAD_WEIGHT_TEMP_BYTES // (4 * h_CH.shape[1]))
            for v0 in range(0, head.vocab, step):
                p = head.product_weight(dz_CV, h_CH, v0, v0 + step)
                if inv_scale is not None:
                    p.mul_(inv_scale)
                bf24_add_(self.buf[v0:v0 + step], None if self.lo is None else self.lo[v0:v0 + step], p, first,
                          last)
            return
        # fp32 or native: cuBLAS (or the CPU) adds in place; a scale needs its value on the host here.
        head.addmm_weight(self.buf, dz_CV, h_CH, alpha=1.0 if inv_scale is None else float(inv_scale))

    def result(self) -> torch.Tensor:
        """The gradient handed to the backward: in the weight's dtype, except fp16 weights (fp32, rounded in the
        backward). Frees the 8-bit plane."""
        self.lo = None
        if self.mode == "fp32" and self.out_dtype == torch.bfloat16:
            buf, self.buf = self.buf, None
            return buf.to(torch.bfloat16)
        return self.buf
