"""The lift metric (train.lift_metric): the change of the sampled tokens' log-probs across one update, on the
rows TRACE distills and on all response tokens.

Checked against an independent computation: the weights before and after the step, gathered whole, loaded
into a plain (unsharded) copy of the model, and the log-probs of the same rollouts computed in the padded
layout with an fp64 LM head. Tolerance abs 1e-6 on means of per-token differences: the trainer's log-probs
are fp32 (magnitude up to ~log V = 4, one ulp 4.8e-7) from packed rows (another attention layout, other
summation orders), so each side is good to a few ulp; measured 2026-11-26 (2-core Xeon): at most 4e-8. The
test's lr (1e-2) makes the lifts ~2e-3 to 2e-1, so a lift taken before the update (0), with a sign error,
or on the wrong rows fails.

Across 2 ranks: the tolerances tests/launch.py uses for the loss (rel 2e-4), with an absolute floor for lifts
near 0 (see test_two_ranks_equal_one_process).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from launch import train  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

from trace_train.config import load_config  # noqa: E402
from trace_train.dist import init_distributed, shutdown  # noqa: E402
from trace_train.model import load_policy, make_batch, response_hidden  # noqa: E402
from trace_train.train import Trainer  # noqa: E402

SMALL = ["train.prompts_per_step=4", "train.rollouts_per_prompt=4", "train.max_new_tokens=12",
         "trace.reverse_kl=true", "train.lift_metric=true"]


def _full_weights(policy) -> dict[str, torch.Tensor]:
    sd = get_model_state_dict(policy.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def _logprobs(cfg, weights, prompts, responses, pad_id) -> torch.Tensor:
    model, _ = load_policy(cfg.model, seed=cfg.train.seed)
    model.load_state_dict(weights)
    batch = make_batch(prompts, responses, pad_id, packed=False)
    with torch.no_grad():
        hidden = response_hidden(model, batch).double()
        logits = hidden @ model.get_output_embeddings().weight.double().T / cfg.train.temperature
        return torch.log_softmax(logits, -1).gather(1, batch.targets[:, None]).squeeze(1)


def _rows(spans_per_response, lens, selected) -> torch.Tensor:
    """Flat response-token rows of the [start, end) spans of the selected responses."""
    rows, offset = [], 0
    for spans, n, keep in zip(spans_per_response, lens, selected):
        if keep:
            rows += [offset + j for a, b in spans for j in range(a, b)]
        offset += n
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize("algorithm,extra", [("trace", []), ("grpo", ["trace.measure_spans=true"])])
def test_lift_equals_logprobs_before_and_after_the_update(tmp_path, algorithm, extra):
    cfg = load_config("toy", [f"train.output_dir={tmp_path}", *SMALL, f"train.algorithm={algorithm}", *extra,
                              "train.lr=1e-2", "train.micro_batch_tokens=150", "train.export_hf=false"])
    d = init_distributed()
    try:
        tr = Trainer(cfg, d)
        # The untrained model answers nothing right: call every other response correct, with a key span on
        # its tokens 1..3, so that both forward-KL rows (key spans) and reverse-KL rows (error spans) exist.
        tr.task.reward = lambda text, ex: float(len(text) % 2 == 0)
        seen = {}
        rollouts, annotate = tr.rollouts, tr.annotate
        tr.rollouts = lambda step: seen.setdefault("s", rollouts(step))

        def annotate_with_keys(step, s):
            annotate(step, s)
            for i, r in enumerate(s.rewards.tolist()):
                if r:
                    s.key[i] = [(1, min(4, s.lens[i]))]

        tr.annotate = annotate_with_keys
        w_before = _full_weights(tr.policy)
        m = tr.train_step(0)
        w_after = _full_weights(tr.policy)
    finally:
        shutdown()
    s = seen["s"]
    correct = [bool(r) for r in s.rewards]
    assert any(correct) and not all(correct)
    assert m["micro_batches"] > 1  # the metric is summed over several micro-batches
    args = (s.ro.prompts, s.ro.responses, tr.tok.pad_token_id)
    delta = _logprobs(cfg, w_after, *args) - _logprobs(cfg, w_before, *args)
    key = _rows(s.key, s.lens, correct)
    err = _rows(s.err, s.lens, [not c for c in correct])
    assert key.numel() > 0 and err.numel() > 0
    want = {"lift_fkl": delta[key].mean(), "lift_rkl": delta[err].mean(), "lift": delta[torch.cat([key, err])].mean(),
            "lift_all": delta.mean()}
    for k, v in want.items():
        assert abs(v.item()) > 1e-4, (k, v)  # 100x the tolerance: a lift of 0 (taken before the update) fails
        assert m[k] == pytest.approx(v.item(), abs=1e-6), k
    if algorithm == "grpo":  # measured, not routed: no KL, no teacher
        assert m["teacher_rollouts"] == 0 and m["span_fraction"] == 0 and m["fkl"] is None and m["rkl"] is None


def test_lift_off_and_no_spans(tmp_path):
    """Off by default (None), and None for lift when no span rows exist (grpo without measure_spans);
    lift_all is still measured."""
    from trace_train.train import run

    off = run(load_config("toy", [f"train.output_dir={tmp_path / 'off'}", *SMALL[:-1], "train.max_steps=1",
                                  "train.export_hf=false"]))
    assert all(off[0][k] is None for k in ("lift", "lift_fkl", "lift_rkl", "lift_all"))
    grpo = run(load_config("toy", [f"train.output_dir={tmp_path / 'grpo'}", *SMALL, "train.algorithm=grpo",
                                   "train.max_steps=1", "train.export_hf=false"]))
    assert grpo[0]["lift"] is None and grpo[0]["lift_all"] is not None


def test_two_ranks_equal_one_process(tmp_path):
    """torchrun x2 with uneven micro-batches (a rank runs dummies in the lift pass too): the same lifts as
    one process. Tolerance: rel 2e-4 as for the loss (differences of near-equal log-probs), with abs 2e-6
    for lifts near 0: two ranks' weights after a step differ by Adam-amplified round-off (tests/
    test_train_dist.py), which moves log-probs by ~1e-7 per token. Measured 2026-11-26 (2-core Xeon): at most
    3e-8 apart on lifts of 3e-4 to 1e-2."""
    args = ["--config", "toy", *SMALL, "train.max_steps=2", "train.lr=3e-4", "train.micro_batch_tokens=150",
            "train.export_hf=false"]
    one = train(tmp_path / "one", 1, args)
    two = train(tmp_path / "two", 2, args)
    assert any(m["dummy_micro_batches"] > 0 for m in two)
    for a, b in zip(one, two, strict=True):
        assert a["lift"] is not None and a["lift_all"] is not None
        for k in ("lift", "lift_fkl", "lift_rkl", "lift_all"):
            if a[k] is None or b[k] is None:
                assert a[k] is b[k], (a["step"], k)
            else:
                assert b[k] == pytest.approx(a[k], rel=2e-4, abs=2e-6), (a["step"], k, a[k], b[k])
