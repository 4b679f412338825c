"""Reductions: families of terms inside a family's template, printed as inner loops.

The stationarity row of a QP ``Σ_j Q_ij y_j + q_i + Σ_k G_ki ν_k`` and the row
``y_i + Σ_j a_ij tanh(y_j) − b_i`` are one template each with long sums of like-shaped
terms: those sums become reductions (an inner index table over the template's slots), and
every kernel accumulates them in a loop. The reduced compilation must agree with the
straight-line one (every entry on its own) and with the exact active-set QP reference.
"""

from pathlib import Path

import numpy as np
import pytest
import sympy as sp
import torch

import implicit_compiler as ic
from implicit_compiler.codegen.emit_problem import emit_problem_module
from implicit_compiler.derive import jacobians, reductions
from implicit_compiler.derive.reductions import reduce_template
from tests.codegen.test_family_codegen import dense_tanh
from tests.derive.test_families import qp_kkt
from tests.problem.qp_reference import qp_vjp, solve_qp


def _source(layer) -> str:
    return Path(layer.kernels.module.__file__).read_text()


def _kernel(src: str, name: str) -> list[str]:
    lines = src.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"def {name}("))
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" "))
    return lines[start:end]


def _inner_loops(src: str, name: str) -> int:
    return sum(1 for line in _kernel(src, name) if line.lstrip().startswith("for e in range("))


# ---------------------------------------------------------------- detection (no compile)

def test_qp_kkt_templates_have_their_sums_as_reductions():
    n, m = 14, 12
    d = qp_kkt(n, m).derivation
    assert len(d.families) == 2 and d.single_rows == ()
    stat, comp = sorted(d.families, key=lambda fd: min(fd.family.members))
    # stationarity: Q_ij y_j / 2 and Q_ji y_j / 2 (j != i) are one shape, G_ki ν_k another
    sizes = sorted(r.size for r in stat.reduced.reductions)
    assert sizes == [m, 2 * (n - 1)]
    assert len(stat.reduced.rest.args) == 4  # Q_ii y_i + q_i + acc0 + acc1
    # complementarity ν_k (Σ_j G_kj y_j − h_k): one reduction inside the product
    assert [r.size for r in comp.reduced.reductions] == [n]
    # the inner tables index the template's slots, one row per term
    for fd in (stat, comp):
        for r in fd.reduced.reductions:
            assert r.table.shape == (r.size, len(r.syms))
            assert r.table.max() < len(fd.family.slots)


def test_dense_rows_have_one_reduction_and_rebuild_exactly():
    n = 16
    s = dense_tanh(n)
    d = s.derivation
    (fd,) = d.families
    red = fd.reduced
    assert [r.size for r in red.reductions] == [n]
    f = fd.family
    # the rest with the accumulator put back as the sum of its renamed terms IS the template
    r = red.reductions[0]
    terms = [r.term.xreplace({sym: f.slots[int(k)] for sym, k in zip(r.syms, row)}) for row in r.table]
    assert red.rest.xreplace({r.acc: sp.Add(*terms)}) == fd.residual
    # and the derivative pieces give the template's own derivatives (chain rule)
    for k, e in fd.d_unknowns:
        s_k = f.slots[k]
        rebuilt = sp.diff(red.rest, s_k) + sum(
            red.d_acc[0] * sp.diff(t, s_k) for t in terms)
        assert sp.simplify(rebuilt.xreplace({r.acc: sp.Add(*terms)}) - e) == 0


def test_a_perturbed_term_is_not_merged():
    n = 14
    y = sp.symbols(f"y0:{n}")
    a = sp.symbols(f"a0:{n}")
    slots = list(y) + list(a)
    kinds = ["unknown"] * n + ["param"] * n
    groups = ["y"] * n + ["a"] * n
    expr = sum((3 if j == 5 else 1) * a[j] * sp.tanh(y[j]) for j in range(n)) + y[0] ** 2
    red = reduce_template(expr, slots, kinds, groups)
    assert [r.size for r in red.reductions] == [n - 1]
    assert 3 * a[5] * sp.tanh(y[5]) in sp.Add.make_args(red.rest)
    # a term in another group's symbol (a parameter in an unknown's place) is not merged either
    expr2 = sum(a[j] * sp.tanh(y[j]) for j in range(n - 1)) + a[n - 1] * sp.tanh(a[0])
    red2 = reduce_template(expr2, slots, kinds, groups)
    assert [r.size for r in red2.reductions] == [n - 1]
    assert a[n - 1] * sp.tanh(a[0]) in sp.Add.make_args(red2.rest)
    # below the threshold: no reduction
    assert reduce_template(sum(a[j] * y[j] for j in range(5)), slots, kinds, groups) is None


def _kernel_lines_without_comments(src: str) -> list[str]:
    lines = src.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("@njit"))
    end = next(i for i, line in enumerate(lines) if line.startswith("# ----") and "tables" in line)
    return [line for line in lines[start:end] if not line.lstrip().startswith("#")]


def _qp_problem(n, m):
    y = sp.Matrix(sp.symbols(f"y0:{n}"))
    Q = sp.Matrix(n, n, sp.symbols(f"Q0:{n * n}"))
    q = sp.Matrix(sp.symbols(f"q0:{n}"))
    G = sp.Matrix(m, n, sp.symbols(f"G0:{m * n}"))
    h = sp.Matrix(sp.symbols(f"h0:{m}"))
    return ic.Problem((y.T * Q * y)[0] / 2 + (q.T * y)[0], variables={"y": y},
                      params={"Q": Q, "q": q, "G": G, "h": h}, inequalities=list(G * y - h))


def test_qp_module_kernels_do_not_grow_with_the_size():
    sizes = {}
    for n, m in ((13, 12), (17, 15)):
        p = _qp_problem(n, m)
        src = emit_problem_module(p, p.system.layout(), "key")
        sizes[n] = _kernel_lines_without_comments(src)
        assert max(len(line) for line in sizes[n]) <= 200
    assert len(sizes[13]) == len(sizes[17])


# ---------------------------------------------------------------- compiled, against references

def _compile(make, cache, reduce=True, families=True, **options):
    old_r, old_f = reductions.REDUCTION_MIN_SIZE, jacobians.FAMILY_MIN_SIZE
    if not reduce:
        reductions.REDUCTION_MIN_SIZE = 10**9
    if not families:
        jacobians.FAMILY_MIN_SIZE = 10**9
    try:
        return ic.compile(make(), cache_dir=cache, **options)
    finally:
        reductions.REDUCTION_MIN_SIZE, jacobians.FAMILY_MIN_SIZE = old_r, old_f


N, M = 9, 9


@pytest.fixture(scope="module")
def qp_pair(tmp_path_factory):
    """The QP with every sum of 8+ like terms reduced (the stationarity sums over Q and G,
    the complementarity and constraint rows), and its straight-line compilation."""
    old = reductions.REDUCTION_MIN_SIZE
    reductions.REDUCTION_MIN_SIZE = 8
    try:
        red = _compile(lambda: _qp_problem(N, M), tmp_path_factory.mktemp("reduced"), return_multipliers=True,
                       tol=1e-12)
    finally:
        reductions.REDUCTION_MIN_SIZE = old
    straight = _compile(lambda: _qp_problem(N, M), tmp_path_factory.mktemp("straight"), families=False,
                        return_multipliers=True, tol=1e-12)
    return red, straight


def _qp_instance(B, seed):
    rng = np.random.default_rng(seed)
    Q = np.empty((B, N, N))
    for b in range(B):
        L = rng.standard_normal((N, N))
        Q[b] = L @ L.T + 0.5 * np.eye(N)
    return Q, 2 * rng.standard_normal((B, N)), rng.standard_normal((B, M, N)), rng.uniform(0.1, 1.0, (B, M))


def test_reduced_qp_kernels_are_inner_loops(qp_pair):
    red, straight = qp_pair
    src = _source(red)
    # residual / Jacobian: the Q and G sums of stationarity, the G sum of complementarity;
    # the Jacobian scatters the terms' derivatives in a second pass
    assert _inner_loops(src, "residual") == 3
    assert _inner_loops(src, "residual_jacobian") == 6
    # ∇f (the G sum vanishes at ν = 0), the constraint rows and their Jacobian rows
    assert _inner_loops(src, "ip_eval") == 1 + 2
    assert _inner_loops(src, "ip_hess") == 1  # the Q sum's derivative in y
    assert _inner_loops(src, "vjp_params") >= 3
    assert _inner_loops(_source(straight), "residual") == 0


def test_reduced_qp_agrees_with_straight_line_and_the_exact_reference(qp_pair):
    red, straight = qp_pair
    B = 6
    Q, q, G, h = _qp_instance(B, seed=11)
    w = np.random.default_rng(12).standard_normal((B, N))
    out = {}
    for name, layer in (("red", red), ("straight", straight)):
        ts = [torch.tensor(a, requires_grad=True) for a in (Q, q, G, h)]
        y, nu = layer(*ts)
        (y * torch.tensor(w)).sum().backward()
        out[name] = [y.detach().numpy(), nu.detach().numpy()] + [t.grad.numpy() for t in ts]
    for a, b in zip(out["red"], out["straight"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    y, nu, gQ, gq, gG, gh = out["red"]
    actives = set()
    for b in range(B):
        A0, b0 = np.zeros((0, N)), np.zeros(0)
        y_ref, _, nu_ref, S = solve_qp(Q[b], q[b], G[b], h[b], A0, b0)
        _, grads = qp_vjp(Q[b], q[b], G[b], h[b], A0, b0, w[b])
        actives.add(len(S))
        assert grads["margin"] > 1e-3
        np.testing.assert_allclose(y[b], y_ref, rtol=0, atol=1e-9)
        np.testing.assert_allclose(nu[b], nu_ref, rtol=0, atol=1e-9)
        for got, key in ((gQ, "Q"), (gq, "q"), (gG, "G"), (gh, "h")):
            np.testing.assert_allclose(got[b], grads[key], rtol=0, atol=1e-8)
    assert len(actives) > 1 and max(actives) > 0


def test_reduced_qp_kernels_match_sympy_entry_by_entry(qp_pair):
    red, _ = qp_pair
    problem = _qp_problem(N, M)
    mod, tab = red.kernels.module, red.kernels.tab
    rng = np.random.default_rng(5)
    yv, p = rng.standard_normal(N), rng.standard_normal(len(problem.params))
    nuv = rng.uniform(0.1, 2.0, M)
    sub = dict(zip(problem.variables, yv)) | dict(zip(problem.params, p)) | dict(zip(problem.nu, nuv))
    gradf, g, Jg = np.zeros(N), np.zeros(M), np.full((M, N), np.nan)
    mod.ip_eval(yv, p, gradf, np.zeros(0), np.zeros((0, N)), g, Jg, tab)
    H = np.full((N, N), np.nan)
    mod.ip_hess(yv, np.zeros(0), nuv, p, H, tab)

    def num(e):
        return float(sp.sympify(e).xreplace(sub))

    ys = problem.variables
    np.testing.assert_allclose(gradf, [num(sp.diff(problem.f, s)) for s in ys], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(g, [num(c) for c in problem.inequalities], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(Jg, [[num(sp.diff(c, s)) for s in ys] for c in problem.inequalities],
                               rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(H, np.array(problem.hessian.xreplace(sub), dtype=float), rtol=1e-13, atol=1e-13)
    # the KKT residual and its Jacobian in z = (y, ν)
    kkt = problem.system
    z = np.concatenate([yv, nuv])
    zsub = dict(zip(kkt.unknowns, z)) | dict(zip(kkt.params, p))
    F, J = np.zeros(N + M), np.full((N + M, N + M), np.nan)
    mod.residual_jacobian(z, p, F, J, tab)
    np.testing.assert_allclose(F, [float(r.xreplace(zsub)) for r in kkt.residuals], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(J, np.array(kkt.jacobian_unknowns.xreplace(zsub), dtype=float),
                               rtol=1e-13, atol=1e-13)


@pytest.fixture(scope="module")
def tanh_triple(tmp_path_factory):
    n = 13
    return (_compile(lambda: dense_tanh(n), tmp_path_factory.mktemp("red")),
            _compile(lambda: dense_tanh(n), tmp_path_factory.mktemp("straight"), families=False), n)


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_reduced_dense_system_agrees_with_straight_line(tanh_triple, need):
    red, straight, n = tanh_triple
    assert _inner_loops(_source(red), "residual") == 1
    assert _inner_loops(_source(red), "residual_scale") == 1
    g = torch.Generator().manual_seed(8)
    A = 3 * torch.randn(4, n, n, generator=g, dtype=torch.float64)
    b = 2 * torch.randn(4, n, generator=g, dtype=torch.float64)
    res = []
    for layer in (red, straight):
        A_ = A.clone().requires_grad_(need[0])
        b_ = b.clone().requires_grad_(need[1])
        y = layer(A_, b_)
        wanted = [t for t, k in zip((A_, b_), need) if k]
        res.append((y.detach(), torch.autograd.grad((y ** 3).sum(), wanted)))
    np.testing.assert_allclose(res[0][0].numpy(), res[1][0].numpy(), rtol=1e-12, atol=1e-13)
    for a, c in zip(res[0][1], res[1][1]):
        np.testing.assert_allclose(a.numpy(), c.numpy(), rtol=1e-11, atol=1e-12)


def test_reduced_residual_scale_and_jacobian_match_sympy(tanh_triple):
    red, _, n = tanh_triple
    s = dense_tanh(n)
    mod, tab = red.kernels.module, red.kernels.tab
    rng = np.random.default_rng(2)
    y, p = rng.standard_normal(n), rng.standard_normal(n * n + n)
    sub = dict(zip(s.unknowns, y)) | dict(zip(s.params, p))
    J_ref = np.array(s.jacobian_unknowns.xreplace(sub), dtype=float)
    F, J, S = np.zeros(n), np.full((n, n), np.nan), np.zeros(n)
    mod.residual_jacobian(y, p, F, J, tab)
    mod.residual_scale(y, p, S, tab)
    np.testing.assert_allclose(J, J_ref, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(S, np.abs(J_ref) @ np.abs(y), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(F, [float(r.xreplace(sub)) for r in s.residuals], rtol=1e-13, atol=1e-14)


def banded(n, w=6):
    """``y_i³ + Σ_{|j-i| <= w} a_{i,j-i} y_j − b = 0``: a sparse (banded) pattern whose interior
    rows are one family with a reduction of ``2w + 1`` terms (pattern storage)."""
    y = sp.symbols(f"y0:{n}")
    a = sp.Matrix(n, 2 * w + 1, sp.symbols(f"a0:{n * (2 * w + 1)}"))
    b = sp.Symbol("b")
    res = [y[i] ** 3 + sum(a[i, j - i + w] * y[j] for j in range(max(0, i - w), min(n, i + w + 1))) - b
           for i in range(n)]
    return ic.ResidualSystem(residuals=res, unknowns={"y": list(y)}, params={"a": a, "b": b})


def test_reduced_rows_in_pattern_storage_agree_with_straight_line(tmp_path_factory):
    n = 40
    red = _compile(lambda: banded(n), tmp_path_factory.mktemp("red"))
    straight = _compile(lambda: banded(n), tmp_path_factory.mktemp("straight"), families=False)
    d = red.system.derivation
    assert d.factorization == "sparse" and any(fd.reduced is not None for fd in d.families)
    src = _source(red)
    # the interior family: a value loop and a derivative loop (the boundary rows, 7 to 12
    # terms, are below the size at which a single row is printed through reductions)
    assert sorted(fd.family.size for fd in d.families if fd.reduced is not None) == [n - 12]
    assert _inner_loops(src, "residual_jacobian") == 2 and "J[0, tab[" in "\n".join(_kernel(src, "residual_jacobian"))
    g = torch.Generator().manual_seed(4)
    A = (torch.randn(3, n * 13, generator=g, dtype=torch.float64) / 4).reshape(3, n, 13)
    A[:, :, 6] += 8.0  # diagonally dominant
    b = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    out = []
    for layer in (red, straight):
        A_, b_ = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = layer(A_, b_)
        assert bool(torch.isfinite(y).all())
        out.append((y.detach(), torch.autograd.grad((y * torch.arange(n, dtype=torch.float64)).sum(), (A_, b_))))
    np.testing.assert_allclose(out[0][0].numpy(), out[1][0].numpy(), rtol=1e-12, atol=1e-13)
    for a_, c in zip(out[0][1], out[1][1]):
        np.testing.assert_allclose(a_.numpy(), c.numpy(), rtol=1e-11, atol=1e-12)


# ---------------------------------------------------------------- family detection by structural keys

def test_every_member_is_its_template_renamed_by_its_row():
    """Detection pairs symbols position by position under equal structural keys (falling back
    to the searching alignment): rebuilding every member from its template and row gives the
    member itself, on systems with ties between like-shaped arguments."""
    from implicit_compiler.derive.families import find_families, system_slots
    from tests.derive.test_families import bratu, grid_ncut

    u = sp.symbols("u0:14")
    # u_i u_{i+1} + u_{i+1} u_{i+2}: two arguments of one shape, in a name-dependent stored order
    chain = [u[i] * u[i + 1] + u[i + 1] * u[i + 2] ** 2 * 0 + u[i + 1] * u[i + 2] for i in range(12)]
    chain_slots = {s: ("unknown", "u", j) for j, s in enumerate(u)}
    cases = [(s.residuals, system_slots(s)) for s in (bratu(30), qp_kkt(5, 4), grid_ncut(3, 4), dense_tanh(9))]
    cases.append((chain, chain_slots))
    for exprs, slots in cases:
        by_pos = {(info[0], info[2]): s for s, info in slots.items()}
        fams, singles = find_families(exprs, slots)
        assert fams
        for f in fams:
            for r, i in enumerate(f.members):
                sub = {sl: by_pos[(k, int(p))] for sl, k, p in zip(f.slots, f.slot_kinds, f.table[r])}
                assert f.template.xreplace(sub) == exprs[i]
        if exprs is chain:
            # (row 9, u9 u10 + u10 u11, defeats the greedy pairing of the fallback: left on its own)
            assert [f.size for f in fams] == [11] and singles == [9]


def arrow(n=65):
    """``y_i³ + y_i − a_i z = 0`` (a family) and one row ``Σ_i b_i y_i² + z − 1 = 0`` on its own,
    whose long sum is a reduction: a residual outside every family printed as a family of one."""
    y = sp.symbols(f"y0:{n}")
    z = sp.Symbol("z")
    a = sp.symbols(f"a0:{n}")
    b = sp.symbols(f"b0:{n}")
    res = [y[i] ** 3 + y[i] - a[i] * z for i in range(n)]
    res.append(sum(b[i] * y[i] ** 2 for i in range(n)) + z - 1)
    return ic.ResidualSystem(residuals=res, unknowns={"y": list(y), "z": z}, params={"a": list(a), "b": list(b)})


def test_a_single_row_with_a_long_sum_is_reduced_and_agrees(tmp_path_factory):
    n = 65  # (a single row is printed through reductions from 64 terms on)
    red = _compile(arrow, tmp_path_factory.mktemp("red"))
    straight = _compile(arrow, tmp_path_factory.mktemp("straight"), families=False)
    d = red.system.derivation
    assert d.single_rows == ()
    sizes = sorted(fd.family.size for fd in d.families)
    assert sizes == [1, n]
    (one,) = [fd for fd in d.families if fd.family.size == 1]
    assert [r.size for r in one.reduced.reductions] == [n]
    assert _inner_loops(_source(red), "residual") == 1
    g = torch.Generator().manual_seed(6)
    a = 0.5 + torch.rand(3, n, generator=g, dtype=torch.float64)
    b = 0.5 + torch.rand(3, n, generator=g, dtype=torch.float64)
    out = []
    for layer in (red, straight):
        a_, b_ = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = torch.cat([t.reshape(t.shape[0], -1) for t in layer(a_, b_)], dim=1)  # (y, z)
        assert bool(torch.isfinite(y).all())
        out.append((y.detach(), torch.autograd.grad((y * torch.arange(n + 1, dtype=torch.float64)).sum(), (a_, b_))))
    np.testing.assert_allclose(out[0][0].numpy(), out[1][0].numpy(), rtol=1e-12, atol=1e-13)
    for x, c in zip(out[0][1], out[1][1]):
        np.testing.assert_allclose(x.numpy(), c.numpy(), rtol=1e-11, atol=1e-12)
    # the solution satisfies the system
    s = arrow(n)
    for k in range(3):
        sub = dict(zip(s.unknowns, out[0][0][k].numpy())) | dict(zip(s.params, np.concatenate([a[k], b[k]])))
        assert max(abs(float(r.xreplace(sub))) for r in s.residuals) <= 1e-10
