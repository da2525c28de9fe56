"""The driver's side of TRACE in verl: after rewards, before the actor update, mark spans with an annotator,
cap them, build the privileged prompts and put the TRACE fields into verl's batch (`trace_batch_fields`);
`TraceTrainerMixin` does this inside verl's `RayPPOTrainer` (`_update_actor`) and sends `TraceVerlLoss` to the
actor workers (`init_workers` -> `set_loss_fn`).

The fields (what `TraceVerlLoss` reads on the workers; verl carries every batch tensor to the actor's
micro-batches): trace_span [B, R] int8 (1: forward KL on a key span of a correct rollout, 2: reverse KL on an
error span of an incorrect one), trace_lambda [B] float32, trace_teacher_input_ids / trace_teacher_attention_mask
[B, P] int64, left-padded privileged prompts (an all-zero row where no teacher runs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..annotate import Job
from ..model import char_to_token_spans, token_char_offsets
from ..routing import cap_spans, lambda_at
from .verl_loss import FORWARD, REVERSE, TraceVerlLoss


@dataclass
class TraceVerlConfig:
    """TRACE's options in verl (the project's `[trace]` section, same names and defaults).

    w0, hold_steps, decay_steps: lambda = w0 for hold_steps optimizer steps, then linearly to 0 over decay_steps
        (then no annotator, no teacher: verl's GRPO). Steps count from 0 (verl's global_steps - 1).
    forward_kl / reverse_kl: forward KL on key spans of correct rollouts / reverse KL on error spans of incorrect ones.
    span_cap: at most this fraction of a response's tokens is marked.
    kl_term_clip, kl_clip_mode: trace_loss's KL clip (None: none).
    correct_reward: a rollout is correct when its summed token_level_scores is >= this.
    """

    w0: float = 0.5
    hold_steps: int = 10
    decay_steps: int = 30
    forward_kl: bool = True
    reverse_kl: bool = False
    span_cap: float = 0.25
    kl_term_clip: float | None = None
    kl_clip_mode: str = "value"
    correct_reward: float = 1.0

    def __post_init__(self):
        if not self.w0 > 0:
            raise ValueError(f"trace w0 must be > 0, got {self.w0}")
        if self.hold_steps < 0 or self.decay_steps < 0:
            raise ValueError("trace hold_steps and decay_steps must be >= 0")
        if not 0.0 <= self.span_cap <= 1.0:
            raise ValueError(f"trace span_cap must lie in [0, 1], got {self.span_cap}")


def _failure_count(failures) -> int:
    return int(sum(failures.values())) if isinstance(failures, Mapping) else int(failures)


def _prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a privileged prompt: a string (already in the model's prompt format) or chat messages."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, Mapping) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(x) for x in ids]


def _rows(non_tensor_batch: Mapping, b: int) -> list[dict]:
    return [{k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in non_tensor_batch.items()}
            for i in range(b)]


def trace_batch_fields(batch, *, step: int, tokenizer, annotator: Callable, privileged_prompt: Callable,
                       options: TraceVerlConfig, problem_text: Callable | None = None, seed: int = 0):
    """(fields, metrics) for verl's `DataProto` batch after rewards (responses, response_mask,
    token_level_scores in batch.batch; the dataset's columns in batch.non_tensor_batch).

    annotator(jobs, rows, seeds) -> (annotations, failures), as in trace_train.annotate (rows: the dataset rows
    of the rollouts, dicts of batch.non_tensor_batch); privileged_prompt(row, diagnostic) -> the privileged
    prompt (problem with its reference solution and, for an incorrect rollout, the coarse diagnostic type;
    never the span text) as a string in the model's prompt format or as chat messages; problem_text(row) ->
    str (default: the decoded prompt)."""
    responses = batch.batch["responses"]
    mask = batch.batch["response_mask"].bool()
    b, r = responses.shape
    lam = lambda_at(step, options.w0, options.hold_steps, options.decay_steps)
    span = torch.zeros(b, r, dtype=torch.int8)
    teacher_ids = [[] for _ in range(b)]
    failures = 0
    if lam > 0:
        rows = _rows(batch.non_tensor_batch, b)
        correct = (batch.batch["token_level_scores"].sum(-1) >= options.correct_reward).tolist()
        ids = [[int(t) for t in responses[i][mask[i]]] for i in range(b)]
        texts = [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
        if problem_text is None:
            prompts = batch.batch["prompts"]
            prompt_mask = batch.batch["attention_mask"][:, :prompts.shape[1]].bool()
            problems = [tokenizer.decode(prompts[i][prompt_mask[i]].tolist(), skip_special_tokens=True)
                        for i in range(b)]
        else:
            problems = [str(problem_text(row)) for row in rows]
        jobs = [Job(p, t, ok) for p, t, ok in zip(problems, texts, correct)]
        annotations, fails = annotator(jobs, rows, [seed + step * 1_000_003 + i for i in range(b)])
        failures = _failure_count(fails)
        for i, ann in enumerate(annotations):
            if ann is None:
                continue
            if correct[i] and options.forward_kl:
                char_spans, kind = ann.key_spans, FORWARD
            elif not correct[i] and options.reverse_kl:
                char_spans, kind = ann.error_spans, REVERSE
            else:
                continue
            token_spans = cap_spans(char_to_token_spans(char_spans, token_char_offsets(tokenizer, ids[i])),
                                    len(ids[i]), options.span_cap)
            if not token_spans:
                continue
            positions = mask[i].nonzero().squeeze(1)  # valid-token index -> response position
            for start, end in token_spans:
                span[i, positions[start:end]] = kind
            teacher_ids[i] = _prompt_ids(tokenizer, privileged_prompt(rows[i], ann.diagnostic))
    width = max(1, max(len(x) for x in teacher_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_BP = torch.full((b, width), pad, dtype=torch.long)
    att_BP = torch.zeros((b, width), dtype=torch.long)
    for i, x in enumerate(teacher_ids):
        if x:
            ids_BP[i, width - len(x):], att_BP[i, width - len(x):] = torch.tensor(x), 1
    fields = dict(trace_span=span, trace_lambda=torch.full((b,), lam, dtype=torch.float32),
                  trace_teacher_input_ids=ids_BP, trace_teacher_attention_mask=att_BP)
    marked = (span > 0) & mask
    metrics = {"trace/lambda": lam, "trace/span_fraction": float(marked.sum()) / max(1.0, float(mask.sum())),
               "trace/annotator_failures": failures, "trace/teacher_rollouts": int(marked.any(-1).sum())}
    return fields, metrics


class TraceTrainerMixin:
    """Put before verl's `RayPPOTrainer` (legacy trainer, `trainer.use_v1=false`):
    `class TraceTrainer(TraceTrainerMixin, RayPPOTrainer)`, built with verl's arguments plus
    `trace_options=TraceVerlConfig(...)`, `annotator=...`, `privileged_prompt=...` (see trace_batch_fields).

    `init_workers` then sends `TraceVerlLoss` to the actor workers (verl's `set_loss_fn`), and `_update_actor`
    adds the TRACE fields for the step to the batch and TRACE's metrics to verl's."""

    def __init__(self, *args, trace_options: TraceVerlConfig, annotator: Callable, privileged_prompt: Callable,
                 problem_text: Callable | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.trace_options, self.trace_annotator = trace_options, annotator
        self.trace_privileged_prompt, self.trace_problem_text = privileged_prompt, problem_text

    def init_workers(self):
        super().init_workers()
        from verl.utils.config import omega_conf_to_dataclass

        actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
        o = self.trace_options
        self.actor_rollout_wg.set_loss_fn(TraceVerlLoss(actor_config, w0=o.w0, kl_term_clip=o.kl_term_clip,
                                                        kl_clip_mode=o.kl_clip_mode))

    def _update_actor(self, batch):
        fields, metrics = trace_batch_fields(batch, step=self.global_steps - 1, tokenizer=self.tokenizer,
                                             annotator=self.trace_annotator,
                                             privileged_prompt=self.trace_privileged_prompt,
                                             options=self.trace_options, problem_text=self.trace_problem_text)
        batch.batch.update(fields)
        output = super()._update_actor(batch)
        output.meta_info["metrics"].update(metrics)
        return output


def install_trace_trainer(*, trace_options: TraceVerlConfig, annotator: Callable, privileged_prompt: Callable,
                          problem_text: Callable | None = None):
    """Make verl's legacy TaskRunner (`trainer.use_v1=false`) build a TRACE trainer: a module that calls this,
    named in `actor_rollout_ref.model.external_lib`, is imported in the TaskRunner before the trainer is built
    (`TaskRunner.run` reads the model config first), so `verl.trainer.main_ppo_v0.RayPPOTrainer` is then
    `TraceTrainerMixin` + verl's `RayPPOTrainer` with these options. Returns that class."""
    from verl.trainer import main_ppo_v0
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    class TraceRayPPOTrainer(TraceTrainerMixin, RayPPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, trace_options=trace_options, annotator=annotator,
                             privileged_prompt=privileged_prompt, problem_text=problem_text, **kwargs)

    main_ppo_v0.RayPPOTrainer = TraceRayPPOTrainer
    return TraceRayPPOTrainer
