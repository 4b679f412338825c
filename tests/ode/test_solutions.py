"""Values and gradients against closed forms, expm and scipy's Radau at tight tolerance."""

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from scipy.integrate import solve_ivp

import implicit_compiler as ic

f64 = torch.float64
ADAPTIVE = ["radau5", "esdirk", "dopri5"]


def _t(a, grad=False):
    return torch.tensor(a, dtype=f64, requires_grad=grad)


@pytest.fixture(scope="module")
def decay_layers(decay):
    return {m: ic.compile(decay, method=m, rtol=1e-10, atol=1e-12) for m in ADAPTIVE}


@pytest.mark.parametrize("method", ADAPTIVE)
def test_decay_values_and_gradients_closed_form(decay_layers, method):
    layer = decay_layers[method]
    x0 = _t([[1.0], [-3.0], [1e-3]], True)
    k = _t([[0.5], [2.0], [30.0]], True)
    te = torch.linspace(0.0, 2.0, 9, dtype=f64)
    out = layer(x0, k, t_eval=te)
    e = torch.exp(-k.detach() * te)  # (B, T)
    exact = x0.detach() * e
    torch.testing.assert_close(out[..., 0], exact, rtol=1e-8, atol=1e-11)
    w = torch.linspace(1.0, 2.0, 9, dtype=f64)
    (out[..., 0] * w).sum().backward()
    torch.testing.assert_close(x0.grad[:, 0], (e * w).sum(1), rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(k.grad[:, 0], (-te * exact * w).sum(1), rtol=1e-7, atol=1e-10)


def test_oscillator_closed_form(oscillator):
    layer = ic.compile(oscillator, method="radau5", rtol=1e-10, atol=1e-12)
    x0 = _t([[1.0, 0.0], [0.3, -2.0]], True)
    w = _t([1.0, 3.0], True)
    te = torch.linspace(0.0, 5.0, 11, dtype=f64)
    out, info = layer(x0, w, t_eval=te, return_info=True)
    assert (info.status == 0).all() and (info.steps > 0).all()
    wt = w.detach()[:, None] * te  # (B, T)
    q0, p0 = x0.detach()[:, :1], x0.detach()[:, 1:]
    q = q0 * torch.cos(wt) + p0 * torch.sin(wt)
    p = -q0 * torch.sin(wt) + p0 * torch.cos(wt)
    torch.testing.assert_close(out, torch.stack([q, p], -1), rtol=0, atol=1e-8)
    out[:, -1, 0].sum().backward()
    T = te[-1]
    wv = w.detach()
    torch.testing.assert_close(x0.grad, torch.stack([torch.cos(wv * T), torch.sin(wv * T)], -1), rtol=0, atol=1e-8)
    dq_dw = T * (-q0[:, 0] * torch.sin(wv * T) + p0[:, 0] * torch.cos(wv * T))
    torch.testing.assert_close(w.grad, dq_dw, rtol=0, atol=1e-7)


@pytest.fixture(scope="module")
def linear_layers(forced_linear):
    return {"radau5": ic.compile(forced_linear, method="radau5", rtol=1e-11, atol=1e-13),
            "esdirk": ic.compile(forced_linear, method="esdirk", rtol=1e-10, atol=1e-12)}


@pytest.mark.parametrize("method", ["radau5", "esdirk"])
def test_linear_system_against_expm_and_its_frechet_derivative(linear_layers, method):
    layer = linear_layers[method]
    rng = np.random.default_rng(0)
    A = np.array([[-1.0, 2.0], [-3.0, -0.5]])
    x0 = rng.normal(size=2)
    T = 1.5
    At, bt, xt = _t(A, True), _t([0.0, 0.0], True), _t(x0, True)
    out = layer(xt, At, bt, t_eval=_t([0.0, T]))
    np.testing.assert_allclose(out[-1].detach().numpy(), sla.expm(A * T) @ x0, rtol=1e-8, atol=1e-10)
    c = np.array([0.7, -1.3])
    (out[-1] @ _t(c)).backward()
    np.testing.assert_allclose(xt.grad.numpy(), sla.expm(A * T).T @ c, rtol=1e-8, atol=1e-10)
    # d/dA_ij of c^T expm(A T) x0 = c^T L(A T, E_ij T) x0 (Frechet derivative)
    dA = np.empty((2, 2))
    for i in range(2):
        for j in range(2):
            E = np.zeros((2, 2))
            E[i, j] = T
            dA[i, j] = c @ sla.expm_frechet(A * T, E, compute_expm=False) @ x0
    np.testing.assert_allclose(At.grad.numpy(), dA, rtol=1e-7, atol=1e-9)


def _scipy(fun, jac, x0, te, args):
    r = solve_ivp(fun, (te[0], te[-1]), x0, method="Radau", t_eval=te, rtol=1e-12, atol=1e-14, jac=jac, args=args)
    assert r.success
    return r.y.T


def _rob(t, y, k1, k2, k3):
    return [-k1 * y[0] + k3 * y[1] * y[2], k1 * y[0] - k2 * y[1] ** 2 - k3 * y[1] * y[2], k2 * y[1] ** 2]


def _rob_jac(t, y, k1, k2, k3):
    return [[-k1, k3 * y[2], k3 * y[1]], [k1, -2 * k2 * y[1] - k3 * y[2], -k3 * y[1]], [0, 2 * k2 * y[1], 0]]


@pytest.mark.parametrize("method, rtol, factor", [("radau5", 1e-6, 20), ("radau5", 1e-9, 20), ("esdirk", 1e-7, 20)])
def test_robertson_against_scipy_radau(robertson, method, rtol, factor):
    atol = 1e-6 * rtol
    layer = ic.compile(robertson, method=method, rtol=rtol, atol=atol)
    te = np.concatenate([[0.0], np.logspace(-4, 4, 9)])
    ks = np.array([[0.04, 3e7, 1e4], [0.08, 1e7, 3e4]])
    out, info = layer(_t([1.0, 0.0, 0.0]), _t(ks), t_eval=_t(te), return_info=True)
    assert (info.status == 0).all()
    for b in range(2):
        ref = _scipy(_rob, _rob_jac, [1.0, 0.0, 0.0], te, tuple(ks[b]))
        err = np.abs(out[b].numpy() - ref) / (atol + rtol * np.abs(ref))
        assert err.max() < factor, (b, err.max())
        np.testing.assert_allclose(out[b].numpy().sum(1), 1.0, atol=1e-12 + 10 * rtol)  # mass is conserved


def _vdp(t, y, mu):
    return [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]]


def _vdp_jac(t, y, mu):
    return [[0, 1], [-2 * mu * y[0] * y[1] - 1, mu * (1 - y[0] ** 2)]]


@pytest.mark.parametrize("method", ["radau5", "esdirk"])
def test_stiff_van_der_pol_against_scipy_radau(vdp, method):
    rtol, atol = 1e-7, 1e-9
    layer = ic.compile(vdp, method=method, rtol=rtol, atol=atol)
    te = np.linspace(0.0, 400.0, 9)  # mu = 1000: the slow branch and the first jump (near t = 807) are beyond
    te = np.concatenate([te, [805.0, 810.0, 820.0]])
    x0 = np.array([[2.0, 0.0], [1.5, -0.1]])
    out, info = layer(_t(x0), _t([[1000.0], [800.0]]), t_eval=_t(te), return_info=True)
    assert (info.status == 0).all()
    for b, mu in enumerate((1000.0, 800.0)):
        ref = _scipy(_vdp, _vdp_jac, x0[b], te, (mu,))
        scale = atol + rtol * np.abs(ref)
        # the fast transitions amplify local errors: compare to 200 tolerance units
        err = np.abs(out[b].numpy() - ref) / scale
        assert err[:, 0].max() < 200, (b, err.max())


def test_per_sample_t_eval_and_dtype(decay_layers):
    layer = decay_layers["dopri5"]
    te = _t([[0.0, 0.5, 1.0], [1.0, 3.0, 4.0]])
    x0 = torch.tensor([[1.0], [2.0]], dtype=torch.float32)
    k = torch.tensor([0.3], dtype=torch.float32)
    out = layer(x0, k, t_eval=te)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 1)
    exact = x0.double() * torch.exp(-0.3 * (te - te[:, :1]))
    torch.testing.assert_close(out.double()[..., 0], exact, rtol=1e-6, atol=1e-7)


def test_threaded_batch_matches_serial(decay):
    serial = ic.compile(decay, method="radau5", rtol=1e-8, atol=1e-10, parallel_threshold=10_000)
    threaded = ic.compile(decay, method="radau5", rtol=1e-8, atol=1e-10, parallel_threshold=2)
    B = 40
    x0 = torch.linspace(0.5, 2.0, B, dtype=f64)[:, None].requires_grad_()
    k = torch.logspace(-1, 2, B, dtype=f64)[:, None].requires_grad_()
    te = torch.linspace(0, 1, 5, dtype=f64)
    outs, grads = [], []
    for layer in (serial, threaded):
        out = layer(x0, k, t_eval=te)
        gx, gk = torch.autograd.grad(out.sum(), (x0, k))
        outs.append(out)
        grads.append((gx, gk))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("x0, k", [(1e12, 1e6), (1e-9, 3e4), (-5.0, 1e8)])
def test_fixed_step_stiff_decay_at_any_magnitude(decay, x0, k):
    # backward Euler: x_n = x0 / (1 + h k)^n exactly; trapezoid: x0 ((1 - h k / 2) / (1 + h k / 2))^n
    h = 0.1
    te = torch.tensor([0.0, 0.5, 1.0], dtype=f64)
    for method, ratio in (("backward_euler", 1 / (1 + h * k)), ("trapezoid", (1 - h * k / 2) / (1 + h * k / 2))):
        layer = ic.compile(decay, method=method, dt=h)
        out, info = layer(_t([[x0]]), _t([[k]]), t_eval=te, return_info=True)
        assert info.status.tolist() == [0]
        exact = torch.tensor([x0, x0 * ratio**5, x0 * ratio**10], dtype=f64)
        torch.testing.assert_close(out[0, :, 0], exact, rtol=1e-12, atol=1e-12)  # stage tolerance: 1e-13 (1 + |x|)
