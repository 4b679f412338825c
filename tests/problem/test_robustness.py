"""Scale-aware tolerances, per-sample arithmetic faults and argument checks of optimization layers."""

import numpy as np
import pytest
import sympy as sp
import torch

import implicit_compiler as ic
from implicit_compiler import Status
from implicit_compiler.errors import InputError

MAGNITUDES = [1e-300, 1e-200, 1e-100, 1e-8, 3.0, 1e8, 1e100, 1e200, 1e300]  # (t = ±1 is weakly active)


@pytest.fixture(scope="module")
def box_qp():
    # argmin (y - t)^2 on [-1, 1]: y = clip(t, -1, 1), multiplier 2 (|t| - 1) on the active bound
    y, t = sp.symbols("y t")
    return ic.compile(ic.Problem((y - t) ** 2, variables=[y], params=[t], inequalities=[y <= 1, y >= -1]),
                      on_failure="keep")


def test_box_qp_at_every_magnitude_matches_the_closed_form(box_qp):
    t = np.array([[s * m] for m in MAGNITUDES for s in (1.0, -1.0, 0.5)])
    res = box_qp.solve(t)
    assert (res.status == Status.CONVERGED).all(), res.summary()
    tt = t[:, 0]
    np.testing.assert_allclose(res.y[:, 0], np.clip(tt, -1, 1), rtol=1e-12, atol=0)
    nu_up = np.where(tt > 1, 2 * (tt - 1), 0.0)
    nu_lo = np.where(tt < -1, 2 * (-1 - tt), 0.0)
    np.testing.assert_allclose(res.y[:, 1], nu_up, rtol=1e-12, atol=0)
    np.testing.assert_allclose(res.y[:, 2], nu_lo, rtol=1e-12, atol=0)


def test_box_qp_gradient_at_huge_and_tiny_magnitudes(box_qp):
    t = torch.tensor([1e200, -1e-200, 3e-150, -7e250], dtype=torch.float64, requires_grad=True)
    y = box_qp.configure(on_failure="raise")(t[:, None])
    y.sum().backward()
    # dy/dt = 1 inside the box, 0 where a bound is active
    torch.testing.assert_close(t.grad, torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    box_qp.configure(on_failure="keep")


def test_scaled_problem_huge_data_and_solution():
    # argmin (y1 - a)^2 + (y2 + 2a)^2 s.t. y1 + y2 = a/2, y1 <= a/8: every quantity scales with a.
    # KKT: y1 = a/8 active, y2 = 3a/8; stationarity 2(y1 - a) + lam + nu = 0, 2(y2 + 2a) + lam = 0
    y1, y2, a = sp.symbols("y1 y2 a")
    layer = ic.compile(ic.Problem((y1 - a) ** 2 + (y2 + 2 * a) ** 2, variables=[y1, y2], params=[a],
                                  equalities=[y1 + y2 - a / 2], inequalities=[y1 <= a / 8]), on_failure="keep")
    mags = np.array([1.0, 1e6, 1e30, 1e50])
    res = layer.solve(mags[:, None])
    assert (res.status == Status.CONVERGED).all(), res.summary()
    # beyond about 1e100 (data, solution and multipliers all that large) the iteration does not
    # reach the tolerance: reported, never returned as converged
    far = layer.solve(np.array([[1e100], [1e150]]))
    assert not (far.status == Status.CONVERGED).any()
    lam = -2 * (3 * mags / 8 + 2 * mags)
    nu = -2 * (mags / 8 - mags) - lam
    ref = np.stack([mags / 8, 3 * mags / 8, lam, nu], axis=1)
    np.testing.assert_allclose(res.y, ref, rtol=1e-11, atol=0)


def test_arithmetic_faults_are_per_sample_nonfinite():
    # 1/s and log(s) at s = 0 (and log of a negative): those samples NONFINITE, the others solved;
    # warm-up (which evaluates at zero parameters) does not fail
    y, s = sp.symbols("y s")
    layer = ic.compile(ic.Problem((y - 1 / s) ** 2 + (y - sp.log(s)) ** 2, variables=[y], params=[s],
                                  inequalities=[y <= 10]), on_failure="keep")
    svals = np.array([2.0, 0.0, 0.5, -1.0, 3.0])
    res = layer.solve(svals[:, None])
    assert res.status.tolist() == [Status.CONVERGED, Status.NONFINITE, Status.CONVERGED, Status.NONFINITE,
                                   Status.CONVERGED]
    good = svals[[0, 2, 4]]
    np.testing.assert_allclose(res.y[[0, 2, 4], 0], (1 / good + np.log(good)) / 2, rtol=1e-12)
    with pytest.raises(ic.ConvergenceError, match=r"samples \[1, 3\]: NONFINITE"):
        layer.configure(on_failure="raise")(torch.tensor(svals[:, None]))


@pytest.fixture(scope="module")
def rayleigh():
    # y^T M y / y^T y (0/0 at the default start y = 0) plus a penalty fixing the length
    y = sp.Matrix(sp.symbols("y0:2"))
    M = sp.Matrix(2, 2, sp.symbols("M0:4"))
    obj = (y.T * M * y)[0] / (y.T * y)[0] + ((y.T * y)[0] - 1) ** 2
    return ic.compile(ic.Problem(obj, variables={"y": y}, params={"M": M}, inequalities=[y[0] <= 2]),
                      on_failure="keep")


def test_rayleigh_quotient_at_the_zero_start_is_nonfinite_not_an_exception(rayleigh):
    Ms = np.array([np.diag([1.0, 3.0]), np.diag([2.0, 5.0]), np.diag([4.0, 1.0])])
    res = rayleigh.solve(Ms, y0=np.array([[0.0, 0.0], [1.0, 0.1], [0.0, 0.0]]))
    assert res.status.tolist() == [Status.NONFINITE, Status.CONVERGED, Status.NONFINITE]
    # the minimiser: the eigenvector of the smallest eigenvalue, unit length (the penalty vanishes there)
    np.testing.assert_allclose(np.abs(res.y[1, :2]), [1.0, 0.0], rtol=0, atol=1e-9)


def test_problem_y0_and_method_are_checked(rayleigh):
    p = rayleigh.system
    with pytest.raises(InputError, match=r"method='picard' does not apply to an optimization problem"):
        ic.compile(p, method="picard")
    with pytest.raises(InputError, match=r"method='anderson' does not apply"):
        ic.compile(p, method="anderson", warmup=False)
    with pytest.raises(InputError, match=r"method='picard' does not apply"):
        rayleigh.configure(method="picard")
    Mt = torch.tensor(np.array([np.diag([2.0, 5.0]), np.diag([3.0, 1.0])]))
    with pytest.raises(InputError, match=r"y0 names unknown variable group\(s\) \['z'\]; the problem's variable "
                                         r"groups are \['y'\]"):
        rayleigh(Mt, y0={"z": torch.zeros(2)})
    with pytest.raises(InputError, match=r"unknown variable group\(s\) \['nu'\].*multipliers"):
        rayleigh(Mt, y0={"y": torch.zeros(2), "nu": torch.zeros(1)})
    with pytest.raises(InputError, match=r"y0\['y'\] has shape \(3,\); variable group 'y' has shape \(2,\), so "
                                         r"y0\['y'\] must have shape \(2,\) \(shared by the batch\) or \(2, 2\)"):
        rayleigh(Mt, y0={"y": torch.zeros(3)})
    with pytest.raises(InputError, match=r"y0\['y'\] has shape \(3, 2\)"):
        rayleigh(Mt, y0={"y": torch.zeros(3, 2)})
    # well-sized dicts work, shared and per sample
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    out = rayleigh(Mt, y0={"y": torch.tensor([[0.9, 0.2], [0.1, 0.8]], dtype=torch.float64)})
    np.testing.assert_allclose(np.abs(out.numpy()), ref, rtol=0, atol=1e-9)
    out = rayleigh(Mt[:1], y0={"y": torch.tensor([0.9, 0.2], dtype=torch.float64)})
    np.testing.assert_allclose(np.abs(out.numpy()), ref[:1], rtol=0, atol=1e-9)
