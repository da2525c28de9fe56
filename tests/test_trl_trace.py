"""TRACE through TRL: `TraceGRPOTrainer` with a `TraceGRPOConfig`.

- At lambda 0 the loss and gradients are bit-for-bit those of the GRPO path (no teacher, no KL rows).
- With spans, the loss equals a materialized reference: TRL's GRPO term with span tokens at
  (1 - lambda / w0) of their weight, plus TRL SDPO's full-logit divergence (`trl.experimental.sdpo`,
  alpha 0 = forward KL, alpha 1 = reverse KL) on the same span mask, each weighted lambda / (B |y| GA).
  Tolerance 2e-5 of the largest entry, as in test_trl_grpo.py (fp32 round-off of different summation
  orders; the reference holds [B, T, V] logits).
- Two TRACE steps train on the CPU and log lambda, span fraction, KLs and annotator failures.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from trl_setup import PROMPTS, make_trainer, random_batch, save_tiny_model  # noqa: E402

from trace_train.annotate import Annotation  # noqa: E402
from trace_train.integrations.trl import FORWARD, REVERSE, TraceGRPOConfig, TraceGRPOTrainer  # noqa: E402
from trace_train.integrations.trl_loss import pg_weights, trl_token_loss  # noqa: E402

TOL = 2e-5
ROWS = {"prompt": PROMPTS, "problem": PROMPTS, "answer": ["5", "41", "5", "3", "16", "-2"]}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def first_chars_annotator(calls):
    """Marks the first three characters of each response; the first job fails (a mapping of failure kinds)."""
    def annotate(jobs, examples, seeds):
        calls.append([j.correct for j in jobs])
        out = [None] + [Annotation(key_spans=[(0, 3)] if j.correct else [], error_spans=[] if j.correct else [(0, 3)],
                                   diagnostic=None if j.correct else "wrong step") for j in jobs[1:]]
        return out, {"malformed": 1}
    return annotate


def privileged(row, diagnostic):
    return row["prompt"] + "A" + row["answer"] + ("D" if diagnostic else "") + "="


def trace_trainer(path, out, **config):
    return make_trainer(TraceGRPOTrainer, path, out, config_cls=TraceGRPOConfig, dataset_rows=ROWS,
                        trainer_kwargs=dict(annotator=first_chars_annotator([]), privileged_prompt=privileged),
                        **config)


def _loss_and_grads(trainer, inputs, accumulation=1):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, dict(inputs))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def trace_batch(vocab, lam, seed=0):
    inputs = random_batch(vocab, seed=seed)
    b, t = inputs["completion_ids"].shape
    span = torch.zeros(b, t, dtype=torch.int8)
    span[0, 1:4] = FORWARD
    span[2, 0:2] = REVERSE
    span[3, 2:5] = FORWARD  # partly beyond the completion's 3 tokens: only the masked-in part counts
    g = torch.Generator().manual_seed(seed + 1)
    teacher_ids = torch.randint(3, vocab, (b, 6), generator=g)
    teacher_mask = torch.ones(b, 6, dtype=torch.long)
    teacher_mask[1] = 0  # no spans: no teacher prompt
    teacher_mask[2, :3] = 0
    inputs.update(trace_span=span, trace_lambda=torch.full((b,), lam), trace_teacher_prompt_ids=teacher_ids,
                  trace_teacher_prompt_mask=teacher_mask)
    return inputs


def test_lambda_zero_is_the_grpo_path_exactly(model_path, tmp_path):
    grpo = make_trainer(TraceGRPOTrainer, model_path, tmp_path / "grpo", beta=0.04)
    trace = trace_trainer(model_path, tmp_path / "trace", beta=0.04)
    inputs = trace_batch(len(grpo._tokenizer), lam=0.0)
    inputs["ref_per_token_logps"] = -3 + torch.randn(inputs["completion_ids"].shape)
    loss_g, grads_g = _loss_and_grads(grpo, {k: v for k, v in inputs.items() if not k.startswith("trace_")})
    loss_t, grads_t = _loss_and_grads(trace, inputs)
    assert torch.equal(loss_g, loss_t)
    assert all(torch.equal(grads_g[n], grads_t[n]) for n in grads_g)


@pytest.mark.parametrize("direction,loss_type", [("forward", "grpo"), ("reverse", "grpo"),
                                                 ("reverse", "sapo")])  # sapo: the prepass, KL in the same call
def test_span_kl_equals_trl_sdpo_full_logit_loss(model_path, tmp_path, direction, loss_type):
    from trl.experimental.sdpo.loss_utils import compute_full_logit_self_distillation_loss

    lam, w0, temperature, accumulation = 0.3, 0.5, 0.9, 2
    trainer = trace_trainer(model_path, tmp_path, loss_type=loss_type, trace_kl_term_clip=None, trace_w0=w0,
                            temperature=temperature, trace_reverse_kl=True)
    inputs = trace_batch(len(trainer._tokenizer), lam)
    kind = FORWARD if direction == "forward" else REVERSE
    inputs["trace_span"] = torch.where(inputs["trace_span"] > 0, kind, 0).to(torch.int8)
    loss, grads = _loss_and_grads(trainer, inputs, accumulation)

    # The reference, from [B, T, V] logits of the model's own forward.
    model = trainer.model
    model.zero_grad(set_to_none=True)
    t = inputs["completion_ids"].shape[1]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    student = model(input_ids=ids, attention_mask=att).logits[:, -t - 1:-1] / temperature
    with torch.no_grad():
        tids = torch.cat([inputs["trace_teacher_prompt_ids"], inputs["completion_ids"]], 1)
        tatt = torch.cat([inputs["trace_teacher_prompt_mask"], inputs["completion_mask"]], 1)
        teacher = model(input_ids=tids, attention_mask=tatt).logits[:, -t - 1:-1] / temperature
    mask = inputs["completion_mask"].bool()
    logp = torch.log_softmax(student, -1).gather(-1, inputs["completion_ids"][..., None])[..., 0]
    span = inputs["trace_span"].long() * mask
    pg = trl_token_loss(logp, logp.detach(), None, inputs["advantages"][:, None], beta=0.0, eps_low=0.2,
                        eps_high=0.2, delta=None, bias_correction=False, loss_type=loss_type)
    w = pg_weights(loss_type, mask, accumulation=accumulation, max_completion_length=None, num_items_in_batch=None,
                   num_processes=1, steps_per_generation=1, training=True)
    w = torch.where(span > 0, w * (1 - lam / w0), w)
    kl_w = lam / (mask.shape[0] * accumulation * mask.sum(-1, keepdim=True).float())
    alpha = 0.0 if direction == "forward" else 1.0
    per_token_kl = compute_full_logit_self_distillation_loss(student, teacher, distillation_alpha=alpha)
    ref = (pg * w).sum() + (per_token_kl * kl_w * (span > 0)).sum()
    ref.backward()
    assert (span > 0).sum() == 6
    assert abs(loss.item() - ref.item()) <= TOL * abs(ref.item())
    for name, p in model.named_parameters():
        assert (grads[name] - p.grad).abs().max() <= TOL * p.grad.abs().max(), name
    kl_metric = trainer._metrics["train"][f"trace/{'fkl' if direction == 'forward' else 'rkl'}"][-1]
    assert kl_metric == pytest.approx((per_token_kl * (span > 0)).sum().item() / 6, rel=1e-4)


def test_two_trace_steps_train_and_log(model_path, tmp_path):
    calls, prompts_seen = [], []

    def privileged_prompt(row, diagnostic):
        prompts_seen.append(diagnostic)
        return privileged(row, diagnostic)

    trainer = make_trainer(TraceGRPOTrainer, model_path, tmp_path, config_cls=TraceGRPOConfig, dataset_rows=ROWS,
                           trainer_kwargs=dict(annotator=first_chars_annotator(calls),
                                               privileged_prompt=privileged_prompt),
                           max_steps=2, trace_hold_steps=2, trace_reverse_kl=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and len(calls) == 2
    for h in logs:
        assert h["trace/lambda"] == 0.5 and h["trace/annotator_failures"] == 1
        assert 0 < h["trace/span_fraction"] <= 0.25 and h["trace/teacher_rollouts"] >= 1
        assert h["trace/fkl"] >= 0 and h["trace/rkl"] >= 0 and torch.isfinite(torch.tensor(h["loss"]))
    assert 1 <= len(prompts_seen) <= 2 * 3  # only rollouts with spans get a privileged prompt
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_no_annotator_call_once_lambda_is_zero(model_path, tmp_path):
    def refuse(*args):
        raise AssertionError("the annotator must not run at lambda 0")

    trainer = make_trainer(TraceGRPOTrainer, model_path, tmp_path, config_cls=TraceGRPOConfig, dataset_rows=ROWS,
                           trainer_kwargs=dict(annotator=refuse, privileged_prompt=refuse), max_steps=1,
                           trace_hold_steps=0, trace_decay_steps=0)
    trainer.train()
    assert [h["trace/lambda"] for h in trainer.state.log_history if "loss" in h] == [0.0]


def test_kl_clip_mode_grad_reaches_the_loss(model_path, tmp_path):
    """trace_kl_clip_mode="grad": the loss value is the unclipped KL's, the gradient is not its gradient."""
    kw = dict(loss_type="grpo", trace_reverse_kl=True)
    plain = trace_trainer(model_path, tmp_path / "plain", trace_kl_term_clip=None, **kw)
    clipped = trace_trainer(model_path, tmp_path / "grad", trace_kl_term_clip=0.001, trace_kl_clip_mode="grad", **kw)
    inputs = trace_batch(len(plain._tokenizer), lam=0.3)
    loss_p, grads_p = _loss_and_grads(plain, inputs)
    loss_g, grads_g = _loss_and_grads(clipped, inputs)
    assert loss_g.item() == pytest.approx(loss_p.item(), rel=1e-6)
    scale = max(g.abs().max().item() for g in grads_p.values())
    assert max((grads_g[n] - grads_p[n]).abs().max().item() for n in grads_p) > 1e-3 * scale


def test_trace_config_errors(model_path, tmp_path):
    with pytest.raises(ValueError, match="annotator and privileged_prompt"):
        make_trainer(TraceGRPOTrainer, model_path, tmp_path, config_cls=TraceGRPOConfig)
    for bad in ({"trace_teacher": "snapshot"}, {"trace_span_cap": 1.5}, {"trace_w0": 0.0},
                {"trace_kl_term_clip": -1.0}, {"trace_kl_clip_mode": "both"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TraceGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **bad)


def test_example_runs(tmp_path, capsys):
    """examples/trl_trace.py end to end, shortened (2 SFT steps, 2 TRACE steps)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "trl_trace.py")
    spec = importlib.util.spec_from_file_location("trl_trace_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--sft-steps", "2", "--steps", "2", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out.split("entropy\n")[1].splitlines()
    assert [line.split()[0] for line in table[:2]] == ["1", "2"]
    assert float(table[0].split()[2]) == 0.5  # lambda at step 0: w0
