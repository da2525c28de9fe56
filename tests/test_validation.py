"""Bad input: a ValueError naming the argument, raised before any computation (docs/contract.md, "Errors")."""

from __future__ import annotations

import pytest
import torch
from problems import ALL_OPTIONS, make_problem

import trace_kernels as tk


def _call(**changes):
    hidden, weight, targets, advantages, kw = make_problem(n=6, h=4, v=9, m=3, options=ALL_OPTIONS,
                                                           dtype=torch.float32)
    args = dict(hidden=hidden, weight=weight, targets=targets, advantages=advantages, impl="torch", **kw)
    args.update(changes)
    hidden, weight, targets, advantages = (args.pop(k) for k in ("hidden", "weight", "targets", "advantages"))
    return tk.trace_loss(hidden, weight, targets, advantages, **args)


f32 = torch.float32
CASES = [
    ("hidden", dict(hidden=torch.randn(6, 4, 1))),
    ("hidden", dict(hidden=torch.randn(6, 4).int())),
    ("hidden", dict(hidden=[[0.0]])),
    ("weight", dict(weight=torch.randn(9, 5))),
    ("weight", dict(weight=torch.randn(9, 4, dtype=torch.float64))),
    ("weight", dict(weight=torch.randn(9, 4, device="meta"))),
    ("weight", dict(weight=torch.randn(0, 4))),
    ("targets", dict(targets=torch.zeros(5, dtype=torch.int64))),
    ("targets", dict(targets=torch.zeros(6, dtype=torch.int32))),
    ("targets", dict(targets=torch.full((6,), 9))),
    ("targets", dict(targets=torch.full((6,), -1))),
    ("targets", dict(targets=torch.zeros(6))),
    ("advantages", dict(advantages=torch.zeros(7))),
    ("advantages", dict(advantages=torch.zeros(6, dtype=torch.int64))),
    ("pg_weight", dict(pg_weight=torch.zeros(2, 3))),
    ("old_logprobs", dict(old_logprobs=torch.zeros(5))),
    ("ref_logprobs", dict(ref_logprobs=torch.zeros(5))),
    ("ref_logprobs", dict(ref_logprobs=None, beta=0.1)),
    ("entropy_weight", dict(entropy_weight=torch.zeros(8))),
    ("beta", dict(beta=-0.1)),
    ("beta", dict(beta=float("nan"))),
    ("clip_low", dict(clip_low=-0.1)),
    ("clip_high", dict(clip_high=-0.01)),
    ("clip_high", dict(clip_high="0.2")),
    ("dual_clip", dict(dual_clip=1.0)),
    ("dual_clip", dict(dual_clip=0.5)),
    ("temperature", dict(temperature=0.0)),
    ("temperature", dict(temperature=-1.0)),
    ("temperature", dict(temperature=float("inf"))),
    ("kl_term_clip", dict(kl_term_clip=-0.05)),
    ("kl_clip_mode", dict(kl_clip_mode="values")),
    ("kl_clip_mode", dict(kl_clip_mode=None)),
    ("kl_clip_mode", dict(kl_clip_mode="GRAD")),
    ("teacher_hidden", dict(teacher_hidden=torch.randn(3, 5))),
    ("teacher_hidden", dict(teacher_hidden=torch.randn(3, 4, dtype=torch.float16))),
    ("teacher_weight", dict(teacher_weight=torch.randn(8, 4))),
    ("teacher_weight", dict(teacher_weight=torch.randn(9, 4, dtype=torch.float64))),
    ("teacher_weight", dict(teacher_hidden=None, kl_index=None, fkl_weight=None, rkl_weight=None)),
    ("kl_index", dict(kl_index=torch.tensor([0, 1, 6]))),
    ("kl_index", dict(kl_index=torch.tensor([0, -1, 2]))),
    ("kl_index", dict(kl_index=torch.tensor([0, 1]))),
    ("kl_index", dict(kl_index=torch.tensor([0, 1, 2], dtype=torch.int32))),
    ("kl_index", dict(kl_index=None)),  # M=3 != N=6 needs kl_index
    ("fkl_weight", dict(fkl_weight=torch.zeros(6))),
    ("rkl_weight", dict(rkl_weight=torch.zeros(2))),
    ("fkl_weight", dict(teacher_hidden=None, teacher_weight=None, kl_index=None, rkl_weight=None)),
    ("ignore_index", dict(ignore_index=1.5)),
]


@pytest.mark.parametrize("name,changes", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_argument_raises_value_error_naming_it(name, changes):
    with pytest.raises(ValueError, match=name):
        _call(**changes)


def test_bad_impl():
    with pytest.raises(ValueError, match="impl"):
        _call(impl="cuda")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="impl"):
        _call(impl="triton")


def test_validation_happens_before_any_kernel(monkeypatch):
    """A bad argument late in the list must fail before the LM-head GEMM runs."""
    from trace_kernels import _gemm

    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran before validation finished")

    monkeypatch.setattr(_gemm.LMHead, "logits", boom)
    with pytest.raises(ValueError, match="kl_term_clip"):
        _call(kl_term_clip=-1.0)


def test_valid_call_passes():
    out = _call()
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("mode", ["value", "grad"])
def test_kl_clip_mode_without_kl_term_clip_is_no_clip(mode):
    """kl_clip_mode is accepted without kl_term_clip and then changes nothing: both modes are the unclipped KL."""
    plain = _call(kl_term_clip=None)
    out = _call(kl_term_clip=None, kl_clip_mode=mode)
    assert torch.equal(out.loss, plain.loss) and torch.equal(out.fkl, plain.fkl) and torch.equal(out.rkl, plain.rkl)
