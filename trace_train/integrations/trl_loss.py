"""TRL's GRPO loss (trl 1.13 to 1.x, `GRPOTrainer._compute_loss`) restated as `trace_loss` arguments.

TRL's per-token term for loss types grpo / bnpo / dr_grpo / dapo is one clipped PPO term,
    L_bt = -min(min(r, delta) A_b, clamp(r, 1 - eps_low, 1 + eps_high) A_b) [+ beta k3_bt (x r with bias correction)]
summed with a per-token weight that only the loss type (and gradient accumulation) sets:
    grpo, sapo:          mask_bt / (|y_b| B GA)        bnpo: mask_bt / (sum mask GA)
    dr_grpo:             mask_bt / (B max_completion_length GA)
    dapo, cispo, vespo:  mask_bt / (num_items_in_batch / processes x GA / steps_per_generation)
    luspo:               mask_bt / (B GA)
(B the micro-batch's sequences, GA the accumulation steps in training, 1 in evaluation). Those weights are
`pg_weight`; a fixed entropy bonus, -entropy_coef x mask_bt / (sum mask GA), is `entropy_weight`;
`delta` >= 1 + eps_high is exactly the dual clip. Those cases run in the single fused pass (`fused_path`).

Everything else TRL's loss can do has no `trace_loss` term of its own: the other loss types (cispo's
detached clipped ratio times logp, sapo's sigmoid gate, vespo's gamma weights, luspo's sequence sum),
sequence-level ratios (GSPO), the off-policy sequence mask (OPSM), the high-entropy token mask, `delta`
below 1 + eps_high (then not a cap), TRL's bias-corrected k3 (k3 x r, derivative r (logp - ref)) and the
vLLM ratio on top of a KL term. These go through `prepass_coefficients`: the log-probs measured without
gradient (one extra LM-head sweep), TRL's loss differentiated in closed form with respect to them, then
`trace_loss` on-policy with advantage -dL/dlogp. Every one of these losses depends on the parameters only
through the log-probs (and the entropy bonus, which stays `entropy_weight`), so the gradient is exact.
"""

from __future__ import annotations

import torch

from ..heads import head_map

FUSED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SUPPORTED_LOSS_TYPES = FUSED_LOSS_TYPES + ("cispo", "sapo", "luspo", "vespo")


def unsupported_options(args, model, aux_loss_enabled: bool = False) -> list[str]:
    """Why `TraceGRPOTrainer` cannot reproduce TRL's loss for these args and this (unwrapped) model: a list
    of messages, each naming the option. Empty when everything is supported."""
    errors = []
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        errors.append(f"loss_type={args.loss_type!r} is not supported (only {', '.join(SUPPORTED_LOSS_TYPES)})")
    if args.importance_sampling_level not in ("token", "sequence"):
        errors.append(f"importance_sampling_level={args.importance_sampling_level!r} is not supported")
    if aux_loss_enabled and router_aux_loss_fn(model) is None:
        errors.append(f"router_aux_loss_coef: {type(model).__name__}'s config has no output_router_logits, "
                      "num_experts and num_experts_per_tok to compute the MoE load-balancing loss from; set "
                      "router_aux_loss_coef=0.0")
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


# The inputs TRL 1.16's `_compute_loss` hands a vision-language model's forward (`_get_per_token_logps_and_entropies`
# slices them per chunk of rows; our loss runs on the whole micro-batch, so they pass whole). The counts
# `num_images` / `num_tiles` only steer TRL's slicing and are not model inputs.
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "token_type_ids", "mm_token_type_ids", "image_position_ids")


def multimodal_inputs(inputs: dict) -> dict:
    """The multimodal model inputs present in a TRL micro-batch (empty for text-only batches)."""
    return {k: inputs[k] for k in MULTIMODAL_KEYS if inputs.get(k) is not None}


def router_aux_loss_fn(model):
    """aux(router_logits, attention_mask): the MoE load-balancing loss as TRL 1.16's fused head computes it
    (transformers' Mixtral `load_balancing_loss_func`, which every MoE family shares, with the text config's
    num_experts and num_experts_per_tok), or None where the model has no such loss."""
    try:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    except ImportError:
        return None
    config = model.config.get_text_config()
    num_experts = getattr(config, "num_experts", None) or getattr(model, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not hasattr(config, "output_router_logits") or num_experts is None or top_k is None:
        return None
    return lambda router_logits, attention_mask: load_balancing_loss_func(router_logits, num_experts, top_k,
                                                                          attention_mask)


def fused_path(args, *, beta: float, is_ratio: bool) -> bool:
    """Whether TRL's loss for these options is one `trace_loss` call (else: the prepass, see the docstring)."""
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    return (args.loss_type in FUSED_LOSS_TYPES and args.importance_sampling_level == "token"
            and args.off_policy_mask_threshold is None and args.top_entropy_quantile >= 1.0
            and (args.delta is None or (args.delta >= 1 + eps_high and args.delta > 1))
            and not (beta != 0.0 and (args.use_bias_correction_kl or is_ratio)))


def pg_weights(loss_type: str, mask_BT: torch.Tensor, *, accumulation: float, max_completion_length: int | None,
               num_items_in_batch: torch.Tensor | None, num_processes: int, steps_per_generation: int,
               training: bool) -> torch.Tensor:
    """[B, T] fp32 weight of each token's loss term for TRL's loss type (see the module docstring)."""
    mask = mask_BT.float()
    b = mask.shape[0]
    if loss_type in ("grpo", "sapo"):
        return mask / mask.sum(-1, keepdim=True).clamp(min=1.0) / b / accumulation
    if loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return mask / (b * max_completion_length) / accumulation
    if loss_type == "luspo":
        return mask / b / accumulation
    if loss_type in ("dapo", "cispo", "vespo"):
        normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
        if training:
            normalizer = normalizer * accumulation / steps_per_generation
        return mask / normalizer
    raise ValueError(f"loss_type={loss_type!r} is not supported")


def importance_weights(logp_BT, old_BT, mask_BT=None, level: str = "token"):
    """log r: per token [B, T], or GSPO's per-sequence mean over the mask [B, 1]."""
    log_ratio = logp_BT - old_BT
    if level == "token":
        return log_ratio
    if level == "sequence":
        maskf = mask_BT.float()
        return ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level={level!r} is not supported")


def trl_token_loss(logp_BT, old_BT, ref_BT, advantages_B1, *, beta, eps_low, eps_high, delta, bias_correction,
                   is_ratio=None, loss_type="grpo", level="token", mask_BT=None, sapo_temperature_pos=1.0,
                   sapo_temperature_neg=1.05, phi_B1=None, keep_B1=None, entropy_mask_BT=None):
    """TRL's per-token loss, written as TRL writes it ([B, T], or [B, 1] for a sequence-level loss without
    a KL term). `phi_B1` are vespo's (detached) gamma weights, `keep_B1` OPSM's sequence mask,
    `entropy_mask_BT` the high-entropy token mask; `is_ratio` vLLM's importance-sampling ratio where TRL
    multiplies by it (not for vespo, which folds it into phi)."""
    coef_1 = torch.exp(importance_weights(logp_BT, old_BT, mask_BT, level))
    if beta != 0.0:
        per_token_kl = torch.exp(ref_BT - logp_BT) - (ref_BT - logp_BT) - 1
        if bias_correction:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        loss = -torch.clamp(coef_1, max=eps_high).detach() * advantages_B1 * logp_BT
    elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        loss = -torch.min(coef_1 * advantages_B1, coef_2 * advantages_B1)
    elif loss_type == "sapo":
        temperatures = torch.where(advantages_B1 > 0, sapo_temperature_pos, sapo_temperature_neg)
        loss = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * advantages_B1
    elif loss_type == "vespo":
        loss = -phi_B1 * advantages_B1 * logp_BT
    else:
        raise ValueError(f"loss_type={loss_type!r} is not supported")
    if keep_B1 is not None:
        loss = loss * keep_B1
    if entropy_mask_BT is not None:
        loss = loss * entropy_mask_BT
    if is_ratio is not None:
        loss = loss * is_ratio
    if beta != 0.0:
        loss = loss + beta * per_token_kl
    return loss


def prepass_coefficients(logp_BT, weight_BT, old_BT, ref_BT, advantages_B1, **options):
    """(value, dlogp_BT) of sum(weight * TRL's per-token loss) at the given (detached) log-probs.

    Where `trace_loss` has no term for TRL's loss, the trainer first measures the log-probs without
    gradient, takes this closed-form derivative, and then calls `trace_loss` on-policy with advantage -dlogp
    and pg_weight 1: its gradient is then exactly dlogp . d logp / d theta (the backward of
    `logprobs_entropy`), with the entropy bonus and the teacher KL still in the same call."""
    with torch.enable_grad():
        logp = logp_BT.detach().clone().requires_grad_(True)
        old = logp.detach() if old_BT is None else old_BT
        loss = trl_token_loss(logp, old, ref_BT, advantages_B1, **options)
        total = (loss * weight_BT).sum()
        (grad,) = torch.autograd.grad(total, logp)
    return total.detach(), grad
