"""Non-convex NLPs from the Hock–Schittkowski collection, solved from their published starting
points, against their published solutions (W. Hock and K. Schittkowski, Test Examples for Nonlinear
Programming Codes, Lecture Notes in Economics and Mathematical Systems 187, Springer, 1981), and a
problem with many local minima where the solver must stay in the start's basin."""

import numpy as np
import pytest
import sympy as sp

import implicit_compiler as ic
from implicit_compiler import Status

x1, x2, x3, x4 = sp.symbols("x1 x2 x3 x4")
a = sp.Symbol("a")  # a parameter the problems are scaled by (1 = the published problem)


def _case_hs6():
    # Hock & Schittkowski 1981, problem 6: x0 = (-1.2, 1), x* = (1, 1), f* = 0
    p = ic.Problem(a * (1 - x1) ** 2, variables=[x1, x2], params=[a], equalities=[10 * (x2 - x1**2)])
    return p, [-1.2, 1.0], [1.0, 1.0], 0.0


def _case_hs7():
    # Hock & Schittkowski 1981, problem 7: x0 = (2, 2), x* = (0, sqrt(3)), f* = -sqrt(3)
    p = ic.Problem(a * (sp.log(1 + x1**2) - x2), variables=[x1, x2], params=[a],
                   equalities=[(1 + x1**2) ** 2 + x2**2 - 4])
    return p, [2.0, 2.0], [0.0, np.sqrt(3.0)], -np.sqrt(3.0)


def _case_hs14():
    # Hock & Schittkowski 1981, problem 14: x0 = (2, 2),
    # x* = ((sqrt(7) - 1)/2, (sqrt(7) + 1)/4), f* = 9 - 23 sqrt(7)/8
    p = ic.Problem(a * ((x1 - 2) ** 2 + (x2 - 1) ** 2), variables=[x1, x2], params=[a],
                   equalities=[x1 - 2 * x2 + 1], inequalities=[-x1**2 / 4 - x2**2 + 1 >= 0])
    s7 = np.sqrt(7.0)
    return p, [2.0, 2.0], [(s7 - 1) / 2, (s7 + 1) / 4], 9 - 23 * s7 / 8


def _case_hs21():
    # Hock & Schittkowski 1981, problem 21: x0 = (-1, -1) (infeasible), x* = (2, 0), f* = -99.96
    p = ic.Problem(a * (0.01 * x1**2 + x2**2 - 100), variables=[x1, x2], params=[a],
                   inequalities=[10 * x1 - x2 - 10 >= 0, x1 >= 2, x1 <= 50, x2 >= -50, x2 <= 50])
    return p, [-1.0, -1.0], [2.0, 0.0], -99.96


def _case_hs35():
    # Hock & Schittkowski 1981, problem 35: x0 = (0.5, 0.5, 0.5), x* = (4/3, 7/9, 4/9), f* = 1/9
    f = 9 - 8 * x1 - 6 * x2 - 4 * x3 + 2 * x1**2 + 2 * x2**2 + x3**2 + 2 * x1 * x2 + 2 * x1 * x3
    p = ic.Problem(a * f, variables=[x1, x2, x3], params=[a],
                   inequalities=[3 - x1 - x2 - 2 * x3 >= 0, x1 >= 0, x2 >= 0, x3 >= 0])
    return p, [0.5, 0.5, 0.5], [4 / 3, 7 / 9, 4 / 9], 1 / 9


def _case_hs71():
    # Hock & Schittkowski 1981, problem 71: x0 = (1, 5, 5, 1),
    # x* = (1, 4.7429994, 3.8211503, 1.3794082), f* = 17.0140173
    p = ic.Problem(a * (x1 * x4 * (x1 + x2 + x3) + x3), variables=[x1, x2, x3, x4], params=[a],
                   equalities=[x1**2 + x2**2 + x3**2 + x4**2 - 40],
                   inequalities=[x1 * x2 * x3 * x4 >= 25] + [v >= 1 for v in (x1, x2, x3, x4)]
                   + [v <= 5 for v in (x1, x2, x3, x4)])
    return p, [1.0, 5.0, 5.0, 1.0], [1.0, 4.7429994, 3.8211503, 1.3794082], 17.0140173


CASES = {"hs6": _case_hs6, "hs7": _case_hs7, "hs14": _case_hs14, "hs21": _case_hs21, "hs35": _case_hs35,
         "hs71": _case_hs71}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hock_schittkowski_from_the_published_start(name):
    problem, x0, x_star, f_star = CASES[name]()
    layer = ic.compile(problem, on_failure="keep", max_iter=200)
    # the published problem (a = 1), and the same problem with its objective scaled by 1e3
    scales = np.array([[1.0], [1e3]])
    res = layer.solve(scales, y0=np.array(x0))
    assert (res.status == Status.CONVERGED).all(), res.summary()
    n = len(x0)
    # the published x* of HS71 has 8 digits
    atol = 1e-6 if name == "hs71" else 1e-9
    for b in range(len(scales)):
        np.testing.assert_allclose(res.y[b, :n], x_star, rtol=0, atol=atol)
        f = float(problem.objective.subs({**dict(zip(problem.variables, res.y[b, :n])), a: 1.0}))
        assert f == pytest.approx(f_star, abs=1e-6)


def test_many_local_minima_stays_in_the_basin_of_the_start():
    # cos(y - t) + (y - t)^2 / 1000: local minima near t + (2k + 1) pi, maxima near t + 2 k pi. From
    # starts in regions of negative curvature (near a maximum), the solver must descend to the nearest
    # minimum, not jump to a far stationary point or return the maximum.
    y, t = sp.symbols("y t")
    layer = ic.compile(ic.Problem(sp.cos(y - t) + (y - t) ** 2 / 1000, variables=[y], params=[t]),
                       on_failure="keep")
    starts = np.array([0.3, -0.3, 1.5, 1.6, 2.0, 4.0, 4.8, 6.0, 6.7, 40.5, -20.0])
    res = layer.solve(np.zeros((len(starts), 1)), y0=starts[:, None])
    assert (res.status == Status.CONVERGED).all(), res.summary()
    ys = res.y[:, 0]
    # stationarity -sin(y) + y / 500 = 0, and a minimum: -cos(y) ... > 0 means cos(y) < 1/500
    np.testing.assert_allclose(-np.sin(ys) + ys / 500, 0.0, atol=1e-12)
    assert (np.cos(ys) < 0).all()
    # in the basin of the start: the minimum nearest to it between the neighbouring maxima
    k = np.round((ys - np.pi) / (2 * np.pi))
    nearest = np.round((starts - np.pi) / (2 * np.pi))
    np.testing.assert_array_equal(k, nearest)
