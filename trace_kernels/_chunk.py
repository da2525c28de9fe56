"""The seam between the chunk loop (chunked.py) and a row backend (rows_torch, rows_triton).

The loop hands a backend one `ChunkInputs` and a PG callback; the backend returns a `ChunkOutputs`.
Neither side writes into the other's tensors except through these two objects.

Per-logit map. The backends apply x = softcap(a (z + b)) * inv_t to the raw GEMM logits z as they read them
(rows_triton's `_load_logits`, rows_torch's `_map_logits_`), with b the head's bias, a the logit scale and
softcap(y) = c tanh(y / c) (the identity without a cap), compute every row statistic and d loss / d x on x,
and turn d x into d z as they write it (`_logit_grad`, `_chain_`): dx/dz = a inv_t, times 1 - tanh^2 with a
cap. `LogitMap` holds the two constants both backends use.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# (logp_C, entropy_C) -> (loss_C, g_C): each row's loss contribution and g = d loss / d logp (pg.pg_rows).
PgCallback = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# A 16-bit dz is scaled so that its largest possible entry is 2^DZ_SCALE_EXP: fp16's largest is 65504 (2^16
# less a little), its smallest normal 2^-14, so entries down to 2^-29 of the largest keep full precision.
DZ_SCALE_EXP = 15


@dataclass(frozen=True)
class LogitMap:
    """x = post tanh(pre (z + b)) with a cap c (pre = a / c, post = c inv_t), else x = pre (z + b) (pre = a inv_t);
    dx/dz = pre post (1 - (x / post)^2) with the cap, else pre."""

    pre: float
    post: float
    softcap: bool

    @staticmethod
    def of(inv_t: float, logit_scale: float = 1.0, logit_softcap: float | None = None) -> LogitMap:
        if logit_softcap is None:
            return LogitMap(logit_scale * inv_t, 1.0, False)
        return LogitMap(logit_scale / logit_softcap, logit_softcap * inv_t, True)

    def slope(self) -> float:
        """The largest |dx/dz|."""
        return self.pre * self.post if self.softcap else self.pre


@dataclass
class ChunkInputs:
    """One chunk of C student rows and the K distilled rows whose student rows lie in it.

    z_CV and u_KV are raw logits (h W^T) in the accumulation dtype, in Workspace buffers the backend may
    overwrite (u_KV may be rows of the same buffer, after z_CV's). local_K [K] is the chunk-local student row
    of each distilled row, in ascending order (duplicates allowed). targets_C holds a valid index on every row
    (ignored rows mapped to 0)."""

    z_CV: torch.Tensor
    targets_C: torch.Tensor
    inv_t: float
    u_KV: torch.Tensor | None = None
    local_K: torch.Tensor | None = None
    fkl_weight_K: torch.Tensor | None = None
    rkl_weight_K: torch.Tensor | None = None
    kl_term_clip: float | None = None
    kl_clip_mode: str = "value"  # "value" | "grad" (docs/contract.md, "Per-term clip")
    entropy_weight_C: torch.Tensor | None = None
    need_grad: bool = False
    # dtype of the returned dz: the LM-head GEMMs' input dtype (bf16 for bf16 weights on CUDA), so that dz is
    # rounded once, by the kernel that computes it, after the logit map's derivative is applied. A 16-bit dz is
    # written over z_CV (the first half of each fp32 row).
    dz_dtype: torch.dtype = torch.float32
    # fp16 (set by the loop): scale dz by a power of two chosen from a bound of its entries (dz_scale), so that
    # it neither underflows nor overflows that dtype; ChunkOutputs.dz_scale says by how much.
    dz_scale_for: torch.dtype | None = None
    # the rest of the per-logit map: the heads' biases [V] (acc dtype, contiguous; None: no bias), the scale
    # and the softcap (see the module docstring)
    bias_V: torch.Tensor | None = None
    teacher_bias_V: torch.Tensor | None = None
    logit_scale: float = 1.0
    logit_softcap: float | None = None

    @property
    def logit_map(self) -> LogitMap:
        return LogitMap.of(self.inv_t, self.logit_scale, self.logit_softcap)


@dataclass
class ChunkOutputs:
    """Row results of one chunk. dz_CV is d loss / d (h @ W.T) for the chunk's rows (times dz_scale when that
    is not None), in ChunkInputs.dz_dtype (None without need_grad); it may alias a Workspace buffer."""

    logp_C: torch.Tensor
    entropy_C: torch.Tensor
    loss_C: torch.Tensor
    fkl_K: torch.Tensor | None
    rkl_K: torch.Tensor | None
    dz_CV: torch.Tensor | None
    dz_scale: torch.Tensor | None = None  # 0-d fp32, a power of two


def dz_scale(g_C: torch.Tensor, entropy_weight_C: torch.Tensor | None, entropy_C: torch.Tensor,
             kl_max_K: torch.Tensor | None, local_K: torch.Tensor | None, inv_t: float) -> torch.Tensor:
    """A power of two s (0-d fp32 tensor, on the device: no host sync) with |s dz| <= 2^DZ_SCALE_EXP for every
    entry of the chunk's dz, from the bound |dz_cv| <= inv_t (2 |g_c| + |ew_c| (H_c + 1/e) + sum_k max|dz_k|)
    (inv_t: the map's largest slope, `LogitMap.slope`):
    |p (a - ew log p)| <= |a| + |ew| max p |log p| with a = -(g + ew H), plus g on the target, plus the
    distilled rows' dz (kl_max_K, with respect to the mapped logits)."""
    bound_C = 2 * g_C.abs()
    if entropy_weight_C is not None:
        bound_C = bound_C + entropy_weight_C.abs() * (entropy_C.abs() + 1 / math.e)
    if kl_max_K is not None and kl_max_K.numel():
        bound_C = bound_C.index_add(0, local_K, kl_max_K)
    bound = bound_C.float().amax() * inv_t if bound_C.numel() else torch.zeros((), device=g_C.device)
    exponent = (DZ_SCALE_EXP - torch.ceil(torch.log2(bound))).clamp(-100, 100)
    return torch.exp2(exponent).float()


class _Timer:
    """Per-piece time of the chunk loop: CUDA events around each piece, summed after a synchronize
    (benchmarks/gpu_tune.py; off by default, when `piece` is a no-op)."""

    def __init__(self):
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def piece(self, name: str):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.events.append((name, start, end))
        self.counts[name] = self.counts.get(name, 0) + 1

    def totals_ms(self) -> dict[str, float]:
        torch.cuda.synchronize()
        out: dict[str, float] = {}
        for name, start, end in self.events:
            out[name] = out.get(name, 0.0) + start.elapsed_time(end)
        self.events.clear()
        return out


TIMER: _Timer | None = None


def piece(name: str):
    """A context timing one piece of the chunk loop when TIMER is set, else nothing."""
    return contextlib.nullcontext() if TIMER is None else TIMER.piece(name)
