"""The GRPO-only path against Liger-Kernel's LigerFusedLinearGRPOLoss, an outside implementation (CPU).

Liger accumulates the loss in an fp32 scalar and its gradients in fp32 buffers even for fp64 inputs, so
agreement is to fp32 precision (~1e-7); 2e-6 still catches any wrong clip, k3 or normalisation term."""

from __future__ import annotations

import pytest
import torch
from problems import rel_err

import trace_kernels as tk

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")


@pytest.mark.parametrize("beta,off_policy,temperature", [(0.0, False, 1.0), (0.04, True, 1.0), (0.1, True, 0.8)])
def test_grpo_matches_liger(beta, off_policy, temperature):
    g = torch.Generator().manual_seed(11)
    b, t, h, v = 3, 7, 16, 45
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.int64)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T / temperature, -1).gather(2, ids[..., None]).squeeze(2)
    old = logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64) if off_policy else None
    ref = logp + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    liger = liger_grpo.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=beta > 0, chunk_size=1,
                                                epsilon_low=0.2, epsilon_high=0.28, loss_type="bnpo",
                                                temperature=temperature)
    liger_loss = liger(h1, w1, ids, mask, adv, ref_per_token_logps=ref if beta > 0 else None,
                       old_per_token_logps=old)[0]
    liger_loss.backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    targets = torch.where(mask.bool(), ids, -100).reshape(-1)
    out = tk.trace_loss(h2.reshape(-1, h), w2, targets, adv[:, None].expand(b, t).reshape(-1), impl="torch",
                        old_logprobs=None if old is None else old.reshape(-1),
                        ref_logprobs=ref.reshape(-1) if beta > 0 else None, beta=beta, temperature=temperature)
    out.loss.backward()
    assert rel_err(out.loss, liger_loss) < 2e-6
    assert rel_err(h2.grad, h1.grad) < 2e-6
    assert rel_err(w2.grad, w1.grad) < 2e-6
