"""The implementations the benchmark suite compares, each as `build(problem) -> step` where step() runs one
forward+backward on the problem's leaves and returns the loss.

Cases (all from hidden states [N, H] and the LM head [V, H]):
- "trace":   off-policy GRPO + k3 on all rows, forward and reverse KL on M distilled rows (TRACE's loss).
- "grpo":    the same without a teacher (TRACE after its warm-up, plain GRPO).
- "logprob": gradient of -mean log p(targets) (on-policy GRPO with A = 1): the cross-entropy floor.
Liger's losses, TRL's kernels (benchmarks/trl_impl.py) and torch's linear_cross_entropy are set up to compute the
same loss (same gradient for "logprob", where the values differ by construction: ours is -1, theirs -mean log p).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

import trace_kernels as tk


@dataclass
class Problem:
    hidden: torch.Tensor  # leaf, requires grad
    weight: torch.Tensor  # leaf, requires grad
    targets: torch.Tensor
    advantages: torch.Tensor
    kwargs: dict  # the remaining trace_loss arguments
    case: str


def make_problem(case: str, n: int, h: int, v: int, m: int, *, dtype, device, seed: int = 0) -> Problem:
    from .problem import make_inputs

    kw = make_inputs(n, h, v, m if case == "trace" else 0, dtype=dtype, device=device, seed=seed)
    kw.pop("kl_term_clip", None)  # Liger has no per-term clip: compare like with like
    # B sequences of T tokens with one advantage each, broadcast to their tokens (as GRPO does).
    seq_len = seq_len_for(n)
    kw["advantages"] = kw["advantages"][::seq_len].repeat_interleave(seq_len)
    if case == "logprob":
        for key in ("old_logprobs", "ref_logprobs", "beta"):
            kw.pop(key)
        kw["advantages"] = torch.ones_like(kw["advantages"])
        kw["targets"] = kw["targets"].clamp(min=0)
    hidden = kw.pop("hidden").detach().requires_grad_(True)
    weight = kw.pop("weight").detach().requires_grad_(True)
    return Problem(hidden, weight, kw.pop("targets"), kw.pop("advantages"), kw, case)


def seq_len_for(n: int) -> int:
    """Tokens per sequence: the largest divisor of n up to 512."""
    return max(t for t in range(1, min(n, 512) + 1) if n % t == 0)


def _seq(t: torch.Tensor, n: int) -> torch.Tensor:
    """[N, ...] -> [B, T, ...]"""
    return t.reshape(n // seq_len_for(n), seq_len_for(n), *t.shape[1:])


def _trace(impl: str) -> Callable[[Problem], Callable[[], torch.Tensor]]:
    def build(p: Problem):
        def step():
            return tk.trace_loss(p.hidden, p.weight, p.targets, p.advantages, impl=impl, **p.kwargs).loss
        return step
    return build


def _naive_compile(p: Problem):
    import dataclasses

    from trace_kernels._inputs import check_inputs
    from trace_kernels.reference import reference_trace_loss

    # Validated once, outside: its data-dependent checks would break the graph.
    inp = check_inputs(p.hidden, p.weight, p.targets, p.advantages, **p.kwargs)
    compiled = torch.compile(
        lambda h, w: reference_trace_loss(dataclasses.replace(inp, hidden_NH=h, weight_VH=w)).loss, dynamic=False)
    return lambda: compiled(p.hidden, p.weight)


def _liger(p: Problem):
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDLoss

    kw, n = p.kwargs, p.hidden.shape[0]
    mask = _seq(p.targets != -100, n).long()
    ids = _seq(p.targets.clamp(min=0), n)
    adv = _seq(p.advantages, n)[:, 0]
    beta = kw.get("beta", 0.0)
    grpo = LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=beta > 0, chunk_size=1,
                                    epsilon_low=0.2, epsilon_high=0.28, loss_type="bnpo")
    jsd = []
    if "teacher_hidden" in kw:
        m = kw["kl_index"].numel()
        # Liger divides the summed KL by the number of rows it is given: weight_soft = fkl_weight * M.
        for beta_jsd, key in ((0.0, "fkl_weight"), (1.0, "rkl_weight")):
            weights = kw[key]
            jsd.append(LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=float(weights[0]) * m,
                                               beta=beta_jsd, compiled=False, chunk_size=1024))

    def step():
        loss = grpo(_seq(p.hidden, n), p.weight, ids, mask, adv,
                    ref_per_token_logps=_seq(kw["ref_logprobs"], n) if beta > 0 else None,
                    old_per_token_logps=_seq(kw["old_logprobs"], n) if "old_logprobs" in kw else None)[0]
        for loss_fn in jsd:
            student = p.hidden[kw["kl_index"]]
            loss = loss + loss_fn(student, p.weight, kw["teacher_hidden"], p.weight.detach(),
                                  torch.zeros_like(kw["kl_index"]))
        return loss
    return step


def _liger_triton_grpo(p: Problem):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    kw, n = p.kwargs, p.hidden.shape[0]
    mask = _seq(p.targets != -100, n).int()

    def step():
        # Liger's Triton GRPO loss takes materialized logits [B, T + 1, V] (the last position is dropped).
        hidden = _seq(p.hidden, n)
        logits = torch.cat([hidden, hidden[:, -1:]], 1) @ p.weight.T
        return triton_grpo_loss(logits, _seq(kw["old_logprobs"], n), _seq(kw["ref_logprobs"], n),
                                _seq(p.targets.clamp(min=0), n), _seq(p.advantages, n)[:, 0], completion_mask=mask,
                                temperature=1.0, beta=kw.get("beta", 0.0), eps_low=0.2, eps_high=0.28,
                                inplace=False, loss_type="bnpo", reduce=True)[0]
    return step


def _torch_linear_ce(p: Problem):
    return lambda: torch.nn.functional.linear_cross_entropy(p.hidden, p.weight, p.targets)


def _trl(p: Problem):
    from . import trl_impl  # imports trl only when its rows run

    return trl_impl.build(p)


@dataclass
class Impl:
    name: str
    build: Callable[[Problem], Callable[[], torch.Tensor]]
    cases: tuple[str, ...]
    devices: tuple[str, ...] = ("cpu", "cuda")
    needs: str | None = None  # a package that must be importable

    def available(self, case: str, device: str) -> str | None:
        """None when it can run, else why not (reported as skipped, never as a zero)."""
        if case not in self.cases:
            return f"no {case} case"
        if device not in self.devices:
            return f"not on {device}"
        if self.needs and importlib.util.find_spec(self.needs) is None:
            return f"{self.needs} not installed"
        if self.name == "trace_triton" and device == "cpu":
            import os
            if os.environ.get("TRITON_INTERPRET") != "1":
                return "Triton runs on CUDA (or TRITON_INTERPRET=1)"
        if self.name == "trl":
            from . import trl_impl
            try:
                trl_impl.kernels()
            except ImportError as e:
                return f"trl kernels not importable: {e}"[:160]
        if self.name == "torch_linear_ce" and not hasattr(torch.nn.functional, "linear_cross_entropy"):
            return "torch has no linear_cross_entropy"
        return None


ALL_CASES = ("trace", "grpo", "logprob")
IMPLS = {i.name: i for i in [
    Impl("naive", _trace("reference"), ALL_CASES),
    Impl("naive_compile", _naive_compile, ALL_CASES),
    Impl("trace_torch", _trace("torch"), ALL_CASES),
    Impl("trace_triton", _trace("triton"), ALL_CASES, needs="triton"),
    Impl("liger", _liger, ("trace", "grpo"), needs="liger_kernel"),
    Impl("liger_triton_grpo", _liger_triton_grpo, ("grpo",), devices=("cuda",), needs="liger_kernel"),
    Impl("torch_linear_ce", _torch_linear_ce, ("logprob",)),
    Impl("trl", _trl, ALL_CASES, needs="trl"),
]}
