"""Rollouts by Hugging Face `generate`: works everywhere, under FSDP too (every rank runs the same number of
forward passes: `synced_gpus`). Sampling is seeded per rollout: rollout i draws its Gumbel noise from its own
generator seeded with seeds[i], so what a rollout samples does not depend on which rank or batch generated it
(a 2-rank FSDP run samples what the single-process run samples)."""

from __future__ import annotations

import torch

from .sampling import Rollouts, Sampling, filter_logits


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

    def close(self) -> None:
        """Nothing to release (the engine interface: vLLM's engine shuts down here)."""

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
