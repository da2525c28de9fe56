"""The result type of `trace_loss`."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TraceLossOutput(NamedTuple):
    """What `trace_loss` returns (a named tuple; docs/contract.md has the definitions).

    Attributes:
        loss: scalar, fp32 (fp64 for fp64 inputs), differentiable w.r.t. hidden and weight only; a weighted
            sum over rows, not a mean.
        logprobs: [N] detached fp32 log p(targets) at the given temperature; 0 on ignored rows.
        entropy: [N] detached fp32 entropy of each row's distribution; 0 on ignored rows.
        fkl: [M] detached fp32 forward KL(teacher || student) per distilled row (per-term clipped when
            kl_term_clip is set), whatever fkl_weight; None without teacher_hidden.
        rkl: [M] detached fp32 reverse KL(student || teacher) per distilled row, likewise.
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    fkl: torch.Tensor | None
    rkl: torch.Tensor | None
