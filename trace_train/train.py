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
import json
import logging
import os
import sys
import time

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .annotate import FAILURE_KINDS, ApiAnnotator, Job, RuleAnnotator, SelfAnnotator
from .config import Config, load_config, save_config
from .dist import Dist, init_distributed, shard, shutdown
from .model import char_to_token_spans, load_policy, token_char_offsets
from .policy import Policy
from .rollout import Sampling, make_engine
from .routing import Routing, cap_spans, group_advantages, lambda_at, route
from .step import batch_loss, pack
from .tasks import DataError, make_task

log = logging.getLogger(__name__)

# Annotated steps in a row on which every annotation job failed before each further one warns that the
# run is, in effect, training plain GRPO (no spans, no KL).
ALL_FAILED_WARN_STEPS = 3


def rollout_seed(seed: int, step: int, index: int, stream: int = 0) -> int:
    """The sampling seed of global rollout `index` at `step` (stream 1: self-annotation generations)."""
    return ((seed * 1_000_003 + step) * 4 + stream) * 1_000_003 + index


def build_policy(cfg: Config, d: Dist):
    model, tok = load_policy(cfg.model, seed=cfg.train.seed)
    policy = shard(Policy(model), d, cfg.model.compute_dtype, cfg.model.activation_checkpointing)
    return policy, tok


def run(cfg: Config) -> list[dict]:
    """Train; returns the metrics of the steps run (rank 0 also appends them to <output_dir>/metrics.jsonl)."""
    d = init_distributed()
    try:
        return _run(cfg, d)
    finally:
        shutdown()


def _run(cfg: Config, d: Dist) -> list[dict]:
    from tqdm import tqdm

    t, lc, tc = cfg.train, cfg.loss, cfg.trace
    if t.prompts_per_step % d.world:
        raise ValueError(f"train.prompts_per_step ({t.prompts_per_step}) must be a multiple of the world size "
                         f"({d.world}): each rank owns whole prompt groups")
    metrics_path = os.path.join(t.output_dir, "metrics.jsonl")
    if d.main:
        os.makedirs(t.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(t.output_dir, "config.toml"))
    torch.manual_seed(t.seed)
    policy, tok = build_policy(cfg, d)
    task = make_task(cfg.data, tok)
    snapshot = None
    if tc.teacher == "snapshot" and t.algorithm != "grpo":
        snapshot, _ = build_policy(cfg, d)
        snapshot.requires_grad_(False)
        sync_snapshot(snapshot, policy)
    opt = torch.optim.AdamW(policy.parameters(), lr=t.lr, weight_decay=0.0)
    engine = make_engine(t.engine, policy, tok, Sampling(t.max_new_tokens, t.temperature), synced=d.world > 1,
                         model_path=cfg.model.path, dtype=cfg.model.compute_dtype or cfg.model.dtype)
    annotator = make_annotator(cfg, task, engine, tok) if t.algorithm == "trace" else None
    start = load_checkpoint(policy, opt, snapshot, t.output_dir) if t.resume else 0
    if d.main:
        drop_metrics_from(metrics_path, start)
    local_p = t.prompts_per_step // d.world
    k = t.rollouts_per_prompt
    history = []
    all_failed_streak = 0
    bar = tqdm(total=t.max_steps, initial=start, disable=not d.main, desc=t.algorithm, dynamic_ncols=True)

    for step in range(start, t.max_steps):
        t0 = time.perf_counter()
        if snapshot is not None and step % tc.snapshot_every == 0:
            sync_snapshot(snapshot, policy)
        examples = task.examples(t.seed, step, t.prompts_per_step, d.rank * local_p, (d.rank + 1) * local_p)
        prompts = [tok(task.student_text(ex), add_special_tokens=False)["input_ids"] for ex in examples]
        first = d.rank * local_p * k
        ro = engine.generate(prompts, k, [rollout_seed(t.seed, step, first + i) for i in range(local_p * k)])
        owners = [examples[i // k] for i in range(len(ro.responses))]
        texts = [tok.decode(r, skip_special_tokens=True) for r in ro.responses]
        rewards = torch.tensor([task.reward(x, ex) for x, ex in zip(texts, owners)], dtype=torch.float32)
        advantages = group_advantages(rewards.view(local_p, k), lc.advantage_norm).reshape(-1)
        lens = [len(r) for r in ro.responses]
        n_global, b_global = d.all_sum([sum(lens), len(lens)])
        t_rollout = time.perf_counter() - t0

        # Spans, only for TRACE and only while lambda > 0 (the annotator is not called afterwards).
        lam = 0.0 if t.algorithm == "grpo" else lambda_at(step, tc.w0, tc.hold_steps, tc.decay_steps)
        key, err, diagnostics, failures = [[] for _ in lens], [[] for _ in lens], [None] * len(lens), {}
        annotating = lam > 0 and t.algorithm == "trace"
        if annotating:
            jobs = [Job(ex.problem, x, bool(r)) for x, ex, r in zip(texts, owners, rewards.tolist())]
            seeds = [rollout_seed(t.seed, step, first + i, stream=1) for i in range(len(jobs))]
            # Every failure is caught per job inside the annotator; what follows runs on validated spans,
            # so an exception in it is a bug of ours and stops the run.
            annotations, failures = annotator(jobs, owners, seeds)
            for i, a in enumerate(annotations):
                if a is None:
                    continue
                offsets = token_char_offsets(tok, ro.responses[i])
                key[i] = cap_spans(char_to_token_spans(a.key_spans, offsets), lens[i], tc.span_cap)
                err[i] = cap_spans(char_to_token_spans(a.error_spans, offsets), lens[i], tc.span_cap)
                diagnostics[i] = a.diagnostic
        t_annotate = time.perf_counter() - t0 - t_rollout

        # Micro-batches by token budget; every rank runs as many (empty ones on a dummy) and the teacher
        # whenever any rank needs it, so that FSDP's collectives line up.
        teacher_prompts = ([tok(task.teacher_text(ex, dg), add_special_tokens=False)["input_ids"]
                            for ex, dg in zip(owners, diagnostics)] if lam > 0 else [[] for _ in lens])
        sizes = [len(p) + n + (len(tp) + n if tp else 0) for p, tp, n in zip(ro.prompts, teacher_prompts, lens)]
        groups = pack(sizes, t.micro_batch_tokens)
        n_micro = int(d.all_max([len(groups)])[0])
        opt.zero_grad(set_to_none=True)
        sums = dict(dummies=float(n_micro - len(groups)), loss=0.0, entropy=0.0, fkl=0.0, fkl_n=0.0, rkl=0.0,
                    rkl_n=0.0, kl_rows=0.0, teacher=0.0, clipped=0.0)
        for g in range(n_micro):
            idx = groups[g] if g < len(groups) else []
            routing = route([lens[i] for i in idx], [bool(rewards[i]) for i in idx], [key[i] for i in idx],
                            [err[i] for i in idx], algorithm=t.algorithm, lam=lam, w0=tc.w0,
                            forward_kl=tc.forward_kl, reverse_kl=tc.reverse_kl,
                            opd_all_direction=tc.opd_all_direction, aggregation=lc.aggregation,
                            global_responses=int(b_global), global_tokens=int(n_global))
            needed = d.all_max([float(routing.has_kl)])[0] > 0
            if idx:
                out = batch_loss(policy, tok.pad_token_id, [ro.prompts[i] for i in idx],
                                 [ro.responses[i] for i in idx], advantages[idx], routing, lc,
                                 teacher_prompts=[teacher_prompts[i] for i in idx], snapshot=snapshot,
                                 teacher_needed=needed, temperature=t.temperature, packing=t.packing,
                                 packing_row_tokens=t.packing_row_tokens)
            else:  # a rank with fewer micro-batches: a one-token, zero-weight dummy
                pad = tok.pad_token_id
                dummy = Routing(torch.zeros(1), torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0), [])
                out = batch_loss(policy, pad, [[pad]], [[pad]], torch.zeros(1), dummy, lc, snapshot=snapshot,
                                 teacher_needed=needed, temperature=t.temperature, packing=t.packing,
                                 packing_row_tokens=t.packing_row_tokens)
            # Each rank's loss is its share of one global loss: gradients are summed over ranks, and
            # FSDP's reduce-scatter averages, hence the factor.
            (out.loss * d.world).backward()
            sums["loss"] += out.loss.item()
            sums["entropy"] += out.entropy.sum().item() if idx else 0.0
            if idx:
                sampler_lp = torch.cat([ro.logprobs[i] for i in idx]).to(out.logprobs.device)
                ratio = torch.exp(out.logprobs - sampler_lp)
                sums["clipped"] += ((ratio < 1 - lc.clip_low) | (ratio > 1 + lc.clip_high)).sum().item()
                for name, w in (("fkl", routing.fkl_weight_M), ("rkl", routing.rkl_weight_M)):
                    vals = getattr(out, name)
                    if vals is not None:
                        rows = (w > 0).to(vals.device)
                        sums[name] += vals[rows].sum().item()
                        sums[name + "_n"] += rows.sum().item()
                sums["kl_rows"] += routing.kl_index_M.numel()
                sums["teacher"] += len(routing.teacher_responses)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), t.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        opt.step()

        names = ["dummies", "loss", "entropy", "fkl", "fkl_n", "rkl", "rkl_n", "kl_rows", "teacher", "clipped"]
        # a fixed list of kinds: every rank runs the same collective whatever failed where
        local = [sums[n] for n in names] + [rewards.sum().item(), float(sum(ro.finished)),
                                            float(sum(1 for a in key if a) + sum(1 for a in err if a))]
        local += [float(failures.get(kind, 0)) for kind in FAILURE_KINDS]
        fail_names = [f"annotator_failures/{kind}" for kind in FAILURE_KINDS]
        tot = dict(zip(names + ["reward", "finished", "annotated"] + fail_names, d.all_sum(local)))
        n_failed = int(sum(tot[n] for n in fail_names))
        if annotating:
            all_failed_streak = all_failed_streak + 1 if n_failed == b_global else 0
            if all_failed_streak >= ALL_FAILED_WARN_STEPS and d.main:
                log.warning("!!! step %d: every annotation job failed on %d annotated steps in a row: no spans, no "
                            "KL, so this TRACE run is training as plain GRPO. Check the annotator "
                            "(annotator_failures/* in %s, the lines above).", step, all_failed_streak, metrics_path)
        metrics = {
            "step": step, "algorithm": t.algorithm, "loss": tot["loss"], "lambda": lam,
            "reward": tot["reward"] / b_global, "accuracy": tot["reward"] / b_global,
            "entropy": tot["entropy"] / n_global, "response_length": n_global / b_global,
            "truncated": 1.0 - tot["finished"] / b_global,
            "fkl": tot["fkl"] / tot["fkl_n"] if tot["fkl_n"] else None,
            "rkl": tot["rkl"] / tot["rkl_n"] if tot["rkl_n"] else None,
            "span_fraction": tot["kl_rows"] / n_global, "teacher_rollouts": int(tot["teacher"]),
            "annotated_rollouts": int(tot["annotated"]), "annotator_failures": n_failed,
            **{n: int(tot[n]) for n in fail_names},
            "annotator_all_failed_streak": all_failed_streak if annotating else 0,
            "clip_fraction": tot["clipped"] / n_global, "grad_norm": grad_norm.item(), "micro_batches": n_micro,
            "dummy_micro_batches": int(tot["dummies"]),
            "time_rollout_s": t_rollout, "time_annotate_s": t_annotate,
            "time_train_s": time.perf_counter() - t0 - t_rollout - t_annotate,
        }
        history.append(metrics)
        if d.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", lam=f"{lam:.2f}", len=f"{metrics['response_length']:.0f}",
                        ent=f"{metrics['entropy']:.2f}")
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.max_steps:
            save_checkpoint(policy, opt, snapshot, t.output_dir, step + 1, d)
    bar.close()
    if t.export_hf and start < t.max_steps:
        export_hf(policy, tok, os.path.join(t.output_dir, "hf"), d)
    return history


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


@torch.no_grad()
def sync_snapshot(snapshot, policy) -> None:
    """Copy the live weights into the frozen teacher (shard by shard under FSDP: same layout)."""
    for m in (snapshot, policy):
        if hasattr(m, "reshard"):  # FSDP keeps a root's gathered parameters after a forward; shard them back
            m.reshard()
    for s, p in zip(snapshot.parameters(), policy.parameters()):
        s.copy_(p)


def _state(policy, opt, snapshot) -> dict:
    model_sd, optim_sd = get_state_dict(policy, opt)
    state = {"model": model_sd, "optim": optim_sd}
    if snapshot is not None:
        state["snapshot"] = get_model_state_dict(snapshot)
    return state


def save_checkpoint(policy, opt, snapshot, out_dir: str, next_step: int, d: Dist) -> None:
    """DCP checkpoint of model, optimizer (and teacher snapshot), then the step marker, written last by rank 0:
    a crash mid-save leaves the previous checkpoint as the one resumed from. Data position and sampling are
    functions of the step, so the step is all the loop's state besides these."""
    path = os.path.join(out_dir, f"checkpoint-{next_step:06d}")
    dcp.save(_state(policy, opt, snapshot), checkpoint_id=path)
    d.barrier()
    if d.main:
        tmp = os.path.join(out_dir, "latest.tmp")
        with open(tmp, "w") as f:
            json.dump({"next_step": next_step, "path": path}, f)
        os.replace(tmp, os.path.join(out_dir, "latest.json"))
    d.barrier()


def load_checkpoint(policy, opt, snapshot, out_dir: str) -> int:
    """Restore the latest checkpoint; returns the step to continue from (0 when there is none)."""
    marker = os.path.join(out_dir, "latest.json")
    if not os.path.exists(marker):
        return 0
    with open(marker) as f:
        latest = json.load(f)
    state = _state(policy, opt, snapshot)
    dcp.load(state, checkpoint_id=latest["path"])
    set_state_dict(policy, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if snapshot is not None:
        set_model_state_dict(snapshot, state["snapshot"])
    return latest["next_step"]


def drop_metrics_from(path: str, step: int) -> None:
    """Keep the metrics of steps before `step` (those after the checkpoint are run again), atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] < step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def export_hf(policy, tok, path: str, d: Dist) -> None:
    """The policy as a Hugging Face folder (safetensors + config + tokenizer), loadable by from_pretrained;
    under FSDP the full state dict is gathered to rank 0 on the CPU."""
    sd = get_model_state_dict(policy.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        policy.lm.save_pretrained(path, state_dict=sd, safe_serialization=True)
        tok.save_pretrained(path)
    d.barrier()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trace_train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="a TOML file, or a shipped config by name (toy, demo, ...)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    return 0
