"""Rollouts behind one small interface: `engine.generate(prompts, k, seeds) -> Rollouts`.

`HFRollouts` (Hugging Face `generate`) works everywhere, under FSDP too (every rank runs the same number
of forward passes: `synced_gpus`). Sampling is seeded per rollout: rollout i draws its Gumbel noise from
its own generator seeded with seeds[i], so what a rollout samples does not depend on which rank or batch
generated it (a 2-rank FSDP run samples what the single-process run samples). `make_engine` picks vLLM
(trace_train.vllm_engine) on CUDA when it is installed, else HF. The types both engines share live in
trace_train.sampling (so that vllm_engine does not import this module back).
"""

from __future__ import annotations

import logging

import torch

from .sampling import Rollouts, Sampling, filter_logits

__all__ = ["HFRollouts", "Rollouts", "Sampling", "filter_logits", "make_engine"]

log = logging.getLogger(__name__)


class _SeededSampler:
    """A logits processor for greedy `generate` that samples itself: argmax(log p + Gumbel noise from the
    row's own generator) is an exact draw from p; it returns a one-hot so greedy picks that token, and
    keeps log p(token)."""

    def __init__(self, seeds: list[int], s: Sampling, device):
        self.s = s
        self.gens = [torch.Generator(device=device).manual_seed(int(x)) for x in seeds]
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        logp = filter_logits(scores, self.s)
        u = torch.stack([torch.rand(logp.shape[-1], generator=g, device=logp.device) for g in self.gens])
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        pick = torch.argmax(logp + gumbel, dim=-1)
        self.logprobs.append(logp.gather(1, pick[:, None]).squeeze(1))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, pick[:, None], 0.0)


class HFRollouts:
    def __init__(self, policy, tokenizer, sampling: Sampling, synced: bool = False):
        """policy: trace_train.policy.Policy (its `generate` runs FSDP's hooks); synced: under FSDP."""
        self.policy, self.tokenizer, self.sampling, self.synced = policy, tokenizer, sampling, synced

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], k: int, seeds: list[int]) -> Rollouts:
        if len(seeds) != len(prompts) * k:
            raise ValueError(f"seeds: one per rollout ({len(prompts) * k}), got {len(seeds)}")
        from transformers import LogitsProcessorList

        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        flat = [p for p in prompts for _ in range(k)]
        width = max(len(p) for p in flat)
        # Left padding: generation continues every prompt from the same column.
        ids = torch.full((len(flat), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(flat):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        device = self.policy.device
        sampler = _SeededSampler(seeds, self.sampling, device)
        was_training = self.policy.training
        self.policy.eval()
        try:
            out = self.policy.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                max_new_tokens=self.sampling.max_new_tokens, logits_processor=LogitsProcessorList([sampler]),
                pad_token_id=pad, eos_token_id=eos, synced_gpus=self.synced, temperature=None, top_k=None,
                top_p=None)
        finally:
            self.policy.train(was_training)
        new = out[:, width:].cpu()
        logp = torch.stack(sampler.logprobs, 1).cpu() if sampler.logprobs else torch.zeros(len(flat), 0)
        responses, logprobs, finished = [], [], []
        for i in range(new.shape[0]):
            row = new[i].tolist()
            end = row.index(eos) + 1 if eos in row else len(row)
            responses.append(row[:end])
            logprobs.append(logp[i, :end])
            finished.append(eos in row)
        return Rollouts(flat, responses, logprobs, finished)


_warned_fallback = False


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_missing(model_path: str) -> list[str]:
    """Why the vLLM engine cannot run here (empty: it can)."""
    return [why for why, bad in (("vLLM is not installed (pip install vllm)", not vllm_available()),
                                 ("CUDA is not available", not torch.cuda.is_available()),
                                 ("model.path is empty (vLLM loads a local folder)", not model_path)) if bad]


def make_engine(name: str, policy, tokenizer, sampling: Sampling, *, synced: bool, model_path: str = "",
                dtype: str | None = None):
    """"hf", "vllm", or "auto" (vLLM on CUDA when installed and the model is a local folder, else HF).

    "vllm" without vLLM, without CUDA or without model.path is a ValueError naming train.engine. "auto" falling
    back to HF generate on CUDA warns once per process (on rank 0): HF generate is far slower than vLLM at long
    responses, the more so under FSDP (every token all-gathers every layer). dtype: the vLLM engine's weights
    (the compute dtype; default the policy's parameter dtype)."""
    if name not in ("auto", "hf", "vllm"):
        raise ValueError(f"train.engine: unknown {name!r} (auto | hf | vllm)")
    if name == "vllm":
        missing = vllm_missing(model_path)
        if missing:
            raise ValueError(f"train.engine = \"vllm\": {'; '.join(missing)}. Use train.engine = \"hf\" or \"auto\".")
    use_vllm = name == "vllm" or (name == "auto" and not vllm_missing(model_path))
    if use_vllm:
        from .vllm_engine import VLLMRollouts

        return VLLMRollouts(policy, tokenizer, sampling, model_path, dtype=dtype)
    if name == "auto" and torch.cuda.is_available():
        _warn_fallback(synced, "vLLM is not installed" if not vllm_available() else "model.path is empty")
    return HFRollouts(policy, tokenizer, sampling, synced=synced)


def _warn_fallback(synced: bool, why: str) -> None:
    global _warned_fallback
    import torch.distributed as dist

    if _warned_fallback or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return
    _warned_fallback = True
    log.warning("!!! train.engine = \"auto\" falls back to Hugging Face generate on CUDA (%s)%s: rollouts will be "
                "many times slower than with vLLM at long responses. Install vLLM and set model.path, or set "
                "train.engine = \"hf\" to choose this knowingly.", why,
                ", under FSDP (every decoding step all-gathers every layer)" if synced else "")
