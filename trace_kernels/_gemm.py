"""LM-head GEMMs with fp32 results whatever the weight dtype, and the [rows, V] buffers they write.

bf16 logits rounded before the fp32 cast lose about 2^-8 relative, 0.1 absolute on a logit of 20: enough
to move probabilities by 10% and to bias every gradient. So the logits, d hidden and every d weight product
come out in fp32: on CUDA by cuBLAS's fp32-output bf16/fp16 GEMM (`torch.mm(..., out_dtype=torch.float32)`,
torch >= 2.8; d hidden in fp32 also keeps cuBLAS from reducing split-K partials over K = V in bf16, which
torch allows by default for bf16 outputs); elsewhere (the CPU has no such kernel) by fp32 operands, the
weight upcast once per call.

Under torch.autocast with a 16-bit dtype, fp32 hidden states and weights enter the GEMMs in that dtype (as
`F.linear` does under autocast); the results are still fp32.

EMULATE_CUDA (tests only): on the CPU, 16-bit inputs take the CUDA path's roundings, done in torch: dz is
rounded to the GEMM dtype before the d hidden / d weight GEMMs, whose products are exact fp32 products of the
16-bit values summed in fp32, as cuBLAS computes them.
"""

from __future__ import annotations

import functools

import torch

from ._plan import padded

EMULATE_CUDA = False

# Where cuBLAS cannot add a 16-bit product into an fp32 matrix in place (torch without addmm's out_dtype),
# the weight-gradient GEMM writes its product to a temporary first; vocabulary blocks keep that
# temporary under this many bytes. The 24-bit accumulator's torch form (grad_weight.py) uses the same slices.
GRAD_WEIGHT_TEMP_BYTES = 64 * 2**20


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
def cuda_fp32_output_addmm(device_index: int) -> bool:
    """Whether `torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)` accumulates a bf16 product into
    an fp32 matrix in place on this device (cuBLAS with beta = 1): d weight then needs no temporary."""
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=f"cuda:{device_index}")
        acc = torch.full((2, 2), 0.5, dtype=torch.float32, device=a.device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return acc.dtype == torch.float32 and bool((acc == 2.5).all())
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype fp32 GEMM operands take under torch.autocast on t's device, or None."""
    if t.dtype != torch.float32 or not torch.is_autocast_enabled(t.device.type):
        return None
    dtype = torch.get_autocast_dtype(t.device.type)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


class Workspace:
    """[rows, V] buffers reused from chunk to chunk, rows padded to a multiple of 64 elements. On the CPU a
    fresh tensor of tens of MB is served by mmap and its pages are faulted in on first touch, which costs as
    much as the arithmetic done on it; on CUDA the caching allocator makes reuse free either way."""

    def __init__(self, vocab: int, dtype: torch.dtype, device: torch.device, student_rows: int, teacher_rows: int):
        self.vocab, self.stride, self.dtype, self.device = vocab, padded(vocab), dtype, device
        self.capacity = {False: student_rows, True: teacher_rows}
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, rows: int, *, teacher: bool = False, dtype: torch.dtype | None = None,
            capacity: int | None = None) -> torch.Tensor:
        """The first `rows` rows of buffer `name` ([rows, V], row stride padded), sized for the largest student
        (or teacher) chunk, or for `capacity` rows."""
        dtype = dtype or self.dtype
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.shape[0] < rows:
            size = max(rows, capacity if capacity is not None else self.capacity[teacher])
            buf = self._buffers[(name, dtype)] = torch.empty(size, self.stride, dtype=dtype, device=self.device)
        return buf[:rows, :self.vocab]

    def rows(self, name: str, rows: int, cols: int, dtype: torch.dtype, capacity: int) -> torch.Tensor:
        """A contiguous [rows, cols] buffer (the GEMMs' row inputs), sized for `capacity` rows."""
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.shape[0] < rows:
            buf = self._buffers[(name, dtype)] = torch.empty(max(rows, capacity), cols, dtype=dtype,
                                                             device=self.device)
        return buf[:rows]


def narrow_view(buf_CV: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [C, V] view of `dtype` (2 bytes) over the first half of each row of an fp32 [C, V] buffer: dz written
    in place over the logits it is computed from (the row stride in bytes stays the buffer's)."""
    c, v = buf_CV.shape
    return buf_CV.view(dtype)[:, :v] if c else buf_CV.new_empty((0, v), dtype=dtype)


class LMHead:
    """The [V, H] LM-head weight as a GEMM operand; all products come out in `acc` (fp32 or fp64).

    compute_dtype: the dtype the GEMMs take their operands in (the weight's, or autocast's for fp32 weights)."""

    def __init__(self, weight_VH: torch.Tensor, acc: torch.dtype, compute_dtype: torch.dtype | None = None):
        compute_dtype = compute_dtype or weight_VH.dtype
        self.weight_VH = weight_VH.detach().to(compute_dtype).contiguous()
        self.acc = acc
        self.native = self.weight_VH.dtype == acc
        self.fp32_output = (not self.native and weight_VH.is_cuda
                            and _cuda_fp32_output_gemm(weight_VH.device.index or 0))
        self.emulate = EMULATE_CUDA and not self.native and not weight_VH.is_cuda
        self._weight_acc = None

    def _upcast(self) -> torch.Tensor:
        if self._weight_acc is None:
            self._weight_acc = self.weight_VH.to(self.acc)
        return self._weight_acc

    @property
    def vocab(self) -> int:
        return self.weight_VH.shape[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight_VH.dtype

    @property
    def gemm_dtype(self) -> torch.dtype:
        """The dtype dz enters the d hidden / d weight GEMMs in: the compute dtype on the fp32-output path (and
        in emulation), else acc."""
        return self.compute_dtype if self.fp32_output or self.emulate else self.acc

    @property
    def kernel_dz_dtype(self) -> torch.dtype:
        """The dtype the row backend writes dz in: gemm_dtype, except in emulation (fp32, rounded in torch)."""
        return self.acc if self.emulate else self.gemm_dtype

    def logits(self, x_RH: torch.Tensor, out_RV: torch.Tensor) -> torch.Tensor:
        """[R, H] (compute dtype) -> out_RV [R, V] in acc (a reused buffer: see Workspace)."""
        if self.native:
            return torch.mm(x_RH, self.weight_VH.T, out=out_RV)
        if self.fp32_output:
            return torch.mm(x_RH, self.weight_VH.T, out_dtype=torch.float32, out=out_RV)
        return torch.mm(x_RH.to(self.acc), self._upcast().T, out=out_RV)

    def round_dz(self, dz_CV: torch.Tensor) -> torch.Tensor:
        """In emulation: dz (fp32) rounded to the GEMM dtype as the CUDA kernel stores it; else dz as is."""
        return dz_CV.to(self.compute_dtype) if self.emulate else dz_CV

    def grad_input(self, dz_CV: torch.Tensor, out_CH: torch.Tensor | None = None) -> torch.Tensor:
        """dz_CV [C, V] in gemm_dtype -> d hidden [C, H] in acc (out_CH if given)."""
        if self.native:
            return torch.mm(dz_CV, self.weight_VH, out=out_CH)
        if self.fp32_output:
            return torch.mm(dz_CV, self.weight_VH, out_dtype=torch.float32, out=out_CH)
        return torch.mm(dz_CV.to(self.acc), self._upcast(), out=out_CH)

    def product_weight(self, dz_CV: torch.Tensor, h_CH: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        """dz_CV[:, v0:v1].T @ h_CH in acc: one vocabulary slice of a chunk's d weight product."""
        if self.native:
            return torch.mm(dz_CV[:, v0:v1].T, h_CH)
        if self.fp32_output:
            return torch.mm(dz_CV[:, v0:v1].T, h_CH, out_dtype=torch.float32)
        return torch.mm(dz_CV[:, v0:v1].T.to(self.acc), h_CH.to(self.acc))

    def addmm_weight(self, acc_VH: torch.Tensor, dz_CV: torch.Tensor, h_CH: torch.Tensor, alpha: float = 1.0) -> None:
        """acc_VH (acc) += alpha dz_CV.T @ h_CH, summed in acc across chunks."""
        if self.native:
            acc_VH.addmm_(dz_CV.T, h_CH, alpha=alpha)
        elif self.fp32_output:
            if alpha == 1.0 and cuda_fp32_output_addmm(self.weight_VH.device.index or 0):
                torch.addmm(acc_VH, dz_CV.T, h_CH, out_dtype=torch.float32, out=acc_VH)
                return
            step = max(1, GRAD_WEIGHT_TEMP_BYTES // (4 * h_CH.shape[1]))
            for v0 in range(0, self.vocab, step):
                acc_VH[v0:v0 + step].add_(self.product_weight(dz_CV, h_CH, v0, v0 + step), alpha=alpha)
        else:
            acc_VH.addmm_(dz_CV.T.to(self.acc), h_CH.to(self.acc), alpha=alpha)
