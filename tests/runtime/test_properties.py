"""Property tests: random well-conditioned linear systems A(theta) y = b(theta)."""

import numpy as np
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import implicit_compiler as ic

N = 3
_layer = None


def layer():
    global _layer
    if _layer is None:
        A = sp.Matrix(N, N, sp.symbols(f"a0:{N * N}"))
        b = sp.Matrix(sp.symbols(f"b0:{N}"))
        y = sp.Matrix(sp.symbols(f"y0:{N}"))
        # a mildly nonlinear term keeps Newton honest; it vanishes at the linear solution only if c = 0
        c = sp.Symbol("c")
        F = list(A * y - b + c * y.applyfunc(lambda t: t**3))
        _layer = ic.compile(ic.ResidualSystem(F, unknowns={"y": y}, params={"A": A, "b": b, "c": c}))
    return _layer


finite = st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (N, N), elements=finite), arrays(np.float64, (N,), elements=finite))
def test_linear_systems_match_numpy_and_closed_form_gradient(M, b):
    A = M + 4.0 * np.eye(N)  # diagonally dominant: well conditioned
    L = layer()
    At = torch.tensor(A, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    y = L(At, bt, torch.tensor(0.0, dtype=torch.float64))
    ref = np.linalg.solve(A, b)
    np.testing.assert_allclose(y.detach().numpy(), ref, atol=1e-12)
    w = np.arange(1.0, N + 1)
    (y * torch.tensor(w)).sum().backward()
    v = np.linalg.solve(A.T, w)  # bbar = A^{-T} w, Abar = -v y^T
    np.testing.assert_allclose(bt.grad.numpy(), v, atol=1e-11)
    np.testing.assert_allclose(At.grad.numpy(), -np.outer(v, ref), atol=1e-11)


@settings(max_examples=15, deadline=None)
@given(arrays(np.float64, (N, N), elements=finite), arrays(np.float64, (N,), elements=finite),
       st.floats(0.0, 0.5))
def test_nonlinear_residual_is_zero_and_gradcheck(M, b, c):
    A = M + 4.0 * np.eye(N)
    L = layer()
    res = L.solve(A[None], b[None], np.array([c]))
    assert res.converged.all()
    P = res.p
    np.testing.assert_allclose(L.kernels.residual(res.y, P), 0.0, atol=1e-10)
    At = torch.tensor(A, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    ct = torch.tensor(c, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, bb, cc: L(a, bb, cc), (At, bt, ct))
