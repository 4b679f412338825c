"""Fixed-point layers y = g(y, theta): plain, Anderson and Newton forward, same implicit backward."""

import numpy as np
import pytest
import sympy as sp
import torch
from scipy.optimize import brentq

import implicit_compiler as ic


@pytest.fixture(scope="module")
def cos_layer():
    y, t = sp.symbols("y t")
    return ic.compile(ic.FixedPoint(map=[sp.cos(t * y)], unknowns=[y], params=[t], method="anderson"))


@pytest.mark.parametrize("method", ["anderson", "picard", "newton"])
def test_cos_fixed_point_against_reference(cos_layer, method):
    cos_layer.configure(method=method, max_iter=200)
    ts = torch.tensor([[0.5], [0.8], [1.0]], dtype=torch.float64, requires_grad=True)
    y, info = cos_layer(ts, return_info=True)
    assert info.converged.all()
    for k, t in enumerate(ts.detach().numpy().ravel()):
        ref = brentq(lambda v, t=t: v - np.cos(t * v), 0.0, 1.0, xtol=1e-15)
        assert y[k, 0].item() == pytest.approx(ref, abs=1e-10)
    y.sum().backward()
    # dy/dt = -y sin(t y) / (1 + t sin(t y))
    yd, td = y.detach(), ts.detach()
    expected = -yd * torch.sin(td * yd) / (1 + td * torch.sin(td * yd))
    torch.testing.assert_close(ts.grad, expected, rtol=1e-8, atol=0)
    if method == "anderson":
        cos_layer.configure(method="picard")
        _, plain = cos_layer(ts, return_info=True)
        assert (info.iterations < plain.iterations).all()
    cos_layer.configure(method=None, max_iter=50)


def test_fixed_point_matches_residual_form():
    a, b = sp.symbols("a b")
    u, v = sp.symbols("u v")
    g = [0.5 * sp.cos(v) + a, 0.3 * sp.sin(u) + b * v / 4]
    fp = ic.compile(ic.FixedPoint(map=g, unknowns=[u, v], params=[a, b]))
    rs = ic.compile(ic.ResidualSystem([u - g[0], v - g[1]], unknowns=[u, v], params=[a, b]))
    th = torch.tensor([[0.2, 1.0], [1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    th2 = th.detach().clone().requires_grad_()
    y1, y2 = fp(th), rs(th2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-9)
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(th.grad, th2.grad, rtol=1e-7, atol=1e-9)
    assert torch.autograd.gradcheck(lambda t: fp(t), (th.detach().clone().requires_grad_(),))


def test_divergent_map_is_reported():
    y, t = sp.symbols("y t")
    layer = ic.compile(ic.FixedPoint(map=[t * y + 1], unknowns=[y], params=[t], method="picard"), max_iter=60)
    res = layer.solve(np.array([[3.0], [0.5]]))
    assert res.status[0] != ic.Status.CONVERGED  # |g'| = 3 > 1: plain iteration diverges
    assert res.status[1] == ic.Status.CONVERGED and res.y[1, 0] == pytest.approx(2.0, abs=1e-9)
