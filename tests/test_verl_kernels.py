"""verl's fused-kernel lookups after `import trace_train.integrations.verl`: the objects verl's forwards look up
at call time are trace_kernels', and they return what verl's originals return (values, gradients, shapes,
dtypes), called exactly as verl calls them.

Runs in the verl job's environment (`make test-verl`); skipped where verl is not installed. References: verl's
own `FusedLinearForPPO` (torch backend, and liger backend through Liger-Kernel's CPU fallback), and verl's
forwards `forward_with_torch_backend` / `forward_with_triton_backend` on a tiny Qwen3 patched by verl's
`patch_forward_with_backends`. verl's Triton `linear_cross_entropy` needs CUDA: on the CPU our
`linear_cross_entropy` is checked against the materialized fp64 reference, and against verl's kernel in
test_linear_cross_entropy_matches_verl_triton on a GPU.

Tolerance: relative 1e-4 in fp32 (the issue's bound), per tensor against its largest entry for gradients
(both sides accumulate in fp32 in different orders: measured differences are ~1e-7 of the largest entry).
"""

from __future__ import annotations

import pytest
import torch

verl = pytest.importorskip("verl")

from verl_setup import VOCAB, patch, tiny_model  # noqa: E402

import trace_train.integrations.verl as tv  # noqa: E402

REL = 1e-4


def close(actual, expected, rel=REL):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, expected.shape,
                                                                               actual.dtype, expected.dtype)
    scale = expected.detach().double().abs().max().clamp(min=1e-30)
    err = (actual.detach().double() - expected.detach().double()).abs().max() / scale
    assert err <= rel, float(err)
    return float(err)


def _inputs(shape, h, v, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, h, generator=g).to(dtype).requires_grad_(True)
    weight = (0.3 * torch.randn(v, h, generator=g)).to(dtype).requires_grad_(True)
    ids = torch.randint(0, v, shape, generator=g)
    return hidden, weight, ids, g


def _grads(fn, hidden, weight, ids, temperature, g):
    logp, entropy = fn(hidden, weight, ids, temperature)
    dlogp, dentropy = torch.randn(logp.shape, generator=g), torch.randn(entropy.shape, generator=g)
    (logp * dlogp).sum().add((entropy.float() * dentropy).sum()).backward()
    out = (logp.detach(), entropy.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    return out


def test_verl_looks_up_trace_kernels():
    from verl.models.transformers import dense_common
    from verl.utils.experimental.torch_functional import FusedLinearForPPO
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    assert FusedLinearForPPO is tv.FusedLinearForPPO
    assert linear_cross_entropy is tv.linear_cross_entropy
    assert dense_common.forward_with_torch_backend.trace_original is tv.originals()["forward_with_torch_backend"]
    assert tv.originals()["FusedLinearForPPO"].__module__ == "verl.utils.experimental.torch_functional"


@pytest.mark.parametrize("backend", ["torch", "liger"])
@pytest.mark.parametrize("shape,h,v,temperature", [
    ((1, 37), 16, VOCAB, 1.0),      # verl's padding-free layout [1, total_nnz]
    ((3, 11), 24, 97, 0.7),         # padded [B, T]
    ((1,), 8, 5, 1.3),              # one row, a tiny vocabulary
    ((600,), 16, 131, 1.0),         # more rows than verl's 512-row chunk
])
def test_fused_linear_for_ppo_matches_verl(backend, shape, h, v, temperature):
    if backend == "liger":
        pytest.importorskip("liger_kernel")
    ours = tv.FusedLinearForPPO(impl_backend=backend)
    theirs = tv.originals()["FusedLinearForPPO"](impl_backend=backend)
    hidden, weight, ids, g = _inputs(shape, h, v)
    seed = torch.randint(0, 2**31, (1,), generator=g).item()
    a = _grads(ours.forward, hidden, weight, ids, temperature, torch.Generator().manual_seed(seed))
    b = _grads(theirs.forward, hidden, weight, ids, temperature, torch.Generator().manual_seed(seed))
    assert a[0].shape == ids.shape and a[1].shape == ids.shape
    for x, y in zip(a, b):
        close(x, y)


def test_fused_linear_for_ppo_dtypes_follow_verl():
    """bf16 in: log-probs fp32, entropy bf16 (the logits' dtype), as verl's torch backend returns them."""
    ours = tv.FusedLinearForPPO()
    theirs = tv.originals()["FusedLinearForPPO"]()
    hidden, weight, ids, _ = _inputs((2, 9), 16, VOCAB, dtype=torch.bfloat16)
    a, b = ours(hidden, weight, ids), theirs(hidden, weight, ids)
    assert [t.dtype for t in a] == [t.dtype for t in b] == [torch.float32, torch.bfloat16]
    # bf16 logits round differently in the two (verl rounds the logits to bf16, we accumulate in fp32)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0.1)


def test_fused_linear_for_ppo_rejects_what_verl_rejects():
    with pytest.raises(ValueError, match="backend"):
        tv.FusedLinearForPPO(impl_backend="triton")
    with pytest.raises(ValueError, match="input_ids shape"):
        tv.FusedLinearForPPO()(torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(3, 2, dtype=torch.long))


def _materialized(hidden, weight, ids, temperature):
    z = (hidden.double() @ weight.double().T) / temperature
    logp = z.log_softmax(-1)
    return logp.gather(-1, ids.reshape(-1, 1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_cross_entropy_matches_materialized_reference(reduction):
    """verl's Triton kernel needs CUDA; here the same call against the fp64 reference (flat [N] outputs, the
    reduction over log-probs only, entropy per token, as verl's kernel)."""
    hidden, weight, ids, g = _inputs((1, 29), 16, VOCAB)
    logp, entropy = tv.linear_cross_entropy(hidden, weight, ids, 0.9, reduction)
    ref_logp, ref_entropy = _materialized(hidden.reshape(-1, 16), weight, ids, 0.9)
    ref_logp = {"none": ref_logp, "sum": ref_logp.sum(), "mean": ref_logp.mean()}[reduction]
    assert logp.dtype == entropy.dtype == torch.float32 and entropy.shape == (29,)
    close(logp, ref_logp.float())
    close(entropy, ref_entropy.float())
    d = torch.randn(logp.shape, generator=g)
    (logp * d).sum().add(entropy.sum()).backward()
    h2, w2 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    r_logp, r_entropy = _materialized(h2.reshape(-1, 16), w2, ids, 0.9)
    r_logp = {"none": r_logp, "sum": r_logp.sum(), "mean": r_logp.mean()}[reduction]
    (r_logp * d.double()).sum().add(r_entropy.sum()).backward()
    close(hidden.grad, h2.grad.float())
    close(weight.grad, w2.grad.float())


def test_linear_cross_entropy_checks_arguments_like_verl():
    hidden, weight, ids, _ = _inputs((4,), 8, 11)
    with pytest.raises(TypeError, match="temperature"):
        tv.linear_cross_entropy(hidden, weight, ids, "1.0")
    with pytest.raises(ValueError, match="reduction"):
        tv.linear_cross_entropy(hidden, weight, ids, 1.0, "avg")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="verl's Triton linear_cross_entropy needs CUDA")
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_linear_cross_entropy_matches_verl_triton(reduction):
    """GPU only: our replacement against verl's own Triton kernel (hidden size a multiple of 128, as it needs)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 300, 128, generator=g).cuda().requires_grad_(True)
    weight = (0.1 * torch.randn(1000, 128, generator=g)).cuda().requires_grad_(True)
    ids = torch.randint(0, 1000, (1, 300), generator=g).cuda()
    results = []
    for fn in (tv.linear_cross_entropy, tv.originals()["linear_cross_entropy"]):
        logp, entropy = fn(hidden, weight, ids, 1.0, reduction)
        (logp.sum() * 0.7 + entropy.sum() * 0.3).backward()
        results.append((logp.detach(), entropy.detach(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
    for a, b in zip(*results):
        close(a, b.reshape(a.shape))


def test_linear_cross_entropy_refuses_a_vocabulary_parallel_head(tmp_path):
    """Megatron's forwards pass the tensor-parallel group; with more than one rank the head is vocabulary-sharded."""
    import torch.multiprocessing as mp

    mp.start_processes(_two_rank_refusal, args=(str(tmp_path / "store"),), nprocs=2, start_method="spawn")


def _two_rank_refusal(rank, store_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        hidden, weight, ids, _ = _inputs((3,), 8, 11)
        with pytest.raises(ValueError, match="dist_process_group"):
            tv.linear_cross_entropy(hidden, weight, ids, 1.0, "none", dist.group.WORLD)
    finally:
        dist.destroy_process_group()


@pytest.fixture
def restore_forward():
    from transformers import Qwen3ForCausalLM

    forward = Qwen3ForCausalLM.forward
    yield
    Qwen3ForCausalLM.forward = forward
    tv.install()


@pytest.mark.parametrize("backend", ["torch", "liger", "triton"])
def test_verl_model_forward_matches_verl(backend, restore_forward):
    """verl's patched model forward, called as its engine calls it (padding-free [1, nnz] input_ids and
    position_ids, shift_labels, temperature, return_dict), on our kernels against verl's torch backend."""
    if backend == "liger":
        pytest.importorskip("liger_kernel")
    model = tiny_model(layers=1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (1, 23), generator=g)
    pos = torch.cat([torch.arange(9), torch.arange(14)])[None]
    kwargs = dict(input_ids=ids, attention_mask=None, position_ids=pos, use_cache=False, temperature=0.8,
                  return_dict=True, shift_labels=torch.roll(ids, -1, dims=1))
    results = []
    for ours in (True, False):
        if ours:
            tv.install()
            patch(model, backend)
        else:
            tv.uninstall()
            patch(model, "torch")  # verl's own path: its torch backend runs on the CPU
        out = model(**kwargs)
        logp, entropy = out.log_probs.reshape(-1), out.entropy.reshape(-1)
        (logp.sum() + 0.5 * entropy.sum()).backward()
        results.append((logp.detach(), entropy.detach(), *[p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    for a, b in zip(*results):
        close(a, b)
