"""The model plumbing of the trainer: tokenizer, tiny Qwen3, response rows, teacher alignment, and one
batch's loss gradients against a naive loss computed from the model's own full logits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from trace_train.config import LossConfig, ModelConfig  # noqa: E402
from trace_train.model import (  # noqa: E402
    build_char_tokenizer,
    build_tiny_model,
    char_to_token_spans,
    load_policy,
    make_batch,
    response_hidden,
    token_char_offsets,
)
from trace_train.policy import Policy  # noqa: E402
from trace_train.routing import route  # noqa: E402
from trace_train.step import batch_loss, teacher_rows_for  # noqa: E402
from trace_train.tasks import arith  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_char_tokenizer_round_trip_and_offsets(tok):
    p = arith.Problem(3, (("+", 4), ("*", 2)))
    text = arith.teacher_prompt(p, arith.DIAGNOSTICS[0])
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) == len(text)
    assert token_char_offsets(tok, ids) == [(i, i + 1) for i in range(len(text))]
    assert char_to_token_spans([(2, 4), (6, 7)], token_char_offsets(tok, ids)) == [(2, 4), (6, 7)]


def test_char_to_token_spans_multichar_tokens():
    offsets = [(0, 2), (2, 5), (5, 6), (6, 9)]
    assert char_to_token_spans([(3, 4)], offsets) == [(1, 2)]
    assert char_to_token_spans([(1, 6)], offsets) == [(0, 3)]
    assert char_to_token_spans([(9, 9)], offsets) == []


def test_save_and_load_from_a_local_path(tmp_path, tok):
    """The real loading code (from_pretrained on a local folder) on a model we built and saved ourselves."""
    model = build_tiny_model(ModelConfig(), tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_policy(ModelConfig(path=str(tmp_path)))
    ids = torch.tensor([tok("Q:1+2\nA:")["input_ids"]])
    assert tok2.decode(ids[0]) == "Q:1+2\nA:"
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)


def test_response_rows_predict_response_tokens(tok):
    """Row (b, j) is the position just before response token j: its logits equal the model's there."""
    model = build_tiny_model(ModelConfig(), tok).double()
    prompts = [tok("Q:1+2\nA:")["input_ids"], tok("Q:9\nA:")["input_ids"]]
    responses = [tok("1+2=3;3")["input_ids"], tok(";9")["input_ids"]]
    batch = make_batch(prompts, responses, tok.pad_token_id)
    hidden = response_hidden(model, batch)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    flat = logits.reshape(-1, logits.shape[-1])[batch.rows]
    assert torch.allclose(hidden @ model.get_output_embeddings().weight.T, flat, atol=1e-10)
    assert batch.targets.tolist() == responses[0] + responses[1]
    # the row before each target is exactly one position earlier in the sequence
    assert (batch.input_ids.reshape(-1)[batch.rows + 1] == batch.targets).all()


def test_teacher_rows_alignment():
    routing = route([3, 2, 4], correct=[True, False, True], key_spans=[[(1, 3)], [], [(0, 1), (3, 4)]],
                    error_spans=[[], [(0, 2)], []], algorithm="trace", lam=0.5, reverse_kl=True)
    assert routing.teacher_responses == [0, 1, 2]
    assert routing.kl_index_M.tolist() == [1, 2, 3, 4, 5, 8]
    assert teacher_rows_for(routing, [3, 2, 4]).tolist() == [1, 2, 3, 4, 5, 8]
    routing = route([3, 2, 4], correct=[False, True, True], key_spans=[[], [(1, 2)], [(2, 4)]],
                    error_spans=[[(0, 1)], [], []], algorithm="trace", lam=0.5)
    assert routing.teacher_responses == [1, 2] and routing.kl_index_M.tolist() == [4, 7, 8]
    assert teacher_rows_for(routing, [3, 2, 4]).tolist() == [1, 4, 5]


def _naive_batch_loss(model, tok, prompts, teacher_prompts, responses, advantages, routing, cfg, old):
    """The same loss from full logits, written out: GRPO (clip-higher) + forward/reverse KL on the routed rows."""
    b = make_batch(prompts, responses, tok.pad_token_id)
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.reshape(-1, len(tok))[b.rows]
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(1, b.targets[:, None]).squeeze(1)
    adv = torch.repeat_interleave(advantages, torch.tensor(b.response_lens)).double()
    ratio = torch.exp(logp - old)
    pg = torch.maximum(-ratio * adv, -ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * adv)
    loss = (routing.pg_weight_N.double() * pg).sum()
    with torch.no_grad():
        tb = make_batch(teacher_prompts, responses, tok.pad_token_id)
        tlogits = model(input_ids=tb.input_ids, attention_mask=tb.attention_mask).logits
        logq_all = torch.log_softmax(tlogits.reshape(-1, len(tok))[tb.rows], -1)
    c = cfg.kl_term_clip or float("inf")  # the trainer's 0 means no clip
    for j, row in enumerate(routing.kl_index_M.tolist()):
        lp, lq = logp_all[row], logq_all[row]  # teacher batch holds every response: same row numbering
        if cfg.kl_clip_mode == "grad":
            # value: the unclipped KL; gradient w.r.t. the row's logits: clamp(p - q), clamp(p (d - RKL))
            p, q, d = lp.exp(), lq.exp(), lp - lq
            fkl, rkl = (q * -d).sum(), (p * d).sum()
            gf, gr = (p - q).clamp(-c, c).detach(), (p * (d - rkl)).clamp(-c, c).detach()
            z = logits[row]
            fkl = fkl.detach() + (z * gf).sum() - (z * gf).sum().detach()
            rkl = rkl.detach() + (z * gr).sum() - (z * gr).sum().detach()
        else:
            fkl = (lq.exp() * (lq - lp)).clamp(-c, c).sum()
            rkl = (lp.exp() * (lp - lq)).clamp(-c, c).sum()
        loss = loss + routing.fkl_weight_M[j].double() * fkl + routing.rkl_weight_M[j].double() * rkl
    return loss


# "grad": a clip small enough to clamp some entries of the tiny model's near-uniform rows (checked below)
@pytest.mark.parametrize("cfg", [LossConfig(), LossConfig(kl_term_clip=0.003, kl_clip_mode="grad")],
                         ids=["value", "grad"])
def test_batch_loss_gradients_match_naive_full_logits(tok, cfg):
    model = build_tiny_model(ModelConfig(), tok, seed=3).double()
    problems = [arith.Problem(3, (("+", 4), ("*", 2))), arith.Problem(7, (("-", 9),))]
    texts = ["3+4=7,7*2=4;4", "7-9=5;5"]  # correct, then incorrect (7 - 9 = 8 mod 10)
    responses = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    ann = [arith.annotate(t, p) for t, p in zip(texts, problems)]
    assert ann[0].key_spans and ann[1].error_spans
    offsets = [token_char_offsets(tok, r) for r in responses]
    key = [char_to_token_spans(a.key_spans, o) for a, o in zip(ann, offsets)]
    err = [char_to_token_spans(a.error_spans, o) for a, o in zip(ann, offsets)]
    routing = route([len(r) for r in responses], [True, False], key, err, algorithm="trace", lam=0.3,
                    reverse_kl=True)
    prompts = [tok(arith.student_prompt(p))["input_ids"] for p in problems]
    teacher_prompts = [tok(arith.teacher_prompt(p, a.diagnostic))["input_ids"] for p, a in zip(problems, ann)]
    advantages = torch.tensor([1.0, -1.0])
    old = torch.randn(sum(len(r) for r in responses), dtype=torch.float64) * 0.1 - 4.0

    out = batch_loss(Policy(model), tok.pad_token_id, prompts, responses, advantages, routing, cfg,
                     teacher_prompts=teacher_prompts, old_logprobs=old, impl="torch")
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    naive = _naive_batch_loss(model, tok, prompts, teacher_prompts, responses, advantages, routing, cfg, old)
    naive_grads = torch.autograd.grad(naive, list(model.parameters()))
    assert torch.allclose(out.loss.double(), naive, rtol=1e-9, atol=1e-12)
    for g, ng in zip(grads, naive_grads):
        assert torch.allclose(g, ng, rtol=1e-7, atol=1e-10)
    assert out.fkl.numel() == routing.kl_index_M.numel() and (out.fkl >= -1e-6).all()
    if cfg.kl_clip_mode == "grad":  # the mode reached trace_loss: unclipped value, gradient not the unclipped one
        plain = LossConfig(kl_term_clip=0.0)
        unclipped = _naive_batch_loss(model, tok, prompts, teacher_prompts, responses, advantages, routing, plain,
                                      old)
        assert torch.allclose(out.loss.double(), unclipped, rtol=1e-9, atol=1e-12)
        plain_grads = torch.autograd.grad(unclipped, list(model.parameters()))
        assert max((g - pg).abs().max().item() for g, pg in zip(grads, plain_grads)) > 1e-6
