"""The training loop, top to bottom: prompts -> rollouts -> rewards -> group advantages -> spans (while
lambda > 0) -> routing -> micro-batches (teacher + trace_loss, backward) -> optimizer -> metrics, checkpoint.

    python -m trace_train --config toy [section.key=value ...]        # a shipped config by name, or a path
    torchrun --nproc_per_node=K -m trace_train --config CONFIG.toml [section.key=value ...]

Every step's problems and every rollout's sampling noise are functions of (seed, step, rollout index), so
a run resumed from a checkpoint continues exactly as the uninterrupted one, and K ranks sample what one
process samples. Rank r owns prompts [r P/K, (r+1) P/K) of each step.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from . import faults, metrics
from .annotate import ApiAnnotator, Job, RuleAnnotator, SelfAnnotator
from .checkpoint import append_metrics, drop_metrics_from, export_hf, load_checkpoint, save_checkpoint, sync_snapshot
from .config import Config, config_text, load_config, save_config
from .dist import Dist, init_distributed, set_gradient_sync, shard, shutdown
from .eval import PAPER_SAMPLING, evaluate
from .faults import crash_if
from .mismatch import Correction, importance_weights
from .model import char_to_token_spans, load_policy, load_sharded_weights, token_char_offsets
from .optim import build_optimizer
from .policy import Policy
from .report import Reporters
from .rollout import Rollouts, Sampling, make_engine
from .routing import Routing, cap_spans, group_advantages, lambda_at, route
from .step import batch_logprobs, batch_loss, pack
from .tasks import DataError, MathTask, make_task

log = logging.getLogger(__name__)

# Annotated steps in a row on which every annotation job failed before each further one warns that the
# run is, in effect, training plain GRPO (no spans, no KL).
ALL_FAILED_WARN_STEPS = 3


def rollout_seed(seed: int, step: int, index: int, stream: int = 0) -> int:
    """The sampling seed of global rollout `index` at `step` (stream 1: self-annotation generations)."""
    return ((seed * 1_000_003 + step) * 4 + stream) * 1_000_003 + index


def build_policy(cfg: Config, d: Dist, weights_from=None):
    """(policy, tokenizer), sharded by FSDP2 and in training mode. From a local folder the model is built on
    the meta device, sharded, and each rank reads only its shards from the files (no rank holds the full
    weights); weights_from: a policy of the same config to copy the shards from instead (the teacher
    snapshot: the files are not read twice). The tiny in-process model is built whole, then sharded."""
    meta = bool(cfg.model.path)
    model, tok = load_policy(cfg.model, seed=cfg.train.seed, meta=meta)
    policy = shard(Policy(model), d, cfg.model.compute_dtype, cfg.model.activation_checkpointing)
    if weights_from is not None:
        sync_snapshot(policy, weights_from)
    elif meta:
        load_sharded_weights(policy.lm, cfg.model.path)
    return policy, tok


def run(cfg: Config) -> list[dict]:
    """Train; returns the metrics of the steps run (rank 0 also appends them to <output_dir>/metrics.jsonl)."""
    d = init_distributed()
    trainer = None
    try:
        trainer = Trainer(cfg, d)
        return trainer.train()
    finally:
        close = getattr(getattr(trainer, "engine", None), "close", None)
        if close is not None:
            close()  # before the process group goes: vLLM's shutdown needs it
        shutdown()


@dataclass
class StepRollouts:
    """One step's rollouts on this rank, with rewards, advantages and (while lambda > 0) spans."""

    ro: Rollouts
    owners: list  # the example of each rollout
    rewards: torch.Tensor  # [R]
    advantages: torch.Tensor  # [R]
    lens: list[int]
    n_global: float  # response tokens over all ranks
    b_global: float  # responses over all ranks
    lam: float = 0.0
    key: list = field(default_factory=list)
    err: list = field(default_factory=list)
    diagnostics: list = field(default_factory=list)
    failures: dict = field(default_factory=dict)
    annotating: bool = False
    texts: list = field(default_factory=list)  # the decoded responses
    first: int = 0  # the global index of this rank's first rollout


class Trainer:
    """The run, split the way torchtitan splits its trainer: `train` (the step loop: snapshot sync,
    metrics, checkpoints), `train_step` (rollouts -> spans -> micro-batches -> optimizer step) and
    `micro_batch` (one forward + backward); the step's sums and metrics are made in trace_train.metrics, called
    from one line in each (the bookkeeping does not interleave the forward, backward and optimizer step)."""

    def __init__(self, cfg: Config, d: Dist):
        t, tc = cfg.train, cfg.trace
        cfg.check_runnable()
        faults.check()
        if t.prompts_per_step % d.world:
            raise ValueError(f"train.prompts_per_step ({t.prompts_per_step}) must be a multiple of the world "
                             f"size ({d.world}): each rank owns whole prompt groups")
        self.cfg, self.d = cfg, d
        self.metrics_path = os.path.join(t.output_dir, "metrics.jsonl")
        if d.main:
            os.makedirs(t.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(t.output_dir, "config.toml"))
        # the data first: a file that cannot be used is a DataError before the model loads
        self.task = make_task(cfg.data)
        self.eval_task = MathTask(cfg.data.eval_files) if cfg.data.eval_files else None
        torch.manual_seed(t.seed)
        self.policy, self.tok = build_policy(cfg, d)
        self.attn_implementation = self.policy.lm.config._attn_implementation  # the kernel transformers runs
        if d.main:  # the run's config, with the kernel auto chose
            save_config(cfg, os.path.join(t.output_dir, "config.toml"),
                        resolved={"model.attn_implementation": self.attn_implementation})
        for task in (self.task, self.eval_task):
            if task is not None:
                task.tokenizer = self.tok  # prompts through the model's chat template
        self.snapshot = None
        if tc.teacher == "snapshot" and t.algorithm != "grpo":
            self.snapshot, _ = build_policy(cfg, d, weights_from=self.policy)
            self.snapshot.requires_grad_(False)
            self.snapshot.eval()  # a frozen teacher: no checkpointing (HF applies it in training mode only)
        self.reference = None  # loss.beta > 0: the frozen initial policy of the k3 penalty (rebuilt on resume)
        if cfg.loss.beta > 0:
            self.reference, _ = build_policy(cfg, d, weights_from=self.policy)
            self.reference.requires_grad_(False)
            self.reference.eval()
        self.opt, self.sched = build_optimizer(self.policy.parameters(), t)
        self.engine = make_engine(t.engine, self.policy, self.tok, Sampling(t.max_new_tokens, t.temperature),
                                  synced=d.world > 1, model_path=cfg.model.path,
                                  dtype=cfg.model.compute_dtype or cfg.model.dtype,
                                  vllm_options=dict(gpu_memory_utilization=t.vllm_gpu_memory_utilization,
                                                    kv_cache_gib=t.vllm_kv_cache_gib,
                                                    max_model_len=t.vllm_max_model_len))
        self.annotator = (make_annotator(cfg, self.task, self.engine, self.tok)
                          if t.algorithm == "trace" or tc.measure_spans else None)
        self.start = (load_checkpoint(self.policy, self.opt, self.snapshot, t.output_dir, self.sched)
                      if t.resume else 0)
        if d.main:
            drop_metrics_from(self.metrics_path, self.start)
        self.reporters = Reporters(cfg, d.main, self.start, config_text(
            cfg, resolved={"model.attn_implementation": self.attn_implementation}))
        self.all_failed_streak = 0

    def train(self) -> list[dict]:
        """The step loop; returns the metrics of the steps run."""
        from tqdm import tqdm

        t, d = self.cfg.train, self.d
        history = []
        bar = tqdm(total=t.max_steps, initial=self.start, disable=not d.main, desc=t.algorithm, dynamic_ncols=True)
        try:
            for step in range(self.start, t.max_steps):
                if self.snapshot is not None and step % self.cfg.trace.snapshot_every == 0:
                    sync_snapshot(self.snapshot, self.policy)
                row = self.train_step(step)
                if self.eval_task is not None and (step + 1 == t.max_steps
                                                   or (t.eval_every and (step + 1) % t.eval_every == 0)):
                    row.update(self.evaluate())
                history.append(row)
                if d.main:
                    append_metrics(self.metrics_path, row)
                    self.reporters.log(row)
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward']:.3f}", lam=f"{row['lambda']:.2f}",
                                len=f"{row['response_length']:.0f}", ent=f"{row['entropy']:.2f}")
                if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.max_steps:
                    save_checkpoint(self.policy, self.opt, self.snapshot, t.output_dir, step + 1, d, self.sched,
                                    keep=t.keep_checkpoints)
        finally:
            bar.close()
            self.reporters.close()
        if t.export_hf and self.start < t.max_steps:
            export_hf(self.policy, self.tok, os.path.join(t.output_dir, "hf"), d)
        return history

    def evaluate(self) -> dict:
        """avg@k / pass@k of the current policy on data.eval_files (the paper's sampling, the run's engine and
        max_new_tokens; seeded by train.seed, so a rerun step scores the same), as eval_* metrics."""
        t = self.cfg.train
        examples = self.eval_task.items[: t.eval_problems or None]
        saved = self.engine.sampling
        self.engine.sampling = Sampling(t.max_new_tokens, PAPER_SAMPLING.temperature, PAPER_SAMPLING.top_k,
                                        PAPER_SAMPLING.top_p)
        try:
            scores = evaluate(self.engine, self.tok, self.eval_task, examples, t.eval_k, seed=t.seed, d=self.d,
                              synced=self.d.world > 1)
        finally:
            self.engine.sampling = saved
        return {f"eval_{k}": v for k, v in scores.items()}

    def rollouts(self, step: int) -> StepRollouts:
        """This rank's prompts, rollouts, rewards and group advantages, and the step's lambda."""
        t, lc, tc, d, tok, task = self.cfg.train, self.cfg.loss, self.cfg.trace, self.d, self.tok, self.task
        local_p, k = t.prompts_per_step // d.world, t.rollouts_per_prompt
        examples = task.examples(t.seed, step, t.prompts_per_step, d.rank * local_p, (d.rank + 1) * local_p)
        prompts = [tok(task.student_text(ex), add_special_tokens=False)["input_ids"] for ex in examples]
        first = d.rank * local_p * k
        ro = self.engine.generate(prompts, k, [rollout_seed(t.seed, step, first + i) for i in range(local_p * k)])
        crash_if("rollout", step)
        owners = [examples[i // k] for i in range(len(ro.responses))]
        texts = [tok.decode(r, skip_special_tokens=True) for r in ro.responses]
        rewards = torch.tensor([task.reward(x, ex) for x, ex in zip(texts, owners)], dtype=torch.float32)
        advantages = group_advantages(rewards.view(local_p, k), lc.advantage_norm).reshape(-1)
        lens = [len(r) for r in ro.responses]
        n_global, b_global = d.all_sum([sum(lens), len(lens)])
        lam = 0.0 if t.algorithm == "grpo" else lambda_at(step, tc.w0, tc.hold_steps, tc.decay_steps)
        return StepRollouts(ro, owners, rewards, advantages, lens, n_global, b_global, lam, key=[[] for _ in lens],
                            err=[[] for _ in lens], diagnostics=[None] * len(lens), texts=texts, first=first)

    def annotate(self, step: int, s: StepRollouts) -> None:
        """Spans, only for TRACE and only while lambda > 0 (the annotator is not called afterwards). With
        trace.measure_spans, grpo and opd_all runs are annotated on the steps where TRACE's lambda would be > 0,
        for the lift metric only: their spans route nothing and their diagnostics reach no teacher prompt."""
        t, tc, tok = self.cfg.train, self.cfg.trace, self.tok
        s.annotating = s.lam > 0 and t.algorithm == "trace"
        measuring = (tc.measure_spans and t.algorithm != "trace"
                     and lambda_at(step, tc.w0, tc.hold_steps, tc.decay_steps) > 0)
        if not (s.annotating or measuring):
            return
        jobs = [Job(ex.problem, x, bool(r)) for x, ex, r in zip(s.texts, s.owners, s.rewards.tolist())]
        seeds = [rollout_seed(t.seed, step, s.first + i, stream=1) for i in range(len(jobs))]
        # Every failure is caught per job inside the annotator; what follows runs on validated spans,
        # so an exception in it is a bug of ours and stops the run.
        annotations, s.failures = self.annotator(jobs, s.owners, seeds)
        for i, a in enumerate(annotations):
            if a is None:
                continue
            offsets = token_char_offsets(tok, s.ro.responses[i])
            s.key[i] = cap_spans(char_to_token_spans(a.key_spans, offsets), s.lens[i], tc.span_cap)
            s.err[i] = cap_spans(char_to_token_spans(a.error_spans, offsets), s.lens[i], tc.span_cap)
            if s.annotating:
                s.diagnostics[i] = a.diagnostic

    def train_step(self, step: int) -> dict:
        """One rollout batch: rollouts, spans, then train.epochs passes over train.mini_batches disjoint shares of
        the rollouts, one optimizer update per share (every micro-batch's forward and backward, gradients reduced
        once, on the last; clipping, AdamW, the schedule); returns the step's metrics. With more than one update
        the log-probs of the weights before the first update are computed first, without gradient: the old
        log-probs of GRPO's ratio (the default single update is on-policy and adds no forward)."""
        t = self.cfg.train
        t0 = time.perf_counter()
        s = self.rollouts(step)
        t_rollout = time.perf_counter() - t0
        self.annotate(step, s)
        t_annotate = time.perf_counter() - t0 - t_rollout

        teacher_prompts = self.teacher_prompts(s)
        sums = metrics.new_sums()
        self.policy.train()  # rollouts may have left it in eval mode; checkpointing needs training mode
        shares = self.mini_batches(s)
        updates = [(epoch, share) for epoch in range(t.epochs) for share in shares]
        # The log-probs before the update(s), per rollout: GRPO's old log-probs (recomputed when several updates
        # follow) or the single update's own forward (on-policy); the lift and mismatch metrics start from them.
        old = self.old_logprobs(s, sums) if len(updates) > 1 else None
        before = old if old is not None else [None] * len(s.lens)
        n_micro, grad_norms = 0, []
        for epoch, share in updates:
            groups = self.micro_batches_of(s, share, teacher_prompts)
            counts = self.d.all_sum([sum(s.lens[i] for i in share), len(share)])
            for g, idx in enumerate(groups):
                # Gradients are reduced across ranks on the last micro-batch only (accumulated unsharded before).
                if t.grad_sync == "step":
                    set_gradient_sync(self.policy, g == len(groups) - 1)
                lp = self.micro_batch(s, idx, teacher_prompts, sums, old, counts, first_epoch=epoch == 0)
                if old is None and lp is not None:
                    for i, x in zip(idx, lp.split([s.lens[i] for i in idx])):
                        before[i] = x
                crash_if("backward", step)
            n_micro += len(groups)
            grad_norm, lr = self.optimizer_step()
            grad_norms.append(grad_norm)
        if t.lift_metric:
            self.lift(s, before, sums)
        metrics.add_rollouts(sums, s.rewards, s.ro.finished, s.key, s.err, s.failures)
        return self.step_metrics(step, s, sums, grad_norms, lr, n_micro, len(updates),
                                 dict(time_rollout_s=t_rollout, time_annotate_s=t_annotate,
                                      time_train_s=time.perf_counter() - t0 - t_rollout - t_annotate))

    def teacher_prompts(self, s: StepRollouts) -> list[list[int]]:
        """Each rollout's privileged prompt (problem, reference solution, the annotator's diagnostic) while
        lambda > 0; empty prompts otherwise (no teacher forward)."""
        if s.lam <= 0:
            return [[] for _ in s.lens]
        return [self.tok(self.task.teacher_text(ex, dg), add_special_tokens=False)["input_ids"]
                for ex, dg in zip(s.owners, s.diagnostics)]

    def mini_batches(self, s: StepRollouts) -> list[list[int]]:
        """This rank's rollouts of each of the train.mini_batches shares: global rollout g goes to share
        g % mini_batches, so a share holds the same rollouts whatever the world size (K ranks = 1 process)."""
        m = self.cfg.train.mini_batches
        return [[i for i in range(len(s.lens)) if (s.first + i) % m == j] for j in range(m)]

    def micro_batches_of(self, s: StepRollouts, share: list[int], teacher_prompts: list[list[int]]
                         ) -> list[list[int]]:
        """The rollouts of each micro-batch of `share`, packed by train.micro_batch_tokens (student and teacher
        tokens). Every rank runs as many micro-batches as the rank with the most (the extra ones empty: a
        zero-weight dummy), so that FSDP's collectives line up."""
        sizes = [len(s.ro.prompts[i]) + s.lens[i] + (len(teacher_prompts[i]) + s.lens[i] if teacher_prompts[i] else 0)
                 for i in share]
        groups = [[share[j] for j in g] for g in pack(sizes, self.cfg.train.micro_batch_tokens)]
        n_micro = int(self.d.all_max([len(groups)])[0])
        return groups + [[] for _ in range(n_micro - len(groups))]

    def old_logprobs(self, s: StepRollouts, sums: dict) -> list[torch.Tensor]:
        """[n_i] per rollout: the response tokens' log-probs under the weights before the step's first update, no
        gradient, in micro-batches of every rollout (dummies where a rank has fewer); adds the sampler / trainer
        mismatch of these log-probs, once per rollout."""
        t, pad = self.cfg.train, self.tok.pad_token_id
        old = [None] * len(s.lens)
        for idx in self.micro_batches_of(s, list(range(len(s.lens))), [[] for _ in s.lens]):
            lp = batch_logprobs(self.policy, pad, [s.ro.prompts[i] for i in idx], [s.ro.responses[i] for i in idx],
                                temperature=t.temperature, packing=t.packing, packing_row_tokens=t.packing_row_tokens)
            if idx:
                for i, x in zip(idx, lp.split([s.lens[i] for i in idx])):
                    old[i] = x.detach()
                metrics.add_mismatch(sums, torch.cat([s.ro.logprobs[i] for i in idx]), lp, [s.lens[i] for i in idx],
                                     self.is_weights(s, idx, lp))
        return old

    def is_weights(self, s: StepRollouts, idx: list[int], trainer_lp_N: torch.Tensor) -> torch.Tensor | None:
        """[N] the importance weights of the GRPO term for the sampler / trainer mismatch (loss.is_correction),
        from the trainer's log-probs before the update; None without a correction."""
        lc = self.cfg.loss
        if lc.is_correction == "none":
            return None
        return importance_weights(torch.cat([s.ro.logprobs[i] for i in idx]), trainer_lp_N, [s.lens[i] for i in idx],
                                  lc.is_correction, clip_min=lc.is_clip_min or None, clip_max=lc.is_clip_max or None)

    def micro_batch(self, s: StepRollouts, idx: list[int], teacher_prompts: list, sums: dict, old: list | None,
                    counts: list[float], first_epoch: bool = True) -> torch.Tensor | None:
        """Forward and backward of the rollouts `idx` (empty: a one-token, zero-weight dummy, for a rank with
        fewer micro-batches than another); adds this micro-batch's sums. old: the old log-probs per rollout
        (None: on-policy); counts: the global (tokens, responses) of the update's share, the loss's normalisers.
        Returns the response tokens' log-probs [N] of this forward (None for a dummy)."""
        t, lc, tc, d = self.cfg.train, self.cfg.loss, self.cfg.trace, self.d
        routing = route([s.lens[i] for i in idx], [bool(s.rewards[i]) for i in idx], [s.key[i] for i in idx],
                        [s.err[i] for i in idx], algorithm=t.algorithm, lam=s.lam, w0=tc.w0,
                        forward_kl=tc.forward_kl, reverse_kl=tc.reverse_kl,
                        opd_all_direction=tc.opd_all_direction, aggregation=lc.aggregation,
                        global_responses=int(counts[1]), global_tokens=int(counts[0]))
        # The teacher runs on every rank whenever any rank distills, so that FSDP's collectives line up.
        needed = d.all_max([float(routing.has_kl)])[0] > 0
        common = dict(snapshot=self.snapshot, teacher_needed=needed, temperature=t.temperature, packing=t.packing,
                      packing_row_tokens=t.packing_row_tokens)
        pad = self.tok.pad_token_id
        prompts, responses = ([s.ro.prompts[i] for i in idx], [s.ro.responses[i] for i in idx]) if idx else ([], [])
        lens = [s.lens[i] for i in idx]
        # The reference policy's log-probs (loss.beta > 0), in the same layout, on every rank (dummies too)
        ref_lp = (batch_logprobs(self.reference, pad, prompts, responses, temperature=t.temperature,
                                 packing=t.packing, packing_row_tokens=t.packing_row_tokens)
                  if self.reference is not None else None)
        old_lp = torch.cat([old[i] for i in idx]) if idx and old is not None else None
        # The mismatch's importance weights of the GRPO term: from the old log-probs when they were recomputed,
        # else from the loss forward's own (one no-grad sweep inside it: trace_train.mismatch.Correction).
        correction = weights = None
        if idx and lc.is_correction != "none":
            if old_lp is not None:
                weights = self.is_weights(s, idx, old_lp)
            else:
                correction = Correction(torch.cat([s.ro.logprobs[i] for i in idx]), lens, lc.is_correction,
                                        clip_min=lc.is_clip_min or None, clip_max=lc.is_clip_max or None)
        # An MoE model's router aux loss: this micro-batch's share of the update's (response tokens)
        share = sum(lens) / max(counts[0], 1)
        if idx:
            out = batch_loss(self.policy, pad, prompts, responses, s.advantages[idx], routing, lc,
                             teacher_prompts=[teacher_prompts[i] for i in idx], ref_logprobs=ref_lp,
                             old_logprobs=old_lp, advantage_weights=correction, token_weights_N=weights,
                             router_aux_weight=share, **common)
        else:
            routing = Routing(torch.zeros(1), torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0), [])
            out = batch_loss(self.policy, pad, [[pad]], [[pad]], torch.zeros(1), routing, lc, ref_logprobs=ref_lp,
                             router_aux_weight=0.0, **common)
        if self.snapshot is not None:  # a root FSDP module keeps its gathered parameters after a forward
            self.snapshot.reshard()
        # Each rank's loss is its share of one global loss: gradients are summed over ranks (FSDP's divide
        # factor is 1; loss_scale is the world size only where that cannot be set).
        (out.loss * self.policy.loss_scale).backward()
        if self.policy.router_aux is not None:
            sums["router_aux_loss"] = sums.get("router_aux_loss", 0.0) + share * self.policy.last_router_aux.item()
        if not idx:
            metrics.add_loss(sums, out)
            return None
        if correction is not None:
            weights = correction.weights_N
        adv_N = torch.repeat_interleave(s.advantages[idx].float(), torch.tensor(lens))
        if weights is not None:
            adv_N = adv_N * weights.cpu()
        metrics.add_micro_batch(sums, out, routing, adv_N, old_lp, lc, ref_lp, first_epoch=first_epoch)
        if old is None:  # on-policy: this forward's log-probs are the trainer's before the update
            metrics.add_mismatch(sums, torch.cat([s.ro.logprobs[i] for i in idx]), out.logprobs, lens, weights)
        return out.logprobs.detach()

    def optimizer_step(self) -> tuple[float, float]:
        """Gradient clipping, AdamW and the schedule; returns (gradient norm before clipping, learning rate)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.train.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)  # now, not before the next backward: no gradients during rollouts
        return grad_norm.item(), lr

    def lift(self, s: StepRollouts, before: list, sums: dict) -> None:
        """The lift metric: after the step's last update, one no-grad forward of every rollout (in micro-batches,
        dummies included, so that FSDP's collectives line up across ranks) and the change of each response
        token's log-prob across the step's updates (`before`: per rollout, under the weights before the first),
        summed over the span rows TRACE distills (forward KL: key spans of correct rollouts; reverse KL: error
        spans of incorrect ones, as the run's trace.forward_kl / trace.reverse_kl select them) and over all
        response tokens. For TRACE these are exactly the distilled rows; grpo and opd_all runs have span rows only
        with trace.measure_spans."""
        t, tc = self.cfg.train, self.cfg.trace
        pad = self.tok.pad_token_id
        for idx in self.micro_batches_of(s, list(range(len(s.lens))), [[] for _ in s.lens]):
            lp_after = batch_logprobs(self.policy, pad, [s.ro.prompts[i] for i in idx],
                                      [s.ro.responses[i] for i in idx], temperature=t.temperature,
                                      packing=t.packing, packing_row_tokens=t.packing_row_tokens)
            if not idx:
                continue
            lp_before = torch.cat([before[i] for i in idx]).to(lp_after.device)
            spans = route([s.lens[i] for i in idx], [bool(s.rewards[i]) for i in idx], [s.key[i] for i in idx],
                          [s.err[i] for i in idx], algorithm="trace", lam=tc.w0, w0=tc.w0,
                          forward_kl=tc.forward_kl, reverse_kl=tc.reverse_kl)
            metrics.add_lift(sums, (lp_after - lp_before).double().cpu(), spans)

    def step_metrics(self, step: int, s: StepRollouts, sums: dict, grad_norms: list[float], lr: float, n_micro: int,
                     n_updates: int, times: dict) -> dict:
        """The step's metrics from every rank's sums and maxima (two all-reduces, the same on every rank)."""
        t, d = self.cfg.train, self.d
        tot = dict(zip(metrics.SUM_KEYS, d.all_sum([sums[k] for k in metrics.SUM_KEYS])))
        tot.update(zip(metrics.MAX_KEYS, d.all_max([sums[k] for k in metrics.MAX_KEYS])))
        out = metrics.summarize(tot, responses=s.b_global, tokens=s.n_global, updates=n_updates,
                                epochs=t.epochs, lift_metric=t.lift_metric,
                                corrected=self.cfg.loss.is_correction != "none", reference=self.reference is not None)
        if s.annotating:
            self.all_failed_streak = self.all_failed_streak + 1 if out["annotator_failures"] == s.b_global else 0
            if self.all_failed_streak >= ALL_FAILED_WARN_STEPS and d.main:
                log.warning("!!! step %d: every annotation job failed on %d annotated steps in a row: no spans, no "
                            "KL, so this TRACE run is training as plain GRPO. Check the annotator "
                            "(annotator_failures/* in %s, the lines above).", step, self.all_failed_streak,
                            self.metrics_path)
        if self.policy.router_aux is not None:  # the token-weighted mean over the step's updates, unweighted by coef
            out["router_aux_loss"] = d.all_sum([sums.get("router_aux_loss", 0.0)])[0] / n_updates
        return {"step": step, "algorithm": t.algorithm, "attn_implementation": self.attn_implementation,
                "lambda": s.lam, **out,
                "annotator_all_failed_streak": self.all_failed_streak if s.annotating else 0,
                # the mean over the step's optimizer updates (each clipped at train.grad_clip)
                "grad_norm": sum(grad_norms) / len(grad_norms), "grad_norm_max": max(grad_norms),
                "lr": lr, "optimizer_updates": n_updates, "micro_batches": n_micro, **times}


def make_annotator(cfg: Config, task, engine, tok):
    """annotator(jobs, examples, seeds) -> (annotations, failures by kind); seeds drive self-annotation."""
    tc = cfg.trace
    if tc.annotator == "rule":
        return RuleAnnotator(task)
    if tc.annotator == "api":
        return ApiAnnotator(task, tc.api_base_url, tc.api_model, os.environ.get(tc.api_key_env, ""),
                            tc.api_timeout_s, tc.api_retries, deadline=tc.api_deadline_s,
                            max_reply_bytes=tc.api_max_reply_bytes)
    return SelfAnnotator(task, engine, tok, task.chat)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trace_train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="a TOML file, or a shipped config by name (toy, demo, ...)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides).check_runnable()
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    return 0
