"""The study: does TRACE beat GRPO on the synthetic task, with which KL clip, and in which reward regime?

    trace-study --out runs/study [--seeds 0,...,7] [--steps 60] [--regimes dense,...]  # `make study`
    trace-study --report-from runs/study/summary.json                                 # rewrite the report only

(trace-study = python -m trace_train.experiments.study)

grpo, trace with the per-term value clip (`loss.kl_clip_mode=value`), trace with the per-entry gradient
clip (`grad`), trace without a clip and opd_all (all-token distillation), every algorithm on the same seeds,
in three regimes (warm starts by `trace_train.experiments.sft`, as in the demo):
- dense: train on 1-3 operation problems from the demo's warm start (supervised on 1-3 operations; it
  already scores ~0.8),
- sparse: train on 4-6 operation problems from the same warm start (it scores ~0.15-0.2 there; but it
  writes 3 steps whatever the problem, so its right answers are lucky digits that the annotator gives no
  key spans: TRACE's forward-KL branch never fires, only the reverse-KL one),
- sparse-long: train on 4-6 operation problems from a warm start supervised on 1-6 operation chains that
  slip at 25% of the steps (right answers ~0.2, every step right in a few percent of the rollouts).
Every run measures the lift (train.lift_metric: the change of the sampled tokens' log-probs across each
update), grpo and opd_all on the spans TRACE would distill (trace.measure_spans), so the lift on key tokens
compares across algorithms. Each final policy is scored avg@4 on held-out 1-3 and 4-6 operation problems
(in distribution: the regime's training range, problems seen in training excluded).

Reported per regime (report.md, summary.json, curves-<regime>.png under --out): per algorithm the mean and a
95% t-interval over seeds of in- and out-of-distribution avg@4, final entropy and response length (training
rollouts, last 5 steps), lift (key/error spans, mean over the steps that have spans; fkl and rkl branches
apart) and lift_all; the paired difference to GRPO (same seed) with its 95% t-interval, and the clip
semantics' paired differences to each other; reward curves.

Budget: under 60 minutes on 2 cores. 1 process per run, 2 runs at a time: on 2 cores this beats torchrun x2
one run at a time (measured alone, a TRACE run took 0.38 s per step and 5.1 s of start-up in 1 process,
0.44 s and 7.1 s under torchrun x2: gloo's collectives and a second interpreter cost more than the second core
gives a model this small). Measured 2026-11-27 on a quiet 2-core Intel Xeon (AVX-512 kernels), the defaults
(8 seeds, 60 steps, 3 regimes: 120 runs): 34.2 min in all; warm starts 325 s, training 1,625 s (a run, mean:
dense 19.9 s, sparse 28.6 s, sparse-long 32.6 s), evaluation 104 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from ..config import load_config
from . import machine
from .demo import CONFIG, evaluate_all, train_run
from .plot import plot_runs, read_metrics
from .stats import fmt, mean_ci, paired_diff

# The long warm start's imitated slip. Measured here (2026-11-27, 600 steps, 100 problems x 8 samples at temperature
# 1): slip 0.25 -> on 4-6 operations 19% right answers, 2.5% with every step right (key spans); slip 0.2 -> 40% and
# 32%, 0.15 -> 38% and 28%, 0.3 -> arithmetic not learnt (6% right on 1-3 operations). The outcome of 600 steps
# is that sensitive: the report prints each warm start's scores beside the results.
LONG_SLIP = 0.25

# (name, train.algorithm, overrides). Each distilling run names its clip (0.05, the paper's) and clip mode, so that
# the study does not move when the demo config's defaults do.
CLIP = "loss.kl_term_clip=0.05"
ALGORITHMS = (
    ("grpo", "grpo", ()),
    ("trace-value", "trace", (CLIP, "loss.kl_clip_mode=value")),
    ("trace-grad", "trace", (CLIP, "loss.kl_clip_mode=grad")),
    ("trace-noclip", "trace", ("loss.kl_term_clip=0",)),
    ("opd_all", "opd_all", (CLIP, "loss.kl_clip_mode=value")),
)
# The warm starts (trace_train.experiments.sft): name -> (min_ops, max_ops, slip); slip None: the --slip argument.
WARM_STARTS = {"warm_start": (1, 3, None), "warm_start_long": (1, 6, LONG_SLIP)}
# (name, warm start, training ops, the other evaluation set's ops, overrides). 4-6 operation solutions run to ~40
# characters: those regimes sample up to 48 tokens (the evaluation's limit) instead of the demo config's 24.
SPARSE = ("data.min_ops=4", "data.max_ops=6", "train.max_new_tokens=48")
REGIMES = (
    ("dense", "warm_start", (1, 3), (4, 6), ()),
    # The 1-3 operation warm start writes 3 steps whatever the problem: its correct answers on 4-6 operations
    # are lucky digits, which the annotator gives no key spans (TRACE's forward-KL branch never fires).
    ("sparse", "warm_start", (4, 6), (1, 3), SPARSE),
    # A warm start that writes 4-6 step chains but slips: correct answers with every step right exist.
    ("sparse-long", "warm_start_long", (4, 6), (1, 3), SPARSE),
)
# Every run: the lift metric, measured on grpo / opd_all too.
MEASURE = ("train.lift_metric=true", "trace.measure_spans=true")
QUANTITIES = (("in_dist", "in-dist avg@4"), ("out_of_dist", "out-of-dist avg@4"), ("entropy", "final entropy"),
              ("response_length", "final length"), ("lift", "lift (spans)"), ("lift_fkl", "lift fkl"),
              ("lift_rkl", "lift rkl"), ("lift_all", "lift (all tokens)"))


def _log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _train_here(out: str, algorithm: str, seed: int, warm: str, steps: int, extra) -> float:
    """One training run in this process (what train_run does in a subprocess); returns its wall time."""
    from ..train import run

    t0 = time.perf_counter()
    run(load_config(CONFIG, [f"model.path={warm}", f"train.algorithm={algorithm}", f"train.seed={seed}",
                             f"train.max_steps={steps}", f"train.output_dir={out}", *extra]))
    return time.perf_counter() - t0


def run_summary(metrics: list[dict], scores: dict) -> dict:
    """One run's numbers: final avg@4 in / out of distribution, entropy and length (last 5 steps), the lifts
    (mean over the steps that measured them) and the reward curve."""
    last = metrics[-5:]
    return {
        "in_dist": scores["in_dist"]["avg_at_k"], "out_of_dist": scores["out_of_dist"]["avg_at_k"],
        "entropy": _mean([m["entropy"] for m in last]), "response_length": _mean([m["response_length"] for m in last]),
        **{k: _mean([m.get(k) for m in metrics]) for k in ("lift", "lift_fkl", "lift_rkl", "lift_all")},
        "reward_curve": [m["reward"] for m in metrics],
    }


# The clip semantics against each other (same seed): (a, b) reports a - b.
CLIP_PAIRS = (("trace-grad", "trace-value"), ("trace-noclip", "trace-value"), ("trace-noclip", "trace-grad"))


def aggregate(runs: dict[str, dict], seeds: list[int]) -> dict:
    """Per algorithm: mean_ci of each quantity over seeds, and paired_diff to grpo (same seed); and the paired
    differences between the clip semantics (CLIP_PAIRS, keyed "a - b")."""
    per = {alg: {q: [runs[f"{alg}-s{s}"][q] for s in seeds] for q, _ in QUANTITIES} for alg, _, _ in ALGORITHMS}
    out = {}
    for alg, _, _ in ALGORITHMS:
        out[alg] = {"mean_ci": {q: mean_ci(v) for q, v in per[alg].items()},
                    "diff_to_grpo": None if alg == "grpo" else {q: paired_diff(per[alg][q], per["grpo"][q])
                                                                for q, _ in QUANTITIES}}
    clip = {f"{x} - {y}": {q: paired_diff(per[x][q], per[y][q]) for q, _ in QUANTITIES} for x, y in CLIP_PAIRS}
    return {"algorithms": out, "clip_pairs": clip}


def regime_report(name: str, warm_name: str, train_ops, out_ops, agg: dict, clip: dict, warm: dict,
                  seeds: list[int]) -> str:
    head = "| algorithm | " + " | ".join(t for _, t in QUANTITIES) + " |"
    sep = "|---" * (len(QUANTITIES) + 1) + "|"
    rows = [head, sep, f"| {warm_name} | {warm['in_dist']['avg_at_k']:.3f} | {warm['out_of_dist']['avg_at_k']:.3f} |"
            + " - |" * (len(QUANTITIES) - 2)]
    for alg, _, _ in ALGORITHMS:
        ci = agg[alg]["mean_ci"]
        rows.append(f"| {alg} | " + " | ".join(fmt(ci[q], 4 if q.startswith("lift") else 3) for q, _ in QUANTITIES)
                    + " |")
    diffs = [head.replace("algorithm", "difference to grpo"), sep]
    for alg, _, _ in ALGORITHMS[1:]:
        dd = agg[alg]["diff_to_grpo"]
        diffs.append(f"| {alg} - grpo | " + " | ".join(fmt(dd[q], 4 if q.startswith("lift") else 3, signed=True)
                                                       for q, _ in QUANTITIES) + " |")
    clips = [head.replace("algorithm", "clip semantics"), sep]
    for pair, dd in clip.items():
        clips.append(f"| {pair} | " + " | ".join(fmt(dd[q], 4 if q.startswith("lift") else 3, signed=True)
                                                 for q, _ in QUANTITIES) + " |")
    lo, hi = WARM_STARTS[warm_name][:2]
    return f"""## Regime: {name} (train on {train_ops[0]}-{train_ops[1]} operations; out of distribution \
{out_ops[0]}-{out_ops[1]})

From `{warm_name}` (supervised on {lo}-{hi} operations). In-dist: held-out {train_ops[0]}-{train_ops[1]} operation \
problems (none seen in training); out-of-dist: {out_ops[0]}-{out_ops[1]} operations, which RL never trains on.

Mean over seeds {', '.join(map(str, seeds))} and 95% t-interval [lo, hi]:

{chr(10).join(rows)}

Paired difference to GRPO (same seed, same warm start), mean and 95% t-interval; an interval that contains 0
is no evidence either way:

{chr(10).join(diffs)}

The clip semantics against each other (TRACE with the value clip, the gradient clip, none; same seed):

{chr(10).join(clips)}

![curves](curves-{name}.png)
"""


def write_report(summary: dict, out: str) -> str:
    """Aggregate summary["runs"] per regime (into summary["regimes"]), write out/report.md and out/summary.json;
    returns the report. `--report-from` calls it again on a finished study's summary.json."""
    st = summary["settings"]
    seeds, wall = st["seeds"], st["wall_s"]
    sections = []
    for regime, r in summary["regimes"].items():
        agg = aggregate(summary["runs"][regime], seeds)
        r["algorithms"], r["clip_pairs"] = agg["algorithms"], agg["clip_pairs"]
        sections.append(regime_report(regime, r["warm_start_folder"], r["train_ops"], r["out_ops"], agg["algorithms"],
                                      agg["clip_pairs"], r["warm_start"], seeds))
    listed = json.loads(json.dumps({k: st[k] for k in ("algorithms", "regimes", "warm_starts", "measure", "overrides",
                                                       "sft_steps")}))
    for w in listed["warm_starts"].values():
        del w["folder"]  # a path on the machine that ran it
    runs = len(summary["regimes"]) * len(seeds) * len(ALGORITHMS)
    report = f"""# TRACE vs GRPO: clip semantics and reward regimes

{st['date']}, {st['machine']}. {len(seeds)} seeds, {st['steps']} RL steps per run, {runs} runs
({st['jobs']} at a time, {st['nproc']} process(es) each); total {wall['total'] / 60:.1f} min (warm starts \
{wall['sft']} s, training {wall['training']} s, evaluation {wall['total'] - wall['sft'] - wall['training']} s).

Evaluation: avg@4 at temperature 0.6, top-p 0.95, top-k 20 on {st['eval_n']} distinct held-out problems per set.
Entropy and length: training rollouts, mean of the last 5 steps. Lift: the mean change of the sampled
tokens' log-probs (nats) across one update, on the span rows TRACE distills (key spans of correct rollouts:
fkl; error spans of incorrect ones: rkl) averaged over the steps with spans (TRACE's lambda > 0; grpo and
opd_all annotated for measurement only), and on all response tokens (lift_all) over all steps.

{chr(10).join(sections)}
## Settings

`{json.dumps(listed)}`
on `--config demo` with model.path = the regime's warm start.
"""
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trace_train.experiments.study", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/study")
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--sft-steps", type=int, default=600)
    p.add_argument("--slip", type=float, default=0.15, help="the warm start's imitated per-step slip rate")
    p.add_argument("--warm-start", default="", help="reuse the warm starts of a previous study (its --out folder: "
                   "OUT/warm_start, OUT/warm_start_long) instead of training them (--sft-steps and --slip ignored)")
    p.add_argument("--regimes", default=",".join(r for r, *_ in REGIMES), help="which regimes (comma-separated)")
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--eval-max-new-tokens", type=int, default=48, help="48 fits 6-operation solutions; less: tests")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1; 0: in this process, "
                   "one run at a time, no start-up cost: tiny studies and tests)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (subprocesses)")
    p.add_argument("--report-from", default="", help="only rewrite report.md (and summary.json's aggregates) "
                   "from this finished study's summary.json, in its folder")
    p.add_argument("overrides", nargs="*", help="section.key=value for every RL run")
    a = p.parse_args(argv)
    if a.report_from:
        with open(a.report_from) as f:
            summary = json.load(f)
        write_report(summary, os.path.dirname(os.path.abspath(a.report_from)))
        return 0
    seeds = [int(s) for s in a.seeds.split(",")]
    if len(seeds) < 2:
        raise SystemExit("--seeds: at least 2 seeds (the intervals are over seeds)")
    names = [r.strip() for r in a.regimes.split(",") if r.strip()]
    unknown = sorted(set(names) - {r for r, *_ in REGIMES})
    if unknown or not names:
        raise SystemExit(f"--regimes: unknown {unknown} (choose from {', '.join(r for r, *_ in REGIMES)})")
    regimes = [r for r in REGIMES if r[0] in names]
    a.out = os.path.abspath(a.out)
    os.makedirs(a.out, exist_ok=True)
    t_start = time.perf_counter()
    cfg = load_config(CONFIG, a.overrides)
    _log(f"machine: {machine.one_line()}")

    from .sft import sft

    warm, warm_info = {}, {}  # warm start name -> folder; -> what summary.json records of it
    for w in dict.fromkeys(r[1] for r in regimes):
        min_ops, max_ops, slip = WARM_STARTS[w]
        slip = a.slip if slip is None else slip
        if a.warm_start:
            warm[w] = os.path.join(os.path.abspath(a.warm_start), w)
            if not os.path.isdir(warm[w]):
                raise SystemExit(f"--warm-start: {warm[w]} does not exist")
            _log(f"{w}: {warm[w]} (reused)")
        else:
            warm[w] = os.path.join(a.out, w)
            _log(f"{w}: {a.sft_steps} supervised steps on {min_ops}-{max_ops} operations, slip {slip} -> {warm[w]}")
            sft(cfg.model, warm[w], a.sft_steps, min_ops=min_ops, max_ops=max_ops, slip=slip, log=lambda s: None)
        warm_info[w] = {"folder": warm[w], "ops": [min_ops, max_ops], "slip": slip}
    t_sft = time.perf_counter() - t_start

    jobs = [(regime, w, alg, seed, (*MEASURE, *r_over, *a.overrides, *a_over))
            for regime, w, _, _, r_over in regimes for seed in seeds for alg, _, a_over in ALGORITHMS]
    algo = {name: alg for name, alg, _ in ALGORITHMS}

    def one(job):
        regime, w, alg, seed, extra = job
        name = f"{regime}/{alg}-s{seed}"
        out = os.path.join(a.out, regime, f"{alg}-s{seed}")
        if a.nproc == 0:
            wall = _train_here(out, algo[alg], seed, warm[w], a.steps, extra)
        else:
            wall = train_run(out, algo[alg], seed, warm[w], a.steps, a.nproc, extra)
        _log(f"{name}: {wall:.0f} s")
        return name, wall

    for regime, *_ in regimes:
        os.makedirs(os.path.join(a.out, regime), exist_ok=True)
    _log(f"{len(jobs)} runs, {a.jobs} at a time, {a.nproc} process(es) each, {a.steps} steps")
    with ThreadPoolExecutor(max_workers=1 if a.nproc == 0 else a.jobs) as pool:
        walls = dict(pool.map(one, jobs))
    t_train = time.perf_counter() - t_start - t_sft

    from ..tasks import ArithTask

    summary = {"regimes": {}, "runs": {}}
    for regime, w, train_ops, out_ops, r_over in regimes:
        _log(f"evaluating {regime}")
        rcfg = load_config(CONFIG, [*r_over, *a.overrides])
        train_task = ArithTask(*train_ops)
        seen = {ex.problem for s in seeds for st in range(a.steps)
                for ex in train_task.examples(s, st, rcfg.train.prompts_per_step)}
        folder = os.path.join(a.out, regime)
        policies = {"warm_start": warm[w], **{f"{alg}-s{s}": os.path.join(folder, f"{alg}-s{s}", "hf")
                                             for s in seeds for alg, _, _ in ALGORITHMS}}
        scores = evaluate_all(policies, seen, a.eval_n, 4, seed=0, in_ops=train_ops, out_ops=out_ops,
                              max_new_tokens=a.eval_max_new_tokens)
        metrics = {f"{alg}-s{s}": read_metrics(os.path.join(folder, f"{alg}-s{s}")) for s in seeds
                   for alg, _, _ in ALGORITHMS}
        summary["runs"][regime] = {name: run_summary(metrics[name], scores[name]) for name in metrics}
        summary["regimes"][regime] = {"train_ops": train_ops, "out_ops": out_ops, "warm_start_folder": w,
                                      "warm_start": scores["warm_start"]}
        plot_runs({alg: [metrics[f"{alg}-s{s}"] for s in seeds] for alg, _, _ in ALGORITHMS},
                  os.path.join(a.out, f"curves-{regime}.png"))
    total = time.perf_counter() - t_start
    summary["settings"] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine.one_line(),
        "machine_info": machine.describe(), "seeds": seeds, "steps": a.steps, "sft_steps": a.sft_steps,
        "slip": a.slip, "eval_n": a.eval_n, "eval_max_new_tokens": a.eval_max_new_tokens, "nproc": a.nproc,
        "jobs": a.jobs, "overrides": a.overrides,
        "warm_starts": warm_info,
        "algorithms": {n: [alg, list(o)] for n, alg, o in ALGORITHMS},
        "regimes": {n: {"warm_start": w, "train_ops": list(t), "other_ops": list(o), "overrides": list(r)}
                    for n, w, t, o, r in regimes}, "measure": list(MEASURE),
        "wall_s": {"sft": round(t_sft), "training": round(t_train), "total": round(total)},
        "run_wall_s": walls}
    write_report(summary, a.out)
    _log(f"report: {os.path.join(a.out, 'report.md')}, total {total:.0f} s")
    print(f"machine: {summary['settings']['machine']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
