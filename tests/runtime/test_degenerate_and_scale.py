"""Degenerate roots are reported, badly scaled and large/tiny systems converge with exact
gradients, small systems with many parameters compile, and solver options are validated."""

import math

import numpy as np
import pytest
import sympy as sp
import torch
from numba import njit
from scipy.optimize import fsolve

import implicit_compiler as ic
from implicit_compiler import Status
from implicit_compiler.errors import ConvergenceError, InputError
from implicit_compiler.runtime.linalg import (
    EXACT_INVERSE_NORM_MAX_N,
    equilibrate,
    inv_norm1,
    lu_factor,
    lu_solve,
    lu_solve_transpose,
)
from tests.conftest import appendix_system

XC = math.sqrt(2 + math.sqrt(3))  # appendix system: y2* = 0 and det dF/dy = 0 there


def _root(F, J, z0):
    """scipy's fsolve, polished by three Newton steps in NumPy (fsolve stops near 1e-12)."""
    z = fsolve(F, z0, fprime=J, xtol=1e-12)
    for _ in range(3):
        z = z - np.linalg.solve(J(z), F(z))
    return z


def _appendix_reference(x):
    y1 = 1 / x
    y2 = math.sqrt(4 - x**2 - 1 / x**2)
    return (y1, y2), (-1 / x**2, (-x + 1 / x**3) / y2)


# ---------------------------------------------------------------- degenerate roots

def test_appendix_degenerate_root_is_singular_at_solution(appendix_layer):
    xs = np.array([[XC], [1.9], [0.9], [XC * (1 - 1e-6)], [XC], [1.2]])
    for y0 in ([1.0, 1.5], [0.3, -0.5], [2.0, 2.0], [0.5, 1e-3]):
        res = appendix_layer.solve(xs, y0=np.array(y0))
        assert res.status[0] == Status.SINGULAR_AT_SOLUTION, (y0, res.y[0])
        assert res.status[4] == Status.SINGULAR_AT_SOLUTION, (y0, res.y[4])
        assert (res.status[[1, 2, 3, 5]] == Status.CONVERGED).all(), (y0, res.status)
    # the good samples of a mixed batch: values and gradients against the closed form
    appendix_layer.configure(on_failure="nan")
    try:
        xt = torch.tensor(xs, requires_grad=True)
        y = appendix_layer(xt, y0=torch.tensor([1.0, 1.5], dtype=torch.float64))
        assert torch.isnan(y[0]).all() and torch.isnan(y[4]).all()
        for k in (1, 2, 3, 5):
            (r1, r2), _ = _appendix_reference(xs[k, 0])
            assert y[k, 0].item() == pytest.approx(r1, rel=1e-13)
            assert y[k, 1].item() == pytest.approx(r2, rel=1e-9 if k == 3 else 1e-13)
        for col in (0, 1):
            (g,) = torch.autograd.grad(y[[1, 2, 3, 5], col].sum(), xt, retain_graph=True)
            for k in (1, 2, 3, 5):
                ref = _appendix_reference(xs[k, 0])[1][col]
                assert g[k, 0].item() == pytest.approx(ref, rel=1e-8 if k == 3 else 1e-10)
    finally:
        appendix_layer.configure(on_failure="raise")
    with pytest.raises(ConvergenceError, match=r"samples \[0\]: SINGULAR_AT_SOLUTION"):
        appendix_layer(torch.tensor([[XC]], dtype=torch.float64), y0=torch.tensor([1.0, 1.5]))


@pytest.fixture(scope="module")
def power_layer():
    # (y - a)^k c = 0 has a root of multiplicity k at y = a; k = 1 is regular.
    y, a, c, k = sp.symbols("y a c k")
    return ic.compile(ic.ResidualSystem([c * (y - a) ** 2 * (y - a + k)], unknowns=[y], params=[a, c, k]))


def test_double_and_triple_roots_at_any_scale(power_layer):
    # k = 0: triple root at a; k != 0: the double root a and the simple root a - k.
    P = np.array([[0.5, 1.0, 0.0], [0.5, 1e150, 0.0], [1e5, 1e-100, 0.0], [0.0, 1.0, 0.0],
                  [2.0, 3.0, 1.0], [-1.0, 1e120, 0.5]])
    Y0 = np.array([[1.5], [1.5], [2e5], [1.0], [2.2], [-0.4]])  # the last two start nearer the double root
    power_layer.configure(max_iter=200)  # the error shrinks by 2/3 per step at a triple root
    res = power_layer.solve(P, y0=Y0)
    assert (res.status == Status.SINGULAR_AT_SOLUTION).all(), (res.status, res.y)
    # started near the simple root a - k, the same systems converge, with dy/da = 1, dy/dk = -1
    Y0s = np.array([[1.2], [-1.7]])
    Ps = P[[4, 5]]
    res = power_layer.solve(Ps, y0=Y0s)
    assert (res.status == Status.CONVERGED).all()
    np.testing.assert_allclose(res.y[:, 0], Ps[:, 0] - Ps[:, 2], rtol=1e-14)
    pt = torch.tensor(Ps, requires_grad=True)
    power_layer(pt, y0=torch.tensor(Y0s)).sum().backward()
    np.testing.assert_allclose(pt.grad.numpy(), [[1.0, 0.0, -1.0]] * 2, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def near_singular_layer():
    # A linear system whose matrix [[1, 1], [c, c (1 + e)]] is singular for e = 0,
    # with its second row scaled by c.
    y1, y2, a, b, c, e = sp.symbols("y1 y2 a b c e")
    F = [y1 + y2 - a, c * (y1 + (1 + e) * y2 - b)]
    return ic.compile(ic.ResidualSystem(F, unknowns=[y1, y2], params=[a, b, c, e]))


def test_condition_test_is_scale_invariant(near_singular_layer):
    rows = []
    for c in (1.0, 1e150, 1e-150, 1e8):
        for e in (1e-13, 1e-6, 1.0):
            rows.append([0.7, -0.4, c, e])
    P = np.array(rows)
    res = near_singular_layer.solve(P, y0=np.zeros(2))
    singular = P[:, 3] < 1e-9
    assert (res.status[singular] == Status.SINGULAR_AT_SOLUTION).all(), res.status
    assert (res.status[~singular] == Status.CONVERGED).all(), res.status
    # converged samples: y = A^{-1} (a, b), dy/d(a, b) = A^{-1} (the row scale c cancels)
    good = np.flatnonzero(~singular)
    pt = torch.tensor(P[good], requires_grad=True)
    y = near_singular_layer(pt, y0=torch.zeros(2, dtype=torch.float64))
    for r, k in enumerate(good):
        e = P[k, 3]
        Ainv = np.linalg.inv(np.array([[1.0, 1.0], [1.0, 1.0 + e]]))
        np.testing.assert_allclose(y[r].detach().numpy(), Ainv @ P[k, :2], rtol=1e-9)
    for i in range(2):
        (g,) = torch.autograd.grad(y[:, i].sum(), pt, retain_graph=True)
        for r, k in enumerate(good):
            Ainv = np.linalg.inv(np.array([[1.0, 1.0], [1.0, 1.0 + P[k, 3]]]))
            np.testing.assert_allclose(g[r, :2].numpy(), Ainv[i], rtol=1e-9)
            assert abs(g[r, 2].item()) <= 1e-12 * (1 + abs(Ainv).max())  # F2 = c (...) = 0: no c dependence


# ---------------------------------------------------------------- large coefficients and badly scaled systems

def test_large_coefficients_are_not_singular():
    x, y = sp.symbols("x y")
    for coeff in (sp.Float(1e8), sp.Integer(3) ** 50 / 7, sp.Float(1e-120)):
        layer = ic.compile(ic.ResidualSystem([y - coeff * x], unknowns=[y], params=[x]))
        xs = torch.tensor([[1.0], [-2.5], [3e-5], [0.0]], dtype=torch.float64, requires_grad=True)
        out = layer(xs)
        c = float(coeff)
        np.testing.assert_allclose(out.detach().numpy(), c * xs.detach().numpy(), rtol=1e-15)
        out.sum().backward()
        np.testing.assert_allclose(xs.grad.numpy(), c, rtol=1e-15)


def _scaled_system(n):
    """r_i (sum_j A_ij c_j y_j + tanh(c_i y_i) - b_i) = 0: z = c y solves an O(1) system.
    (A power of c_i y_i would not do: SymPy writes (c y)^3 as c^3 y^3, which overflows.)"""
    y = sp.symbols(f"y0:{n}")
    r = sp.symbols(f"r0:{n}")
    c = sp.symbols(f"c0:{n}")
    b = sp.symbols(f"b0:{n}")
    rng = np.random.default_rng(n)
    A = np.eye(n) * 3 + rng.uniform(-0.5, 0.5, (n, n))
    F = [r[i] * (sum(sp.Float(A[i, j]) * c[j] * y[j] for j in range(n)) + sp.tanh(c[i] * y[i]) - b[i])
         for i in range(n)]
    return ic.ResidualSystem(F, unknowns=list(y), params={"r": list(r), "c": list(c), "b": list(b)}), A


@pytest.mark.parametrize("n", [3, 7])  # scalar kernels (n <= 6) and the generic dense Newton
def test_rows_and_columns_scaled_by_1e150(n):
    system, A = _scaled_system(n)
    layer = ic.compile(system)
    rng = np.random.default_rng(1)
    b = rng.uniform(-1, 1, n)

    def G(z):
        return A @ z + np.tanh(z) - b

    def JG(z):
        return A + np.diag(1 - np.tanh(z) ** 2)

    z = _root(G, JG, np.zeros(n))
    dz_db = np.linalg.inv(JG(z))
    exps = [150, 0, -150, 75, -75, 10, -10][:n]
    cases = [(np.ones(n), np.ones(n)),
             (10.0 ** np.array(exps), np.ones(n)),
             (np.ones(n), 10.0 ** np.array(exps)),
             (10.0 ** np.array(exps), 10.0 ** -np.array(exps)),
             (10.0 ** np.array(exps), 10.0 ** np.roll(exps, 1))]
    R = torch.tensor(np.array([rr for rr, _ in cases]), requires_grad=True)
    C = torch.tensor(np.array([cc for _, cc in cases]), requires_grad=True)
    Bt = torch.tensor(np.tile(b, (len(cases), 1)), requires_grad=True)
    y = layer(R, C, Bt)
    for k, (_, cc) in enumerate(cases):
        np.testing.assert_allclose(y[k].detach().numpy() * cc, z, rtol=1e-12)
    # y = z / c with z independent of r and c: dy_i/db_j = (dz/db)_ij / c_i,
    # dy_i/dc_j = -delta_ij z_i / c_i^2, dy/dr = 0.
    for i in range(n):
        gr, gc, gb = torch.autograd.grad(y[:, i].sum(), (R, C, Bt), retain_graph=True)
        for k, (rr, cc) in enumerate(cases):
            np.testing.assert_allclose(gb[k].numpy() * cc[i], dz_db[i], rtol=1e-10, atol=1e-14)
            assert np.all(np.abs(gr[k].numpy() * rr) <= 1e-12 * np.abs(z[i] / cc[i]))
            ref_c = np.zeros(n)
            ref_c[i] = -z[i] / cc[i] ** 2
            np.testing.assert_allclose(gc[k].numpy() * cc * cc[i], ref_c * cc * cc[i], rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------- scale-aware tolerances

def test_large_solutions_converge():
    x, y = sp.symbols("x y")
    layer = ic.compile(ic.ResidualSystem([y - x**100], unknowns=[y], params=[x]))
    xs = torch.tensor([[1.7], [0.5], [1.0], [2.0], [0.0]], dtype=torch.float64, requires_grad=True)
    out = layer(xs)
    ref = xs.detach().numpy() ** 100
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-14)
    out.sum().backward()
    np.testing.assert_allclose(xs.grad.numpy(), 100 * xs.detach().numpy() ** 99, rtol=1e-12)


def test_square_root_across_magnitudes():
    u, s = sp.symbols("u s")
    layer = ic.compile(ic.ResidualSystem([u**2 - s], unknowns=[u], params=[s]))
    svals = np.array([1e300, 1e200, 4.0, 1e-20, 1e-200, 1e-300, 2.5e7])
    Y0 = 1.3 * np.sqrt(svals)[:, None]  # a start of the right magnitude
    res = layer.solve(svals[:, None], y0=Y0)
    assert (res.status == Status.CONVERGED).all(), res.status
    np.testing.assert_allclose(res.y[:, 0], np.sqrt(svals), rtol=1e-14)
    st = torch.tensor(svals[:, None], requires_grad=True)
    layer(st, y0=torch.tensor(Y0)).sum().backward()
    np.testing.assert_allclose(st.grad.numpy()[:, 0], 0.5 / np.sqrt(svals), rtol=1e-13)
    # From y0 = 1, the solution 1e-10 lies at the absolute step floor: Newton is still in
    # its linear phase there, which is reported, never returned as converged.
    res = layer.solve(np.array([[1e-20], [1e-300], [0.25]]), y0=np.array([1.0]))
    assert res.status[0] == Status.SINGULAR_AT_SOLUTION and res.status[1] == Status.SINGULAR_AT_SOLUTION
    assert res.status[2] == Status.CONVERGED and res.y[2, 0] == pytest.approx(0.5, rel=1e-15)


def test_fixed_point_with_large_solution():
    y, s = sp.symbols("y s")
    layer = ic.compile(ic.FixedPoint(map=[y / 2 + s], unknowns=[y], params=[s], method="anderson"))
    for method in ("anderson", "picard"):
        layer.configure(method=method, max_iter=200)
        st = torch.tensor([[1e200], [3.0], [-1e100]], dtype=torch.float64, requires_grad=True)
        out = layer(st)
        np.testing.assert_allclose(out.detach().numpy(), 2 * st.detach().numpy(), rtol=1e-9)
        out.sum().backward()
        np.testing.assert_allclose(st.grad.numpy(), 2.0, rtol=1e-12)


def test_overflow_at_finite_inputs_is_nonfinite_not_a_nan_input():
    x, y = sp.symbols("x y")
    layer = ic.compile(ic.ResidualSystem([sp.exp(y) - x], unknowns=[y], params=[x]))
    res = layer.solve(np.array([[2.0], [2.0], [np.nan]]), y0=np.array([[0.0], [800.0], [0.0]]))
    assert res.status.tolist() == [Status.CONVERGED, Status.NONFINITE, Status.NONFINITE]
    assert res.y[0, 0] == pytest.approx(math.log(2.0), rel=1e-15)
    msg = Status.NONFINITE.message
    assert "overflow" in msg and "finite inputs" in msg


# ---------------------------------------------------------------- small systems, many parameters

def _tanh_system(n, extra):
    """y_i + sum_j a_ij tanh(y_j) - sum_k c_ik = 0 with n*n + n*extra parameters."""
    y = sp.symbols(f"y0:{n}")
    a = sp.symbols(f"a0:{n * n}")
    c = sp.symbols(f"c0:{n * extra}")
    F = [y[i] + sum(a[i * n + j] * sp.tanh(y[j]) for j in range(n)) - sum(c[i * extra + k] for k in range(extra))
         for i in range(n)]
    return ic.ResidualSystem(F, unknowns=list(y), params={"a": list(a), "c": list(c)})


@pytest.mark.parametrize("n, extra", [(5, 1), (5, 35), (2, 148)])  # 30, 200 and 300 parameters
def test_small_systems_with_many_parameters(n, extra):
    layer = ic.compile(_tanh_system(n, extra))
    assert layer.kernels.m == n * n + n * extra
    rng = np.random.default_rng(n + extra)
    B = 3
    a = rng.uniform(-0.3, 0.3, (B, n, n))
    c = rng.uniform(-1, 1, (B, n, extra)) / extra
    at = torch.tensor(a.reshape(B, -1), requires_grad=True)
    ct = torch.tensor(c.reshape(B, -1), requires_grad=True)
    y = layer(at, ct)
    ybar = rng.uniform(-1, 1, (B, n))
    (y * torch.tensor(ybar)).sum().backward()
    for k in range(B):
        rhs = c[k].sum(axis=1)

        def F(v, k=k, rhs=rhs):
            return v + a[k] @ np.tanh(v) - rhs

        def JF(v, k=k):
            return np.eye(n) + a[k] * (1 - np.tanh(v) ** 2)[None, :]

        ref = _root(F, JF, np.zeros(n))
        np.testing.assert_allclose(y[k].detach().numpy(), ref, rtol=1e-12, atol=1e-14)
        v = np.linalg.solve(JF(ref).T, ybar[k])  # adjoint: dL/dtheta = -v^T dF/dtheta
        ga = -np.outer(v, np.tanh(ref))            # dF_i/da_ij = tanh(y_j)
        gc = np.repeat(v[:, None], extra, axis=1)  # dF_i/dc_ik = -1
        np.testing.assert_allclose(at.grad[k].numpy(), ga.ravel(), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(ct.grad[k].numpy(), gc.ravel(), rtol=1e-10, atol=1e-13)
    # finite differences of the solve, for one parameter of each group
    h = 1e-6
    for t, idx in ((at, 1), (ct, extra - 1)):
        P0 = [at.detach().numpy().copy(), ct.detach().numpy().copy()]
        which = 0 if t is at else 1
        Pp = [q.copy() for q in P0]
        Pm = [q.copy() for q in P0]
        Pp[which][:, idx] += h
        Pm[which][:, idx] -= h
        fd = (layer.solve(*Pp).y - layer.solve(*Pm).y) / (2 * h)
        np.testing.assert_allclose(t.grad[:, idx].numpy(), (fd * ybar).sum(axis=1), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- option validation

@pytest.mark.parametrize("name, value, valid", [
    ("tol", -1, ">= 0"), ("tol", "a", ">= 0"), ("tol", float("nan"), ">= 0"), ("xtol", float("inf"), ">= 0"),
    ("rtol", -1e-3, ">= 0"), ("max_iter", 2.5, "int"), ("max_iter", -1, "int"), ("max_iter", True, "int"),
    ("singular_tol", 1.0, r"\[0, 1\)"), ("anderson_memory", 51, r"\[0, 50\]"),
    ("parallel_threshold", "a", ">= 1"), ("parallel_threshold", 0, ">= 1"),
    ("method", "foo", "newton"), ("on_failure", "x", "raise"), ("warm_start", "yes", "True or False"),
])
def test_invalid_options_name_the_option(appendix_layer, name, value, valid):
    with pytest.raises(InputError, match=rf"solver option {name} must be .*{valid}") as err:
        ic.SolverOptions(**{name: value})
    assert str(err.value).endswith(f"got {value!r}")
    with pytest.raises(ValueError, match=f"solver option {name}"):
        appendix_layer.configure(**{name: value})
    assert appendix_layer.options.tol == 1e-10  # the layer keeps its options


def test_unknown_option_names_are_an_input_error(appendix_layer):
    # a misspelt option must not be dropped or leak a dataclass TypeError
    with pytest.raises(InputError, match=r"unknown solver option\(s\) 'max_iters' \(did you mean 'max_iter'\?\)"):
        ic.compile(appendix_system(), max_iters=10)
    with pytest.raises(InputError, match=r"unknown solver option\(s\) 'colour'"):
        appendix_layer.configure(colour="red")
    y, t = sp.symbols("y t")
    with pytest.raises(InputError, match=r"'tolerance'"):
        ic.compile(ic.Problem((y - t) ** 2, variables=[y], params=[t]), tolerance=1e-3)
    assert appendix_layer.options.tol == 1e-10  # the layer keeps its options


def test_valid_options_are_accepted():
    opts = ic.SolverOptions(tol=0, xtol=1e-12, rtol=0.0, max_iter=np.int64(7), singular_tol=0.0,
                            anderson_memory=0, parallel_threshold=1, method="picard", on_failure="keep",
                            warm_start=True)
    assert opts.max_iter == 7 and opts.rtol == 0.0


def test_degenerate_root_in_a_larger_system():
    # The appendix system coupled to eight more unknowns (n = 10: the generic Newton driver,
    # sparse elimination, the Hager-Higham condition estimate): z_k = k x + y1 / 2 + z_{k-1} / 4.
    x = sp.Symbol("x")
    y1, y2 = sp.symbols("y1 y2")
    z = sp.symbols("z1:9")
    F = [x**2 + y1**2 + y2**2 - 4, x * y1 - 1]
    F += [z[k] - (k + 1) * x - y1 / 2 - (z[k - 1] / 4 if k else 0) for k in range(8)]
    layer = ic.compile(ic.ResidualSystem(F, unknowns=[y1, y2, *z], params=[x]))
    assert layer.system.derivation.factorization == "sparse"  # with its dense LU fallback
    xs = np.array([[XC], [1.9], [0.9], [XC * (1 - 1e-6)]])
    y0 = np.concatenate([[1.0, 1.5], np.zeros(8)])
    res = layer.solve(xs, y0=y0)
    assert res.status.tolist() == [Status.SINGULAR_AT_SOLUTION] + [Status.CONVERGED] * 3
    xt = torch.tensor(xs[1:], requires_grad=True)
    y = layer(xt, y0=torch.tensor(y0))
    for col in (0, 1):
        (g,) = torch.autograd.grad(y[:, col].sum(), xt, retain_graph=True)
        for k in range(3):
            ref_y = _appendix_reference(xs[k + 1, 0])
            assert y[k, col].item() == pytest.approx(ref_y[0][col], rel=1e-9 if k == 2 else 1e-13)
            assert g[k, 0].item() == pytest.approx(ref_y[1][col], rel=1e-8 if k == 2 else 1e-10)
    # dz1/dx = 1 + (dy1/dx) / 2
    (g,) = torch.autograd.grad(y[:, 2].sum(), xt)
    np.testing.assert_allclose(g[:, 0].numpy(), 1 - 0.5 / xs[1:, 0] ** 2, rtol=1e-12)


# ---------------------------------------------------------------- the linear algebra underneath

@njit
def _solve(LU, piv, b, tab):
    lu_solve(LU.shape[0], LU, piv, b)


@njit
def _solve_t(LU, piv, b, tab):
    lu_solve_transpose(LU.shape[0], LU, piv, b)


@njit
def _cond_and_solve(A, b):
    n = A.shape[0]
    rmax = np.empty(n)
    cmax = np.empty(n)
    anorm = equilibrate(n, A, rmax, cmax)
    piv = np.empty(n + 1, dtype=np.int64)
    lu_factor(n, A, piv)
    tab = np.zeros(0, dtype=np.int64)
    est = inv_norm1(n, _solve, _solve_t, A, piv, rmax, cmax, np.empty(n), np.empty(n), tab)
    _solve(A, piv, b, tab)
    return anorm, est


@pytest.mark.parametrize("n", [1, 2, 5, 8, 9, 20, 40])
def test_equilibrated_condition_number_and_row_scaled_pivoting(n):
    rng = np.random.default_rng(n)
    for trial in range(5):
        A = rng.standard_normal((n, n))
        if trial == 1 and n > 1:
            A[-1] = A[0] + 1e-9 * rng.standard_normal(n)  # nearly dependent rows
        if trial == 2:
            A = np.triu(A) + 5 * np.eye(n)
        x = rng.standard_normal(n)
        D = 10.0 ** rng.integers(-150, 151, n).astype(float)
        E = 10.0 ** rng.integers(-50, 51, n).astype(float)
        conds = []
        # rows scaled by up to 1e+-150 (exactly invariant), then columns by up to 1e+-50 as well
        # (so that the entries of D A E stay within ~1e+-200: the elimination must not underflow)
        for M, xs in ((A, x), (D[:, None] * A, x), (D[:, None] * A * E[None, :], x / E)):
            rmax = np.abs(M).max(axis=1)
            cmax = (np.abs(M) / rmax[:, None]).max(axis=0)
            Me = M / rmax[:, None] / cmax[None, :]
            exact = np.linalg.norm(Me, 1) * np.linalg.norm(np.linalg.inv(Me), 1)
            bb = M @ xs
            anorm, est = _cond_and_solve(M.copy(), bb)
            if n <= EXACT_INVERSE_NORM_MAX_N:
                assert anorm * est == pytest.approx(exact, rel=1e-6)
            else:  # Hager's estimate: a lower bound, close in practice
                assert exact / 10 <= anorm * est <= exact * (1 + 1e-6)
            conds.append(anorm * est)
            np.testing.assert_allclose(bb, xs, rtol=max(1e-12, 1e-15 * np.linalg.cond(Me)))
        assert conds[1] == pytest.approx(conds[0], rel=max(1e-12, 1e-15 * conds[0]))


def _kepler_block(extra):
    """Kepler's ``E - e sin E = M`` plus ``extra`` decoupled linear rows ``z_k - c_k = 0``
    (with ``extra >= 6`` the system leaves the scalar-kernel path for the generic drivers)."""
    E, M, e = sp.symbols("E M e")
    z = sp.symbols(f"z0:{extra}") if extra else ()
    c = sp.symbols(f"c0:{extra}") if extra else ()
    res = [E - e * sp.sin(E) - M] + [zk - ck for zk, ck in zip(z, c)]
    unknowns = {"E": E, **({"z": sp.Matrix(z)} if extra else {})}
    params = {"M": M, "e": e, **({"c": sp.Matrix(c)} if extra else {})}
    return ic.ResidualSystem(res, unknowns=unknowns, params=params)


@pytest.mark.parametrize("method", ["newton", "trust-region"])
@pytest.mark.parametrize("extra", [0, 7])
def test_triple_root_whose_residual_underflows_to_zero_is_not_converged(tmp_path, method, extra):
    """Kepler at e = 1, M = 0 has a triple root at E = 0: Newton's steps shrink by 2/3 per step,
    and near E ~ 1e-8 the residual ``E - sin E`` is exactly 0.0 in floating point, so the final
    step is 0 and a 1x1 Jacobian (1 - cos E ~ 2e-16) is perfectly conditioned after
    equilibration. The run of linearly shrinking steps before the zero step is what tells the
    root is degenerate; dE/dM (~ 5e15 there) must not be returned as a gradient. Regular roots in
    the same batch, and regular roots whose residual is exactly zero after one step, converge."""
    system = _kepler_block(extra)
    layer = ic.compile(system, cache_dir=tmp_path, method=method)
    Ms = np.array([0.0, 0.1, 0.0, 1.0, 0.0, 1e-3])
    es = np.array([1.0, 1.0, 0.5, 0.3, 1.0, 1.0])
    E0 = [1.0, 1.0, 1.0, 1.0, -0.5, 1.0]
    B = len(Ms)
    args = [torch.tensor(Ms), torch.tensor(es)]
    y0 = torch.tensor([[E0[b]] + [0.5] * extra for b in range(B)])
    if extra:
        args.append(torch.linspace(-1.0, 1.0, extra, dtype=torch.float64).repeat(B, 1))
    res = layer.solve(*args, y0=y0)
    S = ic.Status
    assert res.status[0] == S.SINGULAR_AT_SOLUTION and res.status[4] == S.SINGULAR_AT_SOLUTION
    good = [1, 2, 3, 5]
    assert [res.status[b] for b in good] == [S.CONVERGED] * 4
    E_ = res.y[good, 0]
    np.testing.assert_allclose(E_ - es[good] * np.sin(E_), Ms[good], rtol=0, atol=1e-14)
    if extra:
        np.testing.assert_allclose(res.y[good, 1:], np.linspace(-1.0, 1.0, extra)[None].repeat(4, 0), rtol=0,
                                   atol=1e-15)
    # e = 1, M = 0 from the root itself: F = 0 and a zero pivot at the start
    start = torch.cat([torch.zeros(1, 1), args[2][:1]], 1) if extra else torch.zeros(1, 1)
    res0 = layer.solve(*[a[:1] for a in args], y0=start)
    assert res0.status[0] == S.SINGULAR_AT_SOLUTION


def test_regular_roots_reached_exactly_are_converged(tmp_path):
    """The zero-step rule must not flag regular roots whose residual rounds to exactly zero:
    linear systems (one step, then F = 0), ``y^2 = x`` from far away (Newton halves its steps
    for a while before converging quadratically; F = 0 exactly at sqrt(4) = 2) and a
    piecewise-linear residual."""
    y, x = sp.symbols("y x")
    for residual, xs, y0, ref in (
        (y**2 - x, [4.0, 9.0, 16.0, 1e6], 1e3, np.sqrt),
        (3 * y - x, [4.0, -9.0, 0.0, 1e6], 1e3, lambda v: v / 3),
        (y + sp.Abs(y) / 2 - x, [3.0, -1.0, 0.0, 1.5], 5.0, lambda v: np.where(v > 0, v / 1.5, v / 0.5)),
    ):
        system = ic.ResidualSystem([residual], unknowns={"y": y}, params={"x": x})
        for method in ("newton", "trust-region"):
            layer = ic.compile(system, cache_dir=tmp_path, method=method)
            res = layer.solve(torch.tensor(xs), y0=torch.tensor([y0]))
            assert list(res.status) == [ic.Status.CONVERGED] * len(xs), (residual, method, res.status)
            np.testing.assert_allclose(res.y[:, 0], ref(np.array(xs)), rtol=1e-14, atol=0)
