"""The result type of `trace_loss`."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TraceLossOutput(NamedTuple):
    """`loss`: scalar, differentiable w.r.t. hidden and weight (fp32; fp64 for fp64 inputs).
    `logprobs` [N], `entropy` [N]: detached fp32, 0 on ignored rows.
    `fkl` [M], `rkl` [M]: detached fp32 per distilled row; None without a teacher."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    fkl: torch.Tensor | None
    rkl: torch.Tensor | None
