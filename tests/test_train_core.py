"""trace_train's pure pieces against hand-computed values: config, schedule, span cap, routing weights,
group advantages, and the synthetic task's reward and exact annotator."""

from __future__ import annotations

import random

import pytest
import torch

from trace_train.config import load_config, save_config
from trace_train.routing import cap_spans, group_advantages, lambda_at, route
from trace_train.tasks import arith

# ---- config


def test_config_toml_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nalgorithm = "grpo"\nmax_steps = 5\n[loss]\nbeta = 0.01\n')
    cfg = load_config(str(path), ["train.max_steps=7", "trace.reverse_kl=true", "loss.clip_high=0.3",
                                  "train.output_dir=runs/x", "loss.kl_clip_mode=grad"])
    assert cfg.loss.kl_clip_mode == "grad" and load_config(None).loss.kl_clip_mode == "value"
    assert (cfg.train.algorithm, cfg.train.max_steps, cfg.loss.beta) == ("grpo", 7, 0.01)
    assert cfg.trace.reverse_kl is True and cfg.loss.clip_high == 0.3 and cfg.train.output_dir == "runs/x"
    save_config(cfg, str(tmp_path / "resolved.toml"))
    assert load_config(str(tmp_path / "resolved.toml")) == cfg


@pytest.mark.parametrize("override,match", [
    ("train.algorithm=ppo", "train.algorithm"), ("train.nope=1", "train.nope"), ("nosection.x=1", "nosection"),
    ("train.max_steps=ten", "train.max_steps"), ("train.max_steps", "section.key=value"),
    ("trace.span_cap=1.5", "span_cap"), ("train.max_steps=1.5", "train.max_steps"),
    ("loss.kl_clip_mode=both", "loss.kl_clip_mode"),
])
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


# ---- schedule and spans


def test_lambda_schedule_matches_the_paper():
    """0.5 for steps 0-9, then linearly to 0 at step 40; 0 afterwards."""
    assert [lambda_at(s) for s in (0, 9, 10)] == [0.5, 0.5, 0.5]
    assert lambda_at(25) == pytest.approx(0.25)
    assert lambda_at(39) == pytest.approx(0.5 / 30)
    assert lambda_at(40) == 0.0 and lambda_at(1000) == 0.0


def test_cap_spans():
    assert cap_spans([(0, 3), (10, 20)], length=40, cap=0.25) == [(0, 3), (10, 17)]  # 10 tokens at most
    assert cap_spans([(5, 8), (2, 6), (30, 50)], length=40) == [(2, 8), (30, 34)]  # merged, clipped
    assert cap_spans([(0, 10)], length=3) == []  # floor(0.75) = 0 tokens allowed
    assert cap_spans([], length=10) == []


# ---- routing


def test_routing_trace_forward_on_correct_reverse_on_incorrect():
    lengths, lam, w0 = [4, 5], 0.25, 0.5
    r = route(lengths, correct=[True, False], key_spans=[[(1, 3)], []], error_spans=[[], [(0, 2)]],
              algorithm="trace", lam=lam, w0=w0, forward_kl=True, reverse_kl=True, aggregation="token-mean")
    base = 1 / 9
    expected_pg = [base, base * 0.5, base * 0.5, base, base * 0.5, base * 0.5, base, base, base]
    assert torch.allclose(r.pg_weight_N, torch.tensor(expected_pg))
    assert r.kl_index_M.tolist() == [1, 2, 4, 5]
    assert torch.allclose(r.fkl_weight_M, torch.tensor([lam / (2 * 4)] * 2 + [0.0] * 2))
    assert torch.allclose(r.rkl_weight_M, torch.tensor([0.0] * 2 + [lam / (2 * 5)] * 2))
    assert r.teacher_responses == [0, 1]


def test_routing_without_reverse_kl_and_after_warmup():
    args = dict(correct=[True, False], key_spans=[[(0, 1)], []], error_spans=[[], [(0, 2)]], algorithm="trace")
    r = route([3, 3], lam=0.5, **args)  # reverse KL off by default: only the correct response's key span
    assert r.kl_index_M.tolist() == [0] and r.teacher_responses == [0]
    assert r.pg_weight_N[0] == 0  # lambda = w0: span tokens are distilled only
    r = route([3, 3], lam=0.0, **args)  # after the warm-up: pure GRPO, no teacher
    assert not r.has_kl and r.teacher_responses == [] and torch.allclose(r.pg_weight_N, torch.full((6,), 1 / 6))


def test_routing_seq_mean_token_mean_and_global_normaliser():
    r = route([2, 4], correct=[True, True], key_spans=[[], []], error_spans=[[], []], algorithm="grpo", lam=0.5,
              aggregation="seq-mean-token-mean", global_responses=4)
    assert torch.allclose(r.pg_weight_N, torch.tensor([1 / 8] * 2 + [1 / 16] * 4))
    r = route([2, 4], correct=[True, True], key_spans=[[], []], error_spans=[[], []], algorithm="grpo", lam=0.5,
              global_tokens=12)
    assert torch.allclose(r.pg_weight_N, torch.full((6,), 1 / 12))


def test_routing_opd_all_every_token():
    r = route([2, 3], correct=[True, False], key_spans=[[], []], error_spans=[[], []], algorithm="opd_all", lam=0.25,
              opd_all_direction="reverse")
    assert r.kl_index_M.tolist() == [0, 1, 2, 3, 4]
    assert torch.allclose(r.rkl_weight_M, torch.tensor([0.25 / 4] * 2 + [0.25 / 6] * 3))
    assert (r.fkl_weight_M == 0).all()
    assert torch.allclose(r.pg_weight_N, torch.full((5,), 0.5 / 5))


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert (adv[1] == 0).all()
    assert torch.allclose(group_advantages(rewards, "mean")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


# ---- the synthetic task


def test_problem_solution_and_reward():
    p = arith.Problem(3, (("+", 4), ("*", 2), ("-", 5)))
    assert p.text == "3+4*2-5" and p.solution == "3+4=7,7*2=4,4-5=9;9" and p.answer == 9
    assert arith.reward("3+4=7,7*2=4,4-5=9;9", p) == 1.0
    assert arith.reward("3+4=7,7*2=4,4-5=8;8", p) == 0.0
    assert arith.reward("garbage", p) == 0.0


@pytest.mark.parametrize("response,key,error,diag", [
    ("3+4=7,7*2=4,4-5=9;9", [(4, 5), (10, 11), (16, 17), (18, 19)], [], None),
    ("3+4=7,7*2=5,5-5=0;0", [], [(10, 11)], arith.DIAGNOSTICS[1]),   # slip in step 2
    ("3+4=7,8*2=6,6-5=1;1", [], [(6, 11)], arith.DIAGNOSTICS[0]),   # wrong value carried
    ("3+4=7,7*2=4;4", [], [(11, 12)], arith.DIAGNOSTICS[2]),          # a step missing
    ("3+4=7,7*2=4,4-5=9;3", [], [(17, 19)], arith.DIAGNOSTICS[3]),    # answer != last step
    ("3+4=7,7*2=4,4-5=9", [], [(16, 17)], arith.DIAGNOSTICS[3]),      # no answer at all
    ("3+4=7,7*=4,4-5=9;9", [], [], None),                            # right answer, broken step
])
def test_annotator(response, key, error, diag):
    p = arith.Problem(3, (("+", 4), ("*", 2), ("-", 5)))
    a = arith.annotate(response, p)
    assert (a.key_spans, a.error_spans, a.diagnostic) == (key, error, diag)


def test_annotator_spans_hold_what_they_claim():
    """On random problems and corrupted solutions: key spans cover step results of correct responses, the
    error span of an incorrect response starts at or before the first character that differs."""
    rng = random.Random(0)
    for _ in range(300):
        p = arith.sample_problem(rng, rng.randrange(1, 6))
        good = p.solution
        a = arith.annotate(good, p)
        assert a.error_spans == [] and [good[s:e] for s, e in a.key_spans] == [str(c) for *_, c in p.steps()] + [
            str(p.answer)]
        i = rng.randrange(len(good))
        bad = good[:i] + rng.choice("0123456789+-*=,;") + good[i + 1:]
        if arith.reward(bad, p) == 1.0:
            continue
        a = arith.annotate(bad, p)
        assert len(a.error_spans) == 1 and a.diagnostic in arith.DIAGNOSTICS and a.key_spans == []
        assert a.error_spans[0][0] <= i + 1


def test_prompts_keep_the_span_text_from_the_teacher():
    p = arith.Problem(1, (("+", 2),))
    assert arith.student_prompt(p) == "Q:1+2\nA:"
    assert arith.teacher_prompt(p, arith.DIAGNOSTICS[1]) == f"Q:1+2\nR:1+2=3;3\nD:{arith.DIAGNOSTICS[1]}\nA:"
