"""A short supervised warm start on the synthetic task, so that RL starts with signal.

    python -m trace_train.experiments.sft --out runs/sft [--steps 600] [--slip 0.15] [model.tiny_hidden=128 ...]

Half of each batch is student prompt -> reference solution (with slipped steps at rate --slip), half
teacher prompt (problem + reference solution + a random diagnostic type) -> the reference solution: the
model learns the format, the arithmetic, and to use the privileged context (so the self-teacher is better
than the student). The loss is the mean token negative log-likelihood, through trace_kernels.trace_loss.
Writes a Hugging Face folder.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch

import trace_kernels as tk

from ..config import load_config
from ..model import load_policy, make_batch, response_hidden
from ..tasks import arith


def sloppy_solution(p: arith.Problem, rng: random.Random, slip: float) -> str:
    """The written-out solution with, at each step and probability `slip`, a wrong result that the chain
    then carries forward (the answer follows the wrong chain): a demonstrator that knows the steps but
    slips."""
    parts, a = [], p.start
    for op, b in p.ops:
        c = arith.OPS[op](a, b)
        if rng.random() < slip:
            c = rng.choice([d for d in range(10) if d != c])
        parts.append(f"{a}{op}{b}={c}")
        a = c
    return ",".join(parts) + f";{a}"


def sft(cfg_model, out: str, steps: int, batch: int = 64, lr: float = 3e-3, min_ops: int = 1, max_ops: int = 3,
        seed: int = 0, slip: float = 0.0, log=print) -> list[float]:
    """Train the policy of `cfg_model` for `steps` steps; save it to `out`; returns the per-step losses.
    slip: the student-prompt half imitates solutions with slipped steps at this rate per step (the
    teacher-prompt half always copies the reference), so the warm start errs where it could know better."""
    torch.manual_seed(seed)
    model, tok = load_policy(cfg_model, seed=seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    rng = random.Random(seed + 7_777_777)  # a stream apart from the RL runs' problems
    losses = []
    for step in range(steps):
        problems = [arith.sample_problem(rng, rng.randint(min_ops, max_ops)) for _ in range(batch)]
        prompts = [arith.student_prompt(p) if i % 2 == 0 else
                   arith.teacher_prompt(p, rng.choice((None,) + arith.DIAGNOSTICS)) for i, p in enumerate(problems)]
        targets = [sloppy_solution(p, rng, slip) if i % 2 == 0 else p.solution for i, p in enumerate(problems)]
        b = make_batch([tok(x)["input_ids"] for x in prompts],
                       [tok(t)["input_ids"] + [tok.eos_token_id] for t in targets], tok.pad_token_id)
        # On-policy GRPO with advantage 1 and weight 1/N has the mean NLL's gradient (the ratio is 1, never
        # clipped): the fused loss, without the logits.
        n = b.targets.numel()
        res = tk.trace_loss(response_hidden(model, b), model.get_output_embeddings().weight, b.targets,
                            torch.ones(n), pg_weight=torch.full((n,), 1.0 / n))
        loss = -res.logprobs.mean()
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"sft step {step:4d}  nll {loss.item():.4f}")
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    with open(os.path.join(out, "sft.json"), "w") as f:
        json.dump({"steps": steps, "batch": batch, "lr": lr, "min_ops": min_ops, "max_ops": max_ops, "seed": seed,
                   "slip": slip, "final_nll": losses[-1]}, f)
    return losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trace_train.experiments.sft", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None, help="TOML file (its [model] section is used)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-ops", type=int, default=1)
    p.add_argument("--max-ops", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slip", type=float, default=0.0, help="per-step error rate of the imitated student solutions")
    p.add_argument("overrides", nargs="*", help="model.key=value")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    sft(cfg.model, a.out, a.steps, a.batch, a.lr, a.min_ops, a.max_ops, a.seed, a.slip)
    return 0


if __name__ == "__main__":
    sys.exit(main())
