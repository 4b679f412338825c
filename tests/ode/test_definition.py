"""ic.ODE validation and the integrators' tableaus (no code generated)."""

import numpy as np
import pytest
import sympy as sp

import implicit_compiler as ic
from implicit_compiler.errors import InputError, SystemDefinitionError
from implicit_compiler.runtime.ode_tableaus import TABLEAUS
from implicit_compiler.torch.ode_layer import ODEOptions

x, y, k, t, z = sp.symbols("x y k t z")


@pytest.mark.parametrize("kwargs, match", [
    (dict(rhs=[-k * x], state=[x, y], params=[k]), r"1 right-hand sides but 2 state symbols \(x, y\)"),
    (dict(rhs=[-k * x, t], state=[x, t], params=[k], time=t), r"time symbol t is also listed as a state"),
    (dict(rhs=[-k * x], state=[x], params=[k, t], time=t), r"time symbol t is also listed as a parameter"),
    (dict(rhs=[-k * x * z], state=[x], params=[k], time=t), r"rhs 0 \(dx/dt = -k\*x\*z\) uses symbol\(s\) z"),
    (dict(rhs=[-k * x * t], state=[x], params=[k]), r"uses symbol\(s\) t .*pass it as time="),
    (dict(rhs=[sp.I * x], state=[x]), r"in rhs 0 \(dx/dt\).*complex-valued"),
    (dict(rhs=[sp.Function("g")(x)], state=[x]), r"undefined function g\(x\)"),
    (dict(rhs=[x], state=[x], params=[k, k]), r"k listed more than once in params"),
    (dict(rhs=[x], state=[x], params=[x]), r"x declared both as state and as parameter"),
    (dict(rhs=[x * sp.Symbol("w", real=False)], state=[x], params=[sp.Symbol("w", real=False)]), r"non-real"),
    (dict(rhs=[x], state=[x], time=x + 1), r"time must be a sympy Symbol"),
    (dict(rhs=[x], state=[x], params={"_time": k}), r"reserved for the time"),
])
def test_bad_definitions_name_the_fault(kwargs, match):
    with pytest.raises(SystemDefinitionError, match=match):
        ic.ODE(**kwargs)


def test_state_independent_rhs_is_accepted():
    # df/dx singular (dx/dt = k): no structural check as for residual systems
    ode = ic.ODE([k], [x], [k])
    assert ode.jacobian_state == sp.Matrix([[0]])


@pytest.mark.parametrize("options, match", [
    (dict(method="rk4"), r"ODE method must be one of"),
    (dict(method="backward_euler"), r"give the step size dt="),
    (dict(method="radau5", dt=0.1), r"dt= is the step of the fixed-step methods"),
    (dict(method="trapezoid", dt=0.1, h0=0.1), r"h0= is the first step of the adaptive methods"),
    (dict(rtol=-1.0), r"rtol must be a finite number > 0"),
    (dict(max_steps=0), r"max_steps must be an int >= 1"),
    (dict(on_failure="ignore"), r"on_failure must be one of"),
    (dict(tol=1e-3), r"unknown ODE option\(s\) \['tol'\]"),
])
def test_bad_options(options, match):
    with pytest.raises(InputError, match=match):
        ODEOptions.from_kwargs(**options)


def _order_conditions(A, b, c):
    """Residuals of the Runge-Kutta order conditions up to order 5 (Butcher trees)."""
    Ac = A @ c
    out = {1: [b.sum() - 1], 2: [b @ c - 1 / 2], 3: [b @ c**2 - 1 / 3, b @ Ac - 1 / 6],
           4: [b @ c**3 - 1 / 4, b @ (c * Ac) - 1 / 8, b @ (A @ c**2) - 1 / 12, b @ (A @ Ac) - 1 / 24],
           5: [b @ c**4 - 1 / 5, b @ (c**2 * Ac) - 1 / 10, b @ (c * (A @ c**2)) - 1 / 15,
               b @ (c * (A @ Ac)) - 1 / 30, b @ Ac**2 - 1 / 20, b @ (A @ c**3) - 1 / 20,
               b @ (A @ (c * Ac)) - 1 / 40, b @ (A @ (A @ c**2)) - 1 / 60, b @ (A @ (A @ Ac)) - 1 / 120]}
    return out


@pytest.mark.parametrize("name", list(TABLEAUS))
def test_tableaus_have_their_order_and_are_stiffly_accurate(name):
    tb = TABLEAUS[name]
    A, c = tb.A, tb.c
    np.testing.assert_allclose(A.sum(axis=1), c, atol=1e-14)
    conds = _order_conditions(A, tb.b, c)
    for p in range(1, tb.order + 1):
        np.testing.assert_allclose(conds[p], 0, atol=1e-12, err_msg=f"order {p}")
    if tb.order < 5:
        assert max(abs(v) for v in conds[tb.order + 1]) > 1e-6  # and not more
    if tb.err_kind == 1:  # dopri5: the embedded solution has order 4
        bhat = tb.b - tb.e
        for p in range(1, 5):
            np.testing.assert_allclose(_order_conditions(A, bhat, c)[p], 0, atol=1e-12)
    if tb.err_kind == 2:  # ESDIRK: the embedded solution (stage err_row) has order 3
        bhat = A[tb.err_row]
        for p in range(1, 4):
            np.testing.assert_allclose(_order_conditions(A, bhat, c)[p], 0, atol=1e-12)


def test_radau_stability_is_l_stable():
    tb = TABLEAUS["radau5"]
    s = tb.stages
    for z_ in (-1e8, -1e4):
        R = 1 + z_ * tb.b @ np.linalg.solve(np.eye(s) - z_ * tb.A, np.ones(s))
        assert abs(R) < 1e-3


def test_structurally_singular_rhs_compiles_and_integrates():
    # dx/dt = v, dv/dt = -g: df/dx has no structural diagonal (the generated residuals get a zero shift)
    import torch

    g, v = sp.symbols("g v")
    ode = ic.ODE([v, -g], [x, v], [g], name="projectile")
    layer = ic.compile(ode, method="trapezoid", dt=0.25)
    x0 = torch.tensor([0.0, 3.0], dtype=torch.float64, requires_grad=True)
    gg = torch.tensor([9.81], dtype=torch.float64, requires_grad=True)
    te = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    out = layer(x0, gg, t_eval=te)
    exact = torch.stack([3.0 * te - 0.5 * 9.81 * te**2, 3.0 - 9.81 * te], dim=1)
    torch.testing.assert_close(out, exact.to(torch.float64), rtol=0, atol=1e-12)  # trapezoid is exact here
    out[-1, 0].backward()
    torch.testing.assert_close(x0.grad, torch.tensor([1.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(gg.grad, torch.tensor([-0.5], dtype=torch.float64), rtol=0, atol=1e-12)
