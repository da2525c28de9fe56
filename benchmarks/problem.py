"""A TRACE-shaped loss problem for benchmarks: N response tokens, M of them distilled, both KL branches.

Drawn on the device it runs on (a CUDA generator on a GPU: the 622M-element weight of S1 takes milliseconds there,
seconds through the CPU), and the weight is drawn once per (V, H, dtype, device, seed) and shared by every
problem of a run (each gets its own leaf over the same storage)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=2)
def _weight(v: int, h: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed + 1)
    return (torch.randn(v, h, generator=g, device=device) / h**0.5).to(dtype)


def make_inputs(n: int, h: int, v: int, m: int, *, dtype=torch.float32, device="cpu", seed: int = 0) -> dict:
    """Keyword arguments for `trace_kernels.trace_loss` with every TRACE term on: off-policy GRPO with the k3
    penalty, forward and reverse KL (clipped per term at 0.05) on m distilled rows, ~5% padded rows."""
    device = str(torch.device(device))
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    hidden = randn(n, h).to(dtype)
    weight = _weight(v, h, dtype, device, seed).detach()
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    targets[torch.rand(n, generator=g, device=device) < 0.05] = -100
    kl_index = torch.randperm(n, generator=g, device=device)[:m].sort().values
    logp_guess = torch.full((n,), -float(torch.log(torch.tensor(float(v)))), device=device)
    kw = dict(
        hidden=hidden, weight=weight, targets=targets, advantages=randn(n),
        old_logprobs=logp_guess + 0.1 * randn(n), ref_logprobs=logp_guess + 0.1 * randn(n), beta=0.01,
    )
    if m:
        kw.update(
            teacher_hidden=(hidden[kl_index].float() + 0.3 * randn(m, h)).to(dtype), kl_index=kl_index,
            fkl_weight=torch.full((m,), 0.5 / n, device=device), rkl_weight=torch.full((m,), 0.5 / n, device=device),
            kl_term_clip=0.05,
        )
    return kw
