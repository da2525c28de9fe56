"""`TraceLoss`: the nn.Module form of `trace_loss`, for padded [B, T] batches as well as flat rows."""

from __future__ import annotations

import torch
from torch import nn

from .loss import trace_loss
from .output import TraceLossOutput


def _per_token(name: str, t: torch.Tensor | None, shape: tuple[int, ...], *, per_sequence: bool = False):
    """Flatten a [B, T] (or, with per_sequence, a [B]) tensor to [B*T]; None passes through."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if per_sequence and len(shape) == 2 and tuple(t.shape) == shape[:1]:
        return t[:, None].expand(shape).reshape(-1)
    if tuple(t.shape) != shape:
        allowed = f"{shape} or {shape[:1]}" if per_sequence and len(shape) == 2 else f"{shape}"
        raise ValueError(f"{name} must have shape {allowed}, got {tuple(t.shape)}")
    return t.reshape(-1)


class TraceLoss(nn.Module):
    """GRPO + span-routed forward / reverse KL to a teacher + entropy, from hidden states and the LM head
    weight (never [B, T, V] logits). The options are fixed at construction; `forward` takes the batch.

    Options (as in `trace_loss`): beta (k3 penalty to the reference policy), clip_low / clip_high (PPO
    clip), dual_clip (cap -c*A on negative advantages), temperature (student and teacher), kl_term_clip
    and kl_clip_mode (the KL clip and how it acts: "value" clamps each vocabulary term of a KL, "grad" each
    entry of its logit gradient), logit_scale and logit_softcap (the head's logit map: a model's constants),
    ignore_index, impl ("auto" | "triton" | "torch" | "reference"). The head's bias, a parameter, is passed to
    `forward` with its weight.
    """

    def __init__(self, *, beta: float = 0.0, clip_low: float = 0.2, clip_high: float = 0.28,
                 dual_clip: float | None = None, temperature: float = 1.0, kl_term_clip: float | None = None,
                 kl_clip_mode: str = "value", logit_scale: float = 1.0, logit_softcap: float | None = None,
                 ignore_index: int = -100, impl: str = "auto"):
        super().__init__()
        if impl not in ("auto", "triton", "torch", "reference"):
            raise ValueError(f"impl must be one of ('auto', 'triton', 'torch', 'reference'), got {impl!r}")
        self.options = dict(beta=beta, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                            temperature=temperature, kl_term_clip=kl_term_clip, kl_clip_mode=kl_clip_mode,
                            logit_scale=logit_scale, logit_softcap=logit_softcap, ignore_index=ignore_index,
                            impl=impl)
        # Bad options fail here, not at the first batch: trace_loss checks them on an empty problem.
        empty = torch.zeros(0)
        trace_loss(torch.zeros(0, 1), torch.zeros(1, 1), torch.zeros(0, dtype=torch.int64), empty,
                   ref_logprobs=empty, **{**self.options, "impl": "torch"})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        advantages: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        pg_weight: torch.Tensor | None = None,
        old_logprobs: torch.Tensor | None = None,
        ref_logprobs: torch.Tensor | None = None,
        entropy_weight: torch.Tensor | None = None,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        span_mask: torch.Tensor | None = None,
        kl_index: torch.Tensor | None = None,
        fkl_weight: torch.Tensor | None = None,
        rkl_weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ) -> TraceLossOutput:
        """Padded form: hidden [B, T, H], targets [B, T], mask [B, T] (True = a scored token; False rows
        are ignored like targets == ignore_index), advantages [B] (one per sequence) or [B, T], pg_weight /
        old_logprobs / ref_logprobs / entropy_weight [B, T]. The teacher either

        - as teacher_hidden [B, T, H] aligned with the student's positions and span_mask [B, T] (True on
          the distilled tokens; only those teacher rows are used), fkl_weight / rkl_weight [B, T]; the
          output's fkl / rkl are then [B, T] (0 off the spans); or
        - as teacher_hidden [M, H] with kl_index [M] (flat student rows b * T + t), fkl_weight / rkl_weight
          [M]; the output's fkl / rkl are [M].

        Flat form: hidden [N, H] and every per-token tensor [N] (mask optional), exactly `trace_loss`,
        the teacher as teacher_hidden [M, H] with kl_index, or [N, H] with span_mask [N].
        bias [V] / teacher_bias [V]: the heads' biases, as in `trace_loss`.
        Output: `TraceLossOutput` with logprobs / entropy shaped like targets. pg_weight None: the mean over
        scored tokens of the whole batch."""
        if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
            raise ValueError(f"hidden must be a [B, T, H] or [N, H] tensor, got "
                             f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
        if span_mask is not None and kl_index is not None:
            raise ValueError("give the teacher rows by span_mask or by kl_index, not both")
        rows_shape = tuple(hidden.shape[:-1])
        h = hidden.shape[-1]
        ignore_index = self.options["ignore_index"]
        targets_N = _per_token("targets", targets, rows_shape)
        if mask is not None:
            mask_N = _per_token("mask", mask, rows_shape)
            targets_N = torch.where(mask_N.bool(), targets_N, torch.full_like(targets_N, ignore_index))
        hidden_NH = hidden.reshape(-1, h)
        kwargs = dict(
            pg_weight=_per_token("pg_weight", pg_weight, rows_shape),
            old_logprobs=_per_token("old_logprobs", old_logprobs, rows_shape),
            ref_logprobs=_per_token("ref_logprobs", ref_logprobs, rows_shape),
            entropy_weight=_per_token("entropy_weight", entropy_weight, rows_shape),
        )
        advantages_N = _per_token("advantages", advantages, rows_shape, per_sequence=True)

        span_N = None
        if teacher_hidden is not None and kl_index is None:
            if span_mask is None:
                raise ValueError("teacher_hidden needs span_mask (aligned [B, T, H] / [N, H] teacher) or kl_index")
            if not isinstance(teacher_hidden, torch.Tensor) or tuple(teacher_hidden.shape) != rows_shape + (h,):
                raise ValueError(f"teacher_hidden must have shape {rows_shape + (h,)} (aligned with hidden) when "
                                 f"span_mask is given, got {tuple(getattr(teacher_hidden, 'shape', ()))}")
            span_N = _per_token("span_mask", span_mask, rows_shape).bool()
            kl_index_M = span_N.nonzero().squeeze(1)
            kwargs.update(teacher_hidden=teacher_hidden.reshape(-1, h)[kl_index_M], kl_index=kl_index_M,
                          fkl_weight=_per_token("fkl_weight", fkl_weight, rows_shape),
                          rkl_weight=_per_token("rkl_weight", rkl_weight, rows_shape))
            for key in ("fkl_weight", "rkl_weight"):
                if kwargs[key] is not None:
                    kwargs[key] = kwargs[key][kl_index_M]
        elif teacher_hidden is not None:
            kwargs.update(teacher_hidden=teacher_hidden, kl_index=kl_index, fkl_weight=fkl_weight,
                          rkl_weight=rkl_weight)
        elif span_mask is not None or kl_index is not None or fkl_weight is not None or rkl_weight is not None:
            raise ValueError("span_mask, kl_index, fkl_weight and rkl_weight need teacher_hidden")
        if teacher_hidden is not None:
            kwargs["teacher_weight"] = teacher_weight
        elif teacher_weight is not None:
            raise ValueError("teacher_weight was given without teacher_hidden")

        if teacher_bias is not None:
            kwargs["teacher_bias"] = teacher_bias
        out = trace_loss(hidden_NH, weight, targets_N, advantages_N, bias=bias, **kwargs, **self.options)
        fkl, rkl = out.fkl, out.rkl
        if span_N is not None:
            def scatter(x_M):
                full = x_M.new_zeros(span_N.shape[0])
                full[span_N] = x_M
                return full.reshape(rows_shape)
            fkl, rkl = scatter(fkl), scatter(rkl)
        return TraceLossOutput(loss=out.loss, logprobs=out.logprobs.reshape(rows_shape),
                               entropy=out.entropy.reshape(rows_shape), fkl=fkl, rkl=rkl)
