"""docs/kl-clip.md checked: its closed-form KL gradients under both clip modes against autograd on the
materialized reference, its claims about which way entries and the teacher's top token move, and the
numbers its worked examples print (recomputed here, compared to the printed precision).

Everything is fp64 on one distilled row per student row, with the LM head the identity (weight = I,
H = V), so that hidden = temperature * z and d loss / d z = temperature * d loss / d hidden exactly.
Tolerance 1e-12 for closed form vs autograd: both are a few fp64 operations on O(1) numbers (~1e-16
each); any wrong term or factor is O(1e-3) or more here. The reported KL values are fp32 (the contract's
out.fkl / out.rkl): compared at 1e-6 relative.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

import trace_kernels as tk

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "kl-clip.md")
F64 = torch.float64


def reference_grad(z_MV, u_MV, kind, mode, clip, temperature=1.0):
    """(d KL_j / d z_j [M, V] with weight 1, reported KL [M]) from trace_loss(impl="reference") by autograd."""
    m, v = z_MV.shape
    hidden = (z_MV * temperature).clone().requires_grad_(True)
    ones = torch.ones(m, dtype=F64)
    kw = dict(teacher_hidden=u_MV * temperature, temperature=temperature, impl="reference",
              fkl_weight=ones if kind == "forward" else None, rkl_weight=ones if kind == "reverse" else None)
    if mode != "none":
        kw.update(kl_term_clip=clip, kl_clip_mode=mode)
    out = tk.trace_loss(hidden, torch.eye(v, dtype=F64), torch.full((m,), -100), torch.zeros(m, dtype=F64), **kw)
    (g,) = torch.autograd.grad(out.loss, hidden)
    return g * temperature, (out.fkl if kind == "forward" else out.rkl).double()


# ---- the closed forms of docs/kl-clip.md, written from the doc (sections 1 and 2)

def closed_form(z_MV, u_MV, kind, mode, clip):
    """g = d KL / d z per the doc's formulas, and the reported KL."""
    logp, logq = torch.log_softmax(z_MV, -1), torch.log_softmax(u_MV, -1)
    p, q, d = logp.exp(), logq.exp(), logp - logq
    if kind == "forward":
        terms = -q * d  # f_v = q_v (log q_v - log p_v)
        unclipped = p - q
    else:
        terms = p * d  # r_v = p_v (log p_v - log q_v)
        unclipped = p * (d - terms.sum(-1, keepdim=True))
    if mode == "none":
        return unclipped, terms.sum(-1)
    if mode == "grad":
        return unclipped.clamp(-clip, clip), terms.sum(-1)
    u_set = (terms.abs() <= clip).to(F64)  # U: the unclamped terms
    if kind == "forward":
        q_u = (q * u_set).sum(-1, keepdim=True)  # Q_U
        g = p * q_u - q * u_set
    else:
        s_u = (p * (d + 1) * u_set).sum(-1, keepdim=True)  # S_U
        g = p * (u_set * (d + 1) - s_u)
    return g, terms.clamp(-clip, clip).sum(-1)


def lift(z_MV, g_MV, t):
    """L_t = -(g_t - sum_w p_w g_w): first-order change of log p_t per unit step z <- z - eta g."""
    p = torch.softmax(z_MV, -1)
    return -(g_MV[:, t] - (p * g_MV).sum(-1))


def random_rows(m=64, v=11, seed=0, one_hot_teacher=False):
    """Student and teacher logits with a spread of probabilities; with one_hot_teacher the teacher puts
    0.9 to 0.999 on token 0 (the regime of the doc) and the student 0.15 to 0.9 there; in half of those rows
    the teacher's other tokens are in the student's proportions (then token 0 is the only under-allocated one)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, v, generator=g, dtype=F64) * 1.5
    u = torch.randn(m, v, generator=g, dtype=F64) * 1.5
    if one_hot_teacher:
        u[m // 2:, 1:] = z[m // 2:, 1:]  # half the rows: the teacher's tail shaped like the student's
        q_top = 0.9 + 0.099 * torch.rand(m, generator=g, dtype=F64)
        p_top = 0.15 + 0.75 * torch.rand(m, generator=g, dtype=F64)
        u = _with_top(u, q_top)
        z = _with_top(z, p_top)
    return z, u


def _with_top(x_MV, top_M):
    """Logits whose softmax puts top_M on token 0 and spreads the rest as softmax(x[:, 1:])."""
    rest = torch.softmax(x_MV[:, 1:], -1) * (1 - top_M)[:, None]
    return torch.cat([top_M[:, None], rest], 1).log()


MODES = ["none", "value", "grad"]
KINDS = ["forward", "reverse"]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("clip", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_closed_forms_match_autograd_on_the_reference(kind, mode, clip, temperature):
    """The doc's gradient formulas (and the reported values) equal autograd of trace_loss(impl="reference").
    In "grad" mode the reference's gradient is autograd's unclipped one clamped: so this is also the check that
    it equals the clamp of the analytic per-entry gradient p - q, p (d - RKL), computed independently here."""
    z, u = random_rows(seed=3)
    g, kl = reference_grad(z, u, kind, mode, clip, temperature)
    g_doc, kl_doc = closed_form(z, u, kind, mode, clip)
    assert (g - g_doc).abs().max().item() < 1e-12
    assert torch.allclose(kl, kl_doc, rtol=1e-6, atol=1e-7)  # out.fkl / out.rkl are fp32 by contract
    if mode != "none":  # the rows exercise the clip: some entries (terms or gradient entries) clamped, some not
        unclipped, _ = closed_form(z, u, kind, "none", clip)
        logp, logq = torch.log_softmax(z, -1), torch.log_softmax(u, -1)
        terms = -logq.exp() * (logp - logq) if kind == "forward" else logp.exp() * (logp - logq)
        clamped = (terms if mode == "value" else unclipped).abs() > clip
        assert 0.05 < clamped.double().mean().item() < 0.95


@pytest.mark.parametrize("seed", range(3))
def test_which_way_the_entries_move(seed):
    """Section 1 and 2's direction claims, on autograd gradients of the reference."""
    c = 0.05
    for one_hot in (False, True):
        z, u = random_rows(seed=seed, one_hot_teacher=one_hot)
        p, q = torch.softmax(z, -1), torch.softmax(u, -1)
        d = torch.log_softmax(z, -1) - torch.log_softmax(u, -1)
        rkl = (p * d).sum(-1, keepdim=True)
        # forward, value: a clamped entry's logit never goes up (g >= 0)
        g, _ = reference_grad(z, u, "forward", "value", c)
        clamped_f = (q * d).abs() > c
        assert clamped_f.any() and (g[clamped_f] >= 0).all()
        # reverse, value: all clamped entries of a row move one way, g_k = -p_k S_U (same sign in a row)
        g, _ = reference_grad(z, u, "reverse", "value", c)
        clamped_r = (p * d).abs() > c
        assert clamped_r.any()
        s_u = ((p * (d + 1)) * ~clamped_r).sum(-1, keepdim=True)
        assert torch.allclose(g[clamped_r], (-p * s_u)[clamped_r], rtol=0, atol=1e-14)
        # grad mode: every entry keeps the sign of the unclipped gradient, and |g| <= c
        for kind, unclipped in (("forward", p - q), ("reverse", p * (d - rkl))):
            g, _ = reference_grad(z, u, kind, "grad", c)
            assert (torch.sign(g) == torch.sign(unclipped)).all() and g.abs().max() <= c
            assert (g.sum(-1).abs() > 1e-6).any()  # a row's entries need not sum to 0 any more


@pytest.mark.parametrize("seed", range(3))
def test_top_token_lift_claims(seed):
    """Near one-hot teachers (q_0 in [0.9, 0.999]): the lift on the teacher's top token (token 0)."""
    c = 0.05
    z, u = random_rows(m=256, seed=seed, one_hot_teacher=True)
    p, q = torch.softmax(z, -1), torch.softmax(u, -1)
    f_top = q[:, 0] * (torch.log(q[:, 0]) - torch.log(p[:, 0]))
    top_clamped = f_top > c
    # the FKL top term is clamped exactly when p_0 < q_0 exp(-c / q_0)
    assert torch.equal(top_clamped, p[:, 0] < q[:, 0] * torch.exp(-c / q[:, 0]))
    g, _ = reference_grad(z, u, "forward", "value", c)
    lift_value = lift(z, g, 0)
    student_top = p.argmax(-1) == 0
    sel = top_clamped & student_top
    assert sel.sum() > 20 and (top_clamped & ~student_top).sum() > 20
    assert (lift_value[sel] <= 0).all()  # clamped and the student's own favourite: pushed down
    assert (lift_value[top_clamped] <= 1 - q[top_clamped, 0] + 1e-15).all()  # never more than 1 - q_0
    # the doc's closed forms of the lifts: FKL value with the top term clamped, unclipped FKL, RKL value
    sq = (p * p).sum(-1)
    unclamped_f = (q * (torch.log(q) - torch.log(p))).abs() <= c
    q_u = (q * unclamped_f).sum(-1)
    doc_lift = q_u * (sq - p[:, 0]) - (p * q * unclamped_f).sum(-1)
    assert torch.allclose(lift_value[top_clamped], doc_lift[top_clamped], rtol=0, atol=1e-14)
    g, _ = reference_grad(z, u, "forward", "none", c)
    assert torch.allclose(lift(z, g, 0), (q[:, 0] - p[:, 0]) + (sq - (p * q).sum(-1)), rtol=0, atol=1e-14)
    assert (lift(z, g, 0)[top_clamped] > 0).all()  # the unclipped FKL lifts it
    d = torch.log(p) - torch.log(q)
    unclamped_r = (p * d).abs() <= c
    s_u = (p * (d + 1) * unclamped_r).sum(-1)
    top_clamped_r = ~unclamped_r[:, 0]
    assert top_clamped_r.sum() > 20
    g, _ = reference_grad(z, u, "reverse", "value", c)
    doc_lift_r = s_u * (p[:, 0] - sq) + (p * p * (d + 1) * unclamped_r).sum(-1)
    assert torch.allclose(lift(z, g, 0)[top_clamped_r], doc_lift_r[top_clamped_r], rtol=0, atol=1e-14)
    # grad mode: if token 0 is the only token the student under-allocates, lift >= c (1 - p_0)
    g, _ = reference_grad(z, u, "forward", "grad", c)
    only = ((q > p).sum(-1) == 1) & (q[:, 0] - p[:, 0] > c)
    assert only.sum() > 20
    assert (lift(z, g, 0)[only] >= c * (1 - p[only, 0]) - 1e-15).all()
    # reverse, grad: token 0 (p_0 < q_0, so d_0 < 0 <= RKL) always goes up, and lifts when it is the only
    # token with d < RKL
    g, _ = reference_grad(z, u, "reverse", "grad", c)
    under = p[:, 0] < q[:, 0]
    assert under.all() and (g[:, 0] < 0).all()
    only_r = (d < (p * d).sum(-1, keepdim=True)).sum(-1) == 1
    assert only_r.sum() > 20 and (lift(z, g, 0)[only_r] >= -g[only_r, 0] * (1 - p[only_r, 0]) - 1e-15).all()


def test_lift_is_the_first_order_change_of_log_p():
    z, u = random_rows(m=8, seed=1, one_hot_teacher=True)
    eta = 1e-6
    for kind in KINDS:
        for mode in MODES:
            g, _ = reference_grad(z, u, kind, mode, 0.05)
            moved = torch.log_softmax(z - eta * g, -1)[:, 0] - torch.log_softmax(z, -1)[:, 0]
            assert torch.allclose(moved / eta, lift(z, g, 0), rtol=1e-4, atol=1e-9), (kind, mode)


# ---- the worked examples as printed in the doc

_EXAMPLE = re.compile(r"^\*\*Example (\w)\*\*: V = (\d+), q = \(([^)]*)\), p = \(([^)]*)\), c = (\d+\.\d+)")
_NUM = re.compile(r"[-+]?\d+\.\d+")


def _doc_examples():
    """[(name, q, p, c, table rows as lists of cells)] from docs/kl-clip.md."""
    examples = []
    with open(DOC) as f:
        for line in f:
            m = _EXAMPLE.match(line)
            if m:
                floats = [[float(x) for x in grp.split(",")] for grp in (m.group(3), m.group(4))]
                examples.append((m.group(1), *floats, float(m.group(5)), []))
                assert len(floats[0]) == len(floats[1]) == int(m.group(2))
            elif line.startswith("#"):
                examples.append(None)  # a heading ends the example's tables
            elif examples and examples[-1] is not None and line.startswith("|"):
                examples[-1][-1].append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return [e for e in examples if e is not None]


def _matches(cell: str, value: float) -> bool:
    """The printed number equals value to the printed precision (half a unit of the last digit)."""
    (text,) = _NUM.findall(cell)
    decimals = len(text.split(".")[1])
    return abs(float(text) - value) <= 0.5 * 10.0**-decimals + 1e-12


def test_the_doc_examples_print_what_the_reference_computes():
    examples = _doc_examples()
    assert [e[0] for e in examples] == ["A", "B"]
    for name, q, p, c, rows in examples:
        v = len(q)
        assert abs(sum(q) - 1) < 1e-12 and abs(sum(p) - 1) < 1e-12, name
        z, u = torch.tensor([p], dtype=F64).log(), torch.tensor([q], dtype=F64).log()
        logp, logq = z.log_softmax(-1)[0], u.log_softmax(-1)[0]
        terms = {"forward": (logq.exp() * (logq - logp)), "reverse": (logp.exp() * (logp - logq))}
        seen = set()
        for cells in rows:
            if cells[0] in ("f_v", "r_v"):  # | f_v | term 1 | ... | term V |, "(clamped)" marks |term| > c
                kind = "forward" if cells[0] == "f_v" else "reverse"
                assert len(cells) == 1 + v, (name, cells)
                for k in range(v):
                    assert _matches(cells[1 + k], terms[kind][k].item()), (name, cells, k)
                    assert ("clamped" in cells[1 + k]) == (abs(terms[kind][k].item()) > c), (name, cells, k)
                seen.add(cells[0])
            elif cells[0] in KINDS and cells[1] in MODES:  # | KL | mode | g_1..g_V | lift 1 | lift 2 | KL |
                kind, mode = cells[0], cells[1]
                assert len(cells) == 2 + v + 3, (name, cells)
                g, kl = reference_grad(z, u, kind, mode, c)
                numbers = g[0].tolist() + [lift(z, g, 0).item(), lift(z, g, 1).item(), kl.item()]
                for cell, value in zip(cells[2:], numbers):
                    assert _matches(cell, value), (name, cells, cell, value)
                seen.add((kind, mode))
        assert seen == {"f_v", "r_v"} | {(k, m) for k in KINDS for m in MODES}, (name, seen)


def test_the_doc_threshold_for_the_clamped_top_term():
    """The printed threshold below which the FKL term of a 0.99 teacher token is clamped at c = 0.05."""
    with open(DOC) as f:
        text = f.read()
    m = re.search(r"at q_t = 0\.99 and c = 0\.05 that is p_t < ([0-9.]+)", text)
    assert m, "threshold sentence missing"
    assert _matches(m.group(1), 0.99 * math.exp(-0.05 / 0.99))
