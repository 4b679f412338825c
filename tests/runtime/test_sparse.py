"""Bratu: the fixed-order sparse elimination (tridiagonal dF/dy) against dense LU, and its pivot fallback."""

import numpy as np
import pytest
import sympy as sp
import torch

import implicit_compiler as ic


def bratu(n=20):
    y = sp.symbols(f"y0:{n}")
    lam = sp.Symbol("lam")
    h = sp.Rational(1, n + 1)
    F = []
    for i in range(n):
        left = y[i - 1] if i > 0 else 0
        right = y[i + 1] if i < n - 1 else 0
        F.append((left - 2 * y[i] + right) / h**2 + lam * sp.exp(y[i]))
    return ic.ResidualSystem(F, unknowns=list(y), params={"lam": lam}, name=f"bratu{n}")


@pytest.fixture(scope="module")
def bratu_layer():
    return ic.compile(bratu())


def test_sparse_factorisation_is_chosen(bratu_layer):
    d = bratu_layer.system.derivation
    assert d.factorization == "sparse"
    assert d.fill.sum() == d.pattern_unknowns.sum()  # tridiagonal: no fill-in
    # 20 unknowns: the runtime's fill-pattern elimination, its pattern in the module's table
    assert "_driver('pattern_factor')" in bratu_layer.source and "LCOL pointers" in bratu_layer.source


def _dense_reference(lam, n=20, iters=30):
    """Newton with numpy dense solves."""
    h = 1.0 / (n + 1)
    y = np.zeros(n)
    for _ in range(iters):
        yp = np.concatenate([[0.0], y, [0.0]])
        F = (yp[:-2] - 2 * y + yp[2:]) / h**2 + lam * np.exp(y)
        J = (np.diag(-2 * np.ones(n)) + np.diag(np.ones(n - 1), 1) + np.diag(np.ones(n - 1), -1)) / h**2
        J += np.diag(lam * np.exp(y))
        y = y - np.linalg.solve(J, F)
    A = J
    return y, A


def test_bratu_solution_and_gradient(bratu_layer):
    lam = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    y = bratu_layer(lam)
    for k in range(3):
        ref, J = _dense_reference(lam[k].item())
        np.testing.assert_allclose(y[k].detach().numpy(), ref, atol=1e-11)
    w = torch.linspace(0, 1, 20, dtype=torch.float64)
    (y * w).sum().backward()
    for k in range(3):
        ref, J = _dense_reference(lam[k].item())
        # dy/dlam = -J^{-1} exp(y)
        dy = -np.linalg.solve(J, np.exp(ref))
        assert lam.grad[k].item() == pytest.approx(float(w.numpy() @ dy), rel=1e-9)


def test_pivot_check_falls_back_to_dense():
    # A tridiagonal system whose (0, 0) entry vanishes at the solution path start:
    # fixed-order elimination must reject the zero pivot and dense LU must take over.
    n = 9
    y = sp.symbols(f"y0:{n}")
    a = sp.Symbol("a")
    F = [y[0] * y[0] * a + y[1] - 1]  # dF0/dy0 = 2 a y0 = 0 at y0 = 0
    for i in range(1, n - 1):
        F.append(y[i - 1] + 3 * y[i] + y[i + 1] - a)
    F.append(y[n - 2] + 3 * y[n - 1] - a)
    layer = ic.compile(ic.ResidualSystem(F, unknowns=list(y), params=[a]))
    assert layer.system.derivation.factorization == "sparse"
    res = layer.solve(np.array([[1.0]]), y0=np.zeros(n))
    assert res.status[0] == ic.Status.CONVERGED
    np.testing.assert_allclose(layer.kernels.residual(res.y, np.array([[1.0]])), 0, atol=1e-10)
    th = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t, y0=torch.zeros(n, dtype=torch.float64)), (th,))
