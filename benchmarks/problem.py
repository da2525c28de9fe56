"""A TRACE-shaped loss problem for benchmarks: N response tokens, M of them distilled, both KL branches."""

from __future__ import annotations

import torch


def make_inputs(n: int, h: int, v: int, m: int, *, dtype=torch.float32, device="cpu", seed: int = 0) -> dict:
    """Keyword arguments for `trace_kernels.trace_loss` with every TRACE term on: off-policy GRPO with the k3
    penalty, forward and reverse KL (clipped per term at 0.05) on m distilled rows, ~5% padded rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.05] = -100
    kl_index = torch.randperm(n, generator=g)[:m].sort().values
    logp_guess = torch.full((n,), -float(torch.log(torch.tensor(float(v)))))
    kw = dict(
        hidden=hidden, weight=weight, targets=targets.to(device),
        advantages=torch.randn(n, generator=g).to(device),
        old_logprobs=(logp_guess + 0.1 * torch.randn(n, generator=g)).to(device),
        ref_logprobs=(logp_guess + 0.1 * torch.randn(n, generator=g)).to(device),
        beta=0.01,
    )
    if m:
        kw.update(
            teacher_hidden=(hidden[kl_index.to(device)].float() + 0.3 * torch.randn(m, h, generator=g).to(device)
                            ).to(dtype),
            kl_index=kl_index.to(device),
            fkl_weight=torch.full((m,), 0.5 / n).to(device),
            rkl_weight=torch.full((m,), 0.5 / n).to(device),
            kl_term_clip=0.05,
        )
    return kw
