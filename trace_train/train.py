"""The training loop, top to bottom: prompts -> rollouts -> rewards -> group advantages -> spans (while
lambda > 0) -> routing -> teacher + trace_loss -> optimizer -> metrics and checkpoint.

    python -m trace_train --config configs/toy.toml [section.key=value ...]

Single process for now (the FSDP2 / torchrun path is not written yet). Every step seeds its data and
sampling from (seed, step), so a run resumed from a checkpoint continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import arith
from .config import Config, load_config, save_config
from .model import char_to_token_spans, load_policy, token_char_offsets
from .rollout import HFRollouts
from .routing import cap_spans, group_advantages, lambda_at, route
from .step import batch_loss

TASK_STEPS = (1, 3)  # operations per training problem of the synthetic task (inclusive range)


def run(cfg: Config) -> list[dict]:
    """Train; returns the metrics of the steps run (also appended to <output_dir>/metrics.jsonl)."""
    t, lc, tc = cfg.train, cfg.loss, cfg.trace
    os.makedirs(t.output_dir, exist_ok=True)
    save_config(cfg, os.path.join(t.output_dir, "config.toml"))
    torch.manual_seed(t.seed)
    model, tok = load_policy(cfg.model, seed=t.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=0.0)
    engine = HFRollouts(model, tok, t.max_new_tokens, t.temperature)
    start = load_checkpoint(model, opt, t.output_dir) if t.resume else 0
    drop_metrics_from(os.path.join(t.output_dir, "metrics.jsonl"), start)
    history = []

    for step in range(start, t.max_steps):
        t0 = time.perf_counter()
        rng = random.Random(t.seed * 1_000_003 + step)
        torch.manual_seed(t.seed * 1_000_003 + step)
        problems = [arith.sample_problem(rng, rng.randint(*TASK_STEPS)) for _ in range(t.prompts_per_step)]
        prompts = [tok(arith.student_prompt(p))["input_ids"] for p in problems]
        ro = engine.generate(prompts, t.rollouts_per_prompt)
        owners = [problems[i // t.rollouts_per_prompt] for i in range(len(ro.responses))]
        texts = [tok.decode(r, skip_special_tokens=True) for r in ro.responses]
        rewards = torch.tensor([arith.reward(x, p) for x, p in zip(texts, owners)])
        advantages = group_advantages(rewards.view(t.prompts_per_step, -1), lc.advantage_norm).reshape(-1)
        t_rollout = time.perf_counter() - t0

        lam = 0.0 if t.algorithm == "grpo" else lambda_at(step, tc.w0, tc.hold_steps, tc.decay_steps)
        lens = [len(r) for r in ro.responses]
        key, err, diagnostics = [[] for _ in lens], [[] for _ in lens], [None] * len(lens)
        if lam > 0 and t.algorithm == "trace":
            for i, (text, p) in enumerate(zip(texts, owners)):
                a = arith.annotate(text, p)
                offsets = token_char_offsets(tok, ro.responses[i])
                key[i] = cap_spans(char_to_token_spans(a.key_spans, offsets), lens[i], tc.span_cap)
                err[i] = cap_spans(char_to_token_spans(a.error_spans, offsets), lens[i], tc.span_cap)
                diagnostics[i] = a.diagnostic
        routing = route(lens, [bool(r) for r in rewards.tolist()], key, err, algorithm=t.algorithm, lam=lam,
                        w0=tc.w0, forward_kl=tc.forward_kl, reverse_kl=tc.reverse_kl,
                        opd_all_direction=tc.opd_all_direction, aggregation=lc.aggregation)
        # The teacher runs only on routed rollouts, and only while lambda > 0.
        teacher_prompts = ([tok(arith.teacher_prompt(p, d))["input_ids"] for p, d in zip(owners, diagnostics)]
                           if routing.has_kl else None)

        t1 = time.perf_counter()
        out = batch_loss(model, tok.pad_token_id, ro.prompts, ro.responses, advantages, routing, lc,
                         teacher_prompts=teacher_prompts, temperature=t.temperature)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()

        fkl_rows = routing.fkl_weight_M > 0
        rkl_rows = routing.rkl_weight_M > 0
        metrics = {
            "step": step, "algorithm": t.algorithm, "loss": out.loss.item(), "lambda": lam,
            "reward": rewards.mean().item(), "accuracy": rewards.mean().item(),
            "entropy": out.entropy.mean().item(), "response_length": sum(lens) / len(lens),
            "truncated": 1.0 - sum(ro.finished) / len(lens),
            "fkl": out.fkl[fkl_rows].mean().item() if out.fkl is not None and fkl_rows.any() else None,
            "rkl": out.rkl[rkl_rows].mean().item() if out.rkl is not None and rkl_rows.any() else None,
            "span_fraction": routing.kl_index_M.numel() / sum(lens), "teacher_rollouts": len(routing.teacher_responses),
            "grad_norm": grad_norm.item(), "time_rollout_s": t_rollout, "time_train_s": time.perf_counter() - t1,
            "annotator_failures": 0,  # the rule annotator cannot fail; API / self annotators count theirs here
        }
        history.append(metrics)
        with open(os.path.join(t.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        print(f"step {step:4d}  reward {metrics['reward']:.3f}  loss {metrics['loss']:+.4f}  lambda {lam:.3f}  "
              f"len {metrics['response_length']:.1f}  entropy {metrics['entropy']:.3f}", flush=True)
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.max_steps:
            save_checkpoint(model, opt, t.output_dir, step + 1)
    return history


def save_checkpoint(model, opt, out_dir: str, next_step: int) -> None:
    """DCP checkpoint of model and optimizer, then the step marker (written last: a crash mid-save leaves
    the previous checkpoint as the one resumed from)."""
    path = os.path.join(out_dir, f"checkpoint-{next_step:06d}")
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    tmp = os.path.join(out_dir, "latest.tmp")
    with open(tmp, "w") as f:
        json.dump({"next_step": next_step, "path": path}, f)
    os.replace(tmp, os.path.join(out_dir, "latest.json"))


def drop_metrics_from(path: str, step: int) -> None:
    """Keep the metrics of steps before `step` (those after the checkpoint are run again), atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] < step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def load_checkpoint(model, opt, out_dir: str) -> int:
    """Restore the latest checkpoint; returns the step to continue from (0 when there is none)."""
    marker = os.path.join(out_dir, "latest.json")
    if not os.path.exists(marker):
        return 0
    with open(marker) as f:
        latest = json.load(f)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=latest["path"])
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return latest["next_step"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trace_train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="TOML file")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    run(load_config(args.config, args.overrides))
    return 0
