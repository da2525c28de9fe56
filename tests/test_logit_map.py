"""The heads' logit map, x = softcap(logit_scale (hidden @ weight.T + bias)) / temperature with
softcap(y) = c tanh(y / c): values and gradients (hidden, weight and bias) of every implementation against the
fp64 materialized reference, the reference against the Hugging Face heads' own formula, and the argument checks.

Tolerances are those of tests/test_contract.py and tests/test_precision.py (problems.PRECISION, the bf16 / fp16
gradient bounds): the map adds one fp32 product, and under a cap one tanh (torch's, or the Triton kernels' own
from exp, <= 3e-7 relative) per logit, well inside them. The cap's slope is checked elementwise where tanh
saturates, where 1 - tanh^2 would have lost its relative precision.
"""

from __future__ import annotations

import pytest
import torch
from problems import ALL_OPTIONS, FLOOR, PRECISION, make_problem, rel_err

import trace_kernels as tk

MAPS = {
    "scale": dict(logit_scale=0.0625),  # Granite's logits_scaling 16 (divides)
    "softcap": dict(logit_softcap=2.5),  # Gemma 2 caps at 30 with logits of tens; here logits of a few
    "bias": dict(bias=True),
    "all": dict(logit_scale=1.7, logit_softcap=3.0, bias=True),  # Cohere-like scale, then the cap
}


def with_map(problem, options, seed=0):
    """The problem with the map's options; a bias drawn for the student head (and the teacher's own head)."""
    hidden, weight, targets, advantages, kw = problem
    kw = dict(kw, **{k: v for k, v in options.items() if k != "bias"})
    if options.get("bias"):
        g = torch.Generator().manual_seed(100 + seed)
        v = weight.shape[0]
        bias = torch.randn(v, generator=g, dtype=torch.float64)
        kw["bias"] = bias.to(weight.device, weight.dtype)
        if "teacher_weight" in kw:
            kw["teacher_bias"] = (bias + 0.1 * torch.randn(v, generator=g, dtype=torch.float64)).to(weight.device,
                                                                                                    weight.dtype)
    return hidden, weight, targets, advantages, kw


def run(impl, hidden, weight, targets, advantages, kw):
    """trace_loss on fresh leaves; the output and (d hidden, d weight, d bias or None) as fp64."""
    leaves = [hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)]
    kw = dict(kw)
    if kw.get("bias") is not None:
        kw["bias"] = kw["bias"].detach().clone().requires_grad_(True)
        leaves.append(kw["bias"])
    out = tk.trace_loss(leaves[0], leaves[1], targets, advantages, impl=impl, **kw)
    grads = [g.double() for g in torch.autograd.grad(out.loss, leaves)]
    return out, grads + [None] * (3 - len(grads))


def reference64(hidden, weight, targets, advantages, kw):
    kw64 = {k: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for k, t in kw.items()}
    return run("reference", hidden.double(), weight.double(), targets, advantages.double(), kw64)


def assert_matches(impl, problem, tol, grad_tol=None):
    out, grads = run(impl, *problem)
    ref, rgrads = reference64(*problem)
    checks = {"loss": (out.loss, ref.loss), "logprobs": (out.logprobs, ref.logprobs),
              "entropy": (out.entropy, ref.entropy)}
    if ref.fkl is not None:
        checks["fkl"], checks["rkl"] = (out.fkl, ref.fkl), (out.rkl, ref.rkl)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, rgrads):
        assert (a is None) == (e is None), name
        if a is not None:
            checks[name] = (a, e)
    for name, (a, e) in checks.items():
        assert a.shape == e.shape, name
        limit = grad_tol if grad_tol is not None and name.startswith("grad") else tol
        err = rel_err(a, e, FLOOR.get(name, 0.0))
        assert err <= limit, f"{impl} {name}: relative error {err:.3g} > {limit:.3g}"
    return out, grads, ref, rgrads


@pytest.mark.one_block_size
@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("options", [(), ALL_OPTIONS, ("teacher", "fkl", "rkl", "teacher_weight", "kl_index"),
                                     ("teacher", "fkl", "rkl", "kl_term_clip", "entropy_weight")],
                         ids=["plain", "all", "snapshot-teacher", "live-teacher-clip"])
def test_map_against_fp64(impl, name, options):
    dtype, tol = PRECISION[impl]
    problem = make_problem(options=options, dtype=dtype, seed=len(options), scale=2.0)
    assert_matches(impl, with_map(problem, MAPS[name]), tol)


@pytest.mark.heavy
@pytest.mark.parametrize("name", list(MAPS))
def test_map_across_vocabulary_blocks(name, monkeypatch):
    """The Triton kernels with 16-wide blocks (every sweep crosses blocks: online max and sums, the ragged last
    block), every option and each map: the heavy CI job (the interpreter takes minutes)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run here under TRITON_INTERPRET=1")
    from trace_kernels import rows_triton

    monkeypatch.setattr(rows_triton, "MAX_BLOCK_V", 16)
    for options in (ALL_OPTIONS, ("teacher", "fkl", "rkl", "kl_term_clip", "entropy_weight")):
        problem = make_problem(options=options, dtype=torch.float32, seed=len(options), scale=2.0)
        assert_matches("triton", with_map(problem, MAPS[name]), PRECISION["triton"][1])


@pytest.mark.one_block_size
def test_grad_clip_mode_with_map(impl):
    """kl_clip_mode="grad" clamps d KL / d x, x the mapped logits: the map's slope multiplies after the clamp."""
    dtype, tol = PRECISION[impl]
    problem = make_problem(options=("teacher", "fkl", "rkl", "kl_term_clip", "old_logprobs"), dtype=dtype, seed=3,
                           scale=2.0)
    problem[4]["kl_clip_mode"] = "grad"
    problem[4]["kl_term_clip"] = 0.01
    assert_matches(impl, with_map(problem, MAPS["all"]), tol)


@pytest.mark.parametrize("n,h,v", [(1, 1, 1), (1, 7, 3), (2, 5, 3), (6, 17, 97), (5, 3, 2)], ids=str)
def test_odd_shapes(impl, n, h, v):
    """N = 1, V = 1, and vocabularies that are not a multiple of the block (triton-b16 crosses 16-wide blocks)."""
    dtype, tol = PRECISION[impl]
    problem = make_problem(n=n, h=h, v=v, m=max(n // 2, 1), options=ALL_OPTIONS, seed=n + v, dtype=dtype)
    assert_matches(impl, with_map(problem, MAPS["all"], seed=n), tol)


@pytest.mark.one_block_size
def test_all_rows_ignored(impl):
    """No valid row and no teacher: zero loss and zero gradients, the bias's too."""
    dtype, _ = PRECISION[impl]
    hidden, weight, targets, advantages, kw = with_map(make_problem(n=6, options=(), dtype=dtype), MAPS["all"])
    targets[:] = -100
    out, (gh, gw, gb) = run(impl, hidden, weight, targets, advantages, kw)
    assert out.loss.item() == 0 and not gh.any() and not gw.any() and not gb.any()
    assert not out.logprobs.any() and not out.entropy.any()


@pytest.mark.one_block_size
@pytest.mark.parametrize("budget_mb", [1e-4, 2e-3])
def test_bias_gradient_summed_over_chunks(impl, budget_mb):
    """d bias is the sum of each chunk's column sums of dz: one row per chunk up to a few."""
    dtype, tol = PRECISION[impl]
    problem = with_map(make_problem(n=41, v=61, m=30, options=ALL_OPTIONS, seed=7, dtype=dtype), MAPS["all"])
    with tk.chunk_budget(budget_mb):
        assert_matches(impl, problem, tol)


@pytest.mark.one_block_size
def test_bias_alone_requires_grad(impl):
    """A frozen body and head with a trainable bias: the bias alone gets its gradient."""
    dtype, tol = PRECISION[impl]
    hidden, weight, targets, advantages, kw = with_map(make_problem(options=ALL_OPTIONS, dtype=dtype, seed=5),
                                                       MAPS["all"])
    bias = kw.pop("bias").clone().requires_grad_(True)
    out = tk.trace_loss(hidden, weight, targets, advantages, bias=bias, impl=impl, **kw)
    (gb,) = torch.autograd.grad(out.loss, [bias])
    _, (_, _, rgb) = reference64(hidden, weight, targets, advantages, dict(kw, bias=bias.detach()))
    assert rel_err(gb, rgb) <= tol


@pytest.mark.one_block_size
@pytest.mark.parametrize("scale", [20.0, 60.0])
def test_softcap_saturated_slope_elementwise(impl, scale):
    """Logits far beyond the cap (|y| / c up to ~5-15), where tanh is within 1e-5 to 1e-13 of 1: the slope
    1 - tanh^2 must come from exp(-2|y|), not from a difference with 1. One row, so that d bias is that row's dz
    itself (no sum over rows to cancel): elementwise within 1e-4 (fp32; 1e-9 fp64) of fp64 on every entry above
    1e-30. 1 - tanh(y)^2 in fp32 on the same logits is off by more than 1e-3 (checked), so this would see it."""
    dtype, _ = PRECISION[impl]
    hidden, weight, targets, advantages, kw = with_map(make_problem(n=1, h=8, v=53, options=("entropy_weight",),
                                                                    dtype=dtype, seed=2, scale=scale),
                                                       dict(logit_softcap=5.0, bias=True))
    _, (_, _, gb) = run(impl, hidden, weight, targets, advantages, kw)
    _, (_, _, rgb) = reference64(hidden, weight, targets, advantages, kw)
    big = rgb.abs() > 1e-30
    assert big.sum() >= 40
    elem_tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert ((gb - rgb).abs()[big] / rgb.abs()[big]).max() <= elem_tol
    y = (hidden.double() @ weight.double().T + kw["bias"].double()) / 5.0
    naive = 1 - torch.tanh(y.float()).double() ** 2
    exact = 1 / torch.cosh(y) ** 2
    assert ((naive - exact).abs() / exact).max() > 1e-3


@pytest.mark.one_block_size
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_against_fp64(impl, dtype):
    """16-bit hidden, weight and bias: values to 2e-5 (fp32 arithmetic), gradients to one rounding in the input
    dtype normwise (tests/test_precision.py), and elementwise: the median relative error of the gradients'
    entries within 2 ulp of the dtype."""
    ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    problem = with_map(make_problem(n=33, h=24, v=151, options=ALL_OPTIONS, dtype=dtype, seed=1, scale=3.0),
                       MAPS["all"])
    with tk.chunk_budget(0.01):
        out, grads, ref, rgrads = assert_matches(impl, problem, 2e-5, grad_tol=ulp)
    for a, e in zip(grads, rgrads):
        assert a is not None
        big = e.abs() > 1e-3 * e.abs().max()
        assert ((a - e).abs()[big] / e.abs()[big]).median() <= 2 * ulp


def test_reference_is_the_hf_heads_formula():
    """The reference's logits are those of Gemma 2 (logits / c, tanh, x c), Cohere (x logit_scale), Granite
    (/ logits_scaling) and a biased Linear, written as transformers writes them, then divided by the temperature
    as TRL does."""
    hidden, weight, targets, advantages, kw = make_problem(n=7, h=6, v=29, options=("temperature",), seed=4,
                                                           scale=4.0)
    bias = torch.randn(29, dtype=torch.float64)
    lin = hidden @ weight.T + bias
    for options, logits in (
        (dict(logit_softcap=3.0), torch.tanh(lin / 3.0) * 3.0),
        (dict(logit_scale=0.25), lin * 0.25),
        (dict(logit_scale=1 / 8), lin / 8),
        (dict(logit_scale=2.0, logit_softcap=5.0), torch.tanh(lin * 2.0 / 5.0) * 5.0),
    ):
        logp = torch.log_softmax(logits / kw["temperature"], -1).gather(1, targets[:, None]).squeeze(1)
        out = tk.trace_loss(hidden, weight, targets, advantages, bias=bias, impl="reference", **kw, **options)
        assert rel_err(out.logprobs, logp) < 1.2e-7  # logprobs are fp32 (the contract)


@pytest.mark.one_block_size
def test_token_logprobs_and_logprobs_entropy_take_the_map(impl):
    """token_logprobs' values, and logprobs_entropy's gradients (hidden, weight, bias) of a random linear function
    of log p and entropy, against autograd through the HF head's formula in fp64."""
    dtype, tol = PRECISION[impl]
    hidden, weight, targets, _, kw = with_map(make_problem(options=("temperature", "ignore"), dtype=dtype),
                                              MAPS["all"])
    bias, t, ignore = kw["bias"], kw["temperature"], kw["ignore_index"]
    leaves64 = [x.detach().double().requires_grad_(True) for x in (hidden, weight, bias)]
    h64, w64, b64 = leaves64
    logits = torch.tanh((h64 @ w64.T + b64) * 1.7 / 3.0) * 3.0 / t
    logp_NV = torch.log_softmax(logits, -1)
    valid = targets != ignore
    logp64 = torch.where(valid, logp_NV.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ent64 = torch.where(valid, -(logp_NV.exp() * logp_NV).sum(-1), 0.0)
    g = torch.Generator().manual_seed(9)
    c1, c2 = torch.randn(2, hidden.shape[0], generator=g, dtype=torch.float64)
    rgrads = torch.autograd.grad((c1 * logp64 + c2 * ent64).sum(), leaves64)

    logp, ent = tk.token_logprobs(hidden, weight, targets, t, return_entropy=True, ignore_index=ignore, impl=impl,
                                  logit_scale=1.7, logit_softcap=3.0, bias=bias)
    # the outputs are fp32 (the contract) whatever the inputs, and so are the gradients autograd hands back to them
    value_tol = max(tol, 2e-7)
    assert rel_err(logp, logp64.detach()) <= value_tol
    assert rel_err(ent, ent64.detach(), FLOOR["entropy"]) <= value_tol
    leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias)]
    logp, ent = tk.logprobs_entropy(leaves[0], leaves[1], targets, t, ignore_index=ignore, impl=impl,
                                    logit_scale=1.7, logit_softcap=3.0, bias=leaves[2])
    grads = torch.autograd.grad((c1 * logp + c2 * ent).sum(), leaves)
    for name, a, e in zip(("hidden", "weight", "bias"), grads, rgrads):
        assert rel_err(a, e) <= value_tol, name


def test_gradcheck_fp64():
    """Finite differences through the reference and the torch path, bias included (off-policy: see
    tests/test_precision.py)."""
    hidden, weight, targets, advantages, kw = with_map(
        make_problem(n=5, h=3, v=7, m=4, options=("old_logprobs", "teacher", "fkl", "rkl", "entropy_weight",
                                                  "teacher_weight", "kl_index"), seed=3, scale=2.0),
        MAPS["all"])
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, kw.pop("bias"))]
    for impl in ("reference", "torch"):
        assert torch.autograd.gradcheck(
            lambda h, w, b, impl=impl: tk.trace_loss(h, w, targets, advantages, bias=b, impl=impl, **kw).loss, leaves)


@pytest.mark.parametrize("bad,message", [
    (dict(logit_scale=0.0), "logit_scale must be > 0"),
    (dict(logit_scale=-1.0), "logit_scale must be > 0"),
    (dict(logit_scale=float("nan")), "logit_scale must be a finite real number"),
    (dict(logit_scale=True), "logit_scale must be a finite real number"),
    (dict(logit_softcap=0.0), "logit_softcap must be > 0"),
    (dict(logit_softcap=float("inf")), "logit_softcap must be a finite real number"),
    (dict(bias=torch.zeros(36)), r"bias must have shape \(37,\)"),
    (dict(bias=torch.zeros(37, 1)), r"bias must have shape \(37,\)"),
    (dict(bias=torch.zeros(37, dtype=torch.float32)), "bias must have dtype torch.float64"),
    (dict(bias=[0.0] * 37), "bias must be a torch.Tensor"),
    (dict(bias=torch.zeros(37, dtype=torch.float64, device="meta")), "bias must be on cpu"),
    (dict(teacher_bias=torch.zeros(37)), "teacher_bias was given without teacher_hidden"),
])
def test_bad_arguments_name_the_argument(bad, message):
    hidden, weight, targets, advantages, kw = make_problem(options=(), dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        tk.trace_loss(hidden, weight, targets, advantages, impl="torch", **bad)


def test_teacher_bias_rules():
    hidden, weight, targets, advantages, kw = make_problem(options=("teacher", "fkl"), dtype=torch.float64)
    bias = torch.zeros(37, dtype=torch.float64)
    with pytest.raises(ValueError, match="teacher_bias was given without teacher_weight"):
        tk.trace_loss(hidden, weight, targets, advantages, bias=bias, teacher_bias=bias, **kw)
    with pytest.raises(ValueError, match="teacher_bias is required with teacher_weight when bias is given"):
        tk.trace_loss(hidden, weight, targets, advantages, bias=bias, teacher_weight=weight, **kw)
    with pytest.raises(ValueError, match="teacher_bias was given without bias"):
        tk.trace_loss(hidden, weight, targets, advantages, teacher_bias=bias, teacher_weight=weight, **kw)
    with pytest.raises(ValueError, match=r"teacher_bias must have shape \(37,\)"):
        tk.trace_loss(hidden, weight, targets, advantages, bias=bias, teacher_bias=bias[:5], teacher_weight=weight,
                      **kw)
