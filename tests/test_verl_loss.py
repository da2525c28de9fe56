"""`TraceVerlLoss` inside verl's engine step, against verl itself and a materialized reference.

Every batch goes verl's way (DataProto -> to_tensordict -> left_right_2_no_padding -> prepare_micro_batches ->
FSDPEngineWithLMHead.prepare_model_inputs -> the model patched by verl's monkey patch -> prepare_model_outputs ->
the loss), with verl's global_batch_info (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor),
rollout_is_weights, use_kl_loss and entropy_coeff. The reference for lambda 0 is verl's own path: verl's
forward and kernels (trace_train.integrations.verl uninstalled) and verl's `ppo_loss`. For lambda > 0 it is
that plus the span KLs materialized in fp64 from full logits, the teacher run separately on each privileged
prompt + response. Summed over the micro-batches of an accumulation, loss and every parameter gradient agree
to relative 1e-4 (fp32; gradients per tensor against its largest entry).

Packed (use_remove_padding) batches on the CPU: transformers' sdpa does not separate packed sequences here, so
the packed teacher is checked on a model without layers (every row depends on its own token only); the padded
layout runs a 2-layer model.
"""

from __future__ import annotations

import pickle

import pytest
import torch

verl = pytest.importorskip("verl")

from verl_setup import (  # noqa: E402,F401
    actor_config,
    micro_batches,
    patch,
    restore_patches,
    rollout_batch,
    tiny_model,
    train_step,
    verl_loss,
)

import trace_train.integrations.verl as tv  # noqa: E402
from trace_train.integrations import verl_handoff  # noqa: E402
from trace_train.integrations.verl_loss import FORWARD, REVERSE  # noqa: E402

REL = 1e-4


def assert_same(ours, ref, rel=REL):
    loss_a, grads_a, _ = ours
    loss_b, grads_b, _ = ref
    assert loss_a == pytest.approx(loss_b, rel=rel, abs=1e-7)
    assert grads_a.keys() == grads_b.keys()
    worst = 0.0
    for k in grads_b:
        scale = grads_b[k].abs().max().clamp(min=1e-30)
        err = float((grads_a[k] - grads_b[k]).abs().max() / scale)
        worst = max(worst, err)
        assert err <= rel, (k, err)
    return worst


def run_verl(model, mbs_fn, config, backend="torch"):
    """verl alone: its forward, its kernels, its ppo_loss."""
    tv.uninstall()
    patch(model, backend)
    try:
        return train_step(model, mbs_fn(), verl_loss(config))
    finally:
        tv.install()


def run_trace(model, mbs_fn, config, backend="torch", **options):
    tv.install()
    patch(model, backend)
    loss_fn = tv.TraceVerlLoss(config, **options)
    return train_step(model, mbs_fn(), loss_fn), loss_fn


CONFIGS = {
    # fused: verl's vanilla clipped loss is trace_loss's PG term
    "vanilla-token-mean": dict(loss_agg_mode="token-mean"),
    "vanilla-seq-mean-token-mean-entropy": dict(loss_agg_mode="seq-mean-token-mean", entropy_coeff=0.01),
    "vanilla-seq-mean-token-sum-norm": dict(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=16,
                                            clip_ratio_c=2.0),
    "vanilla-token-sum-symmetric-clip": dict(loss_agg_mode="token-sum", clip_ratio=0.2, clip_ratio_low=None,
                                             clip_ratio_high=None),
    # prepass: verl's loss on the log-probs, its gradient through trace_loss
    "kl-low_var_kl": dict(use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.5, entropy_coeff=0.01),
    "kl-k1-seq-mean-token-sum": dict(use_kl_loss=True, kl_loss_type="k1", loss_agg_mode="seq-mean-token-sum"),
    "gspo": dict(policy_loss={"loss_mode": "gspo"}, loss_agg_mode="seq-mean-token-mean", clip_ratio_low=3e-4,
                 clip_ratio_high=4e-4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("remove_padding", [True, False], ids=["packed", "padded"])
def test_lambda_zero_equals_verl_ppo_loss(name, remove_padding):
    options = dict(CONFIGS[name])
    if "policy_loss" in options:
        from verl.workers.config.actor import PolicyLossConfig

        options["policy_loss"] = PolicyLossConfig(**options["policy_loss"])
    config = actor_config(**options)
    batch = rollout_batch(b=4, temperature=0.9)
    global_b = 8 if "seq" in config.loss_agg_mode else None  # as if another rank held 4 more rollouts

    def mbs():
        return micro_batches(batch, remove_padding=remove_padding, global_batch_size=global_b)

    model = tiny_model(layers=2)
    ref = run_verl(model, mbs, config)
    ours, loss_fn = run_trace(model, mbs, config)
    assert loss_fn.fused == (name.startswith("vanilla"))
    assert_same(ours, ref)
    for a, b in zip(ours[2], ref[2]):  # verl's metrics, computed on our log-probs
        for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
            assert a[key].aggregate() == pytest.approx(b[key].aggregate(), rel=1e-4, abs=1e-6)
    assert any(m["actor/pg_clipfrac"].aggregate() > 0 for m in ref[2])  # the clip is exercised


def test_trace_fields_at_lambda_zero_change_nothing():
    config = actor_config(entropy_coeff=0.01)
    batch = rollout_batch(b=4)
    b, r = batch.batch["responses"].shape
    batch.batch["trace_span"] = torch.ones(b, r, dtype=torch.int8)
    batch.batch["trace_lambda"] = torch.zeros(b)
    batch.batch["trace_teacher_input_ids"] = torch.ones(b, 3, dtype=torch.long)
    batch.batch["trace_teacher_attention_mask"] = torch.ones(b, 3, dtype=torch.long)
    model = tiny_model(layers=2)
    ref = run_verl(model, lambda: micro_batches(batch), config)
    ours, _ = run_trace(model, lambda: micro_batches(batch), config)
    assert_same(ours, ref)


# ---------------------------------------------------------------------------------------------------- lambda > 0
def _add_spans(batch, lam, seed=0):
    """Forward spans on rollout 0, reverse on rollout 2, none on 1 and 3; privileged prompts of other lengths."""
    g = torch.Generator().manual_seed(seed)
    b, r = batch.batch["responses"].shape
    span = torch.zeros(b, r, dtype=torch.int8)
    span[0, 0:3] = FORWARD  # each from position 0: the row read from the prompt's last token (see the test)
    span[2, 0:2] = REVERSE
    span[2, 4] = REVERSE
    width = 6
    ids = torch.zeros(b, width, dtype=torch.long)
    att = torch.zeros(b, width, dtype=torch.long)
    for i, n in ((0, 6), (2, 4)):
        ids[i, width - n:] = torch.randint(3, 50, (n,), generator=g)
        att[i, width - n:] = 1
    batch.batch.update(dict(trace_span=span, trace_lambda=torch.full((b,), lam),
                            trace_teacher_input_ids=ids, trace_teacher_attention_mask=att))
    return batch


def _kl_reference(model, batch, lam, w0, global_b, temperature):
    """sum over span tokens of lambda / (G |y_b|) KL_t, materialized: student logits from a separate forward of
    each rollout, teacher logits from its privileged prompt + response, fp64 softmaxes."""
    t = batch.batch
    prompts, responses, att = t["prompts"], t["responses"], t["attention_mask"]
    p = prompts.shape[1]
    mask = t["response_mask"].bool()
    total = 0.0
    for b in range(prompts.shape[0]):
        kinds = t["trace_span"][b] * mask[b]
        if not bool((kinds > 0).any()):
            continue
        n_resp = int(att[b, p:].sum())
        prompt = prompts[b][att[b, :p].bool()]
        response = responses[b, :n_resp]
        student = model.model(input_ids=torch.cat([prompt, response])[None]).last_hidden_state[0]
        student_z = (student[prompt.numel() - 1:-1] @ model.lm_head.weight.T).double() / temperature
        tp = t["trace_teacher_input_ids"][b][t["trace_teacher_attention_mask"][b].bool()]
        with torch.no_grad():
            teacher = model.model(input_ids=torch.cat([tp, response])[None]).last_hidden_state[0]
            teacher_z = (teacher[tp.numel() - 1:-1] @ model.lm_head.weight.T).double() / temperature
        logp, logq = student_z.log_softmax(-1), teacher_z.log_softmax(-1)
        fkl = (logq.exp() * (logq - logp)).sum(-1)
        rkl = (logp.exp() * (logp - logq)).sum(-1)
        weight = lam / (global_b * float(mask[b].sum()))
        kinds = kinds[:n_resp]
        total = total + weight * (fkl[kinds == FORWARD].sum() + rkl[kinds == REVERSE].sum())
    return total


def _reference_step(model, batch, config, lam, w0, global_b, remove_padding):
    """verl's ppo_loss with rollout_is_weights x (1 - lambda / w0) on span tokens, plus the materialized KL."""
    scaled = rollout_batch(b=4, temperature=batch.meta_info["temperature"])
    scaled.batch.update({k: v for k, v in batch.batch.items()})
    span = (batch.batch["trace_span"] > 0) & batch.batch["response_mask"].bool()
    scaled.batch["rollout_is_weights"] = batch.batch["rollout_is_weights"] * torch.where(span, 1 - lam / w0, 1.0)
    drop = ("trace_span", "trace_lambda", "trace_teacher_input_ids", "trace_teacher_attention_mask")
    loss, grads, metrics = run_verl(model, lambda: micro_batches(scaled, remove_padding=remove_padding,
                                                                 global_batch_size=global_b, drop=drop), config)
    model.zero_grad(set_to_none=True)
    kl = _kl_reference(model, batch, lam, w0, global_b, batch.meta_info["temperature"])
    kl.float().backward()
    for n, prm in model.named_parameters():
        if prm.grad is not None:
            grads[n] = grads[n] + prm.grad if n in grads else prm.grad.clone()
    return loss + float(kl), grads, metrics


@pytest.mark.parametrize("name", ["vanilla-token-mean", "kl-low_var_kl"])
@pytest.mark.parametrize("remove_padding,layers", [(True, 0), (False, 2)], ids=["packed", "padded"])
def test_trace_loss_equals_materialized_reference(name, remove_padding, layers):
    config = actor_config(**CONFIGS[name])
    lam, w0, global_b = 0.3, 0.5, 6
    batch = _add_spans(rollout_batch(b=4, temperature=0.9), lam)

    def mbs():
        return micro_batches(batch, remove_padding=remove_padding, global_batch_size=global_b)

    model = tiny_model(layers=layers)
    ref = _reference_step(model, batch, config, lam, w0, global_b, remove_padding)
    ours, _ = run_trace(model, mbs, config, w0=w0)
    assert_same(ours, ref)
    metrics = ours[2]
    assert [m["trace/span_tokens"] for m in metrics] == [3, 3]  # micro-batch 1: rollout 0, 2: rollout 2
    # Without layers (packed) a row depends on its own token only: the KL is 0 except on position 0, whose
    # row is the prompt's last token (the teacher's prompt differs), which a misaligned row would not give.
    assert metrics[0]["trace/fkl"] > 1e-4 and metrics[1]["trace/rkl"] > 1e-4 and metrics[0]["trace/rkl"] == 0


def test_every_micro_batch_runs_one_teacher_forward_while_lambda_is_positive(monkeypatch):
    """A micro-batch without spans still runs a (dummy) teacher forward, so that FSDP ranks stay in step."""
    calls = []
    original = verl_handoff.teacher_hidden_states

    def counting(model, **inputs):
        calls.append(inputs["input_ids"].shape)
        return original(model, **inputs)

    monkeypatch.setattr(verl_handoff, "teacher_hidden_states", counting)
    config = actor_config()
    batch = _add_spans(rollout_batch(b=4), 0.3)
    batch.batch["trace_span"][2] = 0  # the second micro-batch (rollouts 2, 3) has no spans
    model = tiny_model(layers=2)
    ref = _reference_step(model, batch, config, 0.3, 0.5, 4, True)
    ours, _ = run_trace(model, lambda: micro_batches(batch, global_batch_size=4), config)
    assert len(calls) == 2 and calls[1] == (1, 2)
    assert_same(ours, ref)


def test_refusals_name_the_option():
    with pytest.raises(ValueError, match="ulysses_sequence_parallel_size=2"):
        tv.TraceVerlLoss(actor_config(ulysses_sequence_parallel_size=2))
    with pytest.raises(ValueError, match="w0"):
        tv.TraceVerlLoss(actor_config(), w0=0)
    loss_fn = tv.TraceVerlLoss(actor_config())
    mb = micro_batches(rollout_batch(b=2))[0]
    with pytest.raises(RuntimeError, match="use_fused_kernels"):
        loss_fn(model_output={}, data=mb)


def test_a_forward_only_loss_evaluation_is_verl_s():
    """verl's infer_batch may evaluate the loss without gradient: the forward then computed the log-probs itself."""
    from verl_setup import cpu_engine, forward_step

    config = actor_config(entropy_coeff=0.01)
    batch = rollout_batch(b=4)
    model = tiny_model(layers=1)
    losses = []
    for ours in (False, True):
        if ours:
            tv.install()
        else:
            tv.uninstall()
        patch(model)
        loss_fn = tv.TraceVerlLoss(config) if ours else verl_loss(config)
        with torch.no_grad():
            losses.append(sum(float(forward_step(cpu_engine(), model, mb, loss_fn)[0])
                              for mb in micro_batches(batch)))
    assert losses[1] == pytest.approx(losses[0], rel=REL)


def test_the_loss_arms_the_worker_it_is_sent_to():
    """Ray pickles the loss to the actor workers (set_loss_fn): unpickling arms the hand-over there."""
    data = pickle.dumps(tv.TraceVerlLoss(actor_config()))
    verl_handoff.disarm()
    pickle.loads(data)
    assert verl_handoff.State.armed


def test_forwards_without_gradient_stay_verl_s():
    """compute_log_prob / the reference policy run without gradient: log-probs as verl's, no hand-over."""
    tv.TraceVerlLoss(actor_config())
    model = tiny_model(layers=1)
    patch(model)
    ids = torch.randint(3, 50, (1, 9))
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=torch.arange(9)[None], return_dict=True, use_cache=False,
                    shift_labels=torch.roll(ids, -1, 1))
    assert verl_handoff.State.handoff is None
    assert bool((out.log_probs < 0).all())
