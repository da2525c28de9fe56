"""The trainer's tools: recipe configs, the warm start, evaluation, the plot script, and the demo end to end
(in a few steps)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from trace_train.config import load_config, shipped_configs  # noqa: E402
from trace_train.eval import main as eval_main  # noqa: E402
from trace_train.experiments.plot import main as plot_main  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_shipped_configs_are_the_package_files():
    """Every TOML file in the package's configs folder is a shipped config, and there are the four we document."""
    folder = os.path.join(ROOT, "trace_train", "configs")
    assert shipped_configs() == sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(folder, "*.toml")))
    assert {"toy", "demo", "qwen3-1.7b-trace-rkl", "qwen3-8b-trace-fkl"} <= set(shipped_configs())


@pytest.mark.parametrize("path", shipped_configs())
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    if "qwen3-8b" in path:
        assert cfg.trace.forward_kl and not cfg.trace.reverse_kl and cfg.model.compute_dtype == "bfloat16"
    if "qwen3-1.7b" in path:
        assert cfg.trace.reverse_kl and not cfg.trace.forward_kl
    if "qwen3" in path:  # the paper's TRACE settings, but for the KL clip (docs/study.md)
        assert (cfg.trace.w0, cfg.trace.hold_steps, cfg.trace.decay_steps) == (0.5, 10, 30)
        assert (cfg.trace.span_cap, cfg.loss.clip_low, cfg.loss.clip_high) == (0.25, 0.2, 0.28)
        assert cfg.trace.teacher == "snapshot" and cfg.trace.snapshot_every == 10
    if cfg.train.algorithm in ("trace", "opd_all") or "demo" in path:  # every shipped distilling config: no clip
        assert cfg.loss.kl_term_clip == 0.0


@pytest.mark.cpu_outcome
def test_sft_then_eval_and_plot(tmp_path, capsys):
    """A few warm-start steps lower the NLL; eval writes avg@k scores of the saved folder; the plot script
    draws curves from a run's metrics."""
    from trace_train.config import ModelConfig
    from trace_train.experiments.sft import sft

    losses = sft(ModelConfig(), str(tmp_path / "warm"), steps=30, batch=32, log=lambda s: None)
    assert losses[-1] < losses[0] - 0.5
    assert eval_main(["--model", str(tmp_path / "warm"), "--arith-ops", "1-2", "--n", "6", "--k", "2",
                      "--max-new-tokens", "16", "--out", str(tmp_path / "scores.json")]) == 0
    scores = json.load(open(tmp_path / "scores.json"))
    assert scores["k"] == 2 and scores["problems"] == 6 and 0 <= scores["avg_at_k"] <= scores["pass_at_k"] <= 1
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "algorithm": "trace", "reward": s / 10, "entropy": 1.0, "response_length": 10,
             "fkl": None if s % 2 else 0.1, "rkl": 0.2, "lambda": 0.5} for s in range(6)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert plot_main([str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_end_to_end_in_a_few_steps(tmp_path):
    """The demo's whole path with tiny budgets: warm start, 4 runs under torchrun x2, evaluation,
    report, plots, and the table printed last."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "trace_train.experiments.demo", "--out", str(out), "--seeds", "0", "--steps", "2",
           "--sft-steps", "5", "--eval-n", "4", "train.prompts_per_step=2", "train.rollouts_per_prompt=2",
           "train.max_new_tokens=8"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()
    assert last[-1].startswith("| trace-value |") and last[-7].startswith("| algorithm |")
    report = (out / "report.md").read_text()
    assert "| trace |" in report and "Seeds 0" in report and "curves.png" in report
    # the machine beside the numbers: seeded runs repeat exactly only on the same CPU kernels and software
    assert "torch CPU kernels" in report and any(x.startswith("machine: ") for x in last[-10:])
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # the shipped TRACE setting distills without a clip; the control runs the paper's value clip
    assert "kl_term_clip = 0.0" in (out / "trace-s0" / "config.toml").read_text()
    value = (out / "trace-value-s0" / "config.toml").read_text()
    assert "kl_term_clip = 0.05" in value and 'kl_clip_mode = "value"' in value
    summary = json.load(open(out / "summary.json"))
    assert summary["settings"]["machine_info"]["cpu_capability"] and summary["settings"]["machine_info"]["torch"]
    for alg in ("grpo", "trace", "opd_all", "trace-value"):
        assert len(json.loads((out / f"{alg}-s0" / "metrics.jsonl").read_text().splitlines()[-1])) > 5
        assert 0 <= summary["scores"][f"{alg}-s0"]["out_of_dist"]["avg_at_k"] <= 1


def test_held_out_problems_are_distinct_and_unseen():
    from trace_train.experiments.demo import held_out
    from trace_train.tasks import ArithTask

    task = ArithTask(1, 1)  # 300 possible problems: duplicates are frequent in a random stream
    seen = {ex.problem for ex in task.examples(0, 0, 100)}
    out = held_out(task, 150, seed=5, exclude=seen)
    texts = [ex.problem for ex in out]
    assert len(texts) == len(set(texts)) == 150 and not seen & set(texts)
    with pytest.raises(ValueError, match="distinct"):
        held_out(task, 301, seed=5)
