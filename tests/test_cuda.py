"""The implementations on CUDA (the Triton kernels compiled for the card, cuBLAS fp32-output GEMMs, the Triton
d weight GEMM), against the fp64 reference on the same device. Skipped without a GPU; run by
benchmarks/gpu_check.sh, whose time limit reaches the first tests first: fp16 at N 16,384, bf16 over several
chunks at V 151,936, a chunk whose offsets pass 2^31 elements.

Tolerances. fp32 inputs (TF32 off, torch's default for matmul): as on the CPU, 2e-5. bf16 inputs: the
logits come from fp32-output GEMMs of the exact bf16 values, so values keep 2e-5; the gradients pass
through two bf16 roundings (dz before the backward GEMMs, the result after), each at most 2^-9 relative
per element, and the backward GEMM's sum over V can cancel, so we allow 2^-6. That bound is stated, not
yet measured on a card (see benchmarks/results/). fp16 at N 16,384: the elementwise bounds of
tests/test_cuda_rounding.py, which emulates these roundings on the CPU.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from problems import ALL_OPTIONS, FLOOR, make_problem, reference64, rel_err, run
from test_cuda_rounding import FAR_TOL, LOSS_SCALE, MEDIAN_TOL, _elementwise

import trace_kernels as tk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

VALUE_TOL = 2e-5
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2.0**-6}


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_cuda_fp16_at_16k_rows_elementwise(impl):
    """fp16 where dz underflows unscaled (pg_weight 1/16,384, V 8,192), a loss scale of 2^16 as GradScaler's."""
    hidden, weight, targets, adv, kw = make_problem(n=16384, h=64, v=8192, options=("old_logprobs",),
                                                    dtype=torch.float16, seed=0, device="cuda")
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = tk.trace_loss(h, w, targets, adv, impl=impl, **kw)
    gh, gw = torch.autograd.grad(out.loss * LOSS_SCALE, [h, w])
    assert gh.dtype == gw.dtype == torch.float16
    _, rgh, rgw = reference64(hidden, weight, targets, adv, kw)
    for name, a, e in (("d hidden", gh.double() / LOSS_SCALE, rgh), ("d weight", gw.double() / LOSS_SCALE, rgw)):
        median, far = _elementwise(a, e)
        assert median < MEDIAN_TOL and far < FAR_TOL[torch.float16], (name, median, far)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_cuda_bf16_several_chunks_at_qwen3_vocab(impl):
    """bf16 at V 151,936 over 4 chunks of 512 rows, every option (a separate teacher weight: two logits GEMMs)
    and the live teacher (one GEMM of C + K rows)."""
    for options in (ALL_OPTIONS, tuple(o for o in ALL_OPTIONS if o != "teacher_weight")):
        with tk.chunk_rows(512):
            _check(impl, make_problem(n=2048, h=256, v=151_936, m=512, options=options, dtype=torch.bfloat16,
                                      device="cuda"), torch.bfloat16)


def test_cuda_chunk_offsets_past_2_31_elements():
    """One chunk of 14,400 rows at V 151,936 (offsets up to 14,400 x 151,936 = 2.19e9 > 2^31 elements in the
    logits buffer, the distilled rows' after them) against the same call in chunks of 1,024 rows: values and
    gradients equal to the chunks' rounding (bf16, 24-bit d weight: 2^-8 normwise). Drawn on the GPU (an fp64
    problem of this size would take the CPU minutes)."""
    n, h, v, m = 14_400, 64, 151_936, 64
    g = torch.Generator(device="cuda").manual_seed(7)
    hidden = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(v, h, device="cuda", generator=g) / h**0.5).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    adv = torch.randn(n, device="cuda", generator=g)
    kl_index = torch.arange(n - m, n, device="cuda")  # the last rows: the largest offsets
    kw = dict(teacher_hidden=(hidden[kl_index].float() + 0.5 * torch.randn(m, h, device="cuda", generator=g)
                              ).bfloat16(), kl_index=kl_index, fkl_weight=torch.full((m,), 1e-3, device="cuda"),
              rkl_weight=torch.full((m,), 1e-3, device="cuda"))
    results = []
    for rows in (n, 1024):
        with tk.chunk_rows(rows):
            results.append(run("triton", hidden, weight, targets, adv, kw))
        torch.cuda.empty_cache()
    (big, bgh, bgw), (small, sgh, sgw) = results
    assert rel_err(big.logprobs, small.logprobs) < 2e-6 and rel_err(big.fkl, small.fkl, 0.05) < 2e-6
    assert rel_err(big.entropy, small.entropy) < 2e-6 and rel_err(big.rkl, small.rkl, 0.05) < 2e-6
    assert rel_err(bgh, sgh) < 2.0**-8 and rel_err(bgw, sgw) < 2.0**-8


def _syncs(fn, *args):
    """(fn(*args), the number of synchronising CUDA calls it made)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_cuda_host_syncs_per_call(impl):
    """The host synchronisations that remain (trace_kernels/chunked.py's docstring): forward 1 (check_inputs' range
    checks and valid-row count, read together), 2 with a teacher (the distilled rows' positions for the chunk
    bounds); backward 1 (whether the incoming gradient is 1)."""
    for options, forward in ((("old_logprobs",), 1), (("old_logprobs", "teacher", "fkl", "kl_index"), 2)):
        hidden, weight, targets, adv, kw = make_problem(n=300, h=64, v=5003, m=40, options=options,
                                                        dtype=torch.bfloat16, device="cuda")
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        tk.trace_loss(h, w, targets, adv, impl=impl, **kw).loss.backward()  # warm-up: kernels, device probes
        out, n_forward = _syncs(functools.partial(tk.trace_loss, impl=impl, **kw), h, w, targets, adv)
        _, n_backward = _syncs(out.loss.backward)
        assert (n_forward, n_backward) == (forward, 1), options


def _check(impl, problem, dtype):
    out, gh, gw = run(impl, *problem)
    ref, rgh, rgw = reference64(*problem)
    for name in ("loss", "logprobs", "entropy", "fkl", "rkl"):
        if getattr(ref, name) is not None:
            err = rel_err(getattr(out, name), getattr(ref, name), FLOOR.get(name, 0.0))
            assert err < VALUE_TOL, (name, err)
    assert rel_err(gh, rgh) < GRAD_TOL[dtype], rel_err(gh, rgh)
    assert rel_err(gw, rgw) < GRAD_TOL[dtype], rel_err(gw, rgw)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_cuda_all_options(impl, dtype, seed):
    with tk.chunk_budget(4):
        _check(impl, make_problem(n=300, h=128, v=5003, m=80, options=ALL_OPTIONS, dtype=dtype, seed=seed,
                                  device="cuda", scale=2.0), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kl_clip_mode_grad(dtype):
    """The Triton kernel's GRAD_CLIP specialization (kl_clip_mode="grad") compiled for the card."""
    problem = make_problem(n=300, h=128, v=5003, m=80, options=ALL_OPTIONS, dtype=dtype, seed=5, device="cuda",
                           scale=2.0)
    problem[4].update(kl_term_clip=0.01, kl_clip_mode="grad")
    with tk.chunk_budget(4):
        _check("triton", problem, dtype)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_logit_map(impl, dtype):
    """The kernels' HAS_BIAS / SOFTCAP specializations compiled for the card: a logit scale, a softcap and a bias
    (the teacher's own), every option; d bias under the gradients' bound."""
    from test_logit_map import MAPS, assert_matches, with_map

    problem = with_map(make_problem(n=300, h=128, v=5003, m=80, options=ALL_OPTIONS, dtype=dtype, seed=7,
                                    device="cuda", scale=2.0), MAPS["all"])
    with tk.chunk_budget(4):
        assert_matches(impl, problem, VALUE_TOL, grad_tol=GRAD_TOL[dtype])


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_qwen3_vocab(impl, dtype):
    _check(impl, make_problem(n=64, h=256, v=151_936, m=16, options=ALL_OPTIONS, dtype=dtype, device="cuda"), dtype)


@pytest.mark.parametrize("mode", ["bf24", "fp32"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_cuda_grad_weight_over_many_chunks(impl, mode):
    """512 one-row chunks: the 24-bit accumulator (the Triton GEMM's epilogue on the Triton path) and the fp32 one
    both carry one bf16 rounding (tests/test_grad_weight.py)."""
    problem = make_problem(n=512, h=64, v=1000, options=("old_logprobs",), dtype=torch.bfloat16, device="cuda")
    with tk.chunk_rows(1), tk.grad_weight_accumulator(mode):
        out, gh, gw = run(impl, *problem)
    _, _, rgw = reference64(*problem)
    assert rel_err(gw, rgw) < 2 * torch.finfo(torch.bfloat16).eps


def test_auto_follows_the_verified_flag():
    from trace_kernels import loss

    expected = "triton" if loss.AUTO_USES_TRITON_ON_CUDA else "torch"
    assert loss._resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == expected
