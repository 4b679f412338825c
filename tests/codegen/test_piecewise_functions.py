"""floor, ceiling, Mod, frac, sign, Abs, Min, Max, Heaviside and Piecewise compile, with values
and (almost-everywhere) gradients as for real arguments; a Piecewise without default is NaN
outside its branches, so those samples are NONFINITE and the rest are solved."""

import numpy as np
import pytest
import sympy as sp
import torch

import implicit_compiler as ic
from implicit_compiler.codegen.printer import NumbaPrinter
from implicit_compiler.runtime.status import CONVERGED, NONFINITE

a, b, c = sp.symbols("a b c")
y = sp.symbols("y0:6")


@pytest.fixture(scope="module")
def layer():
    residuals = [
        y[0] - sp.floor(a) - sp.ceiling(b),
        y[1] - sp.Mod(a, b),
        y[2] + sp.Abs(y[2]) / 3 - a,
        y[3] - sp.sign(a) * sp.Max(b, c) - sp.Min(a, c),
        y[4] - sp.Heaviside(a) * sp.frac(b),
        y[5] - sp.Piecewise((a, c < 2.5)),
    ]
    return ic.compile(ic.ResidualSystem(residuals, unknowns=list(y), params=[a, b, c], name="piecewise_fns"),
                      on_failure="nan")


def _inputs(B):
    rng = np.random.default_rng(11)
    P = np.column_stack([rng.uniform(-7, 7, B), rng.choice([-1, 1], B) * rng.uniform(0.3, 4, B),
                         rng.uniform(-3, 2.4, B)])
    P[0] = [-2.5, 0.7, 1.0]
    P[1] = [7.0, -3.0, -1.0]
    P[2] = [0.0, -1.5, 2.0]
    P[B - 1, 2] = 2.5  # outside the Piecewise's only branch
    P[B - 2, 2] = 7.0
    return P, [B - 2, B - 1]


def _reference(P):
    A, Bv, C = P.T
    Y = np.column_stack([np.floor(A) + np.ceil(Bv), np.mod(A, Bv), np.where(A >= 0, 0.75 * A, 1.5 * A),
                         np.sign(A) * np.maximum(Bv, C) + np.minimum(A, C),
                         np.heaviside(A, 0.5) * (Bv - np.floor(Bv)), A])
    H = lambda t: (t > 0).astype(float)  # noqa: E731  (ties are kept out of the data)
    grad = {  # dy_i/d(a, b, c) as columns, per output i
        0: (0 * A, 0 * A, 0 * A),
        1: (1 + 0 * A, -np.floor(A / Bv), 0 * A),
        2: (np.where(A > 0, 0.75, 1.5), 0 * A, 0 * A),
        3: (H(C - A), np.sign(A) * H(Bv - C), np.sign(A) * H(C - Bv) + H(A - C)),
        4: (0 * A, np.heaviside(A, 0.5), 0 * A),
        5: (1 + 0 * A, 0 * A, 0 * A),
    }
    return Y, grad


@pytest.mark.parametrize("B", [6, 5000])
def test_values_match_numpy_and_piecewise_gap_is_nonfinite(layer, B):
    P, bad = _inputs(B)
    res = layer.solve(P)
    expected = np.full(B, CONVERGED)
    expected[bad] = NONFINITE
    np.testing.assert_array_equal(res.status, expected)
    Y, _ = _reference(P)
    good = res.status == CONVERGED
    np.testing.assert_allclose(res.y[good], Y[good], rtol=1e-12, atol=1e-12)


def test_gradients_are_the_real_almost_everywhere_derivatives(layer):
    B = 64
    P, bad = _inputs(B)
    P = P[3:]  # the random samples (a = 0 sits on a kink of sign and Heaviside)
    theta = torch.tensor(P, requires_grad=True)
    out = layer(theta)
    Y, grad = _reference(P)
    good = np.ones(len(P), dtype=bool)
    good[[i - 3 for i in bad]] = False
    np.testing.assert_allclose(out.detach().numpy()[good], Y[good], rtol=1e-12, atol=1e-12)
    for i in range(6):
        theta.grad = None
        out[:, i].sum().backward(retain_graph=True)
        g = theta.grad.numpy()
        for k in range(3):
            np.testing.assert_allclose(g[good, k], grad[i][k][good], rtol=1e-12, atol=1e-12,
                                       err_msg=f"d y{i} / d {'abc'[k]}")
        assert np.isnan(g[~good]).all()


def test_printed_forms():
    x, z = sp.symbols("x z")
    pr = NumbaPrinter({x: "p[0]", z: "p[1]"})
    # np.floor: Numba's math.floor returns an int64 (garbage for NaN or |x| >= 2**63)
    assert pr.doprint(sp.floor(x)) == "np.floor(p[0])"
    mx = pr.doprint(sp.Max(x, z, 1))
    assert mx.count("np.maximum(") == 2 and "p[0]" in mx and "p[1]" in mx and "1.0" in mx
    assert pr.doprint(x**-3) == "(1.0/p[0]**3)"
    assert pr.doprint(1 / x) == "(1.0/p[0])"
