"""The driver's side of TRACE in verl: `trace_batch_fields` on a verl `DataProto` after rewards (spans from the
annotator mapped to tokens and capped, privileged prompts tokenized, lambda's schedule), and the fields it adds
travelling verl's way to the actor's micro-batches, where `TraceVerlLoss` reads them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")

from verl_setup import actor_config, micro_batches, patch, restore_patches, tiny_model, train_step  # noqa: E402,F401

import trace_train.integrations.verl as tv  # noqa: E402
from trace_train.annotate import Annotation  # noqa: E402
from trace_train.model import build_char_tokenizer  # noqa: E402

PROMPTS = ["2+3=", "9-4=", "7*6=", "1+1="]
RESPONSES = ["2+3=5 so 5", "9-4=6", "7*6=42 ok", "1+1=3 no"]
SCORES = [1.0, 0.0, 1.0, 0.0]


def _batch(tok):
    from verl import DataProto

    p = max(len(x) for x in PROMPTS)
    r = max(len(x) for x in RESPONSES) + 2
    b = len(PROMPTS)
    prompts = torch.full((b, p), tok.pad_token_id)
    responses = torch.full((b, r), tok.pad_token_id)
    prompt_mask, response_mask = torch.zeros(b, p, dtype=torch.long), torch.zeros(b, r, dtype=torch.long)
    scores = torch.zeros(b, r)
    for i, (q, a) in enumerate(zip(PROMPTS, RESPONSES)):
        q_ids, a_ids = tok(q, add_special_tokens=False)["input_ids"], tok(a, add_special_tokens=False)["input_ids"]
        prompts[i, p - len(q_ids):], prompt_mask[i, p - len(q_ids):] = torch.tensor(q_ids), 1
        responses[i, :len(a_ids)], response_mask[i, :len(a_ids)] = torch.tensor(a_ids), 1
        scores[i, len(a_ids) - 1] = SCORES[i]  # verl's reward sits on the last response token
    attention = torch.cat([prompt_mask, response_mask], 1)
    tensors = dict(prompts=prompts, responses=responses, input_ids=torch.cat([prompts, responses], 1),
                   attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
                   response_mask=response_mask, token_level_scores=scores,
                   old_log_probs=-3.9 * response_mask.float(),
                   advantages=torch.randn(b, 1).expand(b, r) * response_mask)
    non_tensors = {"extra_info": np.array([{"answer": str(eval(q[:-1]))} for q in PROMPTS], dtype=object)}
    return DataProto.from_single_dict({**tensors, **non_tensors}, meta_info={"temperature": 1.0})


def annotator(jobs, rows, seeds):
    """Marks the characters '=<answer>' (key span if correct, error span if not), diagnostic 'arithmetic slip'."""
    out = []
    for job in jobs:
        at = job.response.index("=")
        span = [(at, at + 2)]
        out.append(Annotation(key_spans=span if job.correct else [], error_spans=[] if job.correct else span,
                              diagnostic=None if job.correct else "arithmetic slip"))
    return out, {"timeout": 0}


def privileged_prompt(row, diagnostic):
    return f"ans {row['extra_info']['answer']}" + (f" - {diagnostic}" if diagnostic else "") + ": "


def test_fields_follow_the_annotator_the_cap_and_the_schedule():
    tok = build_char_tokenizer()
    batch = _batch(tok)
    options = tv.TraceVerlConfig(w0=0.5, hold_steps=2, decay_steps=4, forward_kl=True, reverse_kl=True,
                                 span_cap=0.25)
    fields, metrics = tv.trace_batch_fields(batch, step=3, tokenizer=tok, annotator=annotator,
                                            privileged_prompt=privileged_prompt, options=options)
    assert metrics["trace/lambda"] == pytest.approx(0.5 * 3 / 4)
    assert fields["trace_lambda"].tolist() == pytest.approx([0.375] * 4)
    span = fields["trace_span"]
    # "2+3=5 so 5": '=' at 3, the span is tokens 3..4; the cap floor(0.25 * 10) = 2 keeps both
    assert span[0].tolist()[:6] == [0, 0, 0, 1, 1, 0]
    assert span[1].tolist()[:5] == [0, 0, 0, 2, 0]  # "9-4=6": cap floor(0.25 * 5) = 1 token
    assert (span[2] == 1).sum() == 2 and (span[3] == 2).sum() == 2
    ids, att = fields["trace_teacher_input_ids"], fields["trace_teacher_attention_mask"]
    text = tok.decode(ids[1][att[1].bool()].tolist())
    assert text == "ans 5 - arithmetic slip: "
    assert metrics["trace/teacher_rollouts"] == 4
    late, late_metrics = tv.trace_batch_fields(batch, step=6, tokenizer=tok, annotator=annotator,
                                               privileged_prompt=privileged_prompt, options=options)
    assert late_metrics["trace/lambda"] == 0 and not bool(late["trace_span"].any())


def test_fields_reach_the_loss_through_verl_s_batch_conversion():
    """The fields ride verl's DataProto -> TensorDict -> micro-batches to TraceVerlLoss, which runs one teacher
    forward per micro-batch and routes the KL to the marked tokens."""
    tok = build_char_tokenizer()
    batch = _batch(tok)
    options = tv.TraceVerlConfig(hold_steps=5, reverse_kl=True)
    fields, _ = tv.trace_batch_fields(batch, step=0, tokenizer=tok, annotator=annotator,
                                      privileged_prompt=privileged_prompt, options=options)
    batch.batch.update(fields)
    model = tiny_model(layers=1)
    patch(model)
    loss_fn = tv.TraceVerlLoss(actor_config(), w0=options.w0)
    _, grads, metrics = train_step(model, micro_batches(batch, remove_padding=False, global_batch_size=4), loss_fn)
    marked = int(((fields["trace_span"] > 0) & batch.batch["response_mask"].bool()).sum())
    assert sum(m["trace/span_tokens"] for m in metrics) == marked
    assert metrics[0]["trace/fkl"] > 0 and metrics[0]["trace/rkl"] > 0 and metrics[0]["trace/lambda"] == 0.5
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_trace_trainer_adds_the_fields_in_verl_s_update_actor(monkeypatch):
    """install_trace_trainer puts TraceTrainerMixin before verl's RayPPOTrainer where verl's legacy TaskRunner
    builds it; its _update_actor runs verl's own (DataProto -> TensorDict -> no padding, mini-batch options) with
    the TRACE fields added. The actor worker group is a recorder here (no Ray), returning verl's metrics shape."""
    from omegaconf import OmegaConf
    from tensordict import TensorDict
    from verl.trainer import main_ppo_v0
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.utils import tensordict_utils as tu

    monkeypatch.setattr(main_ppo_v0, "RayPPOTrainer", main_ppo_v0.RayPPOTrainer)
    options = tv.TraceVerlConfig(hold_steps=5, reverse_kl=True)
    cls = tv.install_trace_trainer(trace_options=options, annotator=annotator, privileged_prompt=privileged_prompt)
    assert main_ppo_v0.RayPPOTrainer is cls and issubclass(cls, RayPPOTrainer)

    class Recorder:
        def update_actor(self, batch_td):
            self.batch_td = batch_td
            return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": {"mfu": 0.0}})

    tok = build_char_tokenizer()
    trainer = object.__new__(cls)
    trainer.config = OmegaConf.create({"actor_rollout_ref": {
        "rollout": {"multi_turn": {"enable": False}, "temperature": 1.0, "n": 2},
        "actor": {"calculate_entropy": False, "entropy_coeff": 0.0, "ppo_mini_batch_size": 2, "ppo_epochs": 1,
                  "data_loader_seed": 0, "shuffle": False}}})
    trainer.tokenizer, trainer.global_steps, trainer.actor_rollout_wg = tok, 1, Recorder()
    trainer.trace_options, trainer.trace_annotator = options, annotator
    trainer.trace_privileged_prompt, trainer.trace_problem_text = privileged_prompt, None
    output = trainer._update_actor(_batch(tok))
    assert output.meta_info["metrics"]["trace/lambda"] == 0.5
    sent = trainer.actor_rollout_wg.batch_td
    assert isinstance(sent, TensorDict) and sent["input_ids"].is_nested
    expected, _ = tv.trace_batch_fields(_batch(tok), step=0, tokenizer=tok, annotator=annotator,
                                        privileged_prompt=privileged_prompt, options=options)
    assert torch.equal(sent["trace_span"], expected["trace_span"]) and int((sent["trace_span"] > 0).sum()) == 7
    assert sent["trace_teacher_input_ids"].shape[0] == 4
