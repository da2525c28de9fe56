"""Validation of `trace_loss` arguments and their normalised form.

Every check runs before any kernel, so a bad call fails with a ValueError that names the argument
instead of an out-of-bounds read or a silently wrong loss (docs/contract.md lists every check).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ._gemm import autocast_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
IMPLS = ("auto", "triton", "torch", "reference")
KL_CLIP_MODES = ("value", "grad")


@dataclass
class TraceInputs:
    """Checked and normalised arguments. N student rows, M distilled rows, vocabulary V, hidden H."""

    hidden_NH: torch.Tensor
    weight_VH: torch.Tensor
    targets_N: torch.Tensor
    valid_N: torch.Tensor  # bool, targets != ignore_index
    advantages_N: torch.Tensor
    pg_weight_N: torch.Tensor  # acc dtype, 0 on ignored rows (default 1/max(n_valid, 1))
    old_logprobs_N: torch.Tensor | None
    ref_logprobs_N: torch.Tensor | None
    beta: float
    clip_low: float
    clip_high: float
    dual_clip: float | None
    temperature: float
    teacher_hidden_MH: torch.Tensor | None
    teacher_weight_VH: torch.Tensor | None  # detached; `weight` when not given
    kl_index_M: torch.Tensor | None
    fkl_weight_M: torch.Tensor | None
    rkl_weight_M: torch.Tensor | None
    kl_term_clip: float | None
    kl_clip_mode: str  # "value" | "grad" (docs/kl-clip.md); no effect when kl_term_clip is None
    logit_scale: float  # a in x = softcap(a (h W^T + b)) / temperature
    logit_softcap: float | None  # c in softcap(y) = c tanh(y / c); None: no softcapping
    bias_V: torch.Tensor | None  # the LM head's bias b [V], as given (its gradient is returned)
    teacher_bias_V: torch.Tensor | None  # detached; `bias` when the head is shared
    entropy_weight_N: torch.Tensor | None  # 0 on ignored rows
    ignore_index: int
    n_valid: int = 0  # on the host: the number of valid rows
    # the 16-bit dtype fp32 inputs take in the LM-head GEMMs under torch.autocast (None: their own dtype)
    autocast_dtype: torch.dtype | None = None

    @property
    def acc_dtype(self) -> torch.dtype:
        """fp32 for fp32/bf16/fp16 inputs (the contract), fp64 when the inputs are fp64 (gradcheck)."""
        return torch.float64 if self.hidden_NH.dtype == torch.float64 else torch.float32

    @property
    def has_teacher(self) -> bool:
        return self.teacher_hidden_MH is not None


def _real(name: str, value, *, minimum: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    value = float(value)
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


def _matrix(name: str, t, dtype: torch.dtype, device: torch.device, cols: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype} (the dtype of hidden), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of hidden), got {t.device}")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns (the hidden size H), got shape {tuple(t.shape)}")
    return t


def _bias(name: str, t, v: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != v:
        raise ValueError(f"{name} must have shape ({v},) (the vocabulary size V), got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype} (the dtype of hidden), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of hidden), got {t.device}")
    return t


def _row_vector(name: str, t, n: int, device: torch.device, *, integer: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of hidden), got {t.device}")
    if integer and t.dtype != torch.int64:
        raise ValueError(f"{name} must have dtype torch.int64, got {t.dtype}")
    if not integer and not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t.detach()


def check_inputs(
    hidden,
    weight,
    targets,
    advantages,
    *,
    pg_weight=None,
    old_logprobs=None,
    ref_logprobs=None,
    beta=0.0,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=None,
    temperature=1.0,
    teacher_hidden=None,
    teacher_weight=None,
    kl_index=None,
    fkl_weight=None,
    rkl_weight=None,
    kl_term_clip=None,
    kl_clip_mode="value",
    entropy_weight=None,
    ignore_index=-100,
    logit_scale=1.0,
    logit_softcap=None,
    bias=None,
    teacher_bias=None,
) -> TraceInputs:
    """Check every argument of `trace_loss` and return them normalised. Raises ValueError naming the argument."""
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    n, h = hidden.shape
    if h == 0:
        raise ValueError("hidden must have a non-zero hidden size H")
    device, dtype = hidden.device, hidden.dtype
    _matrix("weight", weight, dtype, device, cols=h)
    v = weight.shape[0]
    if v == 0:
        raise ValueError("weight must have at least one vocabulary row")

    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    ignore_index = int(ignore_index)
    targets = _row_vector("targets", targets, n, device, integer=True)
    valid = targets != ignore_index
    # Range checks are read on the host once, together, after every other check (one synchronisation).
    host_checks = [("targets", ((targets < 0) | (targets >= v)).logical_and_(valid).any(),
                    f"targets must lie in [0, {v}) or equal ignore_index ({ignore_index})")]

    advantages = _row_vector("advantages", advantages, n, device)
    if pg_weight is not None:
        pg_weight = _row_vector("pg_weight", pg_weight, n, device)
    if old_logprobs is not None:
        old_logprobs = _row_vector("old_logprobs", old_logprobs, n, device)
    if ref_logprobs is not None:
        ref_logprobs = _row_vector("ref_logprobs", ref_logprobs, n, device)
    if entropy_weight is not None:
        entropy_weight = _row_vector("entropy_weight", entropy_weight, n, device)

    beta = _real("beta", beta, minimum=0.0)
    if beta > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta > 0")
    clip_low = _real("clip_low", clip_low, minimum=0.0)
    clip_high = _real("clip_high", clip_high, minimum=0.0)
    if dual_clip is not None:
        dual_clip = _real("dual_clip", dual_clip, minimum=1.0, strict=True)
    temperature = _real("temperature", temperature, minimum=0.0, strict=True)
    if kl_term_clip is not None:
        kl_term_clip = _real("kl_term_clip", kl_term_clip, minimum=0.0)
    if not isinstance(kl_clip_mode, str) or kl_clip_mode not in KL_CLIP_MODES:
        raise ValueError(f"kl_clip_mode must be one of {KL_CLIP_MODES}, got {kl_clip_mode!r}")
    logit_scale = _real("logit_scale", logit_scale, minimum=0.0, strict=True)
    if logit_softcap is not None:
        logit_softcap = _real("logit_softcap", logit_softcap, minimum=0.0, strict=True)
    if bias is not None:
        bias = _bias("bias", bias, v, dtype, device)

    if teacher_hidden is None:
        for name, value in (("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias),
                            ("kl_index", kl_index), ("fkl_weight", fkl_weight), ("rkl_weight", rkl_weight)):
            if value is not None:
                raise ValueError(f"{name} was given without teacher_hidden")
    else:
        _matrix("teacher_hidden", teacher_hidden, dtype, device, cols=h)
        m = teacher_hidden.shape[0]
        if teacher_weight is None:
            if teacher_bias is not None:
                raise ValueError("teacher_bias was given without teacher_weight (the shared head's bias is `bias`)")
            teacher_weight, teacher_bias = weight, bias
        else:
            _matrix("teacher_weight", teacher_weight, dtype, device, cols=h)
            if teacher_weight.shape[0] != v:
                raise ValueError(f"teacher_weight must have shape ({v}, {h}) like weight, got "
                                 f"{tuple(teacher_weight.shape)}")
            # Teacher and student heads share one architecture: both have a bias or neither has.
            if (teacher_bias is None) != (bias is None):
                raise ValueError("teacher_bias is required with teacher_weight when bias is given" if bias is not None
                                 else "teacher_bias was given without bias (the student head has no bias)")
            if teacher_bias is not None:
                teacher_bias = _bias("teacher_bias", teacher_bias, v, dtype, device).detach()
        if kl_index is None:
            if m != n:
                raise ValueError(f"kl_index is required when teacher_hidden has M={m} rows and hidden N={n}")
            kl_index = torch.arange(n, device=device)
        else:
            kl_index = _row_vector("kl_index", kl_index, m, device, integer=True)
            host_checks.append(("kl_index", ((kl_index < 0) | (kl_index >= n)).any(),
                                f"kl_index must lie in [0, {n}) (rows of hidden)"))
        if fkl_weight is not None:
            fkl_weight = _row_vector("fkl_weight", fkl_weight, m, device)
        if rkl_weight is not None:
            rkl_weight = _row_vector("rkl_weight", rkl_weight, m, device)
        teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n_valid = valid.sum()
    flags = torch.stack([t.to(torch.int64) for _, t, _ in host_checks] + [n_valid]).tolist()
    for (_, _, message), bad in zip(host_checks, flags):
        if bad:
            raise ValueError(message)
    zero = torch.zeros((), dtype=acc, device=device)
    if pg_weight is None:
        pg_weight = valid.to(acc) / n_valid.clamp(min=1).to(acc)
    else:
        # `where`, not a product: the contract sums over valid rows only, so a NaN weight on a padded
        # row must not leak into the loss.
        pg_weight = torch.where(valid, pg_weight.to(acc), zero)
    if entropy_weight is not None:
        entropy_weight = torch.where(valid, entropy_weight.to(acc), zero)

    return TraceInputs(
        hidden_NH=hidden, weight_VH=weight, targets_N=targets, valid_N=valid, advantages_N=advantages,
        pg_weight_N=pg_weight, old_logprobs_N=old_logprobs, ref_logprobs_N=ref_logprobs, beta=beta,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, temperature=temperature,
        teacher_hidden_MH=teacher_hidden, teacher_weight_VH=teacher_weight, kl_index_M=kl_index,
        fkl_weight_M=fkl_weight, rkl_weight_M=rkl_weight, kl_term_clip=kl_term_clip,
        kl_clip_mode=kl_clip_mode, logit_scale=logit_scale, logit_softcap=logit_softcap, bias_V=bias,
        teacher_bias_V=None if teacher_bias is None else teacher_bias.detach(), entropy_weight_N=entropy_weight,
        ignore_index=ignore_index, n_valid=int(flags[-1]), autocast_dtype=autocast_dtype(hidden),
    )
