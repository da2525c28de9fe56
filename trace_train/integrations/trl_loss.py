"""TRL's GRPO loss (trl 1.13 to 1.x, `GRPOTrainer._compute_loss`) restated as `trace_loss` arguments.

TRL's per-token term for loss types grpo / bnpo / dr_grpo / dapo is one clipped PPO term,
    L_bt = -min(min(r, delta) A_b, clamp(r, 1 - eps_low, 1 + eps_high) A_b) [+ beta k3_bt (x r with bias correction)]
summed with a per-token weight that only the loss type (and gradient accumulation) sets:
    grpo:    mask_bt / (|y_b| B GA)           bnpo: mask_bt / (sum mask GA)
    dr_grpo: mask_bt / (B max_completion_length GA)
    dapo:    mask_bt / (num_items_in_batch / processes x GA / steps_per_generation)
(B the micro-batch's sequences, GA the accumulation steps in training, 1 in evaluation). Those weights are
`pg_weight`; a fixed entropy bonus, -entropy_coef x mask_bt / (sum mask GA), is `entropy_weight`;
`delta` >= 1 + eps_high is exactly the dual clip (below it TRL's delta is not a cap, and we refuse it).
TRL's default `use_bias_correction_kl` multiplies k3 by r, whose log-prob derivative, r (logp - ref),
`trace_loss` has no term for: with beta > 0 and bias correction (or a vLLM importance-sampling ratio)
the loss goes through `prepass_coefficients` instead (one extra no-grad LM-head sweep; see there).
"""

from __future__ import annotations

import torch

from ..heads import head_map

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def unsupported_options(args, model, aux_loss_enabled: bool = False) -> list[str]:
    """Why `TraceGRPOTrainer` cannot reproduce TRL's loss for these args and this (unwrapped) model: a list
    of messages, each naming the option. Empty when everything is supported."""
    errors = []
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        errors.append(f"loss_type={args.loss_type!r} is not supported (only {', '.join(SUPPORTED_LOSS_TYPES)})")
    if args.importance_sampling_level != "token":
        errors.append(f"importance_sampling_level={args.importance_sampling_level!r} (sequence-level importance "
                      "sampling) is not supported; use 'token'")
    if args.off_policy_mask_threshold is not None:
        errors.append("off_policy_mask_threshold (off-policy sequence masking) is not supported; set it to None")
    if args.top_entropy_quantile < 1.0:
        errors.append("top_entropy_quantile < 1 (high-entropy token masks) is not supported; set it to 1.0")
    if args.use_adaptive_entropy:
        errors.append("use_adaptive_entropy (the adaptive entropy controller) is not supported; a fixed "
                      "entropy_coef is")
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if args.delta is not None and not (args.delta >= 1 + eps_high and args.delta > 1):
        errors.append(f"delta={args.delta} below 1 + epsilon_high is not a dual clip; use delta >= {1 + eps_high}")
    if aux_loss_enabled:
        errors.append("router_aux_loss_coef (MoE load-balancing loss) is not supported; set it to 0.0")
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        errors.append("model: vision-language models are not supported (text-only causal LMs)")
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        errors.append("model: no output embedding (LM head) weight to read")
    else:
        if type(head).__module__.startswith("peft"):
            errors.append("model: a PEFT adapter on the LM head is not supported (the head weight is read directly)")
    # Logit softcapping, scales and an LM-head bias are trace_loss options (trace_train.heads: one list, shared
    # with trace-train); what that list cannot make exact is refused, naming the config attribute.
    try:
        head_map(model.config)
    except ValueError as e:
        errors.append(f"model config: {e}")
    return errors


def pg_weights(loss_type: str, mask_BT: torch.Tensor, *, accumulation: float, max_completion_length: int | None,
               num_items_in_batch: torch.Tensor | None, num_processes: int, steps_per_generation: int,
               training: bool) -> torch.Tensor:
    """[B, T] fp32 weight of each token's loss term for TRL's loss type (see the module docstring)."""
    mask = mask_BT.float()
    b = mask.shape[0]
    if loss_type == "grpo":
        return mask / mask.sum(-1, keepdim=True).clamp(min=1.0) / b / accumulation
    if loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return mask / (b * max_completion_length) / accumulation
    if loss_type == "dapo":
        normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
        if training:
            normalizer = normalizer * accumulation / steps_per_generation
        return mask / normalizer
    raise ValueError(f"loss_type={loss_type!r} is not supported")


def trl_token_loss(logp_BT, old_BT, ref_BT, advantages_B1, *, beta, eps_low, eps_high, delta, bias_correction,
                   is_ratio=None):
    """TRL's per-token loss (loss types grpo / bnpo / dr_grpo / dapo), written as TRL writes it."""
    coef_1 = torch.exp(logp_BT - old_BT)
    if beta != 0.0:
        per_token_kl = torch.exp(ref_BT - logp_BT) - (ref_BT - logp_BT) - 1
        if bias_correction:
            per_token_kl = per_token_kl * coef_1
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    loss = -torch.min(coef_1 * advantages_B1, coef_2 * advantages_B1)
    if is_ratio is not None:
        loss = loss * is_ratio
    if beta != 0.0:
        loss = loss + beta * per_token_kl
    return loss


def prepass_coefficients(logp_BT, weight_BT, old_BT, ref_BT, advantages_B1, **options):
    """(value, dlogp_BT) of sum(weight * TRL's per-token loss) at the given (detached) log-probs.

    Where `trace_loss` has no term for TRL's loss (k3 times the ratio), the trainer first measures the
    log-probs without gradient, takes this closed-form derivative, and then calls `trace_loss` on-policy with
    advantage -dlogp and pg_weight 1: its gradient is then exactly dlogp . d logp / d theta (the backward of
    `logprobs_entropy`), with the teacher KL still in the same call."""
    with torch.enable_grad():
        logp = logp_BT.detach().clone().requires_grad_(True)
        old = logp.detach() if old_BT is None else old_BT
        loss = trl_token_loss(logp, old, ref_BT, advantages_B1, **options)
        total = (loss * weight_BT).sum()
        (grad,) = torch.autograd.grad(total, logp)
    return total.detach(), grad
