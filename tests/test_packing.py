"""Padding-free micro-batches (train.packing): the loss rows' hidden states in the packed layouts equal the
padded layout's, for the student and the teacher batch, and a 2-rank run with packing equals one without.

Tolerances: the fp64 comparisons differ only by the order of sums inside attention over other key lengths
(padded keys are masked to exactly zero weight), ~1e-15 relative: 1e-10 absolute on O(1) hidden states.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("transformers")

from trace_train.config import LossConfig, ModelConfig  # noqa: E402
from trace_train.model import (  # noqa: E402
    build_char_tokenizer,
    build_tiny_model,
    make_batch,
    pack_rows,
    response_hidden,
    varlen_attention,
)
from trace_train.policy import Policy  # noqa: E402
from trace_train.routing import route  # noqa: E402
from trace_train.step import batch_loss  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _seqs(tok, n, seed):
    rng = random.Random(seed)
    vocab = list(range(3, len(tok)))
    prompts = [[rng.choice(vocab) for _ in range(rng.randint(1, 9))] for _ in range(n)]
    responses = [[rng.choice(vocab) for _ in range(rng.choice([0, 1, 2, 5, 17]))] for _ in range(n)]
    return prompts, responses


# transformers' eager attention takes the softmax in fp32 whatever the model's dtype: its round-off (~1e-7 on
# O(1) states, measured 3.6e-7) depends on the row's key count, so eager gets 1e-5, sdpa (all fp64) 1e-10.
@pytest.mark.parametrize("attn, atol", [("sdpa", 1e-10), ("eager", 1e-5)])
def test_packed_rows_equal_padded_rows_fp64(tok, attn, atol):
    model = build_tiny_model(ModelConfig(tiny_layers=2), tok).double()
    model.config._attn_implementation = attn
    for seed in range(4):
        prompts, responses = _seqs(tok, 7, seed)
        padded = make_batch(prompts, responses, tok.pad_token_id)
        ref = response_hidden(model, padded)
        longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
        for row_tokens in (None, 0, longest + 3, 10**6):
            packed = make_batch(prompts, responses, tok.pad_token_id, packed=True, row_tokens=row_tokens)
            assert packed.attention_mask is None and packed.packed
            assert torch.equal(packed.targets, padded.targets)
            assert (packed.input_ids.reshape(-1)[packed.rows + 1] == packed.targets).all()
            total = sum(len(p) + len(r) for p, r in zip(prompts, responses))
            if row_tokens is None or row_tokens == 10**6:  # one row, no filler
                assert packed.input_ids.shape == (1, total)
            else:  # rows no wider than allowed, never more tokens than the padded batch
                assert packed.input_ids.shape[1] <= max(row_tokens, longest)
                assert packed.input_ids.numel() <= padded.input_ids.numel() or row_tokens > longest
            torch.testing.assert_close(response_hidden(model, packed), ref, rtol=0, atol=atol)


def test_packing_changes_the_hidden_states_without_block_diagonal_mask(tok):
    """The test above would pass vacuously if sequences did not see each other when concatenated without the
    restart of position_ids: check that plain concatenation (one position range) does differ."""
    model = build_tiny_model(ModelConfig(), tok).double()
    prompts, responses = _seqs(tok, 3, 0)
    packed = make_batch(prompts, responses, tok.pad_token_id, packed=True)
    wrong = make_batch(prompts, responses, tok.pad_token_id, packed=True)
    wrong.position_ids = torch.arange(wrong.input_ids.shape[1])[None]
    ref = response_hidden(model, make_batch(prompts, responses, tok.pad_token_id))
    later = slice(len(responses[0]), None)  # rows of the second and third sequences
    assert (response_hidden(model, wrong)[later] - ref[later]).abs().max() > 1e-3
    torch.testing.assert_close(response_hidden(model, packed), ref, rtol=0, atol=1e-10)


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 3, 8, 2, 4], 8) == [[2], [0, 1], [4, 3]]
    assert sorted(i for r in pack_rows([1] * 9, 4) for i in r) == list(range(9))
    b = make_batch([[1, 2], [3], [4]], [[5, 6], [7], []], 0, packed=True, row_tokens=0)  # lengths 4, 2, 1
    assert b.input_ids.tolist() == [[1, 2, 5, 6], [3, 7, 4, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert b.rows.tolist() == [1, 2, 4] and b.targets.tolist() == [5, 6, 7]


def test_varlen_attention_picks_one_row(tok):
    model = build_tiny_model(ModelConfig(), tok)
    assert not varlen_attention(model)
    model.config._attn_implementation = "flash_attention_2"
    assert varlen_attention(model)


class _Recorder(Policy):
    """The policy, recording the batches its loss sees (student, teacher) and returning the hidden states."""

    def __init__(self, lm):
        super().__init__(lm)
        self.seen = []

    def forward(self, batch, loss_kwargs, teacher_batch=None, teacher_rows=None, teacher=None):
        self.seen.append((batch, teacher_batch))
        return super().forward(batch, loss_kwargs, teacher_batch, teacher_rows, teacher)


def test_batch_loss_packed_equals_padded_student_and_teacher_fp64(tok):
    """batch_loss packs the student and the teacher batch; the teacher rows' hidden states, the loss and every
    gradient equal the padded path's (fp64)."""
    model = build_tiny_model(ModelConfig(), tok).double()
    prompts, responses = _seqs(tok, 6, 3)
    responses = [r or [5] for r in responses]
    teacher_prompts = [p + [7, 8, 9] * (i + 1) for i, p in enumerate(prompts)]
    lens = [len(r) for r in responses]
    correct = [i % 2 == 0 for i in range(6)]
    keys = [[(0, max(1, n // 2))] if c else [] for n, c in zip(lens, correct)]
    errs = [[] if c else [(0, n)] for n, c in zip(lens, correct)]
    routing = route(lens, correct, keys, errs, algorithm="trace", lam=0.5, reverse_kl=True)
    assert routing.has_kl
    adv = torch.linspace(-1, 1, 6, dtype=torch.float64)
    cfg = LossConfig()
    outs, grads, teacher_hidden = [], [], []
    for packing in (False, True):
        pol = _Recorder(model)
        model.zero_grad(set_to_none=True)
        out = batch_loss(pol, tok.pad_token_id, prompts, responses, adv, routing, cfg, teacher_prompts=teacher_prompts,
                         impl="torch", packing=packing)
        out.loss.backward()
        batch, tbatch = pol.seen[-1]
        assert batch.packed == packing and tbatch.packed == packing
        with torch.no_grad():
            teacher_hidden.append(response_hidden(model, tbatch))
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(teacher_hidden[1], teacher_hidden[0], rtol=0, atol=1e-10)
    for name in ("loss", "logprobs", "entropy", "fkl", "rkl"):
        torch.testing.assert_close(getattr(outs[1], name), getattr(outs[0], name), rtol=0, atol=1e-10)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=1e-10, msg=n)
