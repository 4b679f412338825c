"""Second-order check: KKT points that are maxima or saddles are reported (NOT_A_MINIMUM), never
returned as minima; the interior point steers away from them; custom forwards get the same check."""

import numpy as np
import pytest
import sympy as sp
import torch

import implicit_compiler as ic
from implicit_compiler import Status

from .test_custom_forward import N, leading_eigenvector


@pytest.fixture(scope="module")
def concave_box():
    # -y^2 + t y on [-1, 1]: the minimisers are the bounds; y = t/2 is the maximum
    y, t = sp.symbols("y t")
    return ic.compile(ic.Problem(-y**2 + t * y, variables=[y], params=[t], inequalities=[y <= 1, y >= -1]),
                      on_failure="keep")


def test_concave_objective_without_minimum_is_never_converged():
    y, t = sp.symbols("y t")
    layer = ic.compile(ic.Problem(-y**2 + t * y, variables=[y], params=[t]), on_failure="keep")
    res = layer.solve(np.array([[0.5], [0.0], [-3.0], [1e-3]]))
    assert not (res.status == Status.CONVERGED).any()
    # from y0 = 0: at t = 0 the start is the maximum itself (a KKT point): reported as such
    assert res.status[1] == Status.NOT_A_MINIMUM
    # elsewhere the modified Newton step descends, away from the maximum t/2, and y runs off
    for b in (0, 2, 3):
        assert res.status[b] in (Status.UNBOUNDED, Status.MAX_ITERATIONS, Status.NOT_A_MINIMUM)
        assert abs(res.y[b, 0] - res.p[b, 0] / 2) > 1.0
    with pytest.raises(ic.ConvergenceError, match="NOT_A_MINIMUM"):
        layer.configure(on_failure="raise")(torch.tensor([0.0], dtype=torch.float64))


def test_concave_box_returns_a_minimiser_or_reports(concave_box):
    t = np.array([[0.0], [0.0], [0.0], [0.3], [-0.3], [0.8]])
    y0 = np.array([[0.0], [0.2], [-0.2], [0.0], [0.0], [0.4]])  # the last starts at the maximum t/2
    res = concave_box.solve(t, y0=y0)
    ys, st = res.y[:, 0], res.status
    assert st[0] == Status.NOT_A_MINIMUM  # started at the maximum y = 0: reported, not returned as converged
    # every converged sample is a local minimiser (a bound), with the multiplier -f'(bound) of the active bound
    conv = st == Status.CONVERGED
    assert conv[1:5].all()
    np.testing.assert_allclose(ys[1:5], [1.0, -1.0, -1.0, 1.0], rtol=0, atol=1e-12)
    for b in np.flatnonzero(conv):
        yb, tb = ys[b], t[b, 0]
        assert abs(abs(yb) - 1.0) < 1e-12
        nu = res.y[b, 1] if yb > 0 else res.y[b, 2]
        np.testing.assert_allclose(nu, abs(-2 * yb + tb), rtol=1e-12)
    assert st[5] in (Status.CONVERGED, Status.NOT_A_MINIMUM)
    if st[5] == Status.CONVERGED:
        assert abs(abs(ys[5]) - 1.0) < 1e-12


def test_maximize_checks_the_mirrored_condition():
    y, t = sp.symbols("y t")
    layer = ic.compile(ic.Problem(y**2 + t * y, variables=[y], params=[t], inequalities=[y <= 1, y >= -1],
                                  maximize=True), on_failure="keep")
    res = layer.solve(np.array([[0.0], [0.0], [0.5]]), y0=np.array([[0.0], [-0.3], [0.0]]))
    assert res.status[0] == Status.NOT_A_MINIMUM  # y = 0 minimises y^2: not a maximum
    assert res.status[1] == Status.CONVERGED and res.y[1, 0] == pytest.approx(-1.0, abs=1e-12)
    assert res.status[2] == Status.CONVERGED and res.y[2, 0] == pytest.approx(1.0, abs=1e-12)
    assert "maximize=True" in Status.NOT_A_MINIMUM.message


def test_curvature_is_checked_on_the_null_space_of_the_active_constraints():
    # c y1^2 + d y2^2 + e y1 y2 with y1 = t fixed by an equality and -u <= y2 <= u: only the
    # curvature d along y2 matters, and nothing when a bound on y2 is active
    y1, y2 = sp.symbols("y1 y2")
    c, d, e, t, u = sp.symbols("c d e t u")
    layer = ic.compile(ic.Problem(c * y1**2 + d * y2**2 + e * y1 * y2, variables=[y1, y2],
                                  params=[c, d, e, t, u], equalities=[y1 - t], inequalities=[y2 <= u, y2 >= -u]),
                       on_failure="keep")
    P = np.array([
        [-1.0, 1.0, 0.4, 0.5, 10.0],   # indefinite Hessian, positive along the free direction: minimum
        [1.0, -1.0, 0.0, 0.5, 10.0],   # negative along y2, started at the KKT point y2 = 0 (a maximum in y2)
        [-1.0, -1.0, 0.3, 0.5, 2.0],   # concave in y2: descends to the bound y2 = 2 (active: a minimum)
        [2.0, 1.0, 0.4, -0.5, 10.0],   # convex
    ])
    y0 = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 1.5], [0.0, 0.0]])
    res = layer.solve(P, y0=y0)
    assert res.status.tolist() == [Status.CONVERGED, Status.NOT_A_MINIMUM, Status.CONVERGED, Status.CONVERGED]
    # closed forms: y1 = t; y2 = -e t / (2 d) when inactive, the bound when active
    np.testing.assert_allclose(res.y[0, :2], [0.5, -0.1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.y[2, :2], [0.5, 2.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.y[3, :2], [-0.5, 0.1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.y[1, :2], [0.5, 0.0], rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def spectral_problem():
    y = sp.Matrix(sp.symbols(f"y0:{N}"))
    M = sp.Matrix(N, N, sp.symbols(f"M0:{N * N}"))
    return ic.Problem((y.T * M * y)[0], variables={"y": y}, params={"M": M},
                      equalities=[(y.T * y)[0] - 1], maximize=True, name="spectral_matching")


def test_custom_forward_returning_a_wrong_point_is_reported_per_sample(spectral_problem):
    rng = np.random.default_rng(7)
    M = rng.standard_normal((4, N, N))

    def forward(Mb):
        v = leading_eigenvector(Mb)
        S = (Mb + np.swapaxes(Mb, 1, 2)) / 2
        V = np.linalg.eigh(S)[1]
        v[1] = V[1, :, 0]  # the smallest eigenvector: a KKT point, but the minimum of y^T M y
        v[2] = V[2, :, 1]  # an interior eigenvector: a saddle point
        w = v[3] + 1e-4 * rng.standard_normal(N)
        v[3] = w / np.linalg.norm(w)  # feasible, close to the solution, but not a KKT point
        return v

    layer = ic.compile(spectral_problem, forward=forward)
    res = layer.solve(M)
    assert res.status.tolist() == [Status.CONVERGED, Status.NOT_A_MINIMUM, Status.NOT_A_MINIMUM,
                                   Status.NOT_OPTIMAL]
    # the good sample is the leading eigenvector; the bad ones are not silently moved elsewhere
    np.testing.assert_allclose(res.y[0, :N], leading_eigenvector(M[:1])[0], rtol=0, atol=1e-12)
    given = forward(M.copy())
    for b in (1, 2):
        assert np.abs(np.abs(res.y[b, :N]) - np.abs(given[b])).max() < 1e-8
    with pytest.raises(ic.ConvergenceError, match="NOT_A_MINIMUM"):
        layer(torch.tensor(M))
