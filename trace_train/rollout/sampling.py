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
