"""The discrete adjoint: unrolled torch implementations, finite differences, torchdiffeq, gradcheck."""

import math

import pytest
import torch
import torchdiffeq

import implicit_compiler as ic

f64 = torch.float64


def _substeps(te, dt):
    """The integrator's fixed-step grid: each output interval in ceil(span/dt) equal steps."""
    out = []
    for k in range(1, len(te)):
        span = float(te[k] - te[k - 1])
        n = max(1, math.ceil(span / dt * (1 - 1e-12)))
        out.append([(float(te[k - 1]) + i * span / n, span / n) for i in range(n)])
    return out


def _unrolled_linear(method, A, b, x0, te, dt):
    """dx/dt = A x + b sin t by backward Euler or the trapezoidal rule, in torch (autograd through it)."""
    I = torch.eye(2, dtype=f64)
    x = x0
    outs = [x0]
    for interval in _substeps(te, dt):
        for t, h in interval:
            if method == "backward_euler":
                x = torch.linalg.solve(I - h * A, x + h * b * math.sin(t + h))
            else:
                rhs = x + 0.5 * h * (A @ x + b * math.sin(t)) + 0.5 * h * b * math.sin(t + h)
                x = torch.linalg.solve(I - 0.5 * h * A, rhs)
        outs.append(x)
    return torch.stack(outs)


@pytest.mark.parametrize("method", ["backward_euler", "trapezoid"])
def test_fixed_step_adjoint_equals_autograd_through_unrolled_steps(forced_linear, method):
    dt = 0.07
    layer = ic.compile(forced_linear, method=method, dt=dt)
    te = torch.tensor([0.0, 0.3, 1.0, 2.2], dtype=f64)
    A = torch.tensor([[-2.0, 1.0], [-0.5, -30.0]], dtype=f64, requires_grad=True)
    b = torch.tensor([1.0, -2.0], dtype=f64, requires_grad=True)
    x0 = torch.tensor([0.5, 1.5], dtype=f64, requires_grad=True)
    w = torch.randn(4, 2, dtype=f64, generator=torch.Generator().manual_seed(1))
    out = layer(x0, A, b, t_eval=te)
    ref = _unrolled_linear(method, A, b, x0, te, dt)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    g = torch.autograd.grad((out * w).sum(), (x0, A, b))
    gr = torch.autograd.grad((ref * w).sum(), (x0, A, b))
    for a, r in zip(g, gr):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_backward_euler_adjoint_on_a_nonlinear_system_equals_unrolled_newton(quadratic):
    # dx/dt = c x^2 with c < 0: each backward Euler step solves x1 - h c x1^2 = x0 (Newton, autograd through it)
    dt = 0.1
    layer = ic.compile(quadratic, method="backward_euler", dt=dt)
    te = torch.tensor([0.0, 0.5, 1.3], dtype=f64)
    c = torch.tensor([[-1.5], [-0.2]], dtype=f64, requires_grad=True)
    x0 = torch.tensor([[2.0], [-1.0]], dtype=f64, requires_grad=True)
    out = layer(x0, c, t_eval=te)
    refs = []
    for i in range(2):
        x = x0[i, 0]
        traj = [x]
        for interval in _substeps(te, dt):
            for _, h in interval:
                y = x
                for _ in range(30):
                    y = y - (y - h * c[i, 0] * y**2 - x) / (1 - 2 * h * c[i, 0] * y)
                x = y
            traj.append(x)
        refs.append(torch.stack(traj))
    ref = torch.stack(refs)[..., None]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)  # the stage solve's tolerance: 1e-13
    g = torch.autograd.grad(out[:, -1].sum() + out[:, 1].sum(), (x0, c))
    gr = torch.autograd.grad(ref[:, -1].sum() + ref[:, 1].sum(), (x0, c))
    for a, r in zip(g, gr):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method, kw", [("dopri5", dict(rtol=1e-11, atol=1e-13)), ("trapezoid", dict(dt=0.01)),
                                        ("radau5", dict(rtol=1e-11, atol=1e-13))])
def test_gradients_against_central_differences_of_the_whole_solve(vdp, method, kw):
    layer = ic.compile(vdp, method=method, **kw)
    te = torch.linspace(0.0, 3.0, 7, dtype=f64)
    x0 = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=f64)
    mu = torch.tensor([[1.0], [3.0]], dtype=f64)
    w = torch.randn(2, 7, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    xg, mg = x0.clone().requires_grad_(), mu.clone().requires_grad_()
    gx, gm = torch.autograd.grad((layer(xg, mg, t_eval=te) * w).sum(), (xg, mg))

    def L(xv, mv):
        with torch.no_grad():
            return (layer(xv, mv, t_eval=te) * w).sum().item()

    eps = 1e-5
    # adaptive methods: step sizes change with the parameters, so the whole-solve difference quotient
    # carries the (tolerance-sized) error of the step choice: a looser comparison for them
    tol = 1e-7 if method == "trapezoid" else 1e-5
    for b in range(2):
        for j in range(2):
            d = torch.zeros_like(x0)
            d[b, j] = eps
            fd = (L(x0 + d, mu) - L(x0 - d, mu)) / (2 * eps)
            assert abs(gx[b, j].item() - fd) <= tol * (1 + abs(fd)), (b, j, gx[b, j].item(), fd)
        d = torch.zeros_like(mu)
        d[b, 0] = eps
        fd = (L(x0, mu + d) - L(x0, mu - d)) / (2 * eps)
        assert abs(gm[b, 0].item() - fd) <= tol * (1 + abs(fd)), (b, gm[b, 0].item(), fd)


def test_against_torchdiffeq_adjoint_on_a_non_stiff_problem(vdp):
    mu0 = 0.8
    te = torch.linspace(0.0, 4.0, 9, dtype=f64)
    x0 = torch.tensor([1.5, -0.5], dtype=f64)

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mu = torch.nn.Parameter(torch.tensor(mu0, dtype=f64))

        def forward(self, t, y):
            return torch.stack([y[1], self.mu * (1 - y[0] ** 2) * y[1] - y[0]])

    f = F()
    xa = x0.clone().requires_grad_()
    ref = torchdiffeq.odeint_adjoint(f, xa, te, method="dopri5", rtol=1e-12, atol=1e-12,
                                     adjoint_params=(f.mu,))
    w = torch.randn(9, 2, dtype=f64, generator=torch.Generator().manual_seed(2))
    gx_ref, gmu_ref = torch.autograd.grad((ref * w).sum(), (xa, f.mu))
    for method in ("radau5", "dopri5"):
        layer = ic.compile(vdp, method=method, rtol=1e-11, atol=1e-13)
        xb = x0.clone().requires_grad_()
        mu = torch.tensor([mu0], dtype=f64, requires_grad=True)
        out = layer(xb, mu, t_eval=te)
        torch.testing.assert_close(out, ref.detach(), rtol=1e-8, atol=1e-9)
        gx, gmu = torch.autograd.grad((out * w).sum(), (xb, mu))
        torch.testing.assert_close(gx, gx_ref, rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(gmu[0], gmu_ref, rtol=1e-7, atol=1e-8)


def test_gradcheck_float64(oscillator):
    layer = ic.compile(oscillator, method="trapezoid", dt=0.05)
    te = torch.tensor([0.0, 0.4, 1.0], dtype=f64)
    x0 = torch.tensor([[0.3, -0.2], [1.0, 0.1]], dtype=f64, requires_grad=True)
    w = torch.tensor([1.3], dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b, t_eval=te), (x0, w), eps=1e-6, atol=1e-9, rtol=1e-7)


def test_broadcast_parameter_and_x0_gradients_sum_over_the_batch(decay):
    layer = ic.compile(decay, method="radau5", rtol=1e-10, atol=1e-12)
    te = torch.tensor([0.0, 1.0], dtype=f64)
    k = torch.tensor([[0.5], [1.5], [2.5]], dtype=f64, requires_grad=True)
    x0 = torch.tensor([[2.0]], dtype=f64, requires_grad=True)  # batch of 1, broadcast
    out = layer(x0, k, t_eval=te)
    gx, = torch.autograd.grad(out[:, -1].sum(), (x0,))
    torch.testing.assert_close(gx, torch.exp(-k.detach()).sum().reshape(1, 1), rtol=1e-8, atol=0)
    x1 = torch.tensor([2.0], dtype=f64, requires_grad=True)  # unbatched
    k1 = torch.tensor([[0.5]], dtype=f64, requires_grad=True)  # batch of 1 against x0 of batch 3
    x3 = torch.tensor([[1.0], [2.0], [3.0]], dtype=f64, requires_grad=True)
    out = layer(x3, k1, t_eval=te)
    gk, = torch.autograd.grad(out[:, -1].sum(), (k1,))
    torch.testing.assert_close(gk, (-6.0 * math.exp(-0.5)) * torch.ones(1, 1, dtype=f64), rtol=1e-8, atol=0)
    out = layer(x1, torch.tensor(0.5, dtype=f64).reshape(1), t_eval=te)
    assert out.shape == (2, 1)
