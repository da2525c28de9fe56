"""Public entry points: `trace_loss` and its no-grad sibling `token_logprobs` (contract: docs/contract.md)."""

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
    kl_clip_mode: str = "value",
    entropy_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    impl: str = "auto",
) -> TraceLossOutput:
    """GRPO + span-routed forward/reverse KL to a teacher + entropy, from hidden states and the LM head,
    without ever holding the [N, V] logits. The full contract, with every edge case, is docs/contract.md.

    With z = softcap(logit_scale (hidden @ weight.T + bias)) / temperature, softcap(y) = c tanh(y / c) with
    c = logit_softcap (the identity when None), p = softmax(z), logp_i = log p_i[targets_i],
    H_i = entropy of p_i, r_i = exp(logp_i - old_i), and for the teacher q = softmax(teacher_hidden @
    teacher_weight.T + teacher_bias) mapped the same way) compared with student row s = kl_index_j::

        loss = sum_{valid i} pg_weight_i (L_pg_i + beta k3_i) + entropy_weight_i H_i
             + sum_j fkl_weight_j FKL_j + rkl_weight_j RKL_j
        L_pg_i = max(-r_i A_i, -clamp(r_i, 1 - clip_low, 1 + clip_high) A_i), capped at -dual_clip A_i if A_i < 0
        k3_i  = exp(ref_i - logp_i) - (ref_i - logp_i) - 1
        FKL_j = sum_v q_jv (log q_jv - log p_sv)     KL(teacher || student)
        RKL_j = sum_v p_sv (log p_sv - log q_jv)     KL(student || teacher)

    A weighted sum, not a mean; a valid row has targets_i != ignore_index; a KL row counts whatever its
    target. Computed in fp32 (fp64 for fp64 inputs).

    Args:
        hidden: [N, H] student hidden states, fp32 / bf16 / fp16 / fp64; row i predicts targets[i].
        weight: [V, H] LM-head weight (its bias: `bias`), same dtype and device as hidden.
        targets: [N] int64 token ids in [0, V), or ignore_index (the row is ignored).
        advantages: [N] float, per token (broadcast each sequence's advantage yourself).
        pg_weight: [N] float weight of each row's PG (+ k3) term. None: 1 / max(n_valid, 1) on valid rows.
        old_logprobs: [N] behaviour-policy log-probs. None: on-policy (old = current, detached; ratio 1).
        ref_logprobs: [N] reference-policy log-probs for the k3 penalty; required when beta > 0.
        beta: weight of k3 (>= 0).
        clip_low, clip_high: the ratio's clip range [1 - clip_low, 1 + clip_high] (each >= 0).
        dual_clip: c > 1 caps the PG loss of rows with A < 0 at -c A; None: no cap.
        temperature: > 0, divides the student and teacher logits.
        teacher_hidden: [M, H] teacher hidden states of the M distilled rows (same dtype); None: no KL.
        teacher_weight: [V, H] teacher LM head. None: `weight`, used without gradient.
        kl_index: [M] int64 student row of each distilled row (repeats allowed). None: arange(N), M == N.
        fkl_weight: [M] float weight of each row's forward KL. None: no forward-KL term.
        rkl_weight: [M] float weight of each row's reverse KL. None: no reverse-KL term.
        kl_term_clip: c >= 0, the KL clip (how it acts: kl_clip_mode); None: no clip.
        kl_clip_mode: "value" (default): every vocabulary term of each KL is clamped to [-c, c] before the
            sum (a clamped term has no gradient; fkl / rkl and the loss use the clamped sums). "grad": the
            KL values stay unclipped (fkl / rkl and the loss value), and each entry of a distilled row's
            unweighted gradient d KL_j / d z_s (z after the temperature; p - q for FKL, p (d - RKL) for RKL)
            is clamped to [-c, c] before fkl_weight / rkl_weight multiply it: the gradient is then not the
            autograd gradient of the reported loss. Ignored when kl_term_clip is None. docs/kl-clip.md
            derives what each mode does to the gradient.
        entropy_weight: [N] float weight of each row's entropy (negative: a bonus). None: no entropy term.
        ignore_index: the target value that marks an ignored row.
        logit_scale: a > 0, multiplies the head's logits (Cohere's logit_scale, 1 / Granite's logits_scaling,
            Falcon-H1's lm_head_multiplier); student and teacher alike, before the softcap and the temperature.
        logit_softcap: c > 0, logit softcapping c tanh(y / c) of the scaled logits (Gemma 2's
            final_logit_softcapping); student and teacher alike. None: no softcapping.
        bias: [V] LM-head bias, same dtype and device as hidden; it receives a gradient like weight. None: none.
        teacher_bias: [V] the teacher head's bias, with teacher_weight (required there when bias is given).
            None: `bias` when teacher_weight is None (the same head).
        impl: "auto" (the torch path; on CUDA, Triton once its kernels have passed the GPU check: see
            AUTO_USES_TRITON_ON_CUDA), "triton", "torch" (chunked PyTorch, the CPU path), "reference"
            (materialized, tests only).

    Returns:
        TraceLossOutput(loss, logprobs, entropy, fkl, rkl): loss a scalar differentiable w.r.t. hidden and
        weight only (the teacher is constant; gradients are computed in the forward, backward scales them);
        logprobs [N] and entropy [N] detached fp32, 0 on ignored rows; fkl [M] and rkl [M] detached fp32
        (clipped if kl_term_clip is set and kl_clip_mode is "value"), None without teacher_hidden.

    Raises:
        ValueError: naming the argument, before any computation: a bad shape, dtype or device, an index
            out of range, temperature / logit_scale / logit_softcap <= 0, a bias not [V], teacher_bias without
            teacher_weight or without bias (or missing with both), beta / clip_low / clip_high / kl_term_clip < 0,
            dual_clip <= 1,
            kl_clip_mode not "value" or "grad", beta > 0 without ref_logprobs, a teacher argument without
            teacher_hidden, kl_index missing with M != N, an unknown impl, or impl="triton" where it cannot
            run (no triton, not CUDA without TRITON_INTERPRET=1, fp64).

    Memory: [rows, V] buffers of one chunk (rows planned per card on CUDA, 512 MB on the CPU, capped by
    TRACE_KERNELS_CHUNK_MB / `chunk_budget` when set), plus, when weight requires grad, the d weight
    accumulator during the forward (for bf16 weights an 8-bit [V, H] plane beside the bf16 gradient; fp32 with
    `grad_weight_accumulator("fp32")` and for fp16): one weight-sized buffer is held until backward
    (docs/memory.md). Under torch.autocast, fp32 inputs enter the GEMMs in autocast's 16-bit dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    inp = check_inputs(
        hidden, weight, targets, advantages, pg_weight=pg_weight, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, beta=beta, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        temperature=temperature, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, kl_index=kl_index,
        fkl_weight=fkl_weight, rkl_weight=rkl_weight, kl_term_clip=kl_term_clip, kl_clip_mode=kl_clip_mode,
        entropy_weight=entropy_weight, ignore_index=ignore_index, logit_scale=logit_scale,
        logit_softcap=logit_softcap, bias=bias, teacher_bias=teacher_bias,
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
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    bias: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(targets) without gradient, under the same memory bound as `trace_loss`: the old- and
    reference-policy log-probs of GRPO. Same definitions and checks as `trace_loss` (docs/contract.md).

    Args:
        hidden: [N, H] hidden states, fp32 / bf16 / fp16 / fp64.
        weight: [V, H] LM-head weight, same dtype and device as hidden.
        targets: [N] int64 token ids in [0, V), or ignore_index.
        temperature: > 0, divides the logits.
        return_entropy: also return the entropy of each row.
        ignore_index: the target value that marks an ignored row.
        logit_scale, logit_softcap, bias: the head's logit map, as in `trace_loss`.
        impl: as in `trace_loss`.

    Returns:
        logprobs [N] fp32 (0 on ignored rows), detached; with return_entropy, (logprobs, entropy [N] fp32).

    Raises:
        ValueError: naming the argument, as `trace_loss` does.
    """
    n = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() == 2 else 0
    device = hidden.device if isinstance(hidden, torch.Tensor) else None
    advantages = torch.zeros(n, device=device)
    out = trace_loss(hidden, weight, targets, advantages, temperature=temperature, ignore_index=ignore_index,
                     logit_scale=logit_scale, logit_softcap=logit_softcap, bias=bias, impl=impl)
    return (out.logprobs, out.entropy) if return_entropy else out.logprobs
