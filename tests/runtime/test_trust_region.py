"""Trust-region Newton (``method="trust-region"``, Powell's dogleg as in MINPACK's hybrj).

Square systems of the More-Garbow-Hillstrom test set (ACM TOMS 7, 1981) from their published
standard starts, against their published roots (refined to 30 digits with mpmath) and
scipy.optimize.root(method="hybr") (MINPACK hybrj) as a second opinion; gradients against
the Newton layer and closed forms; statuses per sample in mixed batches.
"""

import mpmath
import numpy as np
import pytest
import sympy as sp
import torch
from scipy.optimize import root

import implicit_compiler as ic
from implicit_compiler import Status
from implicit_compiler.runtime.options import SolverOptions
from tests.conftest import appendix_system

TR = SolverOptions(method="trust-region")
NEWTON = SolverOptions(method="newton")


# ---------------------------------------------------------------- MGH problems
def rosenbrock():
    x1, x2 = sp.symbols("x1 x2")
    return [10 * (x2 - x1**2), 1 - x1], [x1, x2], [-1.2, 1.0]


def powell_badly_scaled():
    x1, x2 = sp.symbols("x1 x2")
    return [10**4 * x1 * x2 - 1, sp.exp(-x1) + sp.exp(-x2) - sp.Rational(10001, 10000)], [x1, x2], [0.0, 1.0]


def helical_valley():
    x1, x2, x3 = sp.symbols("x1 x2 x3")
    # MGH's theta = atan(x2/x1)/(2 pi) (+ 1/2 for x1 < 0): the angle in (-1/4, 3/4] turns, cut along x2 < 0
    theta = (sp.atan2(-x1, x2) + sp.pi / 2) / (2 * sp.pi)
    return [10 * (x3 - 10 * theta), 10 * (sp.sqrt(x1**2 + x2**2) - 1), x3], [x1, x2, x3], [-1.0, 0.0, 0.0]


def powell_singular():
    x = sp.symbols("x1:5")
    F = [x[0] + 10 * x[1], sp.sqrt(5) * (x[2] - x[3]), (x[1] - 2 * x[2])**2, sp.sqrt(10) * (x[0] - x[3])**2]
    return F, list(x), [3.0, -1.0, 0.0, 1.0]


def freudenstein_roth():
    x1, x2 = sp.symbols("x1 x2")
    F = [-13 + x1 + ((5 - x2) * x2 - 2) * x2, -29 + x1 + ((x2 + 1) * x2 - 14) * x2]
    return F, [x1, x2], [0.5, -2.0]


def brown_almost_linear(n=5):
    x = sp.symbols(f"x1:{n + 1}")
    return [x[i] + sum(x) - (n + 1) for i in range(n - 1)] + [sp.Mul(*x) - 1], list(x), [0.5] * n


def broyden_tridiagonal(n=10):
    """With the constant 1 as a parameter ``c`` (so it also serves the gradient tests)."""
    x = sp.symbols(f"x1:{n + 1}")
    c = sp.Symbol("c")
    F = [(3 - 2 * x[i]) * x[i] - (x[i - 1] if i > 0 else 0) - 2 * (x[i + 1] if i < n - 1 else 0) + c
         for i in range(n)]
    return F, list(x), [-1.0] * n, [c]


# published roots (MGH: "f = 0 at ..."); None: f = 0, location not published (refined from hybr's)
PUBLISHED = {
    "rosenbrock": [1.0, 1.0],
    "powell_badly_scaled": [1.098e-5, 9.106],
    "helical_valley": [1.0, 0.0, 0.0],
    "broyden_tridiagonal": None,
}


def _compile(name, F, xs, params):
    return ic.compile(ic.ResidualSystem(F, unknowns=xs, params=params or None, name=name), warmup=False)


def _refined_root(F, xs, guess):
    """The root near ``guess`` to 30 digits (mpmath's Newton on the exact residuals)."""
    fs = sp.lambdify(xs, F, "mpmath")
    with mpmath.workdps(30):
        r = mpmath.findroot(lambda *v: fs(*v), [mpmath.mpf(g) for g in guess], tol=1e-28)
        return np.array([float(v) for v in (r if len(xs) > 1 else [r])])


def _hybr(F, xs, x0):
    f = sp.lambdify([xs], F, "numpy")
    j = sp.lambdify([xs], sp.Matrix(F).jacobian(xs), "numpy")
    return root(lambda v: np.array(f(v), float), np.array(x0), jac=lambda v: np.array(j(v), float), method="hybr")


@pytest.fixture(scope="module")
def mgh_layers():
    out = {}
    for name, fn in [("rosenbrock", rosenbrock), ("powell_badly_scaled", powell_badly_scaled),
                     ("helical_valley", helical_valley), ("powell_singular", powell_singular),
                     ("freudenstein_roth", freudenstein_roth), ("brown_almost_linear", brown_almost_linear)]:
        F, xs, x0 = fn()
        out[name] = (_compile(name, F, xs, []), F, xs, x0)
    return out


@pytest.fixture(scope="module")
def tridiagonal():
    F, xs, x0, params = broyden_tridiagonal()
    layer = _compile("broyden_tridiagonal", F, xs, params)
    assert layer.kernels.sparse  # exercises the sparse factorisation
    return layer, F, xs, x0, params


def _solve(layer, x0, options, P=None):
    k = layer.kernels
    P = np.zeros((1, k.m)) if P is None else P
    return k.solve(P, np.array([x0], dtype=np.float64), options)


@pytest.mark.parametrize("name", ["rosenbrock", "powell_badly_scaled", "helical_valley"])
def test_mgh_standard_start_reaches_published_root(mgh_layers, name):
    layer, F, xs, x0 = mgh_layers[name]
    # Powell's badly scaled function: at the root the LU pivots are 9.1e4 and 1.1e-4 (the
    # equilibrated Jacobian is well conditioned); the pivot test needs singular_tol < 1.2e-9.
    opts = TR.replace(singular_tol=1e-12) if name == "powell_badly_scaled" else TR
    res = _solve(layer, x0, opts)
    assert res.status[0] == Status.CONVERGED, res.summary()
    ref = _refined_root(F, xs, PUBLISHED[name])
    np.testing.assert_allclose(res.y[0], ref, rtol=1e-10, atol=1e-10)
    hy = _hybr(F, xs, x0)
    assert hy.success  # MINPACK solves it from this start: so do we
    np.testing.assert_allclose(hy.x, ref, rtol=1e-8, atol=1e-8)


def test_powell_badly_scaled_newton_hits_the_cap_trust_region_does_not(mgh_layers):
    layer, F, xs, x0 = mgh_layers["powell_badly_scaled"]
    newton = _solve(layer, x0, NEWTON.replace(singular_tol=1e-12))
    assert newton.status[0] == Status.MAX_ITERATIONS and newton.iterations[0] == 50
    tr = _solve(layer, x0, TR.replace(singular_tol=1e-12))
    assert tr.status[0] == Status.CONVERGED and tr.iterations[0] < 50


def test_powell_singular_is_reported_singular_at_its_root(mgh_layers):
    # F has the root 0 with a singular Jacobian there (rank 2): no implicit gradient exists.
    layer, F, xs, x0 = mgh_layers["powell_singular"]
    res = _solve(layer, x0, TR)
    assert res.status[0] == Status.SINGULAR_AT_SOLUTION
    assert np.abs(res.y[0]).max() < 1e-8
    assert not _hybr(F, xs, x0).success  # hybrj stops too (progress test)


def test_freudenstein_roth_local_minimum_is_reported_not_returned(mgh_layers):
    # From (0.5, -2) both methods and hybrj end near the local minimiser (11.41, -0.8968) of
    # ||F|| (f = 48.98 there), not at the root (5, 4).
    layer, F, xs, x0 = mgh_layers["freudenstein_roth"]
    res = _solve(layer, x0, TR)
    assert res.status[0] == Status.LINE_SEARCH_FAILED
    assert res.residual_norm[0] > 4.0
    np.testing.assert_allclose(res.y[0], [11.41, -0.8968], rtol=0.01)
    assert not _hybr(F, xs, x0).success


def test_freudenstein_roth_batch_of_starts_statuses_per_sample(mgh_layers):
    layer, F, xs, _ = mgh_layers["freudenstein_roth"]
    Y0 = np.array([[0.5, -2.0], [6.0, 3.0], [-10.0, 3.0], [np.nan, 1.0], [5.0, -20.0], [4.0, 5.0]])
    res = layer.kernels.solve(np.zeros((6, 0)), Y0, TR)
    expect = [Status.LINE_SEARCH_FAILED, Status.CONVERGED, Status.CONVERGED, Status.NONFINITE,
              Status.LINE_SEARCH_FAILED, Status.CONVERGED]
    assert [Status(int(s)) for s in res.status] == expect
    for b in np.flatnonzero(res.status == Status.CONVERGED):
        np.testing.assert_allclose(res.y[b], [5.0, 4.0], rtol=0, atol=1e-12)
    for b in np.flatnonzero(res.status == Status.LINE_SEARCH_FAILED):
        assert res.residual_norm[b] > 4.0


def test_brown_almost_linear_reaches_a_published_root(mgh_layers):
    # MGH: f = 0 at (a, ..., a, a^(1-n)) for the real roots a of n a^n - (n+1) a^(n-1) + 1 = 0
    # (a = 1 among them). From (1/2, ..., 1/2) hybr finds (1, ..., 1); the trust region, whose
    # steps follow the exact Jacobian, the root with a = -0.579: both are published roots.
    layer, F, xs, x0 = mgh_layers["brown_almost_linear"]
    n = len(xs)
    res = _solve(layer, x0, TR)
    assert res.status[0] == Status.CONVERGED
    y = res.y[0]
    a = sp.Symbol("a")
    roots = [complex(r) for r in sp.Poly(n * a**n - (n + 1) * a**(n - 1) + 1, a).nroots(n=30)]
    real = sorted(r.real for r in roots if abs(r.imag) < 1e-20)
    alpha = min(real, key=lambda r: abs(r - y[0]))
    np.testing.assert_allclose(y, [alpha] * (n - 1) + [alpha ** (1 - n)], rtol=1e-10, atol=1e-10)
    hy = _hybr(F, xs, x0)
    assert hy.success
    np.testing.assert_allclose(hy.x, np.ones(n), rtol=1e-8)


def test_broyden_tridiagonal_sparse_against_refined_root_and_hybr(tridiagonal):
    layer, F, xs, x0, params = tridiagonal
    Fc = [f.subs(params[0], 1) for f in F]
    res = _solve(layer, x0, TR, P=np.ones((1, 1)))
    assert res.status[0] == Status.CONVERGED
    hy = _hybr(Fc, xs, x0)
    assert hy.success
    ref = _refined_root(Fc, xs, hy.x)
    np.testing.assert_allclose(res.y[0], ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- singular Jacobian at an iterate
@pytest.fixture(scope="module")
def kink():
    # F = (y1^2 - a, y2 - y1): dF/dy is singular on y1 = 0, where Newton cannot step but
    # the Cauchy step along -J^T F = (1, -1) (from (0, 1)) leaves the singular line.
    y1, y2, a = sp.symbols("y1 y2 a")
    sys_ = ic.ResidualSystem([y1**2 - a, y2 - y1], unknowns=[y1, y2], params=[a], name="kink")
    return ic.compile(sys_, method="trust-region"), ic.compile(sys_, method="newton")


def test_cauchy_step_from_a_singular_start(kink):
    tr, newton = kink
    a = np.array([[1.0], [4.0], [0.25], [1e-6], [1e6], [-1.0], [np.nan]])
    Y0 = np.array([[0.0, 1.0]])
    res = tr.kernels.solve(a, Y0, TR.replace(max_iter=100))
    st = [Status(int(s)) for s in res.status]
    assert st == [Status.CONVERGED] * 5 + [Status.LINE_SEARCH_FAILED, Status.NONFINITE]
    r = np.sqrt(a[:5, 0])
    np.testing.assert_allclose(res.y[:5], np.stack([r, r], axis=1), rtol=1e-12, atol=1e-14)
    assert res.residual_norm[5] >= 1.0 - 1e-12  # y1^2 + 1 = 0 has no real root
    # Newton cannot take its first step from this start.
    assert (newton.kernels.solve(a[:6], Y0, NEWTON).status == Status.SINGULAR_JACOBIAN).all()


def test_kink_gradient_closed_form_and_gradcheck(kink):
    tr, _ = kink
    a = torch.tensor([[1.0], [4.0], [0.3]], dtype=torch.float64, requires_grad=True)
    y = tr(a, y0=torch.tensor([0.0, 1.0], dtype=torch.float64))
    y.sum().backward()
    # y1 = y2 = sqrt(a): d(y1 + y2)/da = 1 / sqrt(a) (the factorisation is at the last iterate,
    # within xtol of the returned y: a relative error of that order)
    torch.testing.assert_close(a.grad, 1 / torch.sqrt(a.detach()), rtol=1e-10, atol=0)
    y0 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: tr(t, y0=y0), (a.detach().clone().requires_grad_(),))


# ---------------------------------------------------------------- gradients equal Newton's
def test_appendix_trust_region_matches_newton_and_closed_form():
    tr = ic.compile(appendix_system(), method="trust-region")
    newton = ic.compile(appendix_system(), method="newton")
    x = torch.tensor([[0.9], [1.2], [1.5], [0.6]], dtype=torch.float64)
    y0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    grads = []
    for layer in (tr, newton):
        xx = x.clone().requires_grad_()
        y = layer(xx, y0=y0)
        (y[:, 0] + 3 * y[:, 1]).sum().backward()
        grads.append((y.detach(), xx.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-14)
    xv = x[:, 0]
    y2 = torch.sqrt(4 - xv**2 - 1 / xv**2)
    ref = -1 / xv**2 + 3 * (-xv + 1 / xv**3) / y2
    torch.testing.assert_close(grads[0][1][:, 0], ref, rtol=1e-10, atol=0)
    xx = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: tr(t, y0=y0), (xx,))


def test_sparse_trust_region_gradient_matches_newton(tridiagonal):
    layer, F, xs, x0, params = tridiagonal
    c = torch.tensor([[1.0], [0.5], [2.0]], dtype=torch.float64)
    y0 = torch.tensor(x0, dtype=torch.float64)
    w = torch.linspace(-1.0, 1.0, 10, dtype=torch.float64)
    outs = []
    for method in ("trust-region", "newton"):
        layer.configure(method=method)
        cc = c.clone().requires_grad_()
        y = layer(cc, y0=y0)
        (y * w).sum().backward()
        outs.append((y.detach(), cc.grad))
    layer.configure(method=None)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-12, atol=1e-14)
    # against the implicit function theorem evaluated independently: dy/dc = -J^{-1} 1
    Jf = sp.lambdify([xs, params], sp.Matrix(F).jacobian(xs), "numpy")
    for b in range(3):
        J = np.array(Jf(outs[0][0][b].numpy(), [c[b, 0].item()]), dtype=float)
        dydc = -np.linalg.solve(J, np.ones(10))
        assert outs[0][1][b, 0].item() == pytest.approx(float(dydc @ w.numpy()), rel=1e-12)



def test_threaded_driver_matches_serial_per_sample(kink):
    tr, _ = kink
    k = tr.kernels
    base = np.array([1.0, 4.0, 0.25, 1e-6, 1e6, -1.0, np.nan, 2.0])
    a = np.tile(base, 40)[:, None]  # 320 samples: 5 chunks of 64 for the prange driver
    Y0 = np.array([[0.0, 1.0]])
    opts = TR.replace(max_iter=100)
    serial = k.solve(a, Y0, opts.replace(parallel_threshold=10**9))
    B, n = a.shape[0], k.n
    Y, LU = np.empty((B, n)), np.empty((B, n, n))
    PIV, STATUS, INFO = np.empty((B, n + 1), np.int64), np.empty(B, np.int8), np.empty((B, 2))
    k.module.trust_region_batch_parallel(Y0, a, opts.tol, opts.rtol, opts.xtol, opts.max_iter, opts.singular_tol,
                                         Y, LU, PIV, STATUS, INFO, k.tab)
    np.testing.assert_array_equal(STATUS, serial.status)
    np.testing.assert_array_equal(Y, serial.y)
    np.testing.assert_array_equal(INFO[:, 0], serial.iterations)
    ok = STATUS == Status.CONVERGED
    assert ok.sum() == 6 * 40
    np.testing.assert_allclose(Y[ok, 0], np.sqrt(a[ok, 0]), rtol=1e-12)
