"""The CPU demo: warm-start a tiny model, train it with GRPO, TRACE and all-token self-distillation
(`opd_all`), plus TRACE with the paper's per-term KL value clip, through the real trainer under `torchrun`
(2 processes, gloo), evaluate each final policy in and out of distribution, and write a report with plots.

The warm start imitates a demonstrator that slips: it knows the steps of the synthetic task but writes a
wrong result at some steps (--slip), so RL has something to fix that a tiny model can fix in minutes,
and the teacher (the same network with the reference solution in context) knows the right tokens.

    python -m trace_train.experiments.demo --out runs/demo [--seeds 0,1] [--steps 60]      # `make demo`

Every algorithm starts from the same warm start and uses the same seeds, so the runs differ only by the
algorithm. In distribution: held-out problems with 1-3 operations, as in training (problems the runs
trained on are excluded); out of distribution: 4-6 operations, longer than anything seen in training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

from ..config import load_config, resolve_config
from . import machine
from .plot import plot_runs, read_metrics

# (run name, train.algorithm, extra overrides). The demo config distills without a KL clip (the study's
# evidence, docs/study.md); "trace-value" is TRACE with the paper's per-term value clip at 0.05: with a teacher
# that reads the answer from its context, the leading KL terms exceed 0.05, and the clip (zero gradient where
# clamped) leaves only the small terms, whose gradient moves mass away from the teacher's top token.
RUNS = (("grpo", "grpo", ()), ("trace", "trace", ()), ("opd_all", "opd_all", ()),
        ("trace-value", "trace", ("loss.kl_term_clip=0.05", "loss.kl_clip_mode=value")))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = resolve_config("demo")


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_run(out: str, algorithm: str, seed: int, warm: str, steps: int, nproc: int, extra=()) -> float:
    """One training run through `torchrun -m trace_train`; returns its wall time in seconds."""
    args = ["--config", CONFIG, f"model.path={warm}", f"train.algorithm={algorithm}", f"train.seed={seed}",
            f"train.max_steps={steps}", f"train.output_dir={out}", *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "trace_train", *args]
    else:
        cmd = [sys.executable, "-m", "trace_train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    with open(os.path.join(os.path.dirname(out), f"{os.path.basename(out)}.log"), "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"training run {out} failed (exit {proc.returncode}); see {out}.log")
    return time.perf_counter() - t0


def held_out(task, n: int, seed: int, exclude: set[str] = frozenset()) -> list:
    """n distinct problems of `task` from an evaluation stream, none of whose texts is in `exclude`."""
    out, seen, step = [], set(exclude), 0
    while len(out) < n:
        if step == 1000:
            raise ValueError(f"fewer than {n} distinct held-out problems in this task")
        for ex in task.examples(seed, step, n):
            if ex.problem not in seen and len(out) < n:
                seen.add(ex.problem)
                out.append(ex)
        step += 1
    return out


def _privileged(min_ops: int, max_ops: int):
    """The synthetic task answered from the teacher's prompt (reference solution in context)."""
    from ..tasks import ArithTask

    class Privileged(ArithTask):
        def student_text(self, ex):
            return self.teacher_text(ex, None)

    return Privileged(min_ops, max_ops)


def evaluate_all(policies: dict[str, str], train_seen: set[str], n: int, k: int, seed: int,
                 in_ops: tuple[int, int] = (1, 3), out_ops: tuple[int, int] = (4, 6),
                 max_new_tokens: int = 48) -> dict[str, dict]:
    """avg@k of each policy folder on the in-distribution (in_ops operations, problems in train_seen excluded)
    and out-of-distribution (out_ops) sets; for the warm start also in distribution with the teacher's
    privileged prompt (reference solution in context), which shows what the self-teacher knows."""
    import torch

    from ..eval import evaluate, load_for_eval
    from ..rollout import HFRollouts, Sampling
    from ..tasks import ArithTask

    torch.manual_seed(seed)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.6, top_k=20, top_p=0.95)  # the paper's
    ind, ood = ArithTask(*in_ops), ArithTask(*out_ops)
    sets = {"in_dist": (ind, held_out(ind, n, 10_000 + seed, train_seen)),
            "out_of_dist": (ood, held_out(ood, n, 20_000 + seed))}
    results = {}
    for name, path in policies.items():
        policy, tok = load_for_eval(path)
        engine = HFRollouts(policy, tok, sampling)
        results[name] = {s: evaluate(engine, tok, task, exs, k, seed) for s, (task, exs) in sets.items()}
        if name == "warm_start":
            results[name]["in_dist_privileged"] = evaluate(engine, tok, _privileged(*in_ops), sets["in_dist"][1],
                                                           k, seed)
    return results


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarize(out: str, seeds: list[int], steps: int, scores: dict, walls: dict, settings: dict) -> str:
    """The markdown report; returns the summary table (printed last by main)."""
    rows = ["| algorithm | in-dist avg@4 | out-of-dist avg@4 | final entropy | final response length "
            "| wall time / run |", "|---|---|---|---|---|---|"]
    ws = scores["warm_start"]
    rows.append(f"| warm start (SFT) | {ws['in_dist']['avg_at_k']:.3f} | {ws['out_of_dist']['avg_at_k']:.3f} | - | "
                f"{ws['in_dist']['response_length']:.1f} (eval) | - |")
    per_alg = {}
    for alg, _, _ in RUNS:
        runs = [f"{alg}-s{s}" for s in seeds]
        last = [read_metrics(os.path.join(out, r))[-5:] for r in runs]
        per_alg[alg] = {
            "in_dist": [scores[r]["in_dist"]["avg_at_k"] for r in runs],
            "out_of_dist": [scores[r]["out_of_dist"]["avg_at_k"] for r in runs],
            "entropy": [statistics.mean(m["entropy"] for m in ms) for ms in last],
            "response_length": [statistics.mean(m["response_length"] for m in ms) for ms in last],
            "wall_s": [walls[r] for r in runs],
        }
        a = per_alg[alg]
        rows.append(f"| {alg} | {_mean_spread(a['in_dist'])} | {_mean_spread(a['out_of_dist'])} | "
                    f"{_mean_spread(a['entropy'])} | {_mean_spread(a['response_length'])} | "
                    f"{statistics.mean(a['wall_s']):.0f} s |")
    table = "\n".join(rows)

    def diff(alg, key):
        d = [x - y for x, y in zip(per_alg[alg][key], per_alg["grpo"][key])]
        return statistics.mean(d), d

    lines = []
    for alg, _, _ in RUNS[1:]:
        for key, what in (("in_dist", "in-distribution accuracy"), ("out_of_dist", "out-of-distribution accuracy"),
                          ("entropy", "final entropy"), ("response_length", "final response length")):
            m, d = diff(alg, key)
            per_seed = ", ".join(f"{x:+.3f}" for x in d)
            lines.append(f"- {alg} - grpo, {what}: {m:+.3f} (per seed: {per_seed})")
    spread = "one seed: no spread" if len(seeds) == 1 else "± is the standard deviation over seeds"
    priv = ws["in_dist_privileged"]["avg_at_k"]
    report = f"""# TRACE CPU demo

{settings['date']}, {settings['machine']}. Seeds {', '.join(map(str, seeds))} ({spread}); {steps} RL steps per run.

{table}

Evaluation: avg@4 at temperature 0.6, top-p 0.95, top-k 20 on {settings['eval_n']} distinct held-out problems each:
in distribution 1-3 operations (as in training; problems seen in training excluded), out of distribution
4-6 operations. The warm start answers {priv:.3f} of the in-distribution problems with the teacher's
privileged prompt (the reference solution in context) against {ws['in_dist']['avg_at_k']:.3f} without it: this
gap is what the self-teacher can pass on. Final entropy and response length: training rollouts, mean of the
last 5 steps.

## Differences to GRPO (same warm start, same seeds)

{chr(10).join(lines)}

A difference smaller than the spread over seeds is not evidence either way.

Reproducibility: the same machine and software repeat this run exactly (seeded data and sampling); a CPU
whose torch picks another kernel set ({settings['machine_info']['cpu_capability']} here), another thread count
or another torch build rounds differently, sampling amplifies it, and the digits differ. Compare algorithms by
the spread over seeds, not by one run's digits.

## Curves

![curves](curves.png)

## Settings

- warm start (`trace_train.experiments.sft`): {json.dumps(settings['sft'])}
- RL config: `--config demo`, with model.path = the warm start; `torchrun --nproc_per_node={settings['nproc']}`
- resolved: {json.dumps(settings['rl'])}
"""
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"settings": settings, "scores": scores, "per_algorithm": per_alg, "wall_s": walls}, f, indent=1)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trace_train.experiments.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--sft-steps", type=int, default=600)
    p.add_argument("--slip", type=float, default=0.15, help="the warm start's imitated per-step slip rate")
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="section.key=value for every RL run")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    a.out = os.path.abspath(a.out)
    os.makedirs(a.out, exist_ok=True)
    t_start = time.perf_counter()
    cfg = load_config(CONFIG, a.overrides)

    from .sft import sft

    warm = os.path.join(a.out, "warm_start")
    _log(f"warm start: {a.sft_steps} supervised steps -> {warm}")
    sft_settings = {"steps": a.sft_steps, "batch": 64, "lr": 3e-3, "ops": "1-3", "seed": 0, "slip": a.slip,
                    "model": f"Qwen3 {cfg.model.tiny_layers} layers, hidden {cfg.model.tiny_hidden}"}
    sft(cfg.model, warm, a.sft_steps, slip=a.slip, log=lambda s: None)

    walls = {}
    for seed in seeds:
        for run, alg, extra in RUNS:
            name = f"{run}-s{seed}"
            _log(f"{name}: torchrun x{a.nproc}, {a.steps} steps")
            walls[name] = train_run(os.path.join(a.out, name), alg, seed, warm, a.steps, a.nproc,
                                    (*a.overrides, *extra))
            last = read_metrics(os.path.join(a.out, name))[-1]
            _log(f"{name}: {walls[name]:.0f} s, last step reward {last['reward']:.3f}")

    _log("evaluating")
    from ..tasks import ArithTask

    train_task = ArithTask(cfg.data.min_ops, cfg.data.max_ops)
    seen = {ex.problem for s in seeds for st in range(a.steps)
            for ex in train_task.examples(s, st, cfg.train.prompts_per_step)}
    policies = {"warm_start": warm, **{f"{run}-s{s}": os.path.join(a.out, f"{run}-s{s}", "hf")
                                      for s in seeds for run, _, _ in RUNS}}
    scores = evaluate_all(policies, seen, a.eval_n, 4, seed=0)

    plot_runs({run: [read_metrics(os.path.join(a.out, f"{run}-s{s}")) for s in seeds] for run, _, _ in RUNS},
              os.path.join(a.out, "curves.png"))
    settings = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": machine.one_line(), "machine_info": machine.describe(), "nproc": a.nproc,
                "eval_n": a.eval_n, "sft": sft_settings, "rl": {"steps": a.steps, "overrides": a.overrides,
                                                                "train": vars(cfg.train), "trace": vars(cfg.trace),
                                                                "loss": vars(cfg.loss)},
                "total_wall_s": round(time.perf_counter() - t_start)}
    table = summarize(a.out, seeds, a.steps, scores, walls, settings)
    _log(f"report: {os.path.join(a.out, 'report.md')}, plots: {os.path.join(a.out, 'curves.png')}, "
         f"total {time.perf_counter() - t_start:.0f} s")
    print(f"machine: {settings['machine']}", flush=True)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
