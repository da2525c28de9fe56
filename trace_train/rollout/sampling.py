"""What every rollout engine shares: the sampling settings, the rollouts returned, and the filtered
sampling distribution (temperature, top-k, top-p) whose log-probs the loss's importance ratios use.

A module of its own so that the engines (rollout.hf, rollout.vllm) import it, never each other.
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
    """Temperature, then top-k, then top-p (nucleus) filtering, as log-probs of the sampling distribution, with
    vLLM's semantics: top-k keeps every token whose logit is at least the k-th largest (ties included), top-p is
    taken on the top-k distribution renormalized, dropping the tokens (least likely first) whose cumulative mass
    is at most 1 - top_p and always keeping the most likely one."""
    z = logits_BV.float() / s.temperature
    if 0 < s.top_k < z.shape[-1]:
        kth = torch.topk(z, s.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if s.top_p < 1.0:
        z_sorted, order = torch.sort(z, dim=-1)  # ascending, as vLLM's sampler
        drop = torch.cumsum(torch.softmax(z_sorted, dim=-1), dim=-1) <= 1 - s.top_p
        drop[:, -1] = False
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.log_softmax(z, dim=-1)
