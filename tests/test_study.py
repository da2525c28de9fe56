"""`python -m trace_train.experiments.study` end to end in tiny mode (runs in this process, 2 seeds, 2 steps,
tiny batches and evaluation), checking the report's structure; and the interval arithmetic it rests on."""

from __future__ import annotations

import json
import math

import pytest

from trace_train.experiments.stats import mean_ci, paired_diff, t975

pytest.importorskip("transformers")

TINY = ["--seeds", "0,1", "--steps", "2", "--sft-steps", "5", "--eval-n", "2", "--eval-max-new-tokens", "8",
        "--nproc", "0", "train.prompts_per_step=2", "train.rollouts_per_prompt=2", "train.max_new_tokens=8"]


def test_t_interval():
    assert t975(1) == 12.706 and t975(4) == 2.776
    assert abs(t975(31) - 2.0395) < 1e-3 and abs(t975(1000) - 1.9623) < 1e-3  # beyond the table: the expansion
    ci = mean_ci([1.0, 2.0, 3.0])  # stdev 1: half-width t_{0.975,2} / sqrt(3)
    assert ci["mean"] == 2.0 and ci["hi"] - 2.0 == pytest.approx(4.303 / math.sqrt(3))
    assert mean_ci([0.5])["lo"] is None and mean_ci([None])["mean"] is None
    d = paired_diff([1.0, 2.0, 4.0], [0.0, 1.0, 2.0])  # differences 1, 1, 2
    assert d["mean"] == pytest.approx(4 / 3) and d["lo"] < 4 / 3 < d["hi"]
    with pytest.raises(ValueError, match="unequal"):
        paired_diff([1.0], [1.0, 2.0])


def test_study_tiny_end_to_end(tmp_path, capsys):
    from trace_train.experiments.study import ALGORITHMS, QUANTITIES, REGIMES, main

    assert main(["--out", str(tmp_path), *TINY]) == 0
    assert "machine: " in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    report = (tmp_path / "report.md").read_text()
    algs = [a for a, _, _ in ALGORITHMS]
    assert algs == ["grpo", "trace-value", "trace-grad", "trace-noclip", "opd_all"]
    assert [r for r, *_ in REGIMES] == ["dense", "sparse", "sparse-long"] == list(summary["regimes"])
    for regime in ("dense", "sparse", "sparse-long"):
        assert f"## Regime: {regime}" in report and (tmp_path / f"curves-{regime}.png").stat().st_size > 0
        agg = summary["regimes"][regime]["algorithms"]
        assert list(agg) == algs
        clip = summary["regimes"][regime]["clip_pairs"]
        assert list(clip) == ["trace-grad - trace-value", "trace-noclip - trace-value", "trace-noclip - trace-grad"]
        for pair, dd in clip.items():
            a_, b_ = pair.split(" - ")
            want = [summary["runs"][regime][f"{a_}-s{s}"]["in_dist"] - summary["runs"][regime][f"{b_}-s{s}"]["in_dist"]
                    for s in (0, 1)]
            assert dd["in_dist"]["values"] == pytest.approx(want) and f"| {pair} |" in report
        for alg in algs:
            for q, _ in QUANTITIES:
                ci = agg[alg]["mean_ci"][q]
                if q in ("lift_fkl",):  # a 5-step warm start answers nothing right: no key spans
                    continue
                # two seeds: a mean and a t-interval around it for every quantity (grpo and opd_all have span
                # lifts through trace.measure_spans)
                assert ci["n"] == 2 and ci["lo"] <= ci["mean"] <= ci["hi"], (regime, alg, q)
            diff = agg[alg]["diff_to_grpo"]
            if alg == "grpo":
                assert diff is None
                continue
            assert diff["in_dist"]["n"] == 2 and diff["in_dist"]["lo"] <= diff["in_dist"]["hi"]
            assert diff["lift"]["n"] == 2
            assert f"| {alg} - grpo |" in report
        for alg in algs:
            for s in (0, 1):
                run = summary["runs"][regime][f"{alg}-s{s}"]
                assert len(run["reward_curve"]) == 2 and 0 <= run["in_dist"] <= 1 and 0 <= run["out_of_dist"] <= 1
    # the sparse regimes train on 4-6 operations: their runs saw those problems; sparse-long from the long warm
    # start, which was supervised on 1-6 operation chains
    cfg = (tmp_path / "sparse" / "grpo-s0" / "config.toml").read_text()
    assert "min_ops = 4" in cfg and "lift_metric = true" in cfg and "measure_spans = true" in cfg
    assert f'path = "{tmp_path / "warm_start"}"' in cfg
    long_cfg = (tmp_path / "sparse-long" / "opd_all-s1" / "config.toml").read_text()
    assert "min_ops = 4" in long_cfg and f'path = "{tmp_path / "warm_start_long"}"' in long_cfg
    assert json.loads((tmp_path / "warm_start_long" / "sft.json").read_text())["max_ops"] == 6
    assert summary["settings"]["warm_starts"]["warm_start_long"]["slip"] == 0.25
    assert 'kl_clip_mode = "grad"' in (tmp_path / "dense" / "trace-grad-s0" / "config.toml").read_text()
    assert "kl_term_clip = 0.0" in (tmp_path / "dense" / "trace-noclip-s0" / "config.toml").read_text()
    # the report rebuilt from the summary alone is the same report
    (tmp_path / "report.md").unlink()
    assert main(["--report-from", str(tmp_path / "summary.json")]) == 0
    assert (tmp_path / "report.md").read_text() == report
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_study_arguments_checked_before_any_work(tmp_path):
    from trace_train.experiments.study import main

    with pytest.raises(SystemExit, match="--regimes: unknown"):
        main(["--out", str(tmp_path / "a"), "--regimes", "dense,bogus"])
    with pytest.raises(SystemExit, match="--warm-start"):
        main(["--out", str(tmp_path / "b"), "--warm-start", str(tmp_path / "missing"), "--regimes", "dense"])
    assert not (tmp_path / "b" / "dense").exists()
