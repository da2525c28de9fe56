"""`TraceVerlLoss`: verl's actor loss (`verl.workers.utils.losses.ppo_loss`) plus TRACE's span-routed KL to the
privileged-context teacher, computed by one `trace_loss` call from the hidden states and the LM-head weight
that the patched forward (trace_train.integrations.verl) hands over. Give it to verl's engine with
`actor_rollout_wg.set_loss_fn(TraceVerlLoss(actor_config, ...))`.

The loss, per micro-batch, with verl's padded [B, R] response layout and w the weights of verl's `agg_loss`
for `loss_agg_mode` and `global_batch_info` (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor):

    ppo_loss(log-probs, entropy; rollout_is_weights x s)  +  sum over span tokens of kl_w * KL_t

where s is 1 - lambda / w0 on span tokens and 1 elsewhere (the span tokens' share of the policy-gradient term,
entering as a factor of verl's rollout importance weights), KL_t is forward KL(teacher || student) on the
tokens marked 1 in `trace_span` and reverse KL(student || teacher) on those marked 2, and kl_w =
lambda * dp_size / (global_batch_size * |y_b|): each branch is lambda times the per-response mean over the
response's valid tokens, averaged over the global batch's responses (trace_train.routing.route), scaled by
dp_size as verl's agg_loss scales every term (FSDP averages gradients over data-parallel ranks).

Two ways to the same loss:
- fused (policy_loss.loss_mode "vanilla" without use_kl_loss): verl's clipped objective is exactly trace_loss's
  PG term (clip_ratio_low / clip_ratio_high, the dual clip at clip_ratio_c, old_log_probs; verl's clamp of the
  log-ratio to [-20, 20] only acts where the clip already holds the loss constant), its agg_loss is a
  per-token weight, and the entropy bonus is entropy_weight: one trace_loss call, 3 LM-head GEMMs plus the
  teacher's rows.
- prepass (any other loss_mode, use_kl_loss with any kl_loss_type: verl's k3 clamps its values, the ref
  penalty is not weighted by rollout_is_weights, gspo / sapo / cispo / clip_cov ... are not per-token clips):
  one no-grad sweep gives the log-probs and entropy, verl's own `ppo_loss` runs on them as leaves, and its
  gradients dL/dlogp, dL/dH become trace_loss's advantage (-dL/dlogp, on-policy, pg_weight 1) and
  entropy_weight, with the KL in the same call: the gradient is verl's, whatever its loss; 4 GEMMs.
In both, the metrics are verl's `ppo_loss` metrics (computed by verl on the detached log-probs) plus
trace/lambda, trace/fkl, trace/rkl, trace/span_tokens.

Batch fields (added by `trace_batch_fields` on the driver; without them the loss is verl's ppo_loss):
trace_span [B, R] int8 (0, 1 forward, 2 reverse), trace_lambda [B] float (the step's lambda),
trace_teacher_input_ids / trace_teacher_attention_mask [B, P] (left-padded privileged prompts; the teacher
reads them followed by the rollout's response tokens).
"""

from __future__ import annotations

import torch
from verl.trainer.ppo.core_algos import agg_loss
from verl.utils import tensordict_utils as tu
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

import trace_kernels as tk

from ..routing import route
from . import verl_handoff as _hooks

FORWARD, REVERSE = 1, 2


def _padded(x: torch.Tensor) -> torch.Tensor:
    return x.to_padded_tensor(0) if x.is_nested else x


def _runs(marked: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) runs of True in a 1-D bool tensor."""
    idx = marked.nonzero().squeeze(1).tolist()
    spans = []
    for i in idx:
        if spans and spans[-1][1] == i:
            spans[-1][1] = i + 1
        else:
            spans.append([i, i + 1])
    return [tuple(s) for s in spans]


def unsupported_options(config) -> list[str]:
    """What verl's actor config asks for that this loss cannot give, each message naming the key."""
    errors = []
    if getattr(config, "strategy", None) == "megatron":
        errors.append("actor.strategy=megatron: a tensor-parallel (vocabulary-sharded) LM head cannot be handed to "
                      "trace_loss; use strategy fsdp2 (or fsdp)")
    sp = max(int(getattr(config, "ulysses_sequence_parallel_size", 1) or 1),
             int(getattr(getattr(config, "engine", None), "ulysses_sequence_parallel_size", 1) or 1))
    if sp > 1:
        errors.append(f"ulysses_sequence_parallel_size={sp}: each rank would hold a slice of the packed sequence, "
                      "so its hidden states and the response rows do not line up; use 1")
    if getattr(config, "use_prefix_grouper", False):
        errors.append("use_prefix_grouper: shared-prefix forwards lay the sequences out differently; set it False")
    return errors


class TraceVerlLoss:
    """verl's ppo_loss + TRACE's span KLs, in one trace_loss call (module docstring). Callable as verl's engine
    calls its loss: `loss_fn(model_output=..., data=micro_batch, dp_group=...) -> (loss, metrics)`.

    config: verl's ActorConfig (the actor's, as the worker builds it: `omega_conf_to_dataclass(
        config.actor_rollout_ref.actor)`); w0: lambda's starting value (span tokens keep 1 - lambda / w0 of their
        policy-gradient weight); kl_term_clip / kl_clip_mode: as in trace_loss (None: no clip, the default of the
        project's own trainer); impl: trace_kernels' implementation ("auto": Triton on CUDA, torch elsewhere).
    Building one (or unpickling it in a Ray worker) arms the forward hand-over in that process."""

    def __init__(self, config, *, w0: float = 0.5, kl_term_clip: float | None = None, kl_clip_mode: str = "value",
                 impl: str = "auto"):
        errors = unsupported_options(config)
        if not w0 > 0:
            errors.append(f"w0 must be > 0, got {w0}")
        if kl_term_clip is not None and not kl_term_clip >= 0:
            errors.append(f"kl_term_clip must be >= 0 or None, got {kl_term_clip}")
        if kl_clip_mode not in ("value", "grad"):
            errors.append(f"kl_clip_mode must be 'value' or 'grad', got {kl_clip_mode!r}")
        if errors:
            raise ValueError("TraceVerlLoss cannot compute this loss: " + "; ".join(errors))
        self.config, self.w0, self.kl_term_clip, self.kl_clip_mode, self.impl = \
            config, w0, kl_term_clip, kl_clip_mode, impl
        _hooks.arm()

    def __setstate__(self, state):  # Ray sends the loss to each worker by pickling it: arm there too
        self.__dict__.update(state)
        _hooks.arm()

    @property
    def fused(self) -> bool:
        """Whether verl's loss is exactly trace_loss's PG term (no prepass sweep)."""
        cfg = self.config
        return cfg.policy_loss.get("loss_mode", "vanilla") == "vanilla" and not cfg.use_kl_loss

    # ------------------------------------------------------------------------------------------------ the loss
    def __call__(self, model_output, data, dp_group=None):
        if tu.get_non_tensor_data(data=data, key="distillation_use_topk", default=False):
            raise ValueError("TraceVerlLoss: verl's top-k distillation (distillation.enabled) is a different loss; "
                             "disable it")
        handoff = _hooks.take_handoff()
        if handoff is None and not torch.is_grad_enabled():
            # verl evaluating the loss in a forward-only pass: that forward was verl's (on trace_kernels' kernels),
            # so model_output holds the log-probs; no gradient, no teacher.
            return ppo_loss(self.config, model_output, data)
        if handoff is None:
            raise RuntimeError(
                "TraceVerlLoss found no hidden states from the model's forward: set "
                "actor_rollout_ref.model.use_fused_kernels=True, import trace_train.integrations.verl in the worker "
                "(actor_rollout_ref.model.external_lib), and use a text model that verl patches through "
                "verl.models.transformers.dense_common (VL models are not supported)")
        rows_BR, mask_BR = self._response_rows(data)
        hidden_TH, labels_T = self._packed(handoff, data)
        rows_N = rows_BR[mask_BR]
        hidden_NH, targets_N = hidden_TH[rows_N], labels_T[rows_N]
        weight = handoff.weight
        lam, routing, teacher = self._teacher(handoff, data, mask_BR)
        verl_data = data
        scale_N = None
        if routing is not None and routing.has_kl:
            scale_N = torch.ones(rows_N.numel(), dtype=torch.float32, device=hidden_NH.device)
            scale_N[routing.kl_index_M.to(scale_N.device)] = 1.0 - lam / self.w0
            verl_data = self._scaled_is_weights(data, mask_BR, scale_N)
        kl = {}
        if teacher is not None:
            kl = dict(teacher_hidden=teacher, kl_index=routing.kl_index_M.to(hidden_NH.device),
                      fkl_weight=routing.fkl_weight_M.to(hidden_NH.device) * data["dp_size"],
                      rkl_weight=routing.rkl_weight_M.to(hidden_NH.device) * data["dp_size"],
                      kl_term_clip=self.kl_term_clip, kl_clip_mode=self.kl_clip_mode)
        calc_entropy = bool(tu.get_non_tensor_data(data=data, key="calculate_entropy", default=False))
        with torch.autocast(device_type=hidden_NH.device.type, enabled=False):
            w = weight if weight.dtype == hidden_NH.dtype else weight.to(hidden_NH.dtype)
            if self.fused:
                loss, out = self._fused_loss(hidden_NH, w, targets_N, handoff.temperature, data, mask_BR,
                                             calc_entropy, scale_N, kl)
            else:
                loss, out = self._prepass_loss(hidden_NH, w, targets_N, handoff.temperature, verl_data, rows_N,
                                               calc_entropy, kl)
        metrics = self._metrics(out, verl_data, rows_N, calc_entropy, lam, routing)
        return loss, metrics

    def _response_rows(self, data) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, R] row of each response token in verl's packed sequence (verl's own slicing), and the mask."""
        total = data["input_ids"].values().numel() if data["input_ids"].is_nested else None
        if total is None:
            raise ValueError("TraceVerlLoss expects verl's no-padding batches (nested input_ids)")
        rows_BR = no_padding_2_padding(torch.arange(total, device=data["input_ids"].values().device), data)
        mask_BR = _padded(data["response_mask"]).bool()
        return rows_BR, mask_BR[:, :rows_BR.shape[1]]

    @staticmethod
    def _packed(handoff, data) -> tuple[torch.Tensor, torch.Tensor]:
        """The handed hidden states [T, H] and labels [T] in verl's packed order (padding and tail pad dropped)."""
        lengths = data["input_ids"].offsets().diff()
        total = int(lengths.sum())
        hidden, labels = handoff.hidden, handoff.labels
        if hidden.ndim == 3 and hidden.shape[0] == 1 and handoff.packed:
            return hidden[0, :total], labels.reshape(-1)[:total]
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None]
        return hidden[keep], labels[keep]

    @staticmethod
    def _scaled_is_weights(data, mask_BR, scale_N):
        """The batch with rollout_is_weights multiplied by the span scale (a shallow copy)."""
        scale_BR = torch.ones(mask_BR.shape, dtype=torch.float32, device=scale_N.device)
        scale_BR[mask_BR] = scale_N
        out = data.copy()
        if "rollout_is_weights" in data:
            out["rollout_is_weights"] = _padded(data["rollout_is_weights"]) * scale_BR
        else:
            out["rollout_is_weights"] = scale_BR
        return out

    def _agg_weights(self, data, mask_BR) -> torch.Tensor:
        """[B, R] fp32 weights with agg_loss(x) = sum(weights * x) for this micro-batch (agg_loss is linear)."""
        cfg = self.config
        gbi = dict(dp_size=data["dp_size"], batch_num_tokens=data["batch_num_tokens"],
                   global_batch_size=data["global_batch_size"], loss_scale_factor=cfg.loss_scale_factor)
        with torch.enable_grad():
            x = torch.zeros(mask_BR.shape, dtype=torch.float64, device=mask_BR.device, requires_grad=True)
            (weights,) = torch.autograd.grad(agg_loss(x, mask_BR, cfg.loss_agg_mode, **gbi), x)
        return weights.float()

    def _fused_loss(self, hidden_NH, weight, targets_N, temperature, data, mask_BR, calc_entropy, scale_N, kl):
        cfg = self.config
        fields = data.select(*[k for k in ("old_log_probs", "advantages", "rollout_is_weights") if k in data])
        fields = fields.to_padded_tensor()
        agg_BR = self._agg_weights(data, mask_BR)
        pg_BR = agg_BR * fields["rollout_is_weights"].float() if "rollout_is_weights" in fields else agg_BR
        pg_N = pg_BR[mask_BR]
        if scale_N is not None:
            pg_N = pg_N * scale_N
        entropy_N = -cfg.entropy_coeff * agg_BR[mask_BR] if calc_entropy else None
        low = cfg.clip_ratio_low if cfg.clip_ratio_low is not None else cfg.clip_ratio
        high = cfg.clip_ratio_high if cfg.clip_ratio_high is not None else cfg.clip_ratio
        out = tk.trace_loss(hidden_NH, weight, targets_N, fields["advantages"][mask_BR].float(), pg_weight=pg_N,
                            old_logprobs=fields["old_log_probs"][mask_BR].float(), clip_low=low, clip_high=high,
                            dual_clip=cfg.get("clip_ratio_c", 3.0), temperature=temperature,
                            entropy_weight=entropy_N, impl=self.impl, **kl)
        return out.loss, out

    def _prepass_loss(self, hidden_NH, weight, targets_N, temperature, verl_data, rows_N, calc_entropy, kl):
        with torch.no_grad():
            logp0_N, entropy0_N = tk.token_logprobs(hidden_NH, weight, targets_N, temperature, return_entropy=True,
                                                    impl=self.impl)
        total = verl_data["input_ids"].values().numel()
        leaves = {}
        with torch.enable_grad():
            logp_T = logp0_N.new_zeros(total).index_put((rows_N,), logp0_N).requires_grad_(True)
            leaves["log_probs"] = logp_T
            if calc_entropy:
                leaves["entropy"] = entropy0_N.new_zeros(total).index_put((rows_N,), entropy0_N).requires_grad_(True)
            value, _ = ppo_loss(self.config, dict(leaves), verl_data)
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        dlogp_N = grads[0][rows_N] if grads[0] is not None else torch.zeros_like(logp0_N)
        dentropy_N = grads[1][rows_N] if calc_entropy and grads[1] is not None else None
        out = tk.trace_loss(hidden_NH, weight, targets_N, -dlogp_N, pg_weight=torch.ones_like(dlogp_N),
                            temperature=temperature, entropy_weight=dentropy_N, impl=self.impl, **kl)
        # trace_loss on-policy is sum(dlogp) + sum(dH * H) + KL in value: swap the first two for verl's value.
        constant = value.detach() - dlogp_N.sum()
        if dentropy_N is not None:
            constant = constant - (dentropy_N * out.entropy).sum()
        return out.loss + constant, out

    # ------------------------------------------------------------------------------------------------ teacher
    def _teacher(self, handoff, data, mask_BR):
        """(lambda, Routing or None, teacher hidden states [M, H] or None). While lambda > 0 every micro-batch runs
        exactly one teacher forward (a 2-token dummy where no rollout has spans), so that FSDP ranks issue the
        same collectives."""
        if "trace_lambda" not in data or "trace_span" not in data:
            return 0.0, None, None
        lam_B = data["trace_lambda"].float()
        lam = float(lam_B.max()) if lam_B.numel() else 0.0
        if lam_B.numel() and float(lam_B.min()) != lam:
            raise ValueError("trace_lambda differs within a micro-batch: it is one value per step")
        if lam <= 0:
            return 0.0, None, None
        span_BR = _padded(data["trace_span"])[:, :mask_BR.shape[1]].to(mask_BR.device) * mask_BR
        lengths, correct, key_spans, error_spans = [], [], [], []
        for b in range(mask_BR.shape[0]):
            kinds = span_BR[b][mask_BR[b]]
            fwd, rev = kinds == FORWARD, kinds == REVERSE
            if bool(fwd.any()) and bool(rev.any()):
                raise ValueError(f"trace_span: rollout {b} has both forward and reverse span tokens")
            lengths.append(int(mask_BR[b].sum()))
            correct.append(not bool(rev.any()))
            key_spans.append(_runs(fwd))
            error_spans.append(_runs(rev))
        global_b = data["global_batch_size"]
        if global_b is None:
            if data["dp_size"] > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            global_b = sum(1 for n in lengths if n > 0)
        routing = route(lengths, correct, key_spans, error_spans, algorithm="trace", lam=lam, w0=self.w0,
                        forward_kl=True, reverse_kl=True, aggregation="seq-mean-token-mean",
                        global_responses=int(global_b))
        hidden = self._teacher_forward(handoff, data, mask_BR, routing)
        return lam, routing, hidden if routing.has_kl else None

    @staticmethod
    def _teacher_forward(handoff, data, mask_BR, routing) -> torch.Tensor:
        """Teacher hidden states of the KL rows, in routing.kl_index_M's order: the model on each span rollout's
        privileged prompt followed by its response tokens, packed like the student's forward."""
        device = handoff.hidden.device
        prompts_BP = _padded(data["trace_teacher_input_ids"]).to(device)
        prompt_mask_BP = _padded(data["trace_teacher_attention_mask"]).to(device).bool()
        responses_BR = _padded(data["responses"]).to(device)
        attention = _padded(data["attention_mask"])
        response_lens = attention[:, _padded(data["prompts"]).shape[1]:].sum(-1).tolist() \
            if not data["prompts"].is_nested else data["responses"].offsets().diff().tolist()
        valid_offsets = [0]
        for n in mask_BR.sum(-1).tolist():
            valid_offsets.append(valid_offsets[-1] + n)
        kl_index = routing.kl_index_M.tolist()
        sequences, row_in_sequence = [], []  # per KL row (kl_index order): (sequence, row predicting its token)
        for b in routing.teacher_responses:
            prompt = prompts_BP[b][prompt_mask_BP[b]]
            if prompt.numel() == 0:
                raise ValueError(f"trace_teacher_input_ids: rollout {b} has spans but an empty privileged prompt")
            positions = mask_BR[b].nonzero().squeeze(1).tolist()  # response position of each valid token
            for r in kl_index:
                if valid_offsets[b] <= r < valid_offsets[b + 1]:
                    row_in_sequence.append((len(sequences), prompt.numel() - 1 + positions[r - valid_offsets[b]]))
            sequences.append(torch.cat([prompt, responses_BR[b, :response_lens[b]]]))
        if not sequences:  # no span rollout here: a dummy forward keeps the ranks' collectives in step
            sequences.append(data["input_ids"].values()[:2].to(device))
        if handoff.packed:
            ids = torch.cat(sequences)[None, :]
            pos = torch.cat([torch.arange(s.numel(), device=device) for s in sequences])[None, :]
            hidden = _hooks.teacher_hidden_states(handoff.model, input_ids=ids, attention_mask=None, position_ids=pos)
            starts = [0]
            for s in sequences[:-1]:
                starts.append(starts[-1] + s.numel())
            flat = hidden[0]
        else:
            width = max(s.numel() for s in sequences)
            ids = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
            att = torch.zeros_like(ids)
            for i, s in enumerate(sequences):
                ids[i, :s.numel()], att[i, :s.numel()] = s, 1
            pos = torch.arange(width, device=device)[None, :].expand_as(ids) * att
            hidden = _hooks.teacher_hidden_states(handoff.model, input_ids=ids, attention_mask=att, position_ids=pos)
            starts = [i * width for i in range(len(sequences))]
            flat = hidden.reshape(-1, hidden.shape[-1])
        rows = [starts[seq] + row for seq, row in row_in_sequence]
        return flat[torch.tensor(rows, dtype=torch.long, device=device)]

    # ------------------------------------------------------------------------------------------------ metrics
    def _metrics(self, out, verl_data, rows_N, calc_entropy, lam, routing):
        total = verl_data["input_ids"].values().numel()
        detached = {"log_probs": out.logprobs.new_zeros(total).index_put((rows_N,), out.logprobs)}
        if calc_entropy:
            detached["entropy"] = out.entropy.new_zeros(total).index_put((rows_N,), out.entropy)
        with torch.no_grad():
            _, metrics = ppo_loss(self.config, detached, verl_data)
        metrics["trace/lambda"] = lam
        n_kl = 0 if routing is None else int(routing.kl_index_M.numel())
        metrics["trace/span_tokens"] = n_kl
        for name, weights in (("fkl", None if routing is None else routing.fkl_weight_M),
                              ("rkl", None if routing is None else routing.rkl_weight_M)):
            values = getattr(out, name)
            if values is None or weights is None or not bool((weights > 0).any()):
                metrics[f"trace/{name}"] = 0.0
            else:
                metrics[f"trace/{name}"] = float(values[weights.to(values.device) > 0].mean())
        return metrics
