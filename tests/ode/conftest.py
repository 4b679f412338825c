"""Systems shared by the ODE tests (one generated module each; every method runs on it)."""

import pytest
import sympy as sp

import implicit_compiler as ic

t = sp.Symbol("t")


@pytest.fixture(scope="session")
def decay():
    x, k = sp.symbols("x k")
    return ic.ODE([-k * x], [x], [k], time=t, name="decay")


@pytest.fixture(scope="session")
def oscillator():
    q, p, w = sp.symbols("q p w")
    return ic.ODE([w * p, -w * q], [q, p], {"w": w}, time=t, name="oscillator")


@pytest.fixture(scope="session")
def forced_linear():
    """dx/dt = A x + b sin(t): A a 2x2 group, b a vector group."""
    x1, x2 = sp.symbols("x1 x2")
    A = sp.Matrix(2, 2, sp.symbols("a11 a12 a21 a22"))
    b = sp.Matrix(sp.symbols("b1 b2"))
    rhs = A * sp.Matrix([x1, x2]) + b * sp.sin(t)
    return ic.ODE(list(rhs), [x1, x2], {"A": A, "b": b}, time=t, name="forced_linear")


@pytest.fixture(scope="session")
def vdp():
    u, v, mu = sp.symbols("u v mu")
    return ic.ODE([v, mu * (1 - u**2) * v - u], [u, v], [mu], time=t, name="vdp")


@pytest.fixture(scope="session")
def robertson():
    y1, y2, y3 = sp.symbols("y1 y2 y3")
    k1, k2, k3 = sp.symbols("k1 k2 k3")
    return ic.ODE([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k2 * y2**2 - k3 * y2 * y3, k2 * y2**2],
                  [y1, y2, y3], {"k": [k1, k2, k3]}, time=t, name="robertson")


@pytest.fixture(scope="session")
def quadratic():
    """dx/dt = c x^2: blows up at t = 1 / (c x0) for c x0 > 0."""
    x, c = sp.symbols("x c")
    return ic.ODE([c * x**2], [x], [c], time=t, name="quadratic")
