"""Bad input raises InputError naming the argument; failed samples are per-sample statuses."""

import math

import numpy as np
import pytest
import torch

import implicit_compiler as ic
from implicit_compiler import ConvergenceError, InputError, Status

f64 = torch.float64


@pytest.fixture(scope="module")
def decay_layer(decay):
    return ic.compile(decay, method="radau5", rtol=1e-9, atol=1e-12, on_failure="nan")


@pytest.mark.parametrize("te, match", [
    ([0.0, 1.0, 1.0], r"strictly increasing \(t_eval\[1\] = 1.0, t_eval\[2\] = 1.0\)"),
    ([1.0, 0.5], r"strictly increasing"),
    ([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]], r"shape \(T,\) or \(B, T\) with B = 2"),
    ([0.0, float("nan")], r"NaN or inf"),
    ([], r"t_eval is empty"),
])
def test_bad_t_eval(decay_layer, te, match):
    with pytest.raises(InputError, match=match):
        decay_layer(torch.ones(2, 1, dtype=f64), torch.ones(1, dtype=f64), t_eval=torch.tensor(te, dtype=f64))


def test_bad_shapes_and_arguments(decay_layer):
    te = torch.tensor([0.0, 1.0], dtype=f64)
    with pytest.raises(InputError, match=r"x0 must have shape \(1,\) or \(B, 1\)"):
        decay_layer(torch.ones(2, 3, dtype=f64), torch.ones(1, dtype=f64), t_eval=te)
    with pytest.raises(InputError, match=r"takes x0 and 1 parameter tensor\(s\) \(theta\), got 0"):
        decay_layer(torch.ones(2, 1, dtype=f64), t_eval=te)
    with pytest.raises(InputError, match=r"t_eval= is required"):
        decay_layer(torch.ones(2, 1, dtype=f64), torch.ones(1, dtype=f64))
    with pytest.raises(InputError, match=r"with respect to t_eval are not supported"):
        decay_layer(torch.ones(2, 1, dtype=f64), torch.ones(1, dtype=f64), t_eval=te.clone().requires_grad_())
    with pytest.raises(InputError, match=r"x0 has batch 3 but the parameters have batch 2"):
        decay_layer(torch.ones(3, 1, dtype=f64), torch.ones(2, 1, dtype=f64), t_eval=te)
    with pytest.raises(InputError, match=r"x0 has dtype torch.int64"):
        decay_layer(torch.ones(2, 1, dtype=torch.int64), torch.ones(1, dtype=f64), t_eval=te)


def test_nan_initial_state_is_a_per_sample_status(decay, decay_layer):
    te = torch.tensor([0.0, 0.5, 1.0], dtype=f64)
    x0 = torch.tensor([[1.0], [math.nan], [2.0]], dtype=f64, requires_grad=True)
    k = torch.tensor([[1.0], [1.0], [math.inf]], dtype=f64)
    out, info = decay_layer(x0, k, t_eval=te, return_info=True)
    assert info.status.tolist() == [0, Status.ODE_NONFINITE_STATE, Status.ODE_NONFINITE_STATE]
    torch.testing.assert_close(out[0, :, 0], torch.exp(-te), rtol=1e-8, atol=0)
    assert torch.isnan(out[1:]).all()
    out[0].sum().backward()
    torch.testing.assert_close(x0.grad[0, 0], torch.exp(-te).sum(), rtol=1e-8, atol=0)
    assert torch.isnan(x0.grad[1:]).all()
    raising = ic.compile(decay, method="radau5")
    with pytest.raises(ConvergenceError, match=r"samples \[1\]: ODE_NONFINITE_STATE") as e:
        raising(x0.detach()[:2], k[:2], t_eval=te)
    assert e.value.failed.tolist() == [1]


def test_blow_up_max_steps_and_newton_failure_in_mixed_batches(quadratic):
    te = torch.tensor([0.0, 0.5, 2.0], dtype=f64)
    # c x0 = 1: x = x0 / (1 - c x0 t) blows up at t = 1; c x0 = -1 decays
    x0 = torch.tensor([[1.0], [1.0], [2.0]], dtype=f64)
    c = torch.tensor([[-1.0], [1.0], [-0.5]], dtype=f64)
    exact = x0 / (1 - c * x0 * te)
    layer = ic.compile(quadratic, method="radau5", rtol=1e-9, atol=1e-12, on_failure="keep")
    out, info = layer(x0, c, t_eval=te, return_info=True)
    st = info.status.tolist()
    assert st[0] == 0 and st[2] == 0
    assert st[1] in (Status.ODE_STEP_UNDERFLOW, Status.ODE_MAX_STEPS)
    torch.testing.assert_close(out[[0, 2]], exact[[0, 2]][..., None], rtol=1e-7, atol=0)
    # 'keep': the failed sample keeps the states it reached (t = 0.5: x = 2) and NaN beyond
    torch.testing.assert_close(out[1, 1, 0], torch.tensor(2.0, dtype=f64), rtol=1e-7, atol=0)
    assert torch.isnan(out[1, 2, 0])
    few = ic.compile(quadratic, method="dopri5", max_steps=20, on_failure="nan")
    out, info = few(x0[:2], torch.tensor([[-1.0], [-1e4]], dtype=f64), t_eval=te, return_info=True)
    assert info.status.tolist() == [0, Status.ODE_MAX_STEPS]
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    # backward Euler: x1 - h c x1^2 = x0 has no real root when 4 h c x0 > 1
    be = ic.compile(quadratic, method="backward_euler", dt=0.5, on_failure="nan")
    out, info = be(torch.tensor([[1.0], [1.0]], dtype=f64), torch.tensor([[-1.0], [1.0]], dtype=f64),
                   t_eval=te, return_info=True)
    assert info.status.tolist() == [0, Status.ODE_NEWTON_FAILED]
    ref = [1.0]
    for _ in range(4):  # h = 0.5, c = -1: x1 = (-1 + sqrt(1 + 4 h x0)) / (2 h)
        ref.append(-1 + math.sqrt(1 + 2 * ref[-1]))
    np.testing.assert_allclose(out[0, :, 0].numpy(), [ref[0], ref[1], ref[4]], rtol=1e-12)
    assert "stage equations could not be solved" in Status.ODE_NEWTON_FAILED.message
