"""TRL's fused LM-head kernels (trl >= 1.16) as a benchmark baseline: `ChunkedLogProbFunction` (per-token
log-probs from hidden states and the head, the backward recomputes each tile) and `ChunkedDivergenceFunction`
(per-token forward KL / reverse KL / JSD from student and teacher hidden states and heads), composed with
the policy-gradient term in torch so that the loss is `trace_loss`'s.

The composition per case (TRL's own convention, read from its source: `beta=0.0` is the forward
KL(teacher || student), `beta=1.0` the reverse KL(student || teacher)):
- "trace":   ChunkedLogProbFunction on all N rows -> clipped GRPO + beta k3 in torch, plus two
             ChunkedDivergenceFunction calls on the M distilled rows (beta 0 weighted by fkl_weight, beta 1
             by rkl_weight). TRL has no per-vocabulary-term KL clip, so the benchmark's trace case runs
             unclipped for every implementation (as for Liger).
- "grpo":    the same without the divergence calls.
- "logprob": ChunkedLogProbFunction alone, -mean log p(targets).

Loading: `trl.kernels.chunked_divergence` imports `trl.trainer.utils`, which pulls in accelerate, datasets,
pandas and huggingface_hub for one helper, `maybe_gather_lm_head_ctx` (a DeepSpeed ZeRO-3 all-gather, a null
context otherwise). Where that import fails (the GPU image has no `datasets`), the two kernel files are
loaded unchanged from the installed trl folder under a private package name, with that helper replaced by
the null context TRL itself returns outside ZeRO-3. `kernels()` says which way it loaded them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import types
from dataclasses import dataclass

import torch

# GRPOTrainer's vocabulary tile width for ChunkedLogProbFunction (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE).
LOGPROB_CHUNK_V = 32768
# The trace_loss arguments this composition reproduces; any other one would be silently dropped, so refuse it.
HANDLED_KWARGS = {"old_logprobs", "ref_logprobs", "beta", "clip_low", "clip_high", "teacher_hidden", "kl_index",
                  "fkl_weight", "rkl_weight"}
_STANDALONE = "_trl_kernels_standalone"


@dataclass(frozen=True)
class TrlKernels:
    logprob: type  # ChunkedLogProbFunction
    divergence: type  # ChunkedDivergenceFunction
    version: str
    how: str  # "trl" (the package's own import) or why the standalone load was used


@functools.cache
def kernels() -> TrlKernels:
    """TRL's two kernel classes; ImportError when trl (or transformers, which the kernel files import) is missing."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("trl is not installed", name="trl") from None
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        return TrlKernels(ChunkedLogProbFunction, ChunkedDivergenceFunction, version, "trl")
    except Exception as e:  # a dependency of trl.trainer.utils is missing or does not match its version
        if isinstance(e, ImportError) and (e.name or "").startswith("trl"):
            raise  # trl itself lacks the kernels (older than 1.16): no fallback
        logprob, divergence = _load_standalone()
        return TrlKernels(logprob, divergence, version,
                          f"standalone (trl.trainer.utils not importable: {type(e).__name__}: {e})"[:160])


def _load_standalone() -> tuple[type, type]:
    """Import trl/kernels/chunked_{logprob,divergence}.py under a private package whose `trainer.utils` holds
    only `maybe_gather_lm_head_ctx` (as a null context); trl's own modules stay untouched."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("trl is not installed", name="trl")
    trl_dir = list(spec.submodule_search_locations)[0]
    if _STANDALONE not in sys.modules:
        def package(name: str, path: list[str]) -> types.ModuleType:
            mod = types.ModuleType(name)
            mod.__path__ = path
            sys.modules[name] = mod
            return mod

        package(_STANDALONE, [trl_dir])
        package(f"{_STANDALONE}.kernels", [os.path.join(trl_dir, "kernels")])
        package(f"{_STANDALONE}.trainer", [])
        utils = types.ModuleType(f"{_STANDALONE}.trainer.utils")
        utils.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules[utils.__name__] = utils
    logprob = importlib.import_module(f"{_STANDALONE}.kernels.chunked_logprob")
    divergence = importlib.import_module(f"{_STANDALONE}.kernels.chunked_divergence")
    return logprob.ChunkedLogProbFunction, divergence.ChunkedDivergenceFunction


def pg_term(logp: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor, kw: dict) -> torch.Tensor:
    """trace_loss's policy-gradient part from per-token log-probs [N]: the clipped ratio term plus beta k3, summed
    over valid rows with weight 1 / max(n_valid, 1) (trace_loss's default pg_weight)."""
    valid = targets != -100
    old = kw.get("old_logprobs", logp.detach())
    ratio = torch.exp(logp - old)
    clipped = ratio.clamp(1 - kw.get("clip_low", 0.2), 1 + kw.get("clip_high", 0.28))
    per_token = torch.maximum(-ratio * advantages, -clipped * advantages)
    beta = kw.get("beta", 0.0)
    if beta > 0:
        d = kw["ref_logprobs"] - logp
        per_token = per_token + beta * (torch.exp(d) - d - 1)
    return torch.where(valid, per_token, 0.0).sum() / valid.sum().clamp(min=1)


def build(p, *, fkl_beta: float = 0.0, rkl_beta: float = 1.0):
    """`impls.Impl.build` for "trl": step() returns the composed loss. fkl_beta / rkl_beta are TRL's `beta` for the
    forward and reverse KL terms (0 and 1 by TRL's convention; the tests swap them to show the check notices)."""
    extra = set(p.kwargs) - HANDLED_KWARGS
    if extra:
        raise ValueError(f"the trl composition does not reproduce trace_loss arguments {sorted(extra)}")
    k = kernels()
    kw = p.kwargs
    targets = p.targets.clamp(min=0)  # ignored rows get any valid id; pg_term masks them out

    def logprobs() -> torch.Tensor:
        # (hidden, weight, bias, targets, temperature, chunk_size, softcapping, logit_scale, outputs)
        return k.logprob.apply(p.hidden, p.weight, None, targets, 1.0, LOGPROB_CHUNK_V, None, 1.0, ())[0]

    if p.case == "logprob":
        return lambda: -logprobs().mean()

    teacher_weight = kw.get("teacher_weight", p.weight).detach()
    kl_terms = [(b, kw[key]) for b, key in ((fkl_beta, "fkl_weight"), (rkl_beta, "rkl_weight")) if key in kw]

    def step() -> torch.Tensor:
        loss = pg_term(logprobs(), p.targets, p.advantages, kw)
        if "teacher_hidden" in kw:
            student = p.hidden[kw["kl_index"]]
            for beta, weights in kl_terms:
                # (student h, W, bias, teacher h, W, bias, beta, temperature): per-row divergence [M]
                div = k.divergence.apply(student, p.weight, None, kw["teacher_hidden"], teacher_weight, None, beta,
                                         1.0)[0]
                loss = loss + (weights * div).sum()
        return loss
    return step
