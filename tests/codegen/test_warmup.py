"""``compile()`` compiles (or loads) every kernel a call can reach: the serial range kernels
and the prange drivers, forward and backward, so a first large batch compiles nothing."""

import contextlib

import numpy as np
import pytest
import sympy as sp
import torch
from numba.core import event

import implicit_compiler as ic
from tests.conftest import appendix_system


class _Compiles(event.Listener):
    def __init__(self):
        self.names = []

    def on_start(self, ev):
        self.names.append(ev.data["dispatcher"].py_func.__name__)

    def on_end(self, ev):
        pass


@contextlib.contextmanager
def no_compilation():
    listener = _Compiles()
    with event.install_listener("numba:compile", listener):
        yield
    assert listener.names == [], f"compiled during the call: {listener.names}"


@pytest.fixture(scope="module")
def appendix():
    return ic.compile(appendix_system())


@pytest.fixture(scope="module")
def fixed_point():
    y, x = sp.symbols("y x")
    return ic.FixedPoint([sp.cos(y) * x], unknowns=[y], params=[x], name="warm_fixed_point")


def _compiled(module, names):
    return {name: len(getattr(module, name).signatures) for name in names}


def test_compile_builds_serial_and_parallel_newton_and_vjp(appendix):
    mod = appendix.kernels.module
    counts = _compiled(mod, ["newton_range", "newton_batch_parallel", "vjp_range", "vjp_batch_parallel"])
    assert all(c == 1 for c in counts.values()), counts


def test_first_large_batch_compiles_nothing(appendix):
    mod = appendix.kernels.module
    names = ["newton_range", "newton_batch_parallel", "vjp_range", "vjp_batch_parallel"]
    before = _compiled(mod, names)
    B = 5000  # above the unmeasured threading threshold: the prange drivers run
    assert B >= appendix.kernels.UNMEASURED_PARALLEL_BATCH
    x = torch.linspace(0.8, 1.5, B, dtype=torch.float64).reshape(B, 1).requires_grad_()
    with no_compilation():
        y = appendix(x, y0=torch.tensor([1.0, 1.5], dtype=torch.float64))
        y[:, 1].sum().backward()
        res = appendix.solve(x.detach().numpy(), y0=np.array([1.0, 1.5]))
    assert _compiled(mod, names) == before
    xs = x.detach().numpy()[:, 0]
    y2 = np.sqrt(4 - xs**2 - xs**-2)
    np.testing.assert_allclose(y.detach().numpy()[:, 1], y2, rtol=1e-12)
    np.testing.assert_allclose(res.y[:, 1], y2, rtol=1e-12)
    # dy2/dx from y2^2 = 4 - x^2 - x^-2
    np.testing.assert_allclose(x.grad.numpy()[:, 0], (-xs + xs**-3) / y2, rtol=1e-8)


@pytest.mark.parametrize("method", ["anderson", "newton"])
def test_fixed_point_layer_warm_for_its_method(fixed_point, method):
    layer = ic.compile(fixed_point, method=method)
    mod = layer.kernels.module
    kind = "fixed_point" if method == "anderson" else "newton"
    counts = _compiled(mod, [f"{kind}_range", f"{kind}_batch_parallel", "vjp_range", "vjp_batch_parallel"])
    assert all(c == 1 for c in counts.values()), counts
    B = 4096
    x = np.linspace(0.1, 0.9, B)[:, None]
    with no_compilation():
        res = layer.solve(x)
    y = res.y[:, 0]
    assert res.converged.all()
    np.testing.assert_allclose(y, np.cos(y) * x[:, 0], rtol=1e-9, atol=1e-10)


def test_problem_layer_warm_for_large_batches():
    """Problem layers warm their prange drivers too: a first large batch compiles nothing."""
    y, t = sp.symbols("y t")
    problem = ic.Problem((y - t) ** 2 / 2, variables=[y], params=[t], inequalities=[y <= 1], name="warm_box")
    layer = ic.compile(problem)
    mod = layer.kernels.module
    names = ["ip_range", "ip_batch_parallel", "vjp_range", "vjp_batch_parallel"]
    counts = _compiled(mod, names)
    assert all(c == 1 for c in counts.values()), counts
    B = 5000
    ts = torch.linspace(-2.0, 3.0, B, dtype=torch.float64).requires_grad_()
    with no_compilation():
        out = layer(ts.reshape(B, 1))
        out.sum().backward()
    want = np.minimum(ts.detach().numpy(), 1.0)  # projection onto y <= 1
    np.testing.assert_allclose(out.detach().numpy().reshape(-1), want, rtol=1e-9, atol=1e-9)
    # dy/dt = 1 strictly inside, 0 where the bound is strictly active
    g = ts.grad.numpy()
    inside, active = ts.detach().numpy() < 0.99, ts.detach().numpy() > 1.01
    np.testing.assert_allclose(g[inside], 1.0, atol=1e-8)
    np.testing.assert_allclose(g[active], 0.0, atol=1e-8)
