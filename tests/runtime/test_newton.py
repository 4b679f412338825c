"""Forward solves and implicit gradients against closed forms and finite differences;
failure statuses and policies."""

import math

import numpy as np
import pytest
import sympy as sp
import torch
from scipy.optimize import brentq

import implicit_compiler as ic
from implicit_compiler import Status
from implicit_compiler.errors import ConvergenceError


def test_sin_root_derivative_is_minus_one():
    y, w = sp.symbols("y w")
    layer = ic.compile(ic.ResidualSystem([sp.sin(y + w)], unknowns=[y], params=[w]))
    ws = torch.tensor([[0.1], [0.3], [-0.2]], dtype=torch.float64, requires_grad=True)
    out = layer(ws)  # y0 = 0: the root y = -w
    torch.testing.assert_close(out, -ws.detach(), rtol=0, atol=1e-12)
    out.sum().backward()
    torch.testing.assert_close(ws.grad, -torch.ones_like(ws), rtol=0, atol=1e-12)


def test_kepler_equation_closed_form_derivatives():
    # E - e sin E = M;  dE/dM = 1 / (1 - e cos E),  dE/de = sin E / (1 - e cos E)
    E, M, e = sp.symbols("E M e")
    layer = ic.compile(ic.ResidualSystem([E - e * sp.sin(E) - M], unknowns={"E": E}, params={"M": M, "e": e}))
    Ms = torch.tensor([0.3, 1.0, 2.5, 3.0], dtype=torch.float64, requires_grad=True)
    es = torch.tensor([0.1, 0.5, 0.9, 0.7], dtype=torch.float64, requires_grad=True)
    Es = layer(Ms, es, y0={"E": Ms.detach()})
    for k in range(4):
        ek, Mk = es[k].item(), Ms[k].item()
        ref = brentq(lambda t, ek=ek, Mk=Mk: t - ek * math.sin(t) - Mk, -10, 10, xtol=1e-15)
        assert Es[k].item() == pytest.approx(ref, abs=1e-12)
    Es.sum().backward()
    Ed = Es.detach()
    denom = 1 - es.detach() * torch.cos(Ed)
    torch.testing.assert_close(Ms.grad, 1 / denom, rtol=1e-11, atol=0)
    torch.testing.assert_close(es.grad, torch.sin(Ed) / denom, rtol=1e-11, atol=0)


def test_three_unknowns_against_finite_differences():
    a, b, c = sp.symbols("a b c")
    u, v, w = sp.symbols("u v w")
    F = [u + v * w - a, u**2 - v + sp.exp(w) - b, sp.sin(u) + v**3 + w - c * a]
    layer = ic.compile(ic.ResidualSystem(F, unknowns=[u, v, w], params=[a, b, c]))
    theta = torch.tensor([[1.0, 2.0, 0.5], [0.8, 1.5, 0.3]], dtype=torch.float64)
    y0 = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    res = layer.solve(theta.numpy(), y0=y0.numpy())
    assert res.converged.all()
    # implicit Jacobian column by column via central finite differences of the solve
    h = 1e-6
    for j in range(3):
        tp, tm = theta.clone(), theta.clone()
        tp[:, j] += h
        tm[:, j] -= h
        fd = (layer.solve(tp.numpy(), y0=res.y).y - layer.solve(tm.numpy(), y0=res.y).y) / (2 * h)
        for i in range(3):
            th = theta.clone().requires_grad_()
            out = layer(th, y0=torch.from_numpy(res.y))
            out[:, i].sum().backward()
            np.testing.assert_allclose(th.grad[:, j].numpy(), fd[:, i], rtol=1e-6, atol=1e-8)
    th = theta.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: layer(t, y0=torch.from_numpy(res.y)), (th,))


def _failing_layers():
    x, y = sp.symbols("x y")
    no_root = ic.compile(ic.ResidualSystem([y**2 + 1 + x], unknowns=[y], params=[x]))
    degenerate = ic.compile(ic.ResidualSystem([y**2 - x], unknowns=[y], params=[x]))
    return no_root, degenerate


def test_no_real_root_is_reported_not_returned():
    no_root, _ = _failing_layers()
    xs = torch.tensor([[0.0], [-2.0], [1.0]], dtype=torch.float64)  # x = -2: y = +-1 exists
    with pytest.raises(ConvergenceError, match=r"2 of 3 samples did not converge") as err:
        no_root(xs, y0=torch.tensor([1.0], dtype=torch.float64))
    assert err.value.failed.tolist() == [0, 2]
    assert "samples [0]" in str(err.value) and "samples [2]" in str(err.value)
    res = no_root.solve(xs.numpy(), y0=np.array([1.0]))
    assert res.status[1] == Status.CONVERGED
    assert res.status[0] in (Status.LINE_SEARCH_FAILED, Status.SINGULAR_JACOBIAN, Status.MAX_ITERATIONS)


def test_singular_jacobian_at_solution_is_detected():
    _, degenerate = _failing_layers()
    res = degenerate.solve(np.array([[0.0], [4.0]]), y0=np.array([1.0]))
    assert res.status[0] == Status.SINGULAR_AT_SOLUTION
    assert res.status[1] == Status.CONVERGED and res.y[1, 0] == pytest.approx(2.0, abs=1e-12)
    xs = torch.tensor([[0.0], [4.0]], dtype=torch.float64, requires_grad=True)
    with pytest.raises(ConvergenceError, match="SINGULAR_AT_SOLUTION"):
        degenerate(xs, y0=torch.tensor([1.0], dtype=torch.float64))


def test_failure_policies_nan_and_keep():
    no_root, _ = _failing_layers()
    xs = torch.tensor([[0.0], [-4.0]], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0], dtype=torch.float64)
    no_root.configure(on_failure="nan")
    try:
        y, info = no_root(xs, y0=y0, return_info=True)
        assert torch.isnan(y[0]).all() and y[1].item() == pytest.approx(math.sqrt(3), abs=1e-12)
        assert info.status.tolist()[1] == 0 and info.status.tolist()[0] != 0
        y.sum().backward()
        assert torch.isnan(xs.grad[0]).all()
        # dy/dx = -1/(2y)
        assert xs.grad[1].item() == pytest.approx(-1 / (2 * math.sqrt(3)), rel=1e-10)
        xs.grad = None
        no_root.configure(on_failure="keep")
        y = no_root(xs, y0=y0)
        assert torch.isfinite(y).all()
        y.sum().backward()
        assert xs.grad[0].item() == 0.0
    finally:
        no_root.configure(on_failure="raise")


def test_nonfinite_parameter_is_a_failed_sample(appendix_layer):
    xs = torch.tensor([[1.0], [float("nan")], [float("inf")]], dtype=torch.float64)
    res = appendix_layer.solve(xs.numpy(), y0=np.array([1.0, 1.5]))
    assert res.status.tolist() == [Status.CONVERGED, Status.NONFINITE, Status.NONFINITE]
    with pytest.raises(ConvergenceError, match="NONFINITE"):
        appendix_layer(xs, y0=torch.tensor([1.0, 1.5]))


def test_max_iterations_status():
    x, y = sp.symbols("x y")
    layer = ic.compile(ic.ResidualSystem([sp.atan(y) - x], unknowns=[y], params=[x]), max_iter=2)
    res = layer.solve(np.array([[1.4]]), y0=np.array([0.0]))
    assert res.status[0] == Status.MAX_ITERATIONS and res.iterations[0] == 2
    layer.configure(max_iter=50)
    res = layer.solve(np.array([[1.4]]), y0=np.array([0.0]))
    assert res.status[0] == Status.CONVERGED and res.y[0, 0] == pytest.approx(math.tan(1.4), rel=1e-12)


def test_status_messages_say_what_to_do():
    for s in Status:
        if s is not Status.CONVERGED:
            assert len(s.message) > 30
    assert "y0" in Status.MAX_ITERATIONS.message
