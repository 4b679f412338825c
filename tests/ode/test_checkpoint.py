"""Checkpointed adjoint (``checkpoint=K``): the forward keeps the step sizes, how each step's stages
were solved, and every K accepted steps what the integrator had (state, where the df/dx in use was
evaluated, the previous step's stages); the backward integrates each segment again, repeating the
forward's accepted attempts exactly, and sweeps it in reverse. The gradient is the stored adjoint's,
bit for bit, for every method.
"""

import numpy as np
import pytest
import torch

import implicit_compiler as ic
from implicit_compiler.runtime.ode_tableaus import TABLEAUS

f64 = torch.float64
TE = torch.linspace(0.0, 3.0, 7, dtype=f64)
X0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.3, -1.0]], dtype=f64)
MU = torch.tensor([[1.5], [3.0], [0.7]], dtype=f64)
W = torch.randn(3, 7, 2, dtype=f64, generator=torch.Generator().manual_seed(1))


def _grads(layer):
    x0, mu = X0.clone().requires_grad_(), MU.clone().requires_grad_()
    out = layer(x0, mu, t_eval=TE)
    return (out,) + torch.autograd.grad((out * W).sum(), (x0, mu))


@pytest.mark.parametrize("method, kw", [("dopri5", dict(rtol=1e-8, atol=1e-10)),
                                        ("radau5", dict(rtol=1e-6, atol=1e-9)),
                                        ("esdirk", dict(rtol=1e-6, atol=1e-9)),
                                        ("backward_euler", dict(dt=0.01)),
                                        ("trapezoid", dict(dt=0.02))])
@pytest.mark.parametrize("K", [1, 5, 10**15])  # (a K beyond the steps taken allocates only those)
def test_checkpointed_gradient_is_the_stored_one_bit_for_bit(vdp, method, kw, K):
    ref = _grads(ic.compile(vdp, method=method, **kw))
    got = _grads(ic.compile(vdp, method=method, checkpoint=K, **kw))
    for a, r in zip(got, ref):
        assert torch.equal(a, r)


def test_stiff_long_horizon_checkpointed_gradient_is_the_stored_one(vdp):
    """Van der Pol with mu = 1000 to t = 3000 (about 1,300 steps, relaxation jumps that amplify any
    difference in the stages): replays of 16 steps, of 256, and of the whole trajectory."""
    te = torch.linspace(0.0, 3000.0, 31, dtype=f64)
    x0 = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=f64)
    mu = torch.tensor([[1000.0], [700.0]], dtype=f64)
    ref = None
    for K in (None, 16, 256, 10**6):
        layer = ic.compile(vdp, method="radau5", rtol=1e-6, atol=1e-9, checkpoint=K)
        xg, mg = x0.clone().requires_grad_(), mu.clone().requires_grad_()
        g = torch.autograd.grad(layer(xg, mg, t_eval=te)[:, 1:].sum(), (xg, mg))
        if ref is None:
            ref = g
        for a, r in zip(g, ref):
            assert torch.equal(a, r)


def test_checkpointed_gradient_against_central_differences(vdp):
    layer = ic.compile(vdp, method="radau5", rtol=1e-11, atol=1e-13, checkpoint=7)
    _, gx, gm = _grads(layer)

    def L(xv, mv):
        with torch.no_grad():
            return (layer(xv, mv, t_eval=TE) * W).sum().item()

    eps = 1e-5
    for b in range(3):
        d = torch.zeros_like(MU)
        d[b, 0] = eps
        fd = (L(X0, MU + d) - L(X0, MU - d)) / (2 * eps)
        assert abs(gm[b, 0].item() - fd) <= 1e-5 * (1 + abs(fd))
        for j in range(2):
            d = torch.zeros_like(X0)
            d[b, j] = eps
            fd = (L(X0 + d, MU) - L(X0 - d, MU)) / (2 * eps)
            assert abs(gx[b, j].item() - fd) <= 1e-5 * (1 + abs(fd))


def test_checkpointing_keeps_a_fraction_of_the_step_store(robertson):
    """Robertson to t = 1e5 with Radau IIA (3 stages, 3 states): 3 + 9 numbers per step with every
    step's stages; with K = 32 a step keeps a 4-number head, and every 32 steps a 19-number
    checkpoint (the state, the time and state where df/dx was evaluated, the previous step's 9 stage
    increments, its size and two flags)."""
    layer = ic.compile(robertson, method="radau5", rtol=1e-6, atol=1e-10)
    kern = layer.kernels
    X0r = np.array([[1.0, 0.0, 0.0]] * 2)
    P = np.zeros((2, kern.m))
    P[:, 1:4] = [0.04, 3e7, 1e4]
    TEV = np.array([[0.0, 1.0, 1e5]])
    tb = TABLEAUS["radau5"]
    full = kern.integrate(X0r, P, TEV, tb, 1e-6, 1e-10, None, None, 100_000, store=True)
    ck = kern.integrate(X0r, P, TEV, tb, 1e-6, 1e-10, None, None, 100_000, store=True, checkpoint=32)
    np.testing.assert_array_equal(ck.x, full.x)
    steps = int(full.nstep.max())
    assert steps > 100
    assert full.store.shape[1] >= steps and ck.store.shape[1] >= steps
    per_step_full = full.store_bytes / (2 * full.store.shape[1])
    per_step_ck = ck.store_bytes / (2 * ck.store.shape[1])
    assert per_step_full == 8 * (3 + 3 * 3)
    assert per_step_ck <= 8 * (4 + 19 / 32 + 19 / ck.store.shape[1])  # head + a checkpoint per 32 steps, rounded up
    G = np.random.default_rng(0).standard_normal((2, 3, 3))
    need = np.ones(len(kern.layout["param_groups"]), dtype=np.bool_)
    cols = np.ones(kern.m, dtype=np.bool_)
    cols[0] = False
    XF, PF = kern.adjoint(full, G, need, cols)
    XC, PC = kern.adjoint(ck, G, need, cols)
    np.testing.assert_array_equal(XC, XF)
    np.testing.assert_array_equal(PC, PF)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_checkpoint_option_is_refused_by_name(vdp, bad):
    with pytest.raises(ic.InputError, match="checkpoint"):
        ic.compile(vdp, method="radau5", checkpoint=bad)


def test_checkpoint_option_survives_pickling(vdp):
    import pickle

    layer = ic.compile(vdp, method="dopri5", rtol=1e-8, atol=1e-10, checkpoint=3)
    again = pickle.loads(pickle.dumps(layer))
    assert again.options.checkpoint == 3
    for a, r in zip(_grads(again), _grads(layer)):
        assert torch.equal(a, r)


def test_a_replay_that_does_not_reproduce_the_forward_gives_no_gradient(vdp):
    """The end-of-segment check: a corrupted checkpoint makes that sample's gradient NaN (the others
    keep theirs), and through the layer a sample without a gradient raises by default."""
    layer = ic.compile(vdp, method="radau5", rtol=1e-6, atol=1e-9, checkpoint=4)
    kern = layer.kernels
    P = np.zeros((3, kern.m))
    P[:, 1] = MU[:, 0].numpy()
    res = kern.integrate(X0.numpy(), P, TE.numpy()[None], TABLEAUS["radau5"], 1e-6, 1e-9, None, None, 100_000,
                         store=True, checkpoint=4)
    G = W.numpy()
    need = np.ones(len(kern.layout["param_groups"]), dtype=np.bool_)
    cols = np.array([False, True])
    XR, PR = kern.adjoint(res, G, need, cols)
    res.ckpt[1, 2, 0] *= 1 + 1e-15
    XB, PB = kern.adjoint(res, G, need, cols)
    assert np.isnan(XB[1]).all() and np.isnan(PB[1]).all()
    np.testing.assert_array_equal(XB[[0, 2]], XR[[0, 2]])
    np.testing.assert_array_equal(PB[[0, 2]], PR[[0, 2]])


def test_samples_without_an_adjoint_raise_or_are_nan_by_policy(vdp, monkeypatch):
    from implicit_compiler.runtime.ode import ODEKernels

    real = ODEKernels.adjoint

    def second_sample_lost(self, *args, **kw):
        XB, PB = real(self, *args, **kw)
        if XB.shape[0] > 1:  # (not the one-sample warm-up)
            XB[1] = np.nan
        return XB, PB

    monkeypatch.setattr(ODEKernels, "adjoint", second_sample_lost)
    loud = ic.compile(vdp, method="radau5", rtol=1e-6, atol=1e-9, checkpoint=8)
    xg = X0.clone().requires_grad_()
    with pytest.raises(ic.ConvergenceError, match=r"1 sample\(s\) \(first: \[1\]\).*checkpoint"):
        loud(xg, MU, t_eval=TE).sum().backward()
    quiet = ic.compile(vdp, method="radau5", rtol=1e-6, atol=1e-9, checkpoint=8, on_failure="nan")
    (gx,) = torch.autograd.grad(quiet(xg, MU, t_eval=TE).sum(), (xg,))
    assert torch.isnan(gx[1]).all() and torch.isfinite(gx[[0, 2]]).all()
