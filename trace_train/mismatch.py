"""The sampler / trainer mismatch: how far the rollout engine's log-probs are from the trainer's for the same tokens,
and the importance-sampling corrections for it, as TRL 1.16 defines them (`vllm_importance_sampling_mode`).

Both take flat per-token tensors in the trainer's row order (responses concatenated) and the response lengths:

    w_N = importance_weights(sampler_lp_N, trainer_lp_N, lens, "token_truncate", clip_max=3.0)
    sums = mismatch_sums(sampler_lp_N, trainer_lp_N, lens, w_N)   # adds up over micro-batches and ranks

The trainer's log-probs are those of the policy that the loss differentiates, before the update: on-policy, the
ones its loss forward computes; with several updates per batch, the recomputed old log-probs. The weight multiplies
the GRPO term only (through the advantages: w * max(-r A, -clip(r) A) = max(-r wA, -clip(r) wA) for w >= 0, the
k3 penalty and the KL branches untouched), as TRL multiplies its per-token policy loss by its
`importance_sampling_ratio`.
"""

from __future__ import annotations

import torch

IS_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _segments(lens, n: int, device) -> torch.Tensor:
    """[N] the response of each row."""
    lens = torch.as_tensor(lens, dtype=torch.long, device=device)
    if int(lens.sum()) != n:
        raise ValueError(f"lens: the response lengths sum to {int(lens.sum())}, the log-probs have {n} rows")
    return torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens)


@torch.no_grad()
def importance_weights(sampler_lp_N: torch.Tensor, trainer_lp_N: torch.Tensor, lens, mode: str, *,
                       clip_min: float | None = None, clip_max: float | None = 3.0) -> torch.Tensor:
    """[N] fp32 importance weights of the sampled tokens (detached), TRL's four modes:

    - token_truncate: clamp(exp(trainer_t - sampler_t), clip_min, clip_max);
    - token_mask: exp(trainer_t - sampler_t), 0 where outside [clip_min, clip_max];
    - sequence_truncate / sequence_mask: the same for the response's ratio exp(sum_t (trainer_t - sampler_t)),
      given to each of its tokens;
    - none: ones.
    clip_min / clip_max None: no bound on that side (a truncate mode needs at least one)."""
    if mode not in IS_MODES:
        raise ValueError(f"importance sampling mode: unknown {mode!r} ({' | '.join(IS_MODES)})")
    if sampler_lp_N.shape != trainer_lp_N.shape or sampler_lp_N.dim() != 1:
        raise ValueError(f"sampler_lp_N {tuple(sampler_lp_N.shape)} and trainer_lp_N {tuple(trainer_lp_N.shape)} "
                         f"must be the same [N]")
    if mode == "none":
        return torch.ones_like(trainer_lp_N, dtype=torch.float32)
    if mode.endswith("truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"importance sampling mode {mode!r}: set clip_min or clip_max")
    seg = _segments(lens, trainer_lp_N.numel(), trainer_lp_N.device)
    # fp64: a sequence's log-ratio is a sum over its tokens
    diff = torch.nan_to_num(trainer_lp_N.double() - sampler_lp_N.to(trainer_lp_N.device).double(), nan=0.0)
    if mode.startswith("sequence"):
        per_seq = torch.zeros(len(lens), dtype=torch.float64, device=diff.device).index_add_(0, seg, diff)
        diff = per_seq[seg]
    ratio = torch.exp(diff)
    lo = -torch.inf if clip_min is None else clip_min
    hi = torch.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        ratio = ratio.clamp(lo, hi)
    else:
        ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
    return ratio.float()


class Correction:
    """One micro-batch's importance weights as a function of the trainer's log-probs (`batch_loss`'s
    advantage_weights: called inside the loss forward, on the log-probs of the hidden states the loss then
    differentiates); keeps the weights it returned (`weights_N`) for the metrics."""

    def __init__(self, sampler_lp_N: torch.Tensor, lens, mode: str, *, clip_min: float | None = None,
                 clip_max: float | None = 3.0):
        self.sampler_lp_N, self.lens, self.mode = sampler_lp_N, list(lens), mode
        self.clip_min, self.clip_max = clip_min, clip_max
        self.weights_N: torch.Tensor | None = None

    def __call__(self, trainer_lp_N: torch.Tensor) -> torch.Tensor:
        self.weights_N = importance_weights(self.sampler_lp_N, trainer_lp_N, self.lens, self.mode,
                                            clip_min=self.clip_min, clip_max=self.clip_max)
        return self.weights_N


# The sums mismatch_sums returns: added over micro-batches and ranks (SUMS) or maxed (MAXES; a minimum is
# kept as the max of its negative).
SUMS = ("mismatch_abs", "mismatch_seq_max", "mismatch_seqs", "mismatch_ratio", "mismatch_tokens", "is_weight",
        "is_zeroed")
MAXES = ("mismatch_abs_max", "mismatch_ratio_max", "mismatch_neg_ratio_min")


@torch.no_grad()
def mismatch_sums(sampler_lp_N: torch.Tensor, trainer_lp_N: torch.Tensor, lens, weights_N: torch.Tensor | None
                  = None) -> dict:
    """The sums and maxima of |trainer - sampler| (per token; the per-response maximum), of the token ratio
    exp(trainer - sampler) and of the importance weights applied (None: no correction), over the N tokens.
    Tokens whose sampler log-prob is NaN (an engine that could not score them) are left out."""
    seg = _segments(lens, trainer_lp_N.numel(), trainer_lp_N.device)
    d = trainer_lp_N.double() - sampler_lp_N.to(trainer_lp_N.device).double()
    ok = ~torch.isnan(d)
    d, seg = d[ok], seg[ok]
    a = d.abs()
    seq_max = torch.zeros(len(lens), dtype=torch.float64, device=a.device).scatter_reduce_(
        0, seg, a, "amax", include_self=True)
    has = torch.zeros(len(lens), dtype=torch.bool, device=a.device).index_fill_(0, seg, True)
    ratio = torch.exp(d)
    empty = a.numel() == 0
    out = {
        "mismatch_abs": a.sum().item(), "mismatch_seq_max": seq_max[has].sum().item(),
        "mismatch_seqs": float(has.sum().item()), "mismatch_ratio": ratio.sum().item(),
        "mismatch_tokens": float(a.numel()),
        "is_weight": 0.0 if weights_N is None else weights_N.double().sum().item(),
        "is_zeroed": 0.0 if weights_N is None else float((weights_N == 0).sum().item()),
        "mismatch_abs_max": 0.0 if empty else a.max().item(),
        "mismatch_ratio_max": -torch.inf if empty else ratio.max().item(),
        "mismatch_neg_ratio_min": -torch.inf if empty else (-ratio.min()).item(),
    }
    return out


def summarize(tot: dict, *, tokens: float, corrected: bool) -> dict:
    """The step's mismatch metrics from the all-reduced sums (tokens: the response tokens, for the weights'
    mean); None where nothing was measured."""
    n, seqs = tot["mismatch_tokens"], tot["mismatch_seqs"]
    return {
        "mismatch_logp_abs_mean": tot["mismatch_abs"] / n if n else None,
        "mismatch_logp_abs_max": tot["mismatch_abs_max"] if n else None,
        "mismatch_logp_seq_max_mean": tot["mismatch_seq_max"] / seqs if seqs else None,
        "mismatch_ratio_mean": tot["mismatch_ratio"] / n if n else None,
        "mismatch_ratio_min": -tot["mismatch_neg_ratio_min"] if n else None,
        "mismatch_ratio_max": tot["mismatch_ratio_max"] if n else None,
        "mismatch_is_weight_mean": tot["is_weight"] / tokens if corrected and tokens else None,
        "mismatch_is_zeroed_fraction": tot["is_zeroed"] / tokens if corrected and tokens else None,
    }
