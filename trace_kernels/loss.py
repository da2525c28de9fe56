"""Public entry points: `trace_loss` and its no-grad sibling `token_logprobs`."""

from __future__ import annotations

import os

import torch

from ._inputs import IMPLS, check_inputs
from .chunked import chunked_trace_loss
from .output import TraceLossOutput
from .reference import reference_trace_loss


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Whether impl="auto" picks the Triton kernels on CUDA. They have been checked under the Triton interpreter
# and compiled for sm_90a / sm_80 without spills (benchmarks/compile_check.py), but never run on a GPU:
# until benchmarks/gpu_check.sh has passed on a real card (its results committed under
# benchmarks/results/), "auto" takes the chunked torch path on CUDA too, and impl="triton" opts in.
# The device run that passes flips this to True, in the same commit as its results.
AUTO_USES_TRITON_ON_CUDA = False


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        use_triton = (AUTO_USES_TRITON_ON_CUDA and device.type == "cuda" and dtype != torch.float64
                      and triton_available())
        return "triton" if use_triton else "torch"
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' needs the triton package, which is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"impl='triton' runs on CUDA tensors, or on {device.type} under TRITON_INTERPRET=1")
        if dtype == torch.float64:
            raise ValueError("impl='triton' computes in fp32 and takes fp32/bf16/fp16 hidden; use impl='torch' "
                             "for float64")
    return impl


def trace_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    *,
    pg_weight: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    temperature: float = 1.0,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    kl_index: torch.Tensor | None = None,
    fkl_weight: torch.Tensor | None = None,
    rkl_weight: torch.Tensor | None = None,
    kl_term_clip: float | None = None,
    entropy_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
) -> TraceLossOutput:
    """GRPO + span-routed forward/reverse KL to a teacher + entropy, from hidden states and the LM head.

    Shapes: hidden [N, H], weight [V, H] (same dtype: fp32, bf16, fp16, or fp64), targets [N] int64,
    advantages / pg_weight / old_logprobs / ref_logprobs / entropy_weight [N]; teacher_hidden [M, H],
    teacher_weight [V, H], kl_index [M] int64 (student row of each distilled row), fkl_weight / rkl_weight [M].
    The exact definitions are in reference.py. The loss is differentiable w.r.t. hidden and weight
    only; the teacher is constant. impl: "auto" (torch; Triton on CUDA once verified on a GPU: see
    AUTO_USES_TRITON_ON_CUDA), "triton", "torch" (chunked
    PyTorch, never N x V), "reference" (materialized, for tests). Bad arguments raise ValueError first.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    inp = check_inputs(
        hidden, weight, targets, advantages, pg_weight=pg_weight, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, beta=beta, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        temperature=temperature, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, kl_index=kl_index,
        fkl_weight=fkl_weight, rkl_weight=rkl_weight, kl_term_clip=kl_term_clip, entropy_weight=entropy_weight,
        ignore_index=ignore_index,
    )
    impl = _resolve_impl(impl, hidden.device, hidden.dtype)
    if impl == "reference":
        return reference_trace_loss(inp)
    return chunked_trace_loss(inp, backend=impl)


@torch.no_grad()
def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(targets) [N] fp32 (and the entropy [N] with return_entropy), without gradient, under the same
    memory bound as `trace_loss`: the old- and reference-policy log-probs of GRPO. 0 on ignored rows."""
    n = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() == 2 else 0
    device = hidden.device if isinstance(hidden, torch.Tensor) else None
    advantages = torch.zeros(n, device=device)
    out = trace_loss(hidden, weight, targets, advantages, temperature=temperature, ignore_index=ignore_index,
                     impl=impl)
    return (out.logprobs, out.entropy) if return_entropy else out.logprobs
