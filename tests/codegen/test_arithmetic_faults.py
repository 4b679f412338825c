"""Arithmetic faults (1/0, sqrt or log of a negative, 0 to a negative power) are per-sample
results: the kernels run with NumPy's error model, so the faulty sample gets status NONFINITE
and every other sample of the batch is solved, serially and on the prange drivers alike.
Compiling such a system never fails (warm-up evaluates the kernels at zero)."""

import numpy as np
import pytest
import sympy as sp
import torch

import implicit_compiler as ic
from implicit_compiler.runtime.status import CONVERGED, NONFINITE

a, b, c, d, e, s, t = sp.symbols("a b c d e s t")
BATCHES = [5000, 7]  # the large batch first: before any cost is measured it runs on the prange driver


@pytest.fixture(scope="module")
def scalar_layer():
    # n = 5: the per-system scalar Newton kernels
    u = sp.symbols("u0:5")
    system = ic.ResidualSystem([u[0] - 1 / a, u[1] - sp.sqrt(b), u[2] - sp.log(c), u[3] - d**-2, 1 / u[4] - e],
                               unknowns=list(u), params=[a, b, c, d, e], name="faults_scalar")
    return ic.compile(system)  # warm-up evaluates at zero: 1/0, log(0), 0**-2, 1/y at y = 0


def _scalar_reference(P):
    A, Bv, C, D, E = P.T
    with np.errstate(all="ignore"):  # the faulty samples' entries are not compared
        return np.stack([1 / A, np.sqrt(Bv), np.log(C), D**-2.0, 1 / E], axis=1)


def _scalar_inputs(B, rng):
    P = rng.uniform(0.6, 1.5, size=(B, 5))
    Y0 = np.ones((B, 5))
    faults = [(1, 0, 0.0), (3, 1, -2.0), (4, 2, 0.0), (6, 3, 0.0)]  # (sample, parameter, value)
    if B > 10:
        faults += [(B - 1, 2, -1.0), (B - 3, 0, -0.0)]
    for i, col, v in faults:
        P[i, col] = v
    Y0[5, 4] = 0.0  # 1/y at the initial guess y = 0
    return P, Y0, sorted(i for i, _, _ in faults) + [5]


@pytest.mark.parametrize("B", BATCHES)
def test_scalar_kernels_fault_per_sample(scalar_layer, B):
    P, Y0, bad = _scalar_inputs(B, np.random.default_rng(B))
    res = scalar_layer.solve(P, y0=Y0)
    expected = np.full(B, CONVERGED)
    expected[bad] = NONFINITE
    np.testing.assert_array_equal(res.status, expected)
    good = res.status == CONVERGED
    np.testing.assert_allclose(res.y[good], _scalar_reference(P)[good], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B", BATCHES)
def test_faulty_samples_get_nan_value_and_gradient_others_exact(scalar_layer, B):
    P, Y0, bad = _scalar_inputs(B, np.random.default_rng(100 + B))
    layer = ic.compile(scalar_layer.system, on_failure="nan")
    theta = torch.tensor(P, requires_grad=True)
    y = layer(theta, y0=torch.tensor(Y0))
    y.sum().backward()
    good = np.ones(B, dtype=bool)
    good[bad] = False
    assert np.isnan(y.detach().numpy()[~good]).all()
    np.testing.assert_allclose(y.detach().numpy()[good], _scalar_reference(P)[good], rtol=1e-12, atol=1e-12)
    A, Bv, C, D, E = P.T
    with np.errstate(all="ignore"):
        dref = [-1 / A**2, 0.5 / np.sqrt(Bv), 1 / C, -2 * D**-3.0, -1 / E**2]
    for j in range(5):
        g = theta.grad.numpy()[:, j]
        assert np.isnan(g[~good]).all()
        # the backward reuses the factorisation at the last iterate: exact to O(xtol)
        np.testing.assert_allclose(g[good], dref[j][good], rtol=1e-8)


def test_good_batch_after_faulty_batch(scalar_layer):
    # Nothing of a fault lingers: the next batch solves cleanly.
    P = np.array([[2.0, 4.0, np.e, 0.5, 4.0]])
    res = scalar_layer.solve(np.array([[0.0, -1.0, -1.0, 0.0, 1.0]]))
    assert res.status[0] == NONFINITE
    res = scalar_layer.solve(P, y0=np.ones((1, 5)))
    assert res.status[0] == CONVERGED
    np.testing.assert_allclose(res.y[0], [0.5, 2.0, 1.0, 4.0, 0.25], rtol=1e-14)


@pytest.fixture(scope="module")
def dense_layer():
    # n = 7 dense: the generic Newton driver (runtime.newton.newton_one) over inlined kernels
    y = sp.symbols("y0:7")
    total = sum(y)
    return ic.compile(ic.ResidualSystem([y[i] + total / 10 - (i + 1) / s - sp.sqrt(t) for i in range(7)],
                                        unknowns=list(y), params=[s, t], name="faults_dense"))


@pytest.mark.parametrize("B", BATCHES)
def test_dense_generic_driver_faults_per_sample(dense_layer, B):
    assert dense_layer.kernels.module.FACTORIZATION == "dense"
    rng = np.random.default_rng(7 + B)
    P = np.column_stack([rng.uniform(0.5, 2.0, B), rng.uniform(0.1, 3.0, B)])
    bad = [0, 2, B - 2]
    P[0, 0] = 0.0
    P[2, 1] = -1e-3
    P[B - 2] = [-0.0, -4.0]
    res = dense_layer.solve(P)
    expected = np.full(B, CONVERGED)
    expected[bad] = NONFINITE
    np.testing.assert_array_equal(res.status, expected)
    A = np.eye(7) + 0.1
    with np.errstate(all="ignore"):
        rhs = np.arange(1, 8)[None, :] / P[:, :1] + np.sqrt(P[:, 1:])
    ref = np.linalg.solve(A, rhs.T).T
    good = res.status == CONVERGED
    np.testing.assert_allclose(res.y[good], ref[good], rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def sparse_layer():
    # n = 14 chain: sparse elimination over index arrays, building blocks compiled separately
    y = sp.symbols("y0:14")
    res = [y[0] - 1 / s] + [y[i] - y[i - 1] / 2 - sp.sqrt(t) for i in range(1, 14)]
    return ic.compile(ic.ResidualSystem(res, unknowns=list(y), params=[s, t], name="faults_sparse"))


@pytest.mark.parametrize("B", BATCHES)
def test_sparse_large_system_faults_per_sample(sparse_layer, B):
    assert sparse_layer.kernels.module.FACTORIZATION == "sparse"
    rng = np.random.default_rng(B)
    P = np.column_stack([rng.uniform(0.5, 2.0, B), rng.uniform(0.1, 3.0, B)])
    bad = [1, 4, B - 1]
    P[1, 0] = 0.0
    P[4, 1] = -2.0
    P[B - 1, 1] = -1e-300
    res = sparse_layer.solve(P)
    expected = np.full(B, CONVERGED)
    expected[bad] = NONFINITE
    np.testing.assert_array_equal(res.status, expected)
    ref = np.empty((B, 14))
    with np.errstate(all="ignore"):
        ref[:, 0] = 1 / P[:, 0]
        for i in range(1, 14):
            ref[:, i] = ref[:, i - 1] / 2 + np.sqrt(P[:, 1])
    good = res.status == CONVERGED
    np.testing.assert_allclose(res.y[good], ref[good], rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def fixed_point_system():
    y = sp.Symbol("y")
    return ic.FixedPoint([y / 2 + 1 / s + sp.log(t)], unknowns=[y], params=[s, t], name="faults_fixed_point")


@pytest.mark.parametrize("method", ["anderson", "picard"])
@pytest.mark.parametrize("B", BATCHES)
def test_fixed_point_faults_per_sample(fixed_point_system, method, B):
    layer = ic.compile(fixed_point_system, method=method, max_iter=200, tol=1e-13, rtol=1e-14)
    rng = np.random.default_rng(3 + B)
    P = np.column_stack([rng.uniform(0.5, 2.0, B), rng.uniform(0.5, 2.0, B)])
    bad = [0, 3, B - 1]
    P[0, 0] = 0.0
    P[3, 1] = 0.0
    P[B - 1, 1] = -1.0
    res = layer.solve(P)
    expected = np.full(B, CONVERGED)
    expected[bad] = NONFINITE
    np.testing.assert_array_equal(res.status, expected)
    good = res.status == CONVERGED
    with np.errstate(all="ignore"):
        ref = 2 * (1 / P[:, 0] + np.log(P[:, 1]))
    np.testing.assert_allclose(res.y[good, 0], ref[good], rtol=1e-12, atol=1e-12)
