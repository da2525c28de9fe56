"""Rollouts behind one small interface: `engine.generate(prompts, k, seeds) -> Rollouts`.

`HFRollouts` (Hugging Face `generate`) works everywhere, under FSDP too (every rank runs the same number
of forward passes: `synced_gpus`). Sampling is seeded per rollout: rollout i draws its Gumbel noise from
its own generator seeded with seeds[i], so what a rollout samples does not depend on which rank or batch
generated it (a 2-rank FSDP run samples what the single-process run samples). `make_engine` picks vLLM
(trace_train.vllm_engine) on CUDA when it is installed, else HF.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollouts:
    """K samples of each of P prompts, prompt-major: rollout i answers prompt i // K."""

    prompts: list[list[int]]  # [P * K] the prompt ids of each rollout
    responses: list[list[int]]  # [P * K] sampled ids, ending with EOS unless truncated
    logprobs: list[torch.Tensor]  # [P * K] sampling log-probs of each response token (after temperature/top-k/p)
    finished: list[bool]  # ended with EOS (False: cut at max_new_tokens)


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0


def filter_logits(logits_BV: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering, as log-probs of the sampling distribution."""
    logp = torch.log_softmax(logits_BV.float() / s.temperature, dim=-1)
    if 0 < s.top_k < logp.shape[-1]:
        kth = torch.topk(logp, s.top_k, dim=-1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_lp, order = torch.sort(logp, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        mass_before = torch.cumsum(sorted_lp.exp(), dim=-1) - sorted_lp.exp()
        drop = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, order, mass_before >= s.top_p)
        logp = logp.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logp, dim=-1)


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


def make_engine(name: str, policy, tokenizer, sampling: Sampling, *, synced: bool, model_path: str = ""):
    """"hf", "vllm", or "auto" (vLLM on CUDA when installed and the model is a local folder, else HF)."""
    if name not in ("auto", "hf", "vllm"):
        raise ValueError(f"train.engine: unknown {name!r} (auto | hf | vllm)")
    want_vllm = name == "vllm" or (name == "auto" and torch.cuda.is_available() and model_path)
    if want_vllm:
        try:
            from .vllm_engine import VLLMRollouts
        except ImportError:
            if name == "vllm":
                raise
        else:
            return VLLMRollouts(policy, tokenizer, sampling, model_path)
    return HFRollouts(policy, tokenizer, sampling, synced=synced)
