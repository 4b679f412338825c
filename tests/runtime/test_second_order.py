"""Forward mode (JVP) and double backward of compiled layers, at NumPy level.

References: closed forms (Kepler's equation), central finite differences of the forward
solve (JVP) and of the first-order VJP (double backward), float64, at 1e-7 relative; the
``∂L/∂ȳ`` block against the exact linear identity ``∂L/∂ȳ_i = ⟨w, VJP(e_i)⟩``. Batches mix
converged and failed samples: failed rows are zero, statuses untouched, good rows equal
their references.
"""

import numpy as np
import pytest
import sympy as sp

import implicit_compiler as ic
from implicit_compiler.codegen import cache
from implicit_compiler.compiler import compile_second_order
from implicit_compiler.errors import InputError
from implicit_compiler.runtime.second_order import SecondOrder, batched_solve
from implicit_compiler.runtime.status import CONVERGED

H = 1e-5  # central-difference step, relative to max(1, |theta_c|)
RTOL = 1e-7


def _solve(layer, P, Y0, **opts):
    options = layer.options.replace(**opts) if opts else layer.options
    return layer.kernels.solve(np.ascontiguousarray(P, dtype=np.float64), Y0, options)


def _vjp(layer, P, Y0, Ybar, **opts):
    res = _solve(layer, P, Y0, **opts)
    assert (res.status == CONVERGED).all(), res.status
    need = np.ones(len(layer.layout["param_groups"]), dtype=np.bool_)
    return np.array(layer.kernels.vjp(res, np.ascontiguousarray(Ybar), need, 2**62))


def fd_jvp(layer, P, Y0, W, **opts):
    """(y*(θ + hW) - y*(θ - hW)) / 2h per sample."""
    h = H * np.maximum(1.0, np.abs(P).max(axis=1, keepdims=True))
    yp, ym = _solve(layer, P + h * W, Y0, **opts), _solve(layer, P - h * W, Y0, **opts)
    assert (yp.status == CONVERGED).all() and (ym.status == CONVERGED).all()
    return (yp.y - ym.y) / (2 * h)


def fd_double_backward(layer, P, Y0, Ybar, W, **opts):
    """∂/∂θ of L(θ) = ⟨W, VJP(θ, Ybar)⟩ by central differences, one parameter at a time."""
    B, m = P.shape
    out = np.zeros((B, m))
    for c in range(m):
        h = H * np.maximum(1.0, np.abs(P[:, c]))
        Pp, Pm = P.copy(), P.copy()
        Pp[:, c] += h
        Pm[:, c] -= h
        Lp = (W * _vjp(layer, Pp, Y0, Ybar, **opts)).sum(axis=1)
        Lm = (W * _vjp(layer, Pm, Y0, Ybar, **opts)).sum(axis=1)
        out[:, c] = (Lp - Lm) / (2 * h)
    return out


def exact_dybar(layer, P, Y0, W, **opts):
    """∂L/∂ȳ_i = ⟨W, VJP(e_i)⟩ (L is linear in ȳ)."""
    B = P.shape[0]
    n = layer.kernels.n
    return np.stack([(W * _vjp(layer, P, Y0, np.tile(np.eye(n)[i], (B, 1)), **opts)).sum(axis=1)
                     for i in range(n)], axis=1)


def assert_close_rows(got, ref, rtol=RTOL):
    """Row by row: |got - ref| <= rtol (|ref| + max|ref of the row|)."""
    for g, r in zip(np.atleast_2d(got), np.atleast_2d(ref)):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * np.abs(r).max())


def check_double_backward(layer, P, Y0, rng, ref_opts=None, **opts):
    """Double backward (and JVP) of ``layer`` at the converged parameters ``P`` against finite
    differences (the reference solves use ``ref_opts``); returns the SecondOrder outputs."""
    ref_opts = ref_opts or {}
    k = layer.kernels
    B = P.shape[0]
    Ybar, W = rng.normal(size=(B, k.n)), rng.normal(size=(B, k.m))
    so = compile_second_order(layer)
    res = _solve(layer, P, Y0, **opts)
    assert (res.status == CONVERGED).all(), res.status
    dybar, dp = so.double_backward(res, Ybar, W)
    assert_close_rows(dp, fd_double_backward(layer, P, Y0, Ybar, W, **ref_opts))
    np.testing.assert_allclose(dybar, exact_dybar(layer, P, Y0, W, **ref_opts), rtol=1e-10, atol=1e-12)
    assert_close_rows(so.jvp(res, W), fd_jvp(layer, P, Y0, W, **ref_opts))
    np.testing.assert_array_equal(dybar, so.jvp(res, W))
    return Ybar, W, dybar, dp


def check_mixed_batch(layer, P_good, P_bad, Y0, rng):
    """Good and failed samples interleaved: failed rows zero, statuses untouched, good rows as
    computed on the good samples alone."""
    k = layer.kernels
    so = compile_second_order(layer)
    P = np.empty((len(P_good) + len(P_bad), k.m))
    bad = np.zeros(len(P), dtype=bool)
    bad[1::2][:len(P_bad)] = True
    P[bad], P[~bad] = P_bad, P_good
    res = _solve(layer, P, Y0)
    assert (res.status[bad] != CONVERGED).all() and (res.status[~bad] == CONVERGED).all(), res.status
    status = res.status.copy()
    Ybar, W = rng.normal(size=(len(P), k.n)), rng.normal(size=(len(P), k.m))
    dybar, dp = so.double_backward(res, Ybar, W)
    ydot = so.jvp(res, W)
    np.testing.assert_array_equal(res.status, status)
    for a in (dybar, dp, ydot):
        assert (a[bad] == 0.0).all()
    good = _solve(layer, P_good, Y0)
    g_dybar, g_dp = so.double_backward(good, Ybar[~bad], W[~bad])
    np.testing.assert_allclose(dybar[~bad], g_dybar, rtol=1e-14, atol=0)
    np.testing.assert_allclose(dp[~bad], g_dp, rtol=1e-14, atol=0)
    assert np.isfinite(dp[~bad]).all()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------- Kepler: closed forms
def kepler_system():
    E, e, M = sp.symbols("E e M")
    return ic.ResidualSystem([E - e * sp.sin(E) - M], unknowns=[E], params=[e, M], initial_guess=1.0,
                             name="kepler")


@pytest.fixture(scope="module")
def kepler():
    return ic.compile(kepler_system())


KEPLER_P = np.array([[0.1, 0.3], [0.5, 1.0], [0.9, 2.5], [0.3, -4.0], [0.7, 0.05]])


def test_second_order_module_is_built_on_first_use_only(tmp_path):
    # a fresh cache: the second-order module must not exist until it is asked for
    layer = ic.compile(kepler_system(), cache_dir=tmp_path, warmup=False)
    key2 = cache.module_key(layer.system.content_hash() + "second")
    path2 = tmp_path / f"{cache.MODULE_PREFIX}{key2}.py"
    lazy = layer.kernels.second_order
    assert not lazy.built and not path2.exists()  # compile() of a first-order user generated nothing
    assert [p.name for p in tmp_path.glob("*.py")] == [layer.path.name]
    so = compile_second_order(layer)
    assert lazy.built and path2.exists() and so.module2.__file__ == str(path2)
    assert layer.kernels.second_order() is so and compile_second_order(layer) is so
    assert isinstance(so, SecondOrder)
    res = _solve(layer, KEPLER_P, np.ones((1, 1)))
    np.testing.assert_allclose(so.jvp(res, np.tile([0.0, 1.0], (len(KEPLER_P), 1)))[:, 0],
                               1 / (1 - KEPLER_P[:, 0] * np.cos(res.y[:, 0])), rtol=1e-13)


def test_layer_without_its_system_is_a_clear_error(kepler):
    from implicit_compiler.torch.module import ImplicitLayer

    bare = ImplicitLayer(kepler.kernels.module)  # as a layer loaded without SymPy would be
    with pytest.raises(ic.SystemDefinitionError, match="loaded without its symbolic system"):
        compile_second_order(bare)


def test_kepler_jvp_closed_form(kepler):
    so = compile_second_order(kepler)
    res = _solve(kepler, KEPLER_P, np.ones((1, 1)))
    E, e = res.y[:, 0], KEPLER_P[:, 0]
    d = 1 - e * np.cos(E)
    dM = so.jvp(res, np.tile([0.0, 1.0], (len(E), 1)))[:, 0]
    de = so.jvp(res, np.tile([1.0, 0.0], (len(E), 1)))[:, 0]
    np.testing.assert_allclose(dM, 1 / d, rtol=1e-13)
    np.testing.assert_allclose(de, np.sin(E) / d, rtol=1e-12, atol=1e-15)
    W = np.random.default_rng(1).normal(size=KEPLER_P.shape)
    np.testing.assert_allclose(so.jvp(res, W)[:, 0], W[:, 0] * np.sin(E) / d + W[:, 1] / d, rtol=1e-12)


def test_kepler_double_backward_closed_form(kepler):
    so = compile_second_order(kepler)
    res = _solve(kepler, KEPLER_P, np.ones((1, 1)))
    E, e = res.y[:, 0], KEPLER_P[:, 0]
    d = 1 - e * np.cos(E)
    B = len(E)
    # ȳ = 1, w = e_M: L = dE/dM, so ∂L/∂M = d²E/dM² and ∂L/∂e = d²E/de dM
    dybar, dp = so.double_backward(res, np.ones((B, 1)), np.tile([0.0, 1.0], (B, 1)))
    np.testing.assert_allclose(dp[:, 1], -e * np.sin(E) / d**3, rtol=1e-12, atol=1e-15)
    dEde = np.sin(E) / d
    # d/de (1/d) = (cos E - e sin E dE/de) / d² ... with dE/de = sin E / d
    np.testing.assert_allclose(dp[:, 0], (np.cos(E) - e * np.sin(E) * dEde) / d**2, rtol=1e-12)
    np.testing.assert_allclose(dybar[:, 0], 1 / d, rtol=1e-13)
    # ȳ = 1, w = e_e: ∂L/∂e = d²E/de² = (2 cos E dE/de ... ) checked against its closed form
    _, dp = so.double_backward(res, np.ones((B, 1)), np.tile([1.0, 0.0], (B, 1)))
    d2Ede2 = (2 * np.cos(E) * dEde - e * np.sin(E) * dEde**2) / d
    np.testing.assert_allclose(dp[:, 0], d2Ede2, rtol=1e-12, atol=1e-15)


def test_kepler_double_backward_finite_differences(kepler, rng):
    check_double_backward(kepler, KEPLER_P, np.ones((1, 1)), rng)


def test_kepler_mixed_batch(kepler, rng):
    # non-finite inputs (NONFINITE)
    check_mixed_batch(kepler, KEPLER_P, np.array([[np.nan, 1.0], [np.inf, 0.2], [0.5, np.inf]]), np.ones((1, 1)),
                      rng)


def test_shapes_are_checked(kepler):
    so = compile_second_order(kepler)
    res = _solve(kepler, KEPLER_P, np.ones((1, 1)))
    with pytest.raises(InputError, match=r"W \(the parameter tangent\) has shape \(5, 1\); expected \(5, 2\)"):
        so.jvp(res, np.zeros((5, 1)))
    with pytest.raises(InputError, match=r"Ybar .* has shape \(4, 1\); expected \(5, 1\)"):
        so.double_backward(res, np.zeros((4, 1)), np.zeros((5, 2)))
    # read-only and broadcast inputs are accepted (copied), with the same values
    W = np.random.default_rng(2).normal(size=(5, 2))
    ref = so.double_backward(res, np.ones((5, 1)), W)
    W_ro = W.copy()
    W_ro.setflags(write=False)
    got = so.double_backward(res, np.broadcast_to(1.0, (5, 1)), W_ro)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])


# ---------------------------------------------------------------- the paper appendix system
APPENDIX_Y0 = np.array([[1.0, 1.5]])


def test_appendix_double_backward(appendix_layer, rng):
    P = np.array([[1.0], [0.8], [1.3], [1.7], [0.6]])
    _, W, _, dp = check_double_backward(appendix_layer, P, APPENDIX_Y0, rng)
    # closed form: y1 = 1/x, y2 = sqrt(4 - x² - 1/x²); with ȳ = e_2, w = 1: L = dy2/dx, ∂L/∂x = d²y2/dx²
    so = compile_second_order(appendix_layer)
    res = _solve(appendix_layer, P, APPENDIX_Y0)
    x = sp.Symbol("x")
    y2 = sp.sqrt(4 - x**2 - 1 / x**2)
    f1, f2 = sp.lambdify(x, sp.diff(y2, x)), sp.lambdify(x, sp.diff(y2, x, 2))
    B = len(P)
    dybar, dp = so.double_backward(res, np.tile([0.0, 1.0], (B, 1)), np.ones((B, 1)))
    np.testing.assert_allclose(dp[:, 0], f2(P[:, 0]), rtol=1e-11)
    np.testing.assert_allclose(dybar[:, 1], f1(P[:, 0]), rtol=1e-12)


def test_appendix_mixed_batch(appendix_layer, rng):
    # x = 0.1 and x = 3 have no real solution (4 - x² - 1/x² < 0); NaN is a non-finite input
    check_mixed_batch(appendix_layer, np.array([[1.0], [1.2], [0.7], [1.5]]), np.array([[0.1], [np.nan], [3.0]]),
                      APPENDIX_Y0, rng)


# ---------------------------------------------------------------- Bratu, 20 unknowns (sparse factorisation)
BRATU_N = 20


def bratu_system():
    u = sp.symbols(f"u0:{BRATU_N}")
    lam, a = sp.symbols("lam a")
    h2 = sp.Rational(1, (BRATU_N + 1) ** 2)
    res = []
    for i in range(BRATU_N):
        left = u[i - 1] if i > 0 else a
        right = u[i + 1] if i < BRATU_N - 1 else 0
        res.append(left - 2 * u[i] + right + h2 * lam * sp.exp(u[i]))
    return ic.ResidualSystem(res, unknowns=list(u), params=[lam, a], name="bratu20")


@pytest.fixture(scope="module")
def bratu():
    return ic.compile(bratu_system())


def test_bratu_double_backward_sparse(bratu, rng):
    assert bratu.kernels.sparse  # the sparse factorisation's solves are the ones reused
    P = np.array([[1.0, 0.0], [2.5, 0.3], [3.0, -0.5]])
    check_double_backward(bratu, P, np.zeros((1, BRATU_N)), rng)


def test_bratu_mixed_batch(bratu, rng):
    # lam = 10 is beyond the fold (about 3.5): no solution
    check_mixed_batch(bratu, np.array([[1.0, 0.0], [2.0, 0.2]]), np.array([[10.0, 0.0], [np.nan, 0.0]]),
                      np.zeros((1, BRATU_N)), rng)


# ---------------------------------------------------------------- fixed point (Anderson forward)
@pytest.fixture(scope="module")
def fixed_point():
    u, v, a, b = sp.symbols("u v a b")
    # |u b| checks the real-argument rules (d|g|/dg = sign g, d sign/dg = 0) away from the kink
    g = [sp.Rational(1, 2) * sp.cos(a * v) + b / 10,
         sp.Rational(2, 5) * sp.sin(u + b) + a * u / 5 + sp.Abs(u * b) / 10]
    return ic.compile(ic.FixedPoint(map=g, unknowns=[u, v], params=[a, b], method="anderson", name="fp2"))


def test_fixed_point_double_backward(fixed_point, rng):
    P = np.array([[0.5, 0.2], [1.2, -0.7], [-0.8, 1.5]])
    # the Anderson solve is the one differentiated; the finite-difference references solve with
    # Newton, whose solutions are exact to rounding (Anderson stops at ||F|| <= tol)
    Y0 = np.zeros((1, 2))
    check_double_backward(fixed_point, P, Y0, rng, ref_opts={"method": "newton"})
    res = _solve(fixed_point, P, Y0)
    assert (res.status == CONVERGED).all()


def test_fixed_point_mixed_batch(fixed_point, rng):
    check_mixed_batch(fixed_point, np.array([[0.5, 0.2], [1.0, 0.1]]), np.array([[np.nan, 0.2]]),
                      np.zeros((1, 2)), rng)


# ---------------------------------------------------------------- QP: an equality and an active inequality
@pytest.fixture(scope="module")
def qp():
    y1, y2, y3, a, b, c = sp.symbols("y1 y2 y3 a b c")
    f = a * y1**2 + y2**2 + y3**2 + y1 * y2 / 2 - y1 - 2 * y2
    return ic.compile(ic.Problem(f, variables=[y1, y2, y3], params=[a, b, c],
                                 equalities=[sp.Eq(y1 + b * y2 + y3, 1)], inequalities=[y3 >= c], name="qp3"))


QP_P = np.array([[1.0, 1.0, 0.5], [2.0, 0.5, 0.8], [1.5, -0.3, 0.6]])


def test_qp_double_backward(qp, rng):
    k = qp.kernels
    res = _solve(qp, QP_P, np.zeros((1, 3)))
    assert (res.status == CONVERGED).all()
    # the inequality is active with a positive multiplier, so the KKT system is smooth there
    np.testing.assert_allclose(res.y[:, 2], QP_P[:, 2], rtol=0, atol=1e-12)
    assert (res.y[:, k.nv + k.nq] > 1e-2).all()
    check_double_backward(qp, QP_P, np.zeros((1, 3)), rng)


def test_qp_mixed_batch(qp, rng):
    check_mixed_batch(qp, QP_P, np.array([[1.0, np.nan, 0.5]]), np.zeros((1, 3)), rng)


# ---------------------------------------------------------------- the kernels against SymPy, and a composition
def test_hvp_kernel_matches_dense_sympy_hessian(appendix_layer, rng):
    so = compile_second_order(appendix_layer)
    P = np.array([[1.0], [0.8], [1.6]])
    res = _solve(appendix_layer, P, APPENDIX_Y0)
    B = len(P)
    V, Yd, W = rng.normal(size=(B, 2)), rng.normal(size=(B, 2)), rng.normal(size=(B, 1))
    Hy, Hp = so.hvp(res, V, Yd, W)
    system = appendix_layer.system
    z = list(system.unknowns) + list(system.params)
    v = sp.symbols("v0:2")
    dense = sp.lambdify([*z, *v], sp.hessian(sum(a * F for a, F in zip(v, system.residuals)), z))
    Fp = sp.lambdify(z, system.jacobian_params)
    for b in range(B):
        Hb = np.array(dense(*res.y[b], *P[b], *V[b]), dtype=float)
        np.testing.assert_allclose(np.concatenate([Hy[b], Hp[b]]), Hb @ np.concatenate([Yd[b], W[b]]),
                                   rtol=1e-13, atol=1e-14)
        # jvp = -J^{-1} F_theta w, with J and F_theta from SymPy
        J = np.array(sp.lambdify(z, system.jacobian_unknowns)(*res.y[b], *P[b]), dtype=float)
        ref = -np.linalg.solve(J, np.array(Fp(*res.y[b], *P[b]), dtype=float) @ W[b])
        np.testing.assert_allclose(so.jvp(res, W)[b], ref, rtol=1e-13)


def test_hessian_of_a_loss_through_the_layer(kepler):
    # l(theta) = E*(theta)^2 / 2: its gradient is VJP(ybar = E*); its Hessian-vector product in a
    # direction w is dP + VJP(dYbar) (ybar depends on theta through E*): what a torch double
    # backward composes. Checked against central differences of the gradient.
    so = compile_second_order(kepler)
    P = KEPLER_P
    B = len(P)
    Y0 = np.ones((1, 1))

    def grad(Pk):
        res = _solve(kepler, Pk, Y0)
        return so.vjp(res, res.y)

    res = _solve(kepler, P, Y0)
    for c in range(2):
        w = np.zeros((B, 2))
        w[:, c] = 1.0
        dybar, dp = so.double_backward(res, res.y, w)
        hw = dp + so.vjp(res, dybar)
        h = H * np.maximum(1.0, np.abs(P[:, c:c + 1]))
        ref = (grad(P + h * w) - grad(P - h * w)) / (2 * h)
        assert_close_rows(hw, ref)


# ---------------------------------------------------------------- the batch drivers against a per-sample loop
_TAB = np.zeros(0, dtype=np.int64)


def loop_jvp(so, res, W):
    """The per-sample reference: ``F_θ w`` kernel from Python, then the forward's factors."""
    R = np.zeros((len(W), so.n))
    for b in np.flatnonzero(res.status == CONVERGED):
        so.module2.jvp_params(res.y[b], res.p[b], W[b], R[b], _TAB)
    Ydot = -batched_solve(so.kernels, res, R)
    Ydot[res.status != CONVERGED] = 0.0
    return Ydot


def loop_hvp(so, res, V, Ydot, W):
    Hy, Hp = np.zeros((len(W), so.n)), np.zeros((len(W), so.m))
    for b in np.flatnonzero(res.status == CONVERGED):
        so.module2.hvp(res.y[b], res.p[b], V[b], Ydot[b], W[b], Hy[b], Hp[b], _TAB)
    return Hy, Hp


def loop_double_backward(so, res, Ybar, W):
    V = batched_solve(so.kernels, res, Ybar, transpose=True)
    Ydot = loop_jvp(so, res, W)
    Hy, Hp = loop_hvp(so, res, V, Ydot, W)
    dP = -(so.vjp(res, Hy) + Hp)
    dP[res.status != CONVERGED] = 0.0
    return Ydot, dP


# (layer fixture, converged parameters, failing parameters, initial guess)
DRIVER_CASES = {
    "appendix": ("appendix_layer", [[1.0], [0.8], [1.3], [1.7], [0.6]], [[0.1], [np.nan], [3.0]], APPENDIX_Y0),
    "kepler": ("kepler", KEPLER_P, [[np.nan, 1.0], [0.5, np.inf]], np.ones((1, 1))),
    "fixed_point": ("fixed_point", [[0.5, 0.2], [1.2, -0.7], [-0.8, 1.5]], [[np.nan, 0.2]], np.zeros((1, 2))),
    "qp": ("qp", QP_P, [[1.0, np.nan, 0.5]], np.zeros((1, 3))),
    "bratu": ("bratu", [[1.0, 0.0], [2.5, 0.3]], [[10.0, 0.0]], np.zeros((1, BRATU_N))),
}


@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
@pytest.mark.parametrize("case", list(DRIVER_CASES))
def test_batch_drivers_equal_the_per_sample_loop(request, case, threaded, rng):
    name, good, bad, Y0 = DRIVER_CASES[case]
    layer = request.getfixturevalue(name)
    k = layer.kernels
    so = compile_second_order(layer)
    good, bad = np.asarray(good, dtype=float), np.asarray(bad, dtype=float)
    # good and failed samples interleaved, repeated past one prange chunk (64 samples)
    reps = 30
    P = np.concatenate([np.concatenate([good, bad])] * reps)
    failed = np.tile(np.r_[np.zeros(len(good), bool), np.ones(len(bad), bool)], reps)
    perm = rng.permutation(len(P))
    P, failed = P[perm], failed[perm]
    res = _solve(layer, P, Y0)
    assert (res.status[failed] != CONVERGED).all() and (res.status[~failed] == CONVERGED).all(), res.status
    status = res.status.copy()
    B = len(P)
    Ybar, W, V, Yd = (rng.normal(size=(B, w)) for w in (k.n, k.m, k.n, k.n))
    k._forced = threaded  # as Kernels.warm_up does: the prange drivers, or the range drivers, whatever B is
    try:
        got_jvp = so.jvp(res, W)
        got_hvp = so.hvp(res, V, Yd, W)
        got_db = so.double_backward(res, Ybar, W)
    finally:
        k._forced = None
    # the same kernels on the same values: bit for bit
    np.testing.assert_array_equal(got_jvp, loop_jvp(so, res, W))
    for g, r in zip(got_hvp, loop_hvp(so, res, V, Yd, W)):
        np.testing.assert_array_equal(g, r)
    ref_db = loop_double_backward(so, res, Ybar, W)
    np.testing.assert_array_equal(got_db[0], ref_db[0])
    # (the reference's last VJP may run the module's own scalar VJP: equal to rounding)
    np.testing.assert_allclose(got_db[1], ref_db[1], rtol=1e-14, atol=1e-14 * np.abs(ref_db[1]).max())
    np.testing.assert_array_equal(res.status, status)
    for a in (got_jvp, *got_hvp, *got_db):
        assert (a[failed] == 0.0).all() and np.isfinite(a).all()
    assert np.abs(got_db[1][~failed]).max() > 0
