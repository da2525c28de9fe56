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


def new_sums() -> dict:
    """This rank's sums and maxima for one step, all zero (maxima at -inf)."""
    sums = dict.fromkeys(SUM_KEYS, 0.0)
    sums.update(dict.fromkeys(MAX_KEYS, -float("inf")))
    return sums


def add_loss(sums: dict, out) -> None:
    """A dummy micro-batch (a rank with fewer micro-batches than another): its loss (zero) and the count."""
    sums["loss"] += out.loss.item()
    sums["dummies"] += 1


def add_micro_batch(sums: dict, out, routing: Routing, advantages_N: torch.Tensor, old_logprobs_N: torch.Tensor | None,
                    loss_cfg, ref_logprobs_N: torch.Tensor | None = None, *, first_epoch: bool = True) -> None:
    """A micro-batch of one update: its loss, entropy, per-branch KL (over the rows of positive weight), the
    tokens whose gradient GRPO's clip stops (ratio exp(logp - old) above 1 + clip_high with a positive
    advantage, below 1 - clip_low with a negative one; old None: on-policy, ratio 1), and with a reference
    policy the k3 estimate of KL(policy || reference). advantages_N: each token's advantage as the loss saw it
    (importance weights included). Distilled rows and teacher rollouts describe the rollouts: counted in the
    first epoch only."""
    sums["loss"] += out.loss.item()
    sums["entropy"] += out.entropy.sum().item()
    if old_logprobs_N is not None:
        ratio = torch.exp(out.logprobs - old_logprobs_N.to(out.logprobs.device)).cpu()
        adv = advantages_N.cpu()
        stopped = ((ratio > 1 + loss_cfg.clip_high) & (adv > 0)) | ((ratio < 1 - loss_cfg.clip_low) & (adv < 0))
        sums["clipped"] += stopped.sum().item()
    for name, w in (("fkl", routing.fkl_weight_M), ("rkl", routing.rkl_weight_M)):
        vals = getattr(out, name)
        if vals is not None:
            rows = (w > 0).to(vals.device)
            sums[name] += vals[rows].sum().item()
            sums[name + "_n"] += rows.sum().item()
    if ref_logprobs_N is not None:
        d = ref_logprobs_N.to(out.logprobs.device).double() - out.logprobs.double()
        sums["kl_ref"] += torch.special.expm1(d).sub(d).sum().item()  # k3, the penalty loss.beta weighs
    if first_epoch:
        sums["kl_rows"] += routing.kl_index_M.numel()
        sums["teacher"] += len(routing.teacher_responses)


def add_mismatch(sums: dict, sampler_logprobs_N: torch.Tensor, trainer_logprobs_N: torch.Tensor, lens: list[int],
                 is_weights_N: torch.Tensor | None) -> None:
    """The sampler / trainer mismatch of a micro-batch's tokens, once per rollout (trace_train.mismatch: the
    trainer's log-probs before the update against the sampler's; is_weights_N: the importance weights applied,
    None without a correction)."""
    for k, v in mismatch.mismatch_sums(sampler_logprobs_N, trainer_logprobs_N, lens, is_weights_N).items():
        sums[k] = max(sums[k], v) if k in MAX_KEYS else sums[k] + v


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


def summarize(tot: dict, *, responses: float, tokens: float, lift_metric: bool, updates: int = 1, epochs: int = 1,
              corrected: bool = False, reference: bool = False) -> dict:
    """The metrics made of the all-reduced sums and maxima `tot`: means per response (reward, accuracy, truncated,
    response_length), per token (span_fraction, lift_all) and per token and update (entropy, clip_fraction,
    kl_ref: None without a reference policy; each token is trained on once per epoch), the mean loss of the
    step's `updates` optimizer updates, per measured row (fkl, rkl, lift*: None where no row was measured) and
    the mismatch* metrics (trace_train.mismatch.summarize; corrected: an importance correction was applied)."""
    b, n, ne = responses, tokens, tokens * epochs
    return {
        "loss": tot["loss"] / updates, "reward": tot["reward"] / b, "accuracy": tot["reward"] / b,
        "entropy": tot["entropy"] / ne, "response_length": n / b, "truncated": 1.0 - tot["finished"] / b,
        "fkl": tot["fkl"] / tot["fkl_n"] if tot["fkl_n"] else None,
        "rkl": tot["rkl"] / tot["rkl_n"] if tot["rkl_n"] else None,
        "span_fraction": tot["kl_rows"] / n, "teacher_rollouts": int(tot["teacher"]),
        "annotated_rollouts": int(tot["annotated"]),
        "annotator_failures": int(sum(tot[k] for k in FAILURE_KEYS)), **{k: int(tot[k]) for k in FAILURE_KEYS},
        "clip_fraction": tot["clipped"] / ne, "dummy_micro_batches": int(tot["dummies"]),
        # nats per token; None where no row was measured (train.lift_metric off, or no spans at this step)
        **{k: tot[k] / tot[k + "_n"] if tot[k + "_n"] else None for k in ("lift", "lift_fkl", "lift_rkl")},
        "lift_all": tot["lift_all"] / n if lift_metric else None,
        "kl_ref": tot["kl_ref"] / ne if reference else None,
        **mismatch.summarize(tot, tokens=n, corrected=corrected),
    }
