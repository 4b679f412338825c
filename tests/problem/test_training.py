"""Optimization layers train inside PyTorch models: the loss decreases over optimiser steps."""

import numpy as np
import sympy as sp
import torch

import implicit_compiler as ic


def _train(layer_fn, params, steps=30, lr=0.05):
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = layer_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_qp_layer_trains():
    n = 3
    y = sp.Matrix(sp.symbols(f"y0:{n}"))
    q = sp.Matrix(sp.symbols(f"q0:{n}"))
    h = sp.Matrix(sp.symbols(f"h0:{n}"))
    layer = ic.compile(ic.Problem((y.T * y)[0] / 2 + (q.T * y)[0], variables={"y": y}, params={"q": q, "h": h},
                                  inequalities=list(y - h)))
    target = torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64).repeat(8, 1)
    x = torch.randn(8, 4, dtype=torch.float64)
    net = torch.nn.Linear(4, n, dtype=torch.float64)
    hh = torch.full((n,), 0.25, dtype=torch.float64)
    losses = _train(lambda: ((layer(net(x), hh) - target) ** 2).mean(), list(net.parameters()))
    assert losses[-1] < 0.2 * losses[0]


def test_equality_constrained_layer_trains():
    y = sp.Matrix(sp.symbols("y0:3"))
    a = sp.Matrix(sp.symbols("a0:3"))
    layer = ic.compile(ic.Problem(((y - a).T * (y - a))[0], variables={"y": y}, params={"a": a},
                                  equalities=[(y.T * y)[0] - 1]))
    a_param = torch.nn.Parameter(torch.tensor([1.0, 0.2, 0.1], dtype=torch.float64))
    target = torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64)
    y0 = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    losses = _train(lambda: ((layer(a_param, y0=y0) - target) ** 2).sum(), [a_param], lr=0.1)
    assert losses[-1] < 0.05 * losses[0]


def test_nonconvex_inequality_layer_trains():
    y1, y2, th, c = sp.symbols("y1 y2 theta c")
    f = (y1**2 - 1) ** 2 + (y2 - th * y1) ** 2 - th * y1
    layer = ic.compile(ic.Problem(f, variables=[y1, y2], params={"theta": th, "c": c},
                                  inequalities=[y1 <= c, y2 >= -5], initial_guess={y1: 0.5, y2: 0.0}))
    theta = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    cs = torch.tensor([0.6, 0.8, 3.0], dtype=torch.float64)
    target = torch.tensor([0.4, 0.45, 0.5], dtype=torch.float64)  # y2 values
    losses = _train(lambda: ((layer(theta, cs)[:, 1] - target) ** 2).sum(), [theta], lr=0.02)
    assert losses[-1] < 0.5 * losses[0]


def test_custom_eigen_layer_trains():
    from tests.problem.test_custom_forward import N, leading_eigenvector

    y = sp.Matrix(sp.symbols(f"y0:{N}"))
    M = sp.Matrix(N, N, sp.symbols(f"M0:{N * N}"))
    layer = ic.compile(ic.Problem((y.T * M * y)[0], variables={"y": y}, params={"M": M},
                                  equalities=[(y.T * y)[0] - 1], maximize=True), forward=leading_eigenvector)
    rng = np.random.default_rng(0)
    Mp = torch.nn.Parameter(torch.tensor(rng.standard_normal((N, N))))
    target = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    losses = _train(lambda: ((layer(Mp) - target) ** 2).sum(), [Mp], lr=0.05)
    assert losses[-1] < 0.5 * losses[0]
