"""Non-quadratic optimization layers: closed forms, finite differences, failures, weak activity."""

import warnings

import numpy as np
import pytest
import sympy as sp
import torch

import implicit_compiler as ic
from implicit_compiler import Status
from implicit_compiler.errors import ConvergenceError, SystemDefinitionError


def _fd_jacobian(layer, P, h=1e-6):
    """Central differences of the solution (variables only) w.r.t. each flat parameter."""
    nv = layer.kernels.nv
    base = layer.kernels.solve(P, np.tile(layer._default_y0, (P.shape[0], 1)), layer.options)
    cols = []
    for j in range(P.shape[1]):
        Pp, Pm = P.copy(), P.copy()
        Pp[:, j] += h
        Pm[:, j] -= h
        yp = layer.kernels.solve(Pp, base.y[:, :nv].copy(), layer.options).y[:, :nv]
        ym = layer.kernels.solve(Pm, base.y[:, :nv].copy(), layer.options).y[:, :nv]
        cols.append((yp - ym) / (2 * h))
    return base, np.stack(cols, axis=-1)  # (B, nv, m)


def test_projection_onto_sphere_closed_form():
    # argmin ||y - a||^2 s.t. ||y||^2 = r^2  ->  y = r a / ||a||
    a = sp.Matrix(sp.symbols("a0:3"))
    r = sp.Symbol("r")
    y = sp.Matrix(sp.symbols("y0:3"))
    p = ic.Problem(((y - a).T * (y - a))[0], variables={"y": y}, params={"a": a, "r": r},
                   equalities=[sp.Eq((y.T * y)[0], r**2)])
    layer = ic.compile(p)
    at = torch.tensor([[1.0, 2.0, 2.0], [0.5, -1.0, 0.3]], dtype=torch.float64, requires_grad=True)
    rt = torch.tensor([2.0, 1.5], dtype=torch.float64, requires_grad=True)
    yy = layer(at, rt, y0=torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64))
    a2 = at.detach().clone().requires_grad_()
    r2 = rt.detach().clone().requires_grad_()
    ref = r2[:, None] * a2 / a2.norm(dim=1, keepdim=True)
    torch.testing.assert_close(yy, ref, rtol=0, atol=1e-10)
    w = torch.tensor([[1.0, -1.0, 0.5], [0.2, 0.3, -2.0]], dtype=torch.float64)
    (yy * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(at.grad, a2.grad, rtol=0, atol=1e-9)
    torch.testing.assert_close(rt.grad, r2.grad, rtol=0, atol=1e-9)


def test_unconstrained_logistic_argmin_against_finite_differences():
    k = 5
    X = sp.Matrix(k, 2, sp.symbols(f"x0:{2 * k}"))
    t = sp.Matrix(sp.symbols(f"t0:{k}"))
    lam = sp.Symbol("lam")
    w = sp.Matrix(sp.symbols("w0:2"))
    loss = sum(sp.log(1 + sp.exp(-t[i] * (X[i, :] * w)[0])) for i in range(k)) + lam / 2 * (w.T * w)[0]
    layer = ic.compile(ic.Problem(loss, variables={"w": w}, params={"X": X, "t": t, "lam": lam}))
    rng = np.random.default_rng(3)
    P = np.concatenate([rng.standard_normal(2 * k), np.sign(rng.standard_normal(k)), [0.7]])[None]
    base, fd = _fd_jacobian(layer, P)
    assert base.status[0] == Status.CONVERGED
    Xt = torch.tensor(P[0, :2 * k].reshape(k, 2), requires_grad=True)
    tt = torch.tensor(P[0, 2 * k:3 * k], requires_grad=True)
    lt = torch.tensor(P[0, -1], requires_grad=True)
    for i in range(2):
        out = layer(Xt, tt, lt)
        grads = torch.autograd.grad(out[i], (Xt, tt, lt))
        flat = torch.cat([g.reshape(-1) for g in grads]).numpy()
        np.testing.assert_allclose(flat, fd[0, i], rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def nonconvex_layer():
    # double-well in y1, pulled by theta; y1 <= c (active when c is small), y2 >= -5 (inactive)
    y1, y2 = sp.symbols("y1 y2")
    th, c = sp.symbols("theta c")
    f = (y1**2 - 1) ** 2 + (y2 - th * y1) ** 2 - th * y1
    p = ic.Problem(f, variables=[y1, y2], params={"theta": th, "c": c}, inequalities=[y1 <= c, y2 >= -5],
                   initial_guess={y1: 0.5, y2: 0.0})
    return ic.compile(p)


def test_nonconvex_active_and_inactive_against_finite_differences(nonconvex_layer):
    P = np.array([[0.3, 0.6], [0.3, 3.0]])  # first: y1 <= 0.6 active; second: inactive
    base, fd = _fd_jacobian(nonconvex_layer, P)
    assert (base.status == Status.CONVERGED).all()
    y = base.y[:, :2]
    assert y[0, 0] == pytest.approx(0.6, abs=1e-9)
    assert y[1, 0] > 0.9  # the right-hand well's minimum, not the constraint
    assert base.y[0, 2] > 1e-3 and base.y[1, 2] == 0.0  # nu for y1 <= c: active / inactive
    th = torch.tensor(P[:, 0], requires_grad=True)
    ct = torch.tensor(P[:, 1], requires_grad=True)
    for i in range(2):
        out = nonconvex_layer(th, ct, y0=torch.tensor([0.5, 0.0], dtype=torch.float64))
        gth, gc = torch.autograd.grad(out[:, i].sum(), (th, ct))
        np.testing.assert_allclose(gth.numpy(), fd[:, i, 0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(gc.numpy(), fd[:, i, 1], rtol=1e-5, atol=1e-7)
    # at the active sample dy1/dc = 1 exactly; at the inactive one 0
    assert fd[0, 0, 1] == pytest.approx(1.0, abs=1e-6)
    assert abs(fd[1, 0, 1]) < 1e-6


def test_weakly_active_constraint_is_treated_as_inactive_with_warning():
    y, t = sp.symbols("y t")
    layer = ic.compile(ic.Problem((y - t) ** 2, variables=[y], params=[t], inequalities=[y <= 0]))
    ts = torch.tensor([[0.0], [-1.0]], dtype=torch.float64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=r"1 sample\(s\) \(0\) have weakly active"):
        out = layer(ts)
    out.sum().backward()
    torch.testing.assert_close(ts.grad, torch.ones_like(ts))  # dy/dt = 1 (inactive rule)
    assert torch.isfinite(ts.grad).all()
    quiet = ic.compile(layer.system, warn_weakly_active=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet(ts)
    assert quiet.solve(ts.detach().numpy()).weakly_active.tolist() == [1, 0]


def test_infeasible_instance_is_reported():
    y, a = sp.symbols("y a")
    layer = ic.compile(ic.Problem(y**2, variables=[y], params=[a], inequalities=[y <= a - 1, y >= a + 1]))
    res = layer.solve(np.array([[0.0]]))
    assert res.status[0] == Status.INFEASIBLE
    with pytest.raises(ConvergenceError, match="INFEASIBLE"):
        layer(torch.tensor([[0.0]], dtype=torch.float64))


def test_unbounded_instance_is_reported():
    y, a = sp.symbols("y a")
    layer = ic.compile(ic.Problem(-a * y, variables=[y], params=[a], inequalities=[y >= 0]))
    res = layer.solve(np.array([[1.0], [-1.0]]))
    # the merit stalls while y runs off: reported as a failure, never as a solution
    assert res.status[0] in (Status.UNBOUNDED, Status.LINE_SEARCH_FAILED, Status.MAX_ITERATIONS)
    assert res.status[1] == Status.CONVERGED and abs(res.y[1, 0]) < 1e-8


def test_greater_equal_is_normalised():
    y, a = sp.symbols("y a")
    p = ic.Problem(y**2, variables=[y], params=[a], inequalities=[y >= a, 2 * y <= 3])
    assert sp.simplify(p.inequalities[0] - (a - y)) == 0
    assert sp.simplify(p.inequalities[1] - (2 * y - 3)) == 0
    layer = ic.compile(p)
    res = layer.solve(np.array([[1.0], [-1.0]]))
    np.testing.assert_allclose(res.y[:, 0], [1.0, 0.0], atol=1e-9)


def test_bad_problem_definitions():
    y, a, z = sp.symbols("y a z")
    with pytest.raises(SystemDefinitionError, match="objective is a 2x1 Matrix"):
        ic.Problem(sp.Matrix([y, y]), variables=[y], params=[a])
    with pytest.raises(SystemDefinitionError, match=r"inequality constraint 0 \(.*\) uses symbol\(s\) z"):
        ic.Problem(y**2, variables=[y], params=[a], inequalities=[y <= z])
    with pytest.raises(SystemDefinitionError, match="is an inequality; put it in inequalities"):
        ic.Problem(y**2, variables=[y], params=[a], equalities=[y <= a])
    with pytest.raises(SystemDefinitionError, match="declared both as variable and as parameter"):
        ic.Problem(y**2, variables=[y], params=[y])


def test_maximize_and_multiplier_names_do_not_clash():
    y, nu0 = sp.symbols("y nu0")
    p = ic.Problem(-(y - nu0) ** 2, variables=[y], params=[nu0], inequalities=[y <= 0.5], maximize=True)
    assert str(p.nu[0]) != "nu0"
    layer = ic.compile(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = layer.solve(np.array([[2.0], [0.1]]))
    np.testing.assert_allclose(res.y[:, 0], [0.5, 0.1], atol=1e-9)
