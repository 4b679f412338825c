"""Custom forward passes (the paper's spectral matching: eigensolver forward, KKT backward)."""

import numpy as np
import pytest
import sympy as sp
import torch

import implicit_compiler as ic
from implicit_compiler import Status

N = 4


def leading_eigenvector(M):
    """Forward pass: the leading eigenvector of the symmetric part of each M (sign fixed)."""
    S = (M + np.swapaxes(M, 1, 2)) / 2
    _, V = np.linalg.eigh(S)
    v = V[:, :, -1]
    sign = np.sign(v[np.arange(len(v)), np.abs(v).argmax(axis=1)])
    return v * sign[:, None]


@pytest.fixture(scope="module")
def spectral_problem():
    y = sp.Matrix(sp.symbols(f"y0:{N}"))
    M = sp.Matrix(N, N, sp.symbols(f"M0:{N * N}"))
    return ic.Problem((y.T * M * y)[0], variables={"y": y}, params={"M": M},
                      equalities=[(y.T * y)[0] - 1], maximize=True, name="spectral_matching")


def test_eigen_forward_kkt_backward_matches_perturbation_theory(spectral_problem):
    layer = ic.compile(spectral_problem, forward=leading_eigenvector)
    rng = np.random.default_rng(0)
    M = torch.tensor(rng.standard_normal((3, N, N)), requires_grad=True)
    y, info = layer(M, return_info=True)
    assert info.converged.all()
    # reference: torch's eigh backward is first-order eigenvector perturbation theory,
    # dv = sum_{k != 1} u_k (u_k^T dS v) / (lambda_1 - lambda_k)
    M2 = M.detach().clone().requires_grad_()
    S = (M2 + M2.transpose(1, 2)) / 2
    _, V = torch.linalg.eigh(S)
    v = V[:, :, -1]
    idx = v.detach().abs().argmax(dim=1)
    v = v * torch.sign(v.detach()[torch.arange(3), idx])[:, None]
    torch.testing.assert_close(y, v, rtol=0, atol=1e-12)
    w = torch.tensor(rng.standard_normal((3, N)))
    (y * w).sum().backward()
    (v * w).sum().backward()
    torch.testing.assert_close(M.grad, M2.grad, rtol=1e-9, atol=1e-10)


def test_multipliers_recovered_by_least_squares(spectral_problem):
    layer = ic.compile(spectral_problem, forward=leading_eigenvector, return_multipliers=True)
    rng = np.random.default_rng(1)
    M = rng.standard_normal((2, N, N))
    y, lam = layer(torch.tensor(M))
    S = (M + M.transpose(0, 2, 1)) / 2
    # stationarity of -y^T M y + lam (y^T y - 1): lam = lambda_max(S)
    np.testing.assert_allclose(lam.numpy()[:, 0], np.linalg.eigvalsh(S)[:, -1], atol=1e-12)


def test_wrong_custom_forward_is_reported_not_returned(spectral_problem):
    def not_a_solution(M):
        return np.tile(np.eye(N)[0], (M.shape[0], 1))  # feasible, but not stationary in general

    layer = ic.compile(spectral_problem, forward=not_a_solution)
    res = layer.solve(np.random.default_rng(2).standard_normal((2, N, N)))
    assert (res.status == Status.NOT_OPTIMAL).all()
    with pytest.raises(ic.ConvergenceError, match="NOT_OPTIMAL"):
        layer(torch.tensor(np.random.default_rng(2).standard_normal((2, N, N))))


def test_custom_forward_with_wrong_shape_is_a_clear_error(spectral_problem):
    layer = ic.compile(spectral_problem, forward=lambda M: np.zeros((M.shape[0], N + 1)))
    with pytest.raises(ValueError, match=r"returned 5 values per sample; the problem has 4 variables"):
        layer.solve(np.zeros((1, N, N)))
