"""Training curves from metrics.jsonl files: reward, entropy, response length, per-branch KL and lambda
against step, one line per run (runs with the same label, e.g. seeds of one algorithm, are averaged with
their min-max band).

    python -m trace_train.experiments.plot runs/grpo runs/trace runs/opd_all --out curves.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

PANELS = (("reward", "reward (train accuracy)"), ("entropy", "entropy (nats/token)"),
          ("response_length", "response length (tokens)"), ("fkl", "forward KL, key spans"),
          ("rkl", "reverse KL (error spans; opd_all: all tokens)"), ("lambda", "lambda"))


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(runs: dict[str, list[list[dict]]], out: str, smooth: int = 5) -> None:
    """runs: label -> the metrics of each of its runs. Writes a PNG with one panel per quantity; values
    (lambda excepted) are a trailing mean over `smooth` steps (training rewards of 64 rollouts are noisy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    colors = {label: f"C{i}" for i, label in enumerate(runs)}  # one colour per run in every panel
    for ax, (key, title) in zip(axes.flat, PANELS):
        window_len = 1 if key == "lambda" else smooth  # the schedule is exact, not noisy
        for label, metric_lists in runs.items():
            by_step = defaultdict(list)
            for metrics in metric_lists:
                vals = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
                for i, (step, _) in enumerate(vals):
                    window = [v for _, v in vals[max(0, i - window_len + 1):i + 1]]
                    by_step[step].append(sum(window) / len(window))
            if not by_step:
                continue
            steps = sorted(by_step)
            mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            ax.plot(steps, mean, label=label, color=colors[label])
            if any(len(by_step[s]) > 1 for s in steps):
                ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                                color=colors[label], alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trace_train.experiments.plot", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (with metrics.jsonl)")
    p.add_argument("--out", default="curves.png")
    p.add_argument("--smooth", type=int, default=5)
    a = p.parse_args(argv)
    runs: dict[str, list[list[dict]]] = defaultdict(list)
    for r in a.runs:
        metrics = read_metrics(r)
        runs[metrics[0]["algorithm"] if metrics else os.path.basename(r)].append(metrics)
    plot_runs(dict(runs), a.out, a.smooth)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
