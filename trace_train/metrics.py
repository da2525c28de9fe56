"""A step's metrics: the sums each rank adds up (from its micro-batches, its rollouts and the lift forward), all
reduced once per step in the order of SUM_KEYS, and the per-token / per-response means made from them.

Kept apart from the loop so that the trainer's forward, backward and optimizer step read without the
bookkeeping in between; every quantity logged to metrics.jsonl is defined here.
"""

from __future__ import annotations

import torch

from . import mismatch
from .annotate import FAILURE_KINDS
from .routing import Routing

# The per-step sums every rank contributes (all-reduced once per step, in this order on every rank), and the
# maxima (one all-reduce of their own).
SUM_KEYS = ("dummies", "loss", "entropy", "fkl", "fkl_n", "rkl", "rkl_n", "kl_rows", "teacher", "clipped",
            "reward", "finished", "annotated", "lift", "lift_n", "lift_fkl", "lift_fkl_n", "lift_rkl", "lift_rkl_n",
            "lift_all", "kl_ref") + tuple(f"annotator_failures/{k}" for k in FAILURE_KINDS) + mismatch.SUMS
MAX_KEYS = mismatch.MAXES
FAILURE_KEYS = tuple(k for k in SUM_KEYS if k.startswith("annotator_failures/"))


def new_sums(dummies: int) -> dict:
    """This rank's sums for one step; `dummies`: its zero-weight micro-batches (fewer groups than another rank)."""
    sums = dict.fromkeys(SUM_KEYS, 0.0)
    sums.update(dict.fromkeys(MAX_KEYS, -float("inf")))
    sums["dummies"] = float(dummies)
    return sums


def add_micro_batch(sums: dict, out, routing: Routing, sampler_logprobs_N: torch.Tensor | None,
                    clip_low: float, clip_high: float, response_lens: list[int] | None = None,
                    is_weights_N: torch.Tensor | None = None, ref_logprobs_N: torch.Tensor | None = None) -> None:
    """A micro-batch's loss, entropy, per-branch KL (over the rows of positive weight), distilled rows, the
    tokens whose ratio to the sampler's log-probs is outside the clip range, the sampler / trainer mismatch
    (trace_train.mismatch: the loss forward's log-probs against the sampler's; is_weights_N: the importance
    weights applied, None without a correction) and, with a reference policy, the k3 estimate of
    KL(policy || reference) per token. sampler_logprobs_N None: a dummy (its loss only: zero)."""
    sums["loss"] += out.loss.item()
    if sampler_logprobs_N is None:
        return
    lens = response_lens if response_lens is not None else [out.logprobs.numel()]
    for k, v in mismatch.mismatch_sums(sampler_logprobs_N, out.logprobs, lens, is_weights_N).items():
        sums[k] = max(sums[k], v) if k in MAX_KEYS else sums[k] + v
    sums["entropy"] += out.entropy.sum().item()
    ratio = torch.exp(out.logprobs - sampler_logprobs_N.to(out.logprobs.device))
    sums["clipped"] += ((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).sum().item()
    for name, w in (("fkl", routing.fkl_weight_M), ("rkl", routing.rkl_weight_M)):
        vals = getattr(out, name)
        if vals is not None:
            rows = (w > 0).to(vals.device)
            sums[name] += vals[rows].sum().item()
            sums[name + "_n"] += rows.sum().item()
    if ref_logprobs_N is not None:
        d = ref_logprobs_N.to(out.logprobs.device).double() - out.logprobs.double()
        sums["kl_ref"] += (torch.exp(d) - d - 1).sum().item()  # k3, the penalty loss.beta weighs
    sums["kl_rows"] += routing.kl_index_M.numel()
    sums["teacher"] += len(routing.teacher_responses)


def add_lift(sums: dict, delta_N: torch.Tensor, spans: Routing) -> None:
    """The change of each response token's log-prob across the update (delta_N, fp64 on the CPU), summed over
    all tokens and over the span rows of each KL branch (spans: the routing TRACE would apply)."""
    sums["lift_all"] += delta_N.sum().item()
    for name, w in (("lift_fkl", spans.fkl_weight_M), ("lift_rkl", spans.rkl_weight_M)):
        rows = spans.kl_index_M[w > 0]
        sums[name] += delta_N[rows].sum().item()
        sums[name + "_n"] += rows.numel()
    sums["lift"] += delta_N[spans.kl_index_M].sum().item()
    sums["lift_n"] += spans.kl_index_M.numel()


def add_rollouts(sums: dict, rewards: torch.Tensor, finished: list[bool], key_spans: list, error_spans: list,
                 failures: dict) -> None:
    """The step's rewards, finished responses, annotated rollouts and annotator failures by kind on this rank."""
    sums["reward"] = rewards.sum().item()
    sums["finished"] = float(sum(finished))
    sums["annotated"] = float(sum(1 for a in key_spans if a) + sum(1 for a in error_spans if a))
    for kind in FAILURE_KINDS:
        sums[f"annotator_failures/{kind}"] = float(failures.get(kind, 0))


def summarize(tot: dict, *, responses: float, tokens: float, lift_metric: bool, corrected: bool = False,
              reference: bool = False) -> dict:
    """The metrics made of the all-reduced sums and maxima `tot`: means per response (reward, accuracy, truncated,
    response_length), per token (entropy, clip_fraction, span_fraction, lift_all, kl_ref: None without a
    reference policy), per measured row (fkl, rkl, lift*: None where no row was measured) and the mismatch*
    metrics (trace_train.mismatch.summarize; corrected: an importance correction was applied)."""
    b, n = responses, tokens
    return {
        "loss": tot["loss"], "reward": tot["reward"] / b, "accuracy": tot["reward"] / b,
        "entropy": tot["entropy"] / n, "response_length": n / b, "truncated": 1.0 - tot["finished"] / b,
        "fkl": tot["fkl"] / tot["fkl_n"] if tot["fkl_n"] else None,
        "rkl": tot["rkl"] / tot["rkl_n"] if tot["rkl_n"] else None,
        "span_fraction": tot["kl_rows"] / n, "teacher_rollouts": int(tot["teacher"]),
        "annotated_rollouts": int(tot["annotated"]),
        "annotator_failures": int(sum(tot[k] for k in FAILURE_KEYS)), **{k: int(tot[k]) for k in FAILURE_KEYS},
        "clip_fraction": tot["clipped"] / n, "dummy_micro_batches": int(tot["dummies"]),
        # nats per token; None where no row was measured (train.lift_metric off, or no spans at this step)
        **{k: tot[k] / tot[k + "_n"] if tot[k + "_n"] else None for k in ("lift", "lift_fkl", "lift_rkl")},
        "lift_all": tot["lift_all"] / n if lift_metric else None,
        "kl_ref": tot["kl_ref"] / n if reference else None,
        **mismatch.summarize(tot, tokens=n, corrected=corrected),
    }
