"""The seam between the chunk loop (chunked.py) and a row backend (rows_torch, rows_triton).

The loop hands a backend one `ChunkInputs` and a PG callback; the backend returns a `ChunkOutputs`.
Neither side writes into the other's tensors except through these two objects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# (logp_C, entropy_C) -> (loss_C, g_C): each row's loss contribution and g = d loss / d logp (pg.pg_rows).
PgCallback = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ChunkInputs:
    """One chunk of C student rows and the K distilled rows whose student rows lie in it.

    z_CV and u_KV are unscaled logits in the accumulation dtype, in Workspace buffers the backend may
    overwrite. local_K [K] is the chunk-local student row of each distilled row, in ascending order
    (duplicates allowed). targets_C holds a valid index on every row (ignored rows mapped to 0)."""

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
    # dtype of the returned dz: the LM-head GEMMs' input dtype (bf16 for bf16 weights on CUDA), so that
    # dz is rounded once, by the kernel that computes it, after the temperature is applied.
    dz_dtype: torch.dtype = torch.float32


@dataclass
class ChunkOutputs:
    """Row results of one chunk. dz_CV is d loss / d (h @ W.T) for the chunk's rows, temperature included,
    in ChunkInputs.dz_dtype (None without need_grad); it may alias a Workspace buffer."""

    logp_C: torch.Tensor
    entropy_C: torch.Tensor
    loss_C: torch.Tensor
    fkl_K: torch.Tensor | None
    rkl_K: torch.Tensor | None
    dz_CV: torch.Tensor | None
