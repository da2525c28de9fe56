"""TRL integration: `TraceGRPOTrainer`, a drop-in `trl.GRPOTrainer` whose loss is `trace_loss` computed from
hidden states and the LM-head weight, and `TraceGRPOConfig`, which turns it into TRACE.

- With a plain `GRPOConfig` it is GRPO: the loss and its gradients equal TRL's own `_compute_loss` (every
  loss type, beta, delta, GSPO, OPSM, the entropy mask and bonus, the adaptive entropy controller, the MoE
  aux loss, vLLM's importance sampling, gradient accumulation) within fp32 round-off, and TRL's metrics
  keep their meaning; losses with no `trace_loss` term take one extra no-grad LM-head sweep
  (`trl_loss.fused_path`). The head's softcapping, scales and bias pass to `trace_loss` (heads.py); a
  vision-language model's images reach its backbone as TRL passes them, and its text head is the loss's.
  What it cannot reproduce (an unverified logit transform) raises ValueError naming it when the trainer is
  built (`trl_loss.unsupported_options`).
- With `TraceGRPOConfig` it is TRACE: while lambda > 0 an annotator marks key spans of correct rollouts
  and error spans of incorrect ones; the same model, given a privileged prompt and no gradient, is the
  teacher on rollouts with spans; forward KL on key spans and reverse KL on error spans join the GRPO
  loss inside the same `trace_loss` call. At lambda 0 nothing of this runs and the loss is GRPO's.

It lives in trace_train, not trace_kernels, because TRACE reuses the trainer's annotators, schedule and
span helpers (trace_train imports trace_kernels, never the reverse). `trl` is imported with this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from torch.distributed.tensor import DTensor
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import maybe_gather_lm_head_ctx, nanmax, nanmin

import trace_kernels as tk

from ..annotate import Job
from ..heads import head_bias, head_map
from ..model import char_to_token_spans, token_char_offsets
from ..routing import cap_spans, lambda_at
from .trl_loss import (
    fused_path,
    importance_weights,
    multimodal_inputs,
    pg_weights,
    prepass_coefficients,
    router_aux_loss_fn,
    unsupported_options,
)

FORWARD, REVERSE = 1, 2  # span kinds in the per-token `trace_span` tensor


@dataclass
class TraceGRPOConfig(GRPOConfig):
    """`GRPOConfig` plus TRACE's options (the trainer's `[trace]` section):

    trace_w0, trace_hold_steps, trace_decay_steps: lambda = w0 for hold_steps optimizer steps, then linearly
        to 0 over decay_steps (from then on no annotator, no teacher: plain GRPO).
    trace_forward_kl: forward KL(teacher || student) on the key spans of correct rollouts.
    trace_reverse_kl: reverse KL(student || teacher) on the error spans of incorrect rollouts.
    trace_span_cap: at most this fraction of a completion's tokens is marked.
    trace_kl_term_clip: the KL clip c (None: no clip).
    trace_kl_clip_mode: "value" (clamp each vocabulary term of a KL to [-c, c]) or "grad" (KL values
        unclipped, each entry of a distilled token's logit gradient clamped); docs/kl-clip.md.
    trace_teacher: "live" (the current weights; the only teacher this integration has).
    trace_correct_reward: a rollout is correct when its weighted reward sum is >= this.
    trace_problem_key: the dataset column given to the annotator as the problem (else the prompt text).
    Span tokens keep (1 - lambda / w0) of their GRPO weight; each KL branch weighs lambda / (B |y_b| GA)
    per span token (per-response mean, averaged over the micro-batch's B sequences like grpo's loss).
    """

    trace_w0: float = 0.5
    trace_hold_steps: int = 10
    trace_decay_steps: int = 30
    trace_forward_kl: bool = True
    trace_reverse_kl: bool = False
    trace_span_cap: float = 0.25
    trace_kl_term_clip: float | None = None  # no clip by default: docs/study.md
    trace_kl_clip_mode: str = "value"
    trace_teacher: str = "live"
    trace_correct_reward: float = 1.0
    trace_problem_key: str = "problem"

    def __post_init__(self):
        super().__post_init__()
        if not self.trace_w0 > 0:
            raise ValueError(f"trace_w0 must be > 0, got {self.trace_w0}")
        if self.trace_hold_steps < 0 or self.trace_decay_steps < 0:
            raise ValueError("trace_hold_steps and trace_decay_steps must be >= 0")
        if not 0.0 <= self.trace_span_cap <= 1.0:
            raise ValueError(f"trace_span_cap must lie in [0, 1], got {self.trace_span_cap}")
        if self.trace_kl_term_clip is not None and not self.trace_kl_term_clip >= 0:
            raise ValueError(f"trace_kl_term_clip must be >= 0 or None, got {self.trace_kl_term_clip}")
        if self.trace_kl_clip_mode not in ("value", "grad"):
            raise ValueError(f"trace_kl_clip_mode must be 'value' or 'grad', got {self.trace_kl_clip_mode!r}")
        if self.trace_teacher != "live":
            raise ValueError(f"trace_teacher={self.trace_teacher!r} is not supported: only 'live' (a snapshot "
                             "teacher needs a second model copy; use trace_train's own trainer for that)")


def _failure_count(failures) -> int:
    """Annotators report failures as a count, or as a mapping from failure kind to count."""
    if isinstance(failures, Mapping):
        return int(sum(failures.values()))
    return int(failures)


class TraceGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with the loss computed by `trace_kernels.trace_loss` (never [B, T, V] logits).

    Built exactly like `GRPOTrainer`. With a `TraceGRPOConfig` also pass
    annotator(jobs: list[Job], examples: list[dict], seeds: list[int]) -> (annotations, failures): one
        `Annotation` (character key_spans / error_spans / diagnostic, see trace_train.annotate) or None per
        job; failures an int or a mapping kind -> count (trace_train.annotate's annotators fit);
    privileged_prompt(example: dict, diagnostic: str | None) -> prompt in the dataset's prompt format
        (text or chat messages): the problem with its reference solution and, for an incorrect rollout, the
        coarse diagnostic type, never the span text.
    """

    def __init__(self, *args, annotator: Callable | None = None, privileged_prompt: Callable | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        hf_model = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        errors = unsupported_options(self.args, hf_model, self.aux_loss_enabled)
        self._trace = isinstance(self.args, TraceGRPOConfig)
        if self._trace and (annotator is None or privileged_prompt is None):
            errors.append("annotator and privileged_prompt are required with a TraceGRPOConfig")
        columns = set(getattr(self.train_dataset, "column_names", None) or ())
        if self._trace and columns & {"image", "images"}:
            errors.append("TraceGRPOConfig: the dataset has image columns, but the teacher reads a text-only "
                          "privileged prompt (use GRPOConfig for vision-language rollouts)")
        if not self._trace and (annotator is not None or privileged_prompt is not None):
            errors.append("annotator / privileged_prompt were given but args is not a TraceGRPOConfig")
        if errors:
            raise ValueError("TraceGRPOTrainer cannot compute this loss: " + "; ".join(errors))
        self.annotator, self.privileged_prompt = annotator, privileged_prompt
        self._forward_redirection = _ForwardRedirection()
        self._router_aux_loss = router_aux_loss_fn(hf_model) if self.aux_loss_enabled else None
        self._trace_stash = None
        a = self.args
        # The head's logit softcapping / scales (trace_train.heads), as the model's own forward applies them.
        self._head_kwargs = head_map(hf_model.config).kwargs()
        self._loss_fn = tk.TraceLoss(beta=self.beta, clip_low=self.epsilon_low, clip_high=self.epsilon_high,
                                     dual_clip=a.delta, temperature=self.temperature,
                                     kl_term_clip=a.trace_kl_term_clip if self._trace else None,
                                     kl_clip_mode=a.trace_kl_clip_mode if self._trace else "value",
                                     **self._head_kwargs)
        # Losses with no trace_loss term of their own go through the prepass (trl_loss.fused_path).
        self._prepass_loss_fn = tk.TraceLoss(beta=0.0, temperature=self.temperature,
                                             kl_term_clip=a.trace_kl_term_clip if self._trace else None,
                                             kl_clip_mode=a.trace_kl_clip_mode if self._trace else "value",
                                             **self._head_kwargs)

    # ---------------------------------------------------------------- TRACE: spans and privileged prompts
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._trace:
            self._trace_stash = (inputs, prompts, completion_ids_list, rewards_per_func)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if not self._trace:
            return output
        stash, self._trace_stash = self._trace_stash, None
        completion_ids = output["completion_ids"]
        b, t = completion_ids.shape
        device = completion_ids.device
        training = self.model.training
        a = self.args
        lam = lambda_at(self.state.global_step, a.trace_w0, a.trace_hold_steps, a.trace_decay_steps) if training \
            else 0.0
        span = torch.zeros(b, t, dtype=torch.int8, device=device)
        teacher_prompts = [None] * b
        failures = 0
        if lam > 0:
            rows, prompts, completion_ids_list, rewards_per_func = stash
            local = slice(self.accelerator.process_index * b, (self.accelerator.process_index + 1) * b)
            rewards = (rewards_per_func[local] * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
            correct = (rewards >= a.trace_correct_reward).tolist()
            tok = self._tokenizer
            ids = [list(map(int, x)) for x in completion_ids_list]
            texts = [tok.decode(x, skip_special_tokens=True) for x in ids]
            jobs = [Job(self._problem_text(row, prompt), text, ok)
                    for row, prompt, text, ok in zip(rows, prompts, texts, correct)]
            seeds = [self.state.global_step * 1_000_003 + self.accelerator.process_index * b + i for i in range(b)]
            annotations, fails = self.annotator(jobs, rows, seeds)
            failures = _failure_count(fails)
            for i, ann in enumerate(annotations):
                if ann is None:
                    continue
                if correct[i] and a.trace_forward_kl:
                    char_spans, kind = ann.key_spans, FORWARD
                elif not correct[i] and a.trace_reverse_kl:
                    char_spans, kind = ann.error_spans, REVERSE
                else:
                    continue
                token_spans = cap_spans(char_to_token_spans(char_spans, token_char_offsets(tok, ids[i])),
                                        len(ids[i]), a.trace_span_cap)
                for start, end in token_spans:
                    span[i, start:end] = kind
                if token_spans:
                    teacher_prompts[i] = self.privileged_prompt(rows[i], ann.diagnostic)
        output["trace_span"] = span
        output["trace_lambda"] = torch.full((b,), lam, dtype=torch.float32, device=device)
        output["trace_teacher_prompt_ids"], output["trace_teacher_prompt_mask"] = \
            self._teacher_prompt_tensors(teacher_prompts, device)
        mode = "train" if training else "eval"
        marked = (span > 0) & output["completion_mask"].bool()
        totals = self.accelerator.reduce(torch.tensor(
            [float(marked.sum()), float(output["completion_mask"].sum()), float(failures),
             float(marked.any(-1).sum())], device=device), reduction="sum")
        self._metrics[mode]["trace/lambda"].append(lam)
        self._metrics[mode]["trace/span_fraction"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        self._metrics[mode]["trace/annotator_failures"].append(totals[2].item())
        self._metrics[mode]["trace/teacher_rollouts"].append(totals[3].item())
        return output

    def _problem_text(self, row: dict, prompt) -> str:
        if self.args.trace_problem_key in row:
            return str(row[self.args.trace_problem_key])
        if isinstance(prompt, list):  # chat messages: the last user turn
            users = [m["content"] for m in prompt if m.get("role") == "user"]
            return str(users[-1] if users else prompt[-1]["content"])
        return str(prompt)

    def _teacher_prompt_tensors(self, teacher_prompts: list, device) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, P] left-padded privileged prompt ids and mask (an all-zero row where no teacher runs)."""
        wanted = [i for i, p in enumerate(teacher_prompts) if p is not None]
        ids_list = [[] for _ in teacher_prompts]
        if wanted:
            tokenized, _, _ = self._tokenize_prompts([teacher_prompts[i] for i in wanted])
            for i, ids in zip(wanted, tokenized):
                ids_list[i] = list(map(int, ids))
        width = max(1, max(len(x) for x in ids_list))
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        ids_BP = torch.full((len(ids_list), width), pad, dtype=torch.long, device=device)
        mask_BP = torch.zeros((len(ids_list), width), dtype=torch.long, device=device)
        for i, ids in enumerate(ids_list):
            if ids:
                ids_BP[i, width - len(ids):] = torch.tensor(ids, device=device)
                mask_BP[i, width - len(ids):] = 1
        return ids_BP, mask_BP

    # ---------------------------------------------------------------- the loss
    def _compute_loss(self, model, inputs):
        # The backbone and the loss run inside the wrapper's forward (DDP / FSDP / ZeRO-3 hooks fire); the
        # metrics' collectives run after it returns.
        unwrapped = self.accelerator.unwrap_model(model)
        loss, stats = self._forward_redirection(model, unwrapped, self._loss_in_forward, unwrapped, inputs)
        self._log_loss_metrics(inputs, stats)
        return loss

    @staticmethod
    def _completion_hidden(backbone, input_ids, attention_mask, t: int, **kwargs):
        """([B, T, H] hidden states of the positions that predict the T completion tokens, the backbone's output);
        kwargs: output_router_logits, a vision-language model's image inputs."""
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        return out.last_hidden_state[:, -t - 1:-1], out

    def _loss_in_forward(self, unwrapped, inputs):
        hf_model = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        backbone = hf_model.base_model
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mask = mask.bool()
        b, t = completion_ids.shape
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        media = multimodal_inputs(inputs)
        if media and self._trace:
            raise ValueError("TraceGRPOConfig: the teacher reads a text-only privileged prompt, so rollouts with "
                             f"image inputs ({', '.join(media)}) cannot be distilled; use GRPOConfig for them")
        aux_loss = None
        if self._router_aux_loss is not None:  # the MoE load-balancing loss, as TRL's fused head computes it
            media["output_router_logits"] = True
        with self.accelerator.autocast():
            hidden, out = self._completion_hidden(backbone, input_ids, attention_mask, t, **media)
            if self._router_aux_loss is not None:
                aux_loss = self._router_aux_loss(out.router_logits, attention_mask)
        weight, bias = hf_model.get_output_embeddings().weight, head_bias(hf_model)
        if isinstance(weight, DTensor):  # FSDP2 shards the head: gather it once, differentiably
            weight = weight.full_tensor()
        if isinstance(bias, DTensor):
            bias = bias.full_tensor()
        if self.args.cast_lm_head_to_fp32:
            hidden = hidden.float()
        teacher = self._teacher_rows(backbone, inputs, mask, t, hidden.dtype)
        with maybe_gather_lm_head_ctx(*(p for p in (weight, bias) if p is not None)):
            w = weight.float() if self.args.cast_lm_head_to_fp32 else weight.to(hidden.dtype)
            b = None if bias is None else bias.to(w.dtype)
            loss, out, entropy_w, extra = self._trace_loss(hidden, w, completion_ids, mask, inputs, teacher, bias=b)
        # The policy part of the loss (TRL logs it with an entropy bonus): the total less the KL and entropy terms.
        other = self._entropy_and_kl_value(out, entropy_w, teacher)
        stats = dict(logprobs=out.logprobs, entropy=out.entropy, fkl=out.fkl, rkl=out.rkl,
                     kinds=None if teacher is None else teacher["kinds"], mask=mask,
                     policy_loss=loss.detach() - other, aux_loss=aux_loss, **extra)
        if aux_loss is not None:  # TRL scales it for accumulation like the policy loss, after the entropy bonus
            accumulation = self.current_gradient_accumulation_steps if self.model.training else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
        return loss, stats

    @staticmethod
    def _entropy_and_kl_value(out, entropy_w, teacher) -> torch.Tensor:
        """The (detached) value of the loss's entropy-bonus and teacher-KL terms."""
        other = torch.zeros((), device=out.loss.device)
        if entropy_w is not None:
            other = other + (entropy_w * out.entropy).sum()
        if teacher is not None:
            other = other + (teacher["fkl_weight"] * out.fkl).sum() + (teacher["rkl_weight"] * out.rkl).sum()
        return other

    def _teacher_rows(self, backbone, inputs, mask_BT, t, dtype):
        """Teacher hidden states [M, H] of the span tokens, their flat student rows and KL weights, or None.
        The live model on the privileged prompt, without gradient, only for rollouts with spans."""
        if not self._trace or "trace_span" not in inputs:
            return None
        lam = float(inputs["trace_lambda"][0]) if inputs["trace_lambda"].numel() else 0.0
        span = inputs["trace_span"] * mask_BT
        marked = span > 0
        if lam <= 0 or not bool(marked.any()):
            return None
        sel = marked.any(-1).nonzero().squeeze(1)
        ids = torch.cat([inputs["trace_teacher_prompt_ids"][sel], inputs["completion_ids"][sel]], dim=1)
        att = torch.cat([inputs["trace_teacher_prompt_mask"][sel], inputs["completion_mask"][sel]], dim=1)
        with torch.no_grad(), self.accelerator.autocast():
            th = self._completion_hidden(backbone, ids, att, t)[0]
        teacher_hidden = th[marked[sel]].to(dtype)
        kl_index = marked.reshape(-1).nonzero().squeeze(1)
        kinds = span.reshape(-1)[kl_index]
        b = mask_BT.shape[0]
        accumulation = self.current_gradient_accumulation_steps if self.model.training else 1.0
        per_token = lam / (b * accumulation * mask_BT.sum(-1, keepdim=True).clamp(min=1).float())
        kl_w = per_token.expand_as(mask_BT).reshape(-1)[kl_index]
        return dict(hidden=teacher_hidden, kl_index=kl_index, kinds=kinds, lam=lam,
                    fkl_weight=torch.where(kinds == FORWARD, kl_w, 0.0),
                    rkl_weight=torch.where(kinds == REVERSE, kl_w, 0.0))

    def _trace_loss(self, hidden, weight, completion_ids, mask, inputs, teacher, bias=None):
        a = self.args
        training = self.model.training
        accumulation = self.current_gradient_accumulation_steps if training else 1.0
        pg_w = pg_weights(self.loss_type, mask, accumulation=accumulation,
                          max_completion_length=self.max_completion_length,
                          num_items_in_batch=inputs.get("num_items_in_batch"),
                          num_processes=self.accelerator.num_processes,
                          steps_per_generation=a.steps_per_generation, training=training)
        if teacher is not None:
            scale = torch.ones_like(pg_w).reshape(-1)
            scale[teacher["kl_index"]] = 1.0 - teacher["lam"] / a.trace_w0
            pg_w = pg_w * scale.reshape(pg_w.shape)
        is_ratio = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = inputs["importance_sampling_ratio"]
        advantages = inputs["advantages"]
        advantages = advantages if advantages.dim() == 2 else advantages[:, None]
        old, ref = inputs.get("old_per_token_logps"), inputs.get("ref_per_token_logps")
        kl = {} if teacher is None else dict(teacher_hidden=teacher["hidden"], kl_index=teacher["kl_index"],
                                             fkl_weight=teacher["fkl_weight"], rkl_weight=teacher["rkl_weight"])
        prepass = not fused_path(a, beta=self.beta, is_ratio=is_ratio is not None)
        extra = {}
        entropy_mask = None
        if prepass:
            with torch.no_grad():
                logp0, entropy0 = tk.token_logprobs(
                    hidden.reshape(-1, hidden.shape[-1]), weight, completion_ids.masked_fill(~mask, -100).reshape(-1),
                    self.temperature, return_entropy=True,
                    bias=bias, **self._head_kwargs)
            logp0, entropy0 = logp0.view(mask.shape), entropy0.view(mask.shape)
            if a.top_entropy_quantile < 1.0:  # TRL's own mask: the quantile over every rank's entropies
                entropy_mask = self.get_high_entropy_mask(entropy0, mask, 1 - a.top_entropy_quantile)
                extra["entropy_mask"] = entropy_mask
        entropy_w = None
        if self._entropy_bonus_enabled:  # a mean over the tokens the policy term acts on, as in TRL
            effective = mask.float() if entropy_mask is None else (mask & entropy_mask).float()
            extra["effective_mask"] = effective
            coef = self.entropy_coef
            if a.use_adaptive_entropy:  # the coefficient and gate of the previous optimizer step
                coef = coef if self._last_world_entropy <= a.entropy_target else 0.0
            if coef != 0.0:
                entropy_w = -coef * effective / effective.sum().clamp(min=1.0) / accumulation
        if prepass:
            old_now = logp0 if old is None else old
            keep = phi = None
            if a.off_policy_mask_threshold is not None:  # TRL's sequence mask, from the measured log-probs
                keep = self.get_off_policy_mask(advantages, logp0, inputs.get("sampling_per_token_logps", old_now),
                                                mask.float(), a.off_policy_mask_threshold)
            if self.loss_type == "vespo":  # TRL's detached gamma weights (vLLM's ratio folded in there)
                phi = self.get_gamma_weights(advantages, logp0 - old_now, mask.float(),
                                             inputs.get("importance_sampling_ratio"), k_pos=a.vespo_k_pos,
                                             lambda_pos=a.vespo_lambda_pos, k_neg=a.vespo_k_neg,
                                             lambda_neg=a.vespo_lambda_neg)
                extra["phi"] = phi
            # the sapo options exist only in TRL versions that have sapo
            sapo = {} if self.loss_type != "sapo" else dict(sapo_temperature_pos=a.sapo_temperature_pos,
                                                            sapo_temperature_neg=a.sapo_temperature_neg)
            value, dlogp = prepass_coefficients(
                logp0, pg_w, old, ref, advantages, beta=self.beta, eps_low=self.epsilon_low,
                eps_high=self.epsilon_high, delta=a.delta, bias_correction=a.use_bias_correction_kl,
                is_ratio=None if self.loss_type == "vespo" else is_ratio, loss_type=self.loss_type,
                level=a.importance_sampling_level, mask_BT=mask, phi_B1=phi, keep_B1=keep,
                entropy_mask_BT=entropy_mask, **sapo)
            dlogp = dlogp * mask
            out = self._prepass_loss_fn(hidden, weight, completion_ids, -dlogp, mask=mask,
                                        pg_weight=torch.ones_like(dlogp), entropy_weight=entropy_w, bias=bias,
                                        **kl)
            # The value: TRL's loss at the measured log-probs plus the entropy and KL terms, summed apart from
            # the stand-in policy term (whose own value, sum(dlogp), would only add round-off); the gradient is
            # out.loss's.
            value = value + self._entropy_and_kl_value(out, entropy_w, teacher)
            return value + (out.loss - out.loss.detach()), out, entropy_w, extra
        if is_ratio is not None:
            pg_w = pg_w * is_ratio
        out = self._loss_fn(hidden, weight, completion_ids, advantages.expand(mask.shape), mask=mask, pg_weight=pg_w,
                            old_logprobs=old, ref_logprobs=ref if self.beta != 0.0 else None,
                            entropy_weight=entropy_w, bias=bias, **kl)
        return out.loss, out, entropy_w, extra

    def _log_loss_metrics(self, inputs, stats):
        """TRL's loss metrics (same names and meaning), from the detached log-probs, plus TRACE's KLs; and the
        adaptive entropy controller's update, as TRL makes it."""
        mode = "train" if self.model.training else "eval"
        mask = stats["mask"]
        maskf = mask.float()
        logp, entropy = stats["logprobs"], stats["entropy"]
        advantages = inputs["advantages"]
        advantages = advantages if advantages.dim() == 2 else advantages[:, None]
        old = inputs.get("old_per_token_logps")
        coef_1 = torch.exp(importance_weights(logp, logp if old is None else old, mask,
                                              self.args.importance_sampling_level))

        def masked_seq_mean(x):
            if x.shape[1] == 1:  # sequence-level: one value per sequence already
                return x.squeeze(1)
            return (x * maskf).sum(-1) / maskf.sum(-1)

        def global_masked_mean(x, m=maskf):
            if x.dim() == 2 and x.shape[1] == 1:  # as TRL: [B, 1] is one value per sequence
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([(x * m).sum(), m.sum().float()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if self._entropy_bonus_enabled:
            # TRL logs the policy loss before the accumulation division for the per-sequence / per-batch means,
            # after it for the num_items_in_batch normalisers (they include the accumulation).
            accumulation = self.current_gradient_accumulation_steps if self.model.training else 1.0
            per_window = self.loss_type in ("dapo", "cispo", "vespo")
            policy_loss = stats["policy_loss"] * (1.0 if per_window else accumulation)
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if self.args.use_adaptive_entropy and mode == "train":
                self._adaptive_entropy_update(entropy, stats["effective_mask"])
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        if stats["aux_loss"] is not None:
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(stats["aux_loss"].detach()).mean().item())
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * coef_1
            self._metrics[mode]["kl"].append(global_masked_mean(per_token_kl))
        self._metrics[mode]["entropy"].append(global_masked_mean(entropy))
        if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            if self.args.delta is not None:  # TRL counts clipped tokens on the ratio after its delta cap
                coef_1 = torch.clamp(coef_1, max=self.args.delta)
            is_low = ((coef_1 < 1 - self.epsilon_low) & (advantages < 0)).float()
            is_high = ((coef_1 > 1 + self.epsilon_high) & (advantages > 0)).float()
            self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(is_low))
            self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(is_high))
            self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(is_low, is_high)))
            self._metrics[mode]["clip_ratio/low_min"].append(
                nanmin(self.accelerator.gather(masked_seq_mean(is_low))).item())
            self._metrics[mode]["clip_ratio/high_max"].append(
                nanmax(self.accelerator.gather(masked_seq_mean(is_high))).item())
        elif self.loss_type == "cispo":
            clipped = ((coef_1 > self.epsilon_high) & (advantages > 0)).float()
            self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(clipped))
        elif self.loss_type == "vespo":
            self._metrics[mode]["vespo/phi_seq_mean"].append(global_masked_mean(stats["phi"]))
        if self._trace:
            kinds = stats["kinds"]
            for name, kind in (("fkl", FORWARD), ("rkl", REVERSE)):
                if kinds is None:
                    values = torch.zeros(0, device=mask.device)
                    sel = values
                else:
                    values, sel = stats[name], (kinds == kind).float()
                self._metrics[mode][f"trace/{name}"].append(global_masked_mean(values, sel))

    def _adaptive_entropy_update(self, entropy_BT, effective_BT):
        """TRL's controller: the entropy of the whole accumulation window (every rank, token-weighted) moves
        entropy_coef by entropy_coef_delta towards raising entropy below the target, lowering it above."""
        a = self.args
        window = torch.stack([(entropy_BT * effective_BT).sum(), effective_BT.sum()]).detach()
        self._entropy_window_stats = window if self._entropy_window_stats is None \
            else self._entropy_window_stats + window
        if not self.accelerator.sync_gradients:
            return
        totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
        world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
        if world_entropy <= a.entropy_target:
            self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
        self._last_world_entropy = world_entropy
        self._entropy_window_stats = None
