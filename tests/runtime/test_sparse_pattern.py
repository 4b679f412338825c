"""Pattern-sized sparse elimination (residual systems above the unrolled size) against the dense path.

Each system is compiled twice: as the compiler chooses (fixed-order sparse elimination in
pattern-sized storage, order chosen at compile time) and with the factorisation forced to
dense LU with partial pivoting. Solutions, VJPs, linear solves and statuses must agree.
"""

from unittest import mock

import numpy as np
import pytest
import sympy as sp
import torch

import implicit_compiler as ic
from implicit_compiler.derive import jacobians
from implicit_compiler.derive.sparsity import choose_factorization, csr_pattern, symbolic_elimination
from implicit_compiler.runtime.options import SolverOptions

TOL = 1e-12


def _compile_pair(build):
    sparse = ic.compile(build(""))
    with mock.patch.object(jacobians, "choose_factorization", lambda pattern: ("dense", None)):
        dense = ic.compile(build("_dense"))
    assert sparse.kernels.pattern and sparse.system.derivation.factorization == "sparse"
    assert dense.kernels.module.FACTORIZATION == "dense"
    return sparse, dense


def bratu(suffix, n=30):
    u = sp.symbols(f"u0:{n}")
    lam, a = sp.symbols("lam a")
    h2 = sp.Rational(1, (n + 1) ** 2)
    res = [(u[i - 1] if i else a) - 2 * u[i] + (u[i + 1] if i < n - 1 else 0) + h2 * lam * sp.exp(u[i])
           for i in range(n)]
    return ic.ResidualSystem(res, unknowns=list(u), params=[lam, a], name="pattern_bratu" + suffix)


GRID = (4, 7)  # rows x columns, numbered row by row: bandwidth 7 in the natural order


def grid(suffix):
    r_, c_ = GRID
    u = [[sp.Symbol(f"u_{i}_{j}") for j in range(c_)] for i in range(r_)]
    a, b = sp.symbols("a b")
    res = []
    for i in range(r_):
        for j in range(c_):
            nb = [u[i + di][j + dj] for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1))
                  if 0 <= i + di < r_ and 0 <= j + dj < c_]
            res.append(4 * u[i][j] - sum(nb) + a * u[i][j] ** 3 - b * sp.Rational(i + 1, j + 2))
    flat = [s for row in u for s in row]
    return ic.ResidualSystem(res, unknowns=flat, params=[a, b], name="pattern_grid" + suffix)


ARROW_N = 16


def arrow(suffix):
    # the hub y0 couples to every unknown: eliminated first (natural order) it fills all of L+U
    n = ARROW_N
    y = sp.symbols(f"y0:{n}")
    a, b = sp.symbols("a b")
    res = [(3 + a) * y[0] + sum(y[1:]) / 10 + y[0] ** 3 / 10 - b]
    res += [y[i] * (2 + y[i] ** 2 / 10) + y[0] / 5 - b * sp.Rational(i, n) for i in range(1, n)]
    return ic.ResidualSystem(res, unknowns=list(y), params=[a, b], name="pattern_arrow" + suffix)


@pytest.fixture(scope="module")
def bratu_pair():
    return _compile_pair(bratu)


@pytest.fixture(scope="module")
def grid_pair():
    return _compile_pair(grid)


@pytest.fixture(scope="module")
def arrow_pair():
    return _compile_pair(arrow)


def _params(name, B, rng):
    if name == "bratu":
        return np.column_stack([rng.uniform(0.5, 3.0, B), rng.uniform(-0.5, 0.5, B)])
    return np.column_stack([rng.uniform(0.2, 2.0, B), rng.uniform(-2.0, 2.0, B)])


def _opts(**kw):
    return SolverOptions.from_kwargs(**kw)


def _agree(sparse, dense, P, **kw):
    n = sparse.kernels.n
    o = _opts(**kw)
    Y0 = np.zeros((1, n))
    rs = sparse.kernels.solve(P, Y0, o)
    rd = dense.kernels.solve(P, Y0, o)
    np.testing.assert_array_equal(rs.status, rd.status)
    ok = rs.status == 0
    assert ok.any()
    np.testing.assert_allclose(rs.y[ok], rd.y[ok], rtol=TOL, atol=TOL)
    rng = np.random.default_rng(3)
    Ybar = rng.standard_normal((P.shape[0], n))
    need = np.ones(len(sparse.layout["param_groups"]), dtype=bool)
    gs = np.array(sparse.kernels.vjp(rs, Ybar, need))
    gd = np.array(dense.kernels.vjp(rd, Ybar, need))
    np.testing.assert_allclose(gs[ok], gd[ok], rtol=1e-10, atol=TOL * np.abs(gd[ok]).max())
    for transpose in (False, True):
        xs = sparse.kernels.solve_linear(rs, Ybar, transpose)
        xd = dense.kernels.solve_linear(rd, Ybar, transpose)
        np.testing.assert_allclose(xs[ok], xd[ok], rtol=1e-10, atol=TOL * np.abs(xd[ok]).max())
    return rs, rd


@pytest.mark.parametrize("name", ["bratu", "grid", "arrow"])
@pytest.mark.parametrize("method", ["newton", "trust-region"])
def test_pattern_path_agrees_with_dense(name, method, request):
    sparse, dense = request.getfixturevalue(name + "_pair")
    P = _params(name, 5, np.random.default_rng(len(name)))
    rs, rd = _agree(sparse, dense, P, method=method)
    e = sparse.system.derivation.elimination
    # factors stored as the filled pattern, not (n, n)
    assert rs.lu.shape == (5, 1, e.fill_nnz) and e.fill_nnz < sparse.kernels.n ** 2 // 2
    assert not rs.dense_fallback.any()


def test_orders_chosen_at_compile_time(bratu_pair, grid_pair, arrow_pair):
    assert bratu_pair[0].kernels.module.ELIMINATION_ORDER == "natural"  # tridiagonal: no fill either way
    for pair in (grid_pair, arrow_pair):
        d = pair[0].system.derivation
        e = d.elimination
        assert e.order in ("rcm", "minimum degree") and pair[0].kernels.module.ELIMINATION_ORDER == e.order
        natural = symbolic_elimination(*d.pattern_csr(), d.n)
        assert e.fill_nnz < natural.fill_nnz and e.updates < natural.updates
    # the arrow: the natural order fills all of L+U, a hub-last order nothing
    d = arrow_pair[0].system.derivation
    n = ARROW_N
    assert d.natural_elimination.fill_nnz == n * n
    assert d.elimination.fill_nnz == d.elimination.nnz == 3 * n - 2
    assert 0 in d.elimination.perm[-2:]  # the hub is eliminated (nearly) last


def test_statuses_agree_mixed_batch(bratu_pair):
    # good samples, one beyond the fold (no solution), a NaN parameter; then every converged
    # sample judged singular by the condition test (singular_tol above 1 / cond ~ 1e-3)
    sparse, dense = bratu_pair
    P = np.array([[1.0, 0.0], [10.0, 0.0], [2.0, 0.3], [np.nan, 0.0], [3.0, -0.2]])
    rs, rd = _agree(sparse, dense, P)
    assert list(rs.status[[0, 2, 4]]) == [0, 0, 0] and rs.status[1] != 0
    assert rs.status[3] == ic.Status.NONFINITE
    o = _opts(singular_tol=1e-2)
    Y0 = np.zeros((1, sparse.kernels.n))
    s1 = sparse.kernels.solve(P, Y0, o).status
    np.testing.assert_array_equal(s1, dense.kernels.solve(P, Y0, o).status)
    assert (s1[[0, 2, 4]] == ic.Status.SINGULAR_AT_SOLUTION).all()


def test_gradcheck_through_pattern_path(grid_pair):
    layer = grid_pair[0]
    p = torch.tensor([[0.7, 0.3], [1.5, -1.1]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (p,), atol=1e-8, rtol=1e-7)


# ---------------------------------------------------------------- the dense fallback
N_FB = 16


def zero_pivot(suffix):
    # dF0/dy0 = 2 a y0: zero at y0 = 0, so the fixed-order elimination rejects its first pivot
    y = sp.symbols(f"y0:{N_FB}")
    a, c = sp.symbols("a c")
    F = [a * y[0] ** 2 + y[1] - 1]
    F += [y[i - 1] + 3 * y[i] + y[i + 1] - a - c * sp.Rational(i, N_FB) for i in range(1, N_FB - 1)]
    F.append(y[N_FB - 2] + 3 * y[N_FB - 1] - a)
    return ic.ResidualSystem(F, unknowns=list(y), params=[a, c], name="pattern_zero_pivot" + suffix)


@pytest.fixture(scope="module")
def zero_pivot_pair():
    return _compile_pair(zero_pivot)


@pytest.mark.parametrize("method", ["newton", "trust-region"])
def test_zero_pivot_falls_back_to_dense_and_is_reported(zero_pivot_pair, method):
    sparse, dense = zero_pivot_pair
    k = sparse.kernels
    P = np.array([[1.0, 0.5], [1.2, -0.3], [0.8, 0.0]])
    Y0 = np.ones((3, N_FB))
    Y0[1] = 0.0  # sample 1 starts where the first pivot is zero
    o = _opts(method=method)
    rs = k.solve(P, Y0, o)
    rd = dense.kernels.solve(P, Y0, o)
    np.testing.assert_array_equal(rs.dense_fallback, [False, True, False])
    assert "1 sample(s) solved with dense LU" in rs.summary() and "sample 1" in rs.summary()
    np.testing.assert_array_equal(rs.status, [0, 0, 0])
    np.testing.assert_array_equal(rd.status, [0, 0, 0])
    np.testing.assert_allclose(rs.y, rd.y, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(k.residual(rs.y, P), 0.0, atol=1e-12)
    Ybar = np.random.default_rng(0).standard_normal((3, N_FB))
    need = np.ones(2, dtype=bool)
    gd = np.array(dense.kernels.vjp(rd, Ybar, need))
    np.testing.assert_allclose(k.vjp(rs, Ybar, need), gd, rtol=1e-10, atol=1e-13)
    # a kernel handed the pattern storage of a fallback sample has no factors to use: NaN, not garbage
    X = Ybar.copy()
    k.module.solve_batch(rs.lu, rs.piv, rs.status, X, False, k.tab)
    assert np.isnan(X[1]).all() and np.isfinite(X[[0, 2]]).all()
    # the dense factors are recomputed when the result comes back without them (torch's saved tensors)
    del rs.dense_factors
    np.testing.assert_allclose(k.vjp(rs, Ybar, need), gd, rtol=1e-10, atol=1e-13)
    for transpose in (False, True):
        np.testing.assert_allclose(k.solve_linear(rs, Ybar, transpose), dense.kernels.solve_linear(rd, Ybar, transpose),
                                   rtol=1e-10, atol=1e-13)
    # forward mode and the double backward solve with J too: the fallback sample's come from its
    # dense factors (the pattern storage has none), and equal the dense compilation's
    W = np.random.default_rng(1).standard_normal((3, 2))
    so_s, so_d = k.second_order(), dense.kernels.second_order()
    np.testing.assert_allclose(so_s.jvp(rs, W), so_d.jvp(rd, W), rtol=1e-10, atol=1e-13)
    for a, b in zip(so_s.double_backward(rs, Ybar, W), so_d.double_backward(rd, Ybar, W)):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    if method != "newton":
        return
    # the gradient through torch, against central differences of the solution
    p = torch.tensor([[1.2, -0.3]], dtype=torch.float64, requires_grad=True)
    y0 = torch.zeros(N_FB, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: sparse(p, y0=y0), (p,), atol=1e-8, rtol=1e-7)


# ---------------------------------------------------------------- compile-time analysis at scale


def test_pattern_analysis_is_linear_in_the_pattern():
    # 10^5 unknowns: a dense boolean n x n would need 10 GB; index lists need a few MB
    n = 100_000
    i = np.arange(n)
    ij = np.concatenate([np.stack([i, i], 1), np.stack([i[1:], i[:-1]], 1), np.stack([i[:-1], i[1:]], 1)])
    kind, e = choose_factorization((*csr_pattern(ij, n), n))
    assert kind == "sparse" and e.order == "natural"
    assert e.fill_nnz == 3 * n - 2 and e.updates == n - 1
    cptr, cpos = e.columns()  # the left-looking elimination's tables are O(fill), not O(work)
    assert cpos.size == e.fill_nnz and (np.diff(cptr) == np.r_[2, np.full(n - 2, 3), 2]).all()
    assert (e.rows[cpos[cptr[5]:cptr[6]]] == [4, 5, 6]).all()  # column 5 by increasing row
    lptr, lpos = e.lower_columns()
    assert lpos.size == n - 1 and (e.indices[lpos] == np.arange(n - 1)).all()


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")  # torch.compile's own warnings
def test_the_dense_fallback_is_in_the_torch_solve_info(zero_pivot_pair):
    # return_info=True reports the fallback per sample in eager mode, under torch.func (vmap, grad)
    # and in a compiled model, as SolveResult.dense_fallback does; a dense layer reports none
    sparse, dense = zero_pivot_pair
    p = torch.tensor([[1.0, 0.5], [1.2, -0.3], [0.8, 0.0]], dtype=torch.float64)
    y0 = torch.ones((3, N_FB), dtype=torch.float64)
    y0[1] = 0.0  # sample 1 starts where the first pivot is zero
    y, info = sparse(p, y0=y0, return_info=True)
    assert info.dense_fallback.tolist() == [False, True, False]
    assert "1 sample(s) solved with dense LU" in info.summary() and "sample 1" in info.summary()
    yd, infod = dense(p, y0=y0, return_info=True)
    assert infod.dense_fallback.tolist() == [False] * 3 and "dense LU" not in infod.summary()
    torch.testing.assert_close(y, yd, rtol=TOL, atol=TOL)

    def with_info(p, y0):
        y, info = sparse(p, y0=y0, return_info=True)
        return y, info.status, info.dense_fallback

    _, status, fallback = torch.func.vmap(with_info)(p, y0)  # three unbatched calls, folded
    assert status.reshape(-1).tolist() == [0, 0, 0] and fallback.reshape(-1).tolist() == [False, True, False]

    def loss_and_flags(p):
        y, info = sparse(p, y0=y0, return_info=True)
        return y.sum(), info.dense_fallback

    g, fallback = torch.func.grad(loss_and_flags, has_aux=True)(p)
    assert fallback.tolist() == [False, True, False]
    pr = p.clone().requires_grad_()
    dense(pr, y0=y0).sum().backward()
    torch.testing.assert_close(g, pr.grad, rtol=1e-10, atol=1e-12)

    compiled = torch.compile(lambda p, y0: sparse(p, y0=y0, return_info=True)[1].dense_fallback, fullgraph=True,
                             backend="aot_eager")
    assert compiled(p, y0).tolist() == [False, True, False]


@pytest.mark.parametrize("name", ["bratu", "grid"])
def test_pattern_equilibration_matches_dense(name, request):
    """``equilibrate_pattern`` (reciprocal scales, or divisions when a reciprocal overflows)
    against the dense ``equilibrate`` of the same matrix: scales and norm to rounding, also with
    a row and a column scaled to subnormal and to huge magnitudes."""
    from implicit_compiler.runtime.linalg import (
        PT_COLO,
        PT_NV,
        PT_ROWO,
        equilibrate,
        equilibrate_pattern,
        pattern_to_dense,
    )

    sparse, _ = request.getfixturevalue(name + "_pair")
    k = sparse.kernels
    n, tab = k.n, k.tab
    nv = int(tab[PT_NV])
    rowo = tab[tab[PT_ROWO]:tab[PT_ROWO] + nv]
    colo = tab[tab[PT_COLO]:tab[PT_COLO] + nv]
    rng = np.random.default_rng(3)
    cases = []
    for row_scale, col_scale in ((1.0, 1.0), (1e-310, 1.0), (1.0, 1e-311), (1e300, 1e-300), (1e-200, 1e250)):
        v = rng.normal(size=nv) * 10.0 ** rng.uniform(-3, 3, size=nv)
        v[rowo == 2] *= row_scale
        v[colo == n - 2] *= col_scale
        cases.append(v)
    zero_row = rng.normal(size=nv)
    zero_row[rowo == 1] = 0.0
    cases.append(zero_row)
    for v in cases:
        J = np.zeros((1, k.lu_shape[1]))
        J[0, :nv] = v
        D = np.zeros((n, n))
        pattern_to_dense(J, D, tab)
        r1, c1, r2, c2 = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
        got = equilibrate_pattern(n, J, r1, c1, tab)
        ref = equilibrate(n, D.copy(), r2, c2)
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_allclose(c1, c2, rtol=4e-16)
        np.testing.assert_allclose(got, ref, rtol=1e-14)
        assert 1.0 - 1e-14 <= got <= n * (1.0 + 1e-14)
    J = np.zeros((1, k.lu_shape[1]))
    J[0, :nv] = cases[0]
    J[0, 5] = np.inf
    assert equilibrate_pattern(n, J, r1, c1, tab) == -1.0

