"""LM-head GEMMs with fp32 results whatever the weight dtype.

bf16 logits rounded before the fp32 cast lose about 2^-8 relative, 0.1 absolute on a logit of 20: enough
to move probabilities by 10% and to bias every gradient. So logits and the weight gradient are produced
in fp32: on CUDA by cuBLAS's fp32-output bf16/fp16 GEMM (`torch.mm(..., out_dtype=torch.float32)`, torch
>= 2.8); elsewhere (the CPU has no such kernel) by fp32 operands, the weight upcast once per call.
"""

from __future__ import annotations

import functools

import torch

# Where cuBLAS cannot add a bf16 product into an fp32 matrix in place (torch without addmm's out_dtype),
# the weight-gradient GEMM writes its product to a temporary first; vocabulary blocks keep that
# temporary under this many bytes.
_GRAD_WEIGHT_TEMP_BYTES = 256 * 2**20


@functools.cache
def _cuda_fp32_output_gemm(device_index: int) -> bool:
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=f"cuda:{device_index}")
        out = torch.empty(2, 2, dtype=torch.float32, device=a.device)
        torch.mm(a, a, out_dtype=torch.float32, out=out)
        return float(out[0, 0]) == 2.0 and float(torch.mm(a, a, out_dtype=torch.float32)[1, 1]) == 2.0
    except (TypeError, RuntimeError):
        return False


@functools.cache
def _cuda_fp32_output_addmm(device_index: int) -> bool:
    """Whether `torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)` accumulates a bf16 product into
    an fp32 matrix in place on this device (cuBLAS with beta = 1): d weight then needs no temporary."""
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=f"cuda:{device_index}")
        acc = torch.full((2, 2), 0.5, dtype=torch.float32, device=a.device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return acc.dtype == torch.float32 and bool((acc == 2.5).all())
    except (TypeError, RuntimeError, NotImplementedError):
        return False


class Workspace:
    """[rows, V] buffers reused from chunk to chunk. On the CPU a fresh tensor of tens of MB is served by
    mmap and its pages are faulted in on first touch, which costs as much as the arithmetic done on it;
    on CUDA the caching allocator makes reuse free either way."""

    def __init__(self, vocab: int, dtype: torch.dtype, device: torch.device, student_rows: int, teacher_rows: int):
        self.vocab, self.dtype, self.device = vocab, dtype, device
        self.capacity = {False: student_rows, True: teacher_rows}
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, rows: int, *, teacher: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The first `rows` rows of buffer `name`, sized for the largest student (or teacher) chunk."""
        dtype = dtype or self.dtype
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.shape[0] < rows:
            size = max(rows, self.capacity[teacher])
            buf = self._buffers[(name, dtype)] = torch.empty(size, self.vocab, dtype=dtype, device=self.device)
        return buf[:rows]


class LMHead:
    """The [V, H] LM-head weight as a GEMM operand; all products come out in `acc` (fp32 or fp64)."""

    def __init__(self, weight_VH: torch.Tensor, acc: torch.dtype):
        self.weight_VH = weight_VH.contiguous()
        self.acc = acc
        self.native = weight_VH.dtype == acc
        self.fp32_output = (not self.native and weight_VH.is_cuda
                            and _cuda_fp32_output_gemm(weight_VH.device.index or 0))
        self._weight_acc = None

    def _upcast(self) -> torch.Tensor:
        if self._weight_acc is None:
            self._weight_acc = self.weight_VH.to(self.acc)
        return self._weight_acc

    @property
    def vocab(self) -> int:
        return self.weight_VH.shape[0]

    @property
    def gemm_dtype(self) -> torch.dtype:
        """The dtype dz must have to enter the d hidden / d weight GEMMs: the weight's on the fp32-output
        path (bf16 x bf16 with fp32 accumulation), else acc."""
        return self.weight_VH.dtype if self.fp32_output else self.acc

    def logits(self, h_CH: torch.Tensor, out_CV: torch.Tensor) -> torch.Tensor:
        """[C, H] -> out_CV [C, V] in acc (a reused buffer: see Workspace)."""
        if self.native:
            return torch.mm(h_CH, self.weight_VH.T, out=out_CV)
        if self.fp32_output:
            return torch.mm(h_CH, self.weight_VH.T, out_dtype=torch.float32, out=out_CV)
        return torch.mm(h_CH.to(self.acc), self._upcast().T, out=out_CV)

    def grad_input(self, dz_CV: torch.Tensor) -> torch.Tensor:
        """dz_CV [C, V] in gemm_dtype -> [C, H] in the weight dtype (each row is written once, so one
        rounding)."""
        if self.native or self.fp32_output:
            return dz_CV @ self.weight_VH
        return (dz_CV @ self._upcast()).to(self.weight_VH.dtype)

    def accumulate_grad_weight(self, grad_VH: torch.Tensor, dz_CV: torch.Tensor, h_CH: torch.Tensor) -> None:
        """grad_VH (acc) += dz_CV.T @ h_CH (dz_CV in gemm_dtype), summed in acc across chunks."""
        if self.native:
            grad_VH.addmm_(dz_CV.T, h_CH)
        elif self.fp32_output:
            if _cuda_fp32_output_addmm(self.weight_VH.device.index or 0):
                torch.addmm(grad_VH, dz_CV.T, h_CH, out_dtype=torch.float32, out=grad_VH)
                return
            step = max(1, _GRAD_WEIGHT_TEMP_BYTES // (4 * h_CH.shape[1]))
            for v0 in range(0, self.vocab, step):
                grad_VH[v0:v0 + step] += torch.mm(dz_CV[:, v0:v0 + step].T, h_CH, out_dtype=torch.float32)
        else:
            grad_VH.addmm_(dz_CV.T, h_CH.to(self.acc))
