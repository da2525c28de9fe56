"""Values and gradients of every implementation against the materialized fp64 reference (docs/contract.md).

Tolerances (problems.PRECISION). fp64 inputs: the chunked paths differ from the reference only in
summation order and in the closed-form gradients, so they agree to ~1e-13; 1e-9 leaves room for
conditioning and still catches any wrong term (a missing term or factor is an O(1) relative error).
fp32 (and Triton, which computes in fp32): one fp32 rounding per GEMM product and per softmax term, sums
of V <= 200 terms: ~1e-6 relative; we allow 2e-5.
"""

from __future__ import annotations

import pytest
import torch
from problems import ALL_OPTIONS, FLOOR, PRECISION, assert_matches_reference, make_problem, reference64, rel_err, run

import trace_kernels as tk

TOL = {torch.float64: 1e-9, torch.float32: 2e-5}

SINGLE_OPTIONS = [(), ("pg_weight",), ("old_logprobs",), ("ref_logprobs",), ("dual_clip", "old_logprobs"),
                  ("temperature",), ("clip", "old_logprobs"), ("entropy_weight",), ("ignore",),
                  ("teacher", "fkl"), ("teacher", "rkl"), ("teacher", "fkl", "rkl"), ("teacher",),
                  ("teacher", "fkl", "rkl", "kl_term_clip"), ("teacher", "fkl", "teacher_weight"),
                  ("teacher", "fkl", "rkl", "kl_index"), ("teacher", "rkl", "kl_index", "kl_term_clip")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", SINGLE_OPTIONS, ids=lambda o: "+".join(o) or "plain")
def test_each_option_alone(impl, options, dtype):
    if dtype != PRECISION[impl][0] and dtype == torch.float64:
        pytest.skip(f"{impl} computes in fp32")
    assert_matches_reference(impl, make_problem(options=options, dtype=dtype, seed=len(options)), tol=TOL[dtype])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_all_options_combined(impl, dtype, seed):
    if dtype != PRECISION[impl][0] and dtype == torch.float64:
        pytest.skip(f"{impl} computes in fp32")
    assert_matches_reference(impl, make_problem(options=ALL_OPTIONS, dtype=dtype, seed=seed), tol=TOL[dtype])


@pytest.mark.parametrize("budget_mb", [1e-4, 2e-3, 1e-2, 256])
def test_chunking_does_not_change_the_result(impl, budget_mb):
    """From one row per chunk (1e-4 MB) to everything in one chunk, with duplicated kl_index rows."""
    dtype, tol = PRECISION[impl]
    problem = make_problem(n=41, v=61, m=30, options=ALL_OPTIONS, seed=7, dtype=dtype)
    problem[4]["kl_index"][:6] = 3  # six distilled rows on one student row
    with tk.chunk_budget(budget_mb):
        assert_matches_reference(impl, problem, tol=tol)


@pytest.mark.parametrize("n,h,v", [(1, 1, 1), (1, 7, 3), (2, 5, 3), (29, 17, 97), (16, 64, 131), (5, 3, 2)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("options", [(), ALL_OPTIONS], ids=["plain", "all"])
def test_odd_shapes(impl, n, h, v, options):
    dtype, tol = PRECISION[impl]
    assert_matches_reference(impl, make_problem(n=n, h=h, v=v, m=max(n // 2, 1), options=options, seed=n + v,
                                                dtype=dtype), tol=tol)


def test_kl_index_m_equals_n_default(impl):
    """kl_index=None means arange(N) and equals passing it explicitly."""
    dtype, tol = PRECISION[impl]
    hidden, weight, targets, advantages, kw = make_problem(options=("teacher", "fkl", "rkl", "kl_term_clip"),
                                                           dtype=dtype)
    assert "kl_index" not in kw
    out_default = assert_matches_reference(impl, (hidden, weight, targets, advantages, kw), tol=tol)
    kw_explicit = dict(kw, kl_index=torch.arange(hidden.shape[0]))
    out_explicit = assert_matches_reference(impl, (hidden, weight, targets, advantages, kw_explicit), tol=tol)
    assert torch.equal(out_default.fkl, out_explicit.fkl) and torch.equal(out_default.loss, out_explicit.loss)


def test_kl_rows_count_whatever_their_target(impl):
    """A distilled row whose target is ignored still contributes its KL (the KL does not use the target)."""
    dtype, tol = PRECISION[impl]
    hidden, weight, targets, advantages, kw = make_problem(n=9, options=("teacher", "fkl", "rkl", "kl_index"),
                                                           dtype=dtype)
    targets[:] = -100
    out, gh, gw = run(impl, hidden, weight, targets, advantages, kw)
    ref, rgh, rgw = reference64(hidden, weight, targets, advantages, kw)
    assert out.loss.item() > 0 and rel_err(out.loss, ref.loss) < tol
    assert gh.abs().max() > 0 and rel_err(gh, rgh) < tol and rel_err(gw, rgw) < tol


@pytest.mark.parametrize("with_teacher", [False, True])
def test_all_rows_ignored_gives_zero_loss_and_gradients(impl, with_teacher):
    options = ("teacher", "fkl", "kl_index") if with_teacher else ()
    hidden, weight, targets, advantages, kw = make_problem(n=6, options=options, m=0, dtype=PRECISION[impl][0])
    targets[:] = -100
    out, gh, gw = run(impl, hidden, weight, targets, advantages, kw)
    assert out.loss.item() == 0.0
    assert (gh == 0).all() and (gw == 0).all()
    assert (out.logprobs == 0).all() and (out.entropy == 0).all()
    if with_teacher:
        assert out.fkl.shape == (0,)


def test_empty_batch(impl):
    dtype = PRECISION[impl][0]
    hidden, weight = torch.zeros(0, 4, dtype=dtype), torch.randn(5, 4, dtype=dtype)
    out, gh, gw = run(impl, hidden, weight, torch.zeros(0, dtype=torch.int64), torch.zeros(0), {})
    assert out.loss.item() == 0.0 and gh.shape == (0, 4) and (gw == 0).all()


def test_ignored_rows_cannot_leak_nan(impl):
    """Garbage (NaN) in advantages / old / ref / weights of padded rows does not reach the loss."""
    hidden, weight, targets, advantages, kw = make_problem(options=("old_logprobs", "ref_logprobs", "pg_weight",
                                                                     "entropy_weight", "ignore"),
                                                           dtype=PRECISION[impl][0])
    pad = targets == kw["ignore_index"]
    assert pad.any()
    for t in (advantages, kw["old_logprobs"], kw["ref_logprobs"], kw["pg_weight"], kw["entropy_weight"]):
        t[pad] = float("nan")
    out, gh, gw = run(impl, hidden, weight, targets, advantages, kw)
    assert torch.isfinite(out.loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()


@pytest.mark.parametrize("where", ["hidden", "weight", "teacher_hidden", "advantages"])
def test_nan_input_gives_non_finite_loss(impl, where):
    hidden, weight, targets, advantages, kw = make_problem(options=("teacher", "fkl", "rkl"), dtype=PRECISION[impl][0])
    targets[:] = 1
    tensors = {"hidden": hidden, "weight": weight, "teacher_hidden": kw["teacher_hidden"], "advantages": advantages}
    tensors[where].view(-1)[0] = float("nan")
    out, _, _ = run(impl, hidden, weight, targets, advantages, kw, grad=False)
    assert not torch.isfinite(out.loss)


def test_inf_hidden_gives_non_finite_loss(impl):
    hidden, weight, targets, advantages, kw = make_problem(options=(), dtype=PRECISION[impl][0])
    targets[:] = 0
    hidden[2, 0] = float("inf")
    out, _, _ = run(impl, hidden, weight, targets, advantages, kw, grad=False)
    assert not torch.isfinite(out.loss)


def test_teacher_gets_no_gradient(impl):
    hidden, weight, targets, advantages, kw = make_problem(options=("teacher", "fkl", "rkl", "teacher_weight"),
                                                           dtype=PRECISION[impl][0])
    th = kw["teacher_hidden"].clone().requires_grad_(True)
    tw = kw["teacher_weight"].clone().requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    out = tk.trace_loss(h, weight, targets, advantages, impl=impl, **dict(kw, teacher_hidden=th, teacher_weight=tw))
    out.loss.backward()
    assert th.grad is None and tw.grad is None and h.grad is not None


def test_teacher_weight_defaults_to_weight_without_gradient_through_it(impl):
    """teacher_weight=None uses `weight` for the teacher but only the student path carries gradient."""
    hidden, weight, targets, advantages, kw = make_problem(options=("teacher", "fkl", "rkl"), dtype=PRECISION[impl][0])
    out, gh, gw = run(impl, hidden, weight, targets, advantages, kw)
    kw_explicit = dict(kw, teacher_weight=weight.clone())
    out2, gh2, gw2 = run(impl, hidden, weight, targets, advantages, kw_explicit)
    assert rel_err(out.loss, out2.loss) < 1e-12 and rel_err(gw, gw2) < 1e-12 and rel_err(gh, gh2) < 1e-12


def test_backward_scales_with_incoming_gradient(impl):
    dtype = PRECISION[impl][0]
    hidden, weight, targets, advantages, kw = make_problem(options=ALL_OPTIONS, dtype=dtype)
    out, gh, gw = run(impl, hidden, weight, targets, advantages, kw)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = tk.trace_loss(h, w, targets, advantages, impl=impl, **kw).loss
    (3.5 * loss).backward()
    eps = torch.finfo(dtype).eps  # one rounding of the product
    assert rel_err(h.grad, 3.5 * gh) <= eps and rel_err(w.grad, 3.5 * gw) <= eps


def test_only_weight_or_only_hidden_requires_grad(impl):
    dtype, tol = PRECISION[impl]
    hidden, weight, targets, advantages, kw = make_problem(options=ALL_OPTIONS, dtype=dtype)
    _, rgh, rgw = reference64(hidden, weight, targets, advantages, kw)
    w = weight.clone().requires_grad_(True)
    tk.trace_loss(hidden, w, targets, advantages, impl=impl, **kw).loss.backward()
    assert rel_err(w.grad, rgw) < tol
    h = hidden.clone().requires_grad_(True)
    tk.trace_loss(h, weight, targets, advantages, impl=impl, **kw).loss.backward()
    assert rel_err(h.grad, rgh) < tol


def test_no_grad_mode_returns_values_without_graph(impl):
    dtype, tol = PRECISION[impl]
    hidden, weight, targets, advantages, kw = make_problem(options=ALL_OPTIONS, dtype=dtype)
    ref, _, _ = reference64(hidden, weight, targets, advantages, kw)
    with torch.no_grad():
        out = tk.trace_loss(hidden.requires_grad_(True), weight, targets, advantages, impl=impl, **kw)
    assert not out.loss.requires_grad and rel_err(out.loss, ref.loss) < tol


@pytest.mark.parametrize("return_entropy", [False, True])
def test_token_logprobs(impl, return_entropy):
    hidden, weight, targets, advantages, kw = make_problem(options=("temperature", "ignore"))
    ref, _, _ = reference64(hidden.float(), weight.float(), targets, advantages, kw)
    h = hidden.float().requires_grad_(True)
    got = tk.token_logprobs(h, weight.float(), targets, temperature=kw["temperature"], return_entropy=return_entropy,
                            ignore_index=kw["ignore_index"], impl=impl)
    logp, ent = got if return_entropy else (got, None)
    assert logp.dtype == torch.float32 and not logp.requires_grad
    assert rel_err(logp, ref.logprobs) < 2e-6
    if return_entropy:
        assert rel_err(ent, ref.entropy) < 2e-6


def test_on_policy_equals_old_logprobs_equal_to_current(impl):
    """old_logprobs=None is the on-policy case: identical to passing the current log-probs."""
    dtype, tol = PRECISION[impl]
    hidden, weight, targets, advantages, kw = make_problem(options=("ignore",), dtype=dtype)
    logp_NV = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    current = logp_NV.gather(1, targets.clamp(min=0)[:, None]).squeeze(1).to(dtype)
    out_a, gh_a, gw_a = run(impl, hidden, weight, targets, advantages, kw)
    out_b, gh_b, gw_b = run(impl, hidden, weight, targets, advantages, dict(kw, old_logprobs=current))
    assert rel_err(out_a.loss, out_b.loss) < tol and rel_err(gh_a, gh_b) < tol and rel_err(gw_a, gw_b) < tol


def test_extreme_logits_and_low_temperature(impl):
    """Logits of ~1e3 at temperature 0.1 (scaled logits ~1e4): the online max must keep everything finite and
    exact. Small-integer inputs make the fp32 GEMM exact, so the comparison isolates the row math, where
    log p = z - lse with an fp32 lse would already be off by 1e-3."""
    dtype, tol = PRECISION[impl]
    hidden, weight, targets, advantages, kw = make_problem(n=17, h=9, v=41, options=("teacher", "fkl", "rkl",
                                                                                    "kl_term_clip"), dtype=dtype)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randint(-20, 21, hidden.shape, generator=g).to(dtype)
    weight = torch.randint(-20, 21, weight.shape, generator=g).to(dtype)
    kw["teacher_hidden"] = torch.randint(-20, 21, kw["teacher_hidden"].shape, generator=g).to(dtype)
    kw["temperature"] = 0.1
    assert (hidden.double() @ weight.double().T).abs().max() > 1e3
    assert_matches_reference(impl, (hidden, weight, targets, advantages, kw), tol=tol)


def test_negative_logits_everywhere(impl):
    """All logits far below 0: a max initialised to 0 instead of -inf would underflow every exp (exp(-120)
    is 0 in fp32) and give -inf or NaN everywhere."""
    dtype, tol = PRECISION[impl]
    hidden, weight, targets, advantages, kw = make_problem(n=7, v=19, options=("teacher", "fkl", "rkl"), dtype=dtype)
    # A constant column in hidden times a constant in weight shifts every logit by -120.
    hidden = torch.cat([hidden, torch.ones(7, 1, dtype=dtype)], 1)
    weight = torch.cat([weight, torch.full((19, 1), -120.0, dtype=dtype)], 1)
    kw["teacher_hidden"] = torch.cat([kw["teacher_hidden"], torch.ones(7, 1, dtype=dtype)], 1)
    out, gh, gw = run(impl, hidden, weight, targets, advantages, kw)
    ref, rgh, rgw = reference64(hidden, weight, targets, advantages, kw)
    for name in ("loss", "logprobs", "entropy", "fkl", "rkl"):
        assert rel_err(getattr(out, name), getattr(ref, name), FLOOR.get(name, 0.0)) < tol, name
    # The shift column of d hidden is -120 * sum_v dz_v: 0 in exact arithmetic and pure cancellation
    # noise in fp32, so it is left out; the same dz are checked through d weight[:, -1] = sum_n dz_n.
    assert rel_err(gw, rgw) < tol and rel_err(gh[:, :-1], rgh[:, :-1]) < tol


# kl_clip_mode="grad": unclipped values, each entry of a distilled row's unweighted dKL/dz clamped. A clip of
# 0.01 clamps a share of the entries of p - q and p (d - RKL) in these problems (checked below), not all.
GRAD_MODE_OPTIONS = [("teacher", "fkl", "kl_term_clip"), ("teacher", "rkl", "kl_term_clip"),
                     ("teacher", "fkl", "rkl", "kl_term_clip", "kl_index", "temperature"), ALL_OPTIONS]


def _grad_mode(problem, clip=0.01):
    hidden, weight, targets, advantages, kw = problem
    return hidden, weight, targets, advantages, dict(kw, kl_term_clip=clip, kl_clip_mode="grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", GRAD_MODE_OPTIONS, ids=lambda o: "all" if o == ALL_OPTIONS else "+".join(o))
def test_kl_clip_mode_grad(impl, options, dtype):
    """Values and gradients against the fp64 reference (whose clamped gradient is autograd's, clamped)."""
    if dtype != PRECISION[impl][0] and dtype == torch.float64:
        pytest.skip(f"{impl} computes in fp32")
    problem = _grad_mode(make_problem(options=options, dtype=dtype, seed=11 + len(options)))
    assert_matches_reference(impl, problem, tol=TOL[dtype])
    # The problem exercises the mode: the values are the unclipped KL, the gradient is not the unclipped one.
    hidden, weight, targets, advantages, kw = problem
    ref, rgh, rgw = reference64(*problem)
    plain, pgh, pgw = reference64(hidden, weight, targets, advantages, dict(kw, kl_term_clip=None))
    value, _, _ = reference64(hidden, weight, targets, advantages, dict(kw, kl_clip_mode="value"))
    assert rel_err(ref.loss, plain.loss) < 1e-12 and rel_err(ref.fkl, plain.fkl) < 1e-12
    assert rel_err(ref.rkl, plain.rkl) < 1e-12
    assert rel_err(ref.fkl, value.fkl) > 1e-2 or rel_err(ref.rkl, value.rkl) > 1e-2
    assert rel_err(rgh, pgh) > 1e-2 and rel_err(rgw, pgw) > 1e-2


@pytest.mark.one_block_size
@pytest.mark.parametrize("budget_mb", [1e-4, 256])
def test_kl_clip_mode_grad_chunking_and_repeated_rows(impl, budget_mb):
    """Each distilled row's gradient is clamped on its own, then summed on the shared student row."""
    dtype, tol = PRECISION[impl]
    problem = _grad_mode(make_problem(n=41, v=61, m=30, options=ALL_OPTIONS, seed=7, dtype=dtype))
    problem[4]["kl_index"][:6] = 3  # six distilled rows on one student row
    with tk.chunk_budget(budget_mb):
        assert_matches_reference(impl, problem, tol=tol)
