"""The paper's appendix system through the torch layer: values, exact Jacobian, gradcheck, shapes."""

import math

import numpy as np
import pytest
import sympy as sp
import torch

import implicit_compiler as ic
from implicit_compiler.errors import InputError

Y0 = torch.tensor([1.0, 1.5], dtype=torch.float64)


def test_solution_and_exact_jacobian(appendix_layer):
    xs = torch.tensor([[1.0], [0.9]], dtype=torch.float64, requires_grad=True)
    y = appendix_layer(xs, y0=Y0)
    assert y.shape == (2, 2)
    np.testing.assert_allclose(y[0].detach().numpy(), [1.0, math.sqrt(2.0)], atol=1e-12)
    # closed form away from x = 1: y1 = 1/x, y2 = sqrt(4 - x^2 - 1/x^2)
    np.testing.assert_allclose(y[1].detach().numpy(), [1 / 0.9, math.sqrt(4 - 0.81 - 1 / 0.81)], atol=1e-12)
    # dy/dx at x = 1 is -[[2, 2 sqrt2], [1, 0]]^{-1} [2, 1]^T
    Jy = np.array([[2.0, 2.0 * math.sqrt(2.0)], [1.0, 0.0]])
    expected = -np.linalg.solve(Jy, np.array([2.0, 1.0]))
    for k in range(2):
        (g,) = torch.autograd.grad(y[0, k], xs, retain_graph=True)
        np.testing.assert_allclose(g[0, 0].item(), expected[k], atol=1e-10)
        assert g[1, 0].item() == 0.0


def test_symbolic_jacobians_match_paper():
    from tests.conftest import appendix_system

    s = appendix_system()
    x, y1, y2 = sp.symbols("x y1 y2")
    assert s.jacobian_unknowns == sp.Matrix([[2 * y1, 2 * y2], [x, 0]])
    assert s.jacobian_params == sp.Matrix([[2 * x], [y1]])
    J = s.implicit_jacobian().subs({x: 1, y1: 1, y2: sp.sqrt(2)})
    assert sp.simplify(J - sp.Matrix([-1, 0])) == sp.zeros(2, 1)


def test_gradcheck_float64(appendix_layer):
    xs = torch.tensor([[1.0], [0.9], [1.1]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: appendix_layer(t, y0=Y0), (xs,), eps=1e-6, atol=1e-7)


def test_batch_equals_loop(appendix_layer):
    xs = torch.linspace(0.7, 1.3, 17, dtype=torch.float64).reshape(-1, 1).requires_grad_()
    w = torch.randn(17, 2, dtype=torch.float64)
    y = appendix_layer(xs, y0=Y0)
    (y * w).sum().backward()
    for k in range(17):
        xk = xs[k:k + 1].detach().clone().requires_grad_()
        yk = appendix_layer(xk, y0=Y0)
        (yk * w[k]).sum().backward()
        torch.testing.assert_close(yk[0], y[k], rtol=0, atol=1e-13)
        torch.testing.assert_close(xk.grad[0], xs.grad[k], rtol=0, atol=1e-12)


def test_unbatched_input_gives_unbatched_output(appendix_layer):
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    y = appendix_layer(x, y0=Y0)
    assert y.shape == (2,)
    y[0].backward()
    assert x.grad.shape == (1,)
    assert x.grad.item() == pytest.approx(-1.0, abs=1e-10)


def test_float32_in_float32_out(appendix_layer):
    xs = torch.tensor([[1.0], [0.9]], dtype=torch.float32, requires_grad=True)
    y = appendix_layer(xs, y0=Y0)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert xs.grad.dtype == torch.float32
    assert xs.grad[0, 0].item() == pytest.approx(-1.0, abs=1e-6)


def test_per_sample_initial_guess_and_info(appendix_layer):
    xs = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    y0 = torch.tensor([[1.0, 1.5], [1.0, -1.5]], dtype=torch.float64)
    y, info = appendix_layer(xs, y0=y0, return_info=True)
    # the two starting points pick the two roots y2 = +-sqrt(2)
    assert y[0, 1].item() == pytest.approx(math.sqrt(2), abs=1e-12)
    assert y[1, 1].item() == pytest.approx(-math.sqrt(2), abs=1e-12)
    assert info.converged.all()
    assert (info.iterations >= 1).all() and (info.residual_norm <= 1e-10).all()


def test_warm_start_needs_fewer_iterations():
    from tests.conftest import appendix_system

    layer = ic.compile(appendix_system(), warm_start=True)
    xs = torch.tensor([[1.0], [0.95]], dtype=torch.float64)
    _, first = layer(xs, y0=Y0, return_info=True)
    _, second = layer(xs + 1e-6, return_info=True)
    assert (second.iterations < first.iterations).all()


def test_shape_errors_name_the_group(appendix_layer):
    with pytest.raises(InputError, match=r"'theta' expects shape \(1,\) .* or \(B, 1\) .*got \(2, 3\)"):
        appendix_layer(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(InputError, match="takes 1 parameter argument"):
        appendix_layer(torch.zeros(1), torch.zeros(1))
    with pytest.raises(InputError, match="unknown argument 'z'"):
        appendix_layer(z=torch.zeros(1))
    with pytest.raises(InputError, match="missing parameter group"):
        appendix_layer()
    with pytest.raises(InputError, match=r"y0 must have shape \(2,\) or \(4, 2\)"):
        appendix_layer(torch.ones(4, 1, dtype=torch.float64), y0=torch.ones(3))
    with pytest.raises(InputError, match="dtype torch.int64"):
        appendix_layer(torch.ones(4, 1, dtype=torch.int64))


def test_layer_introspection(appendix_layer):
    assert issubclass(appendix_layer.function, torch.autograd.Function)
    src = appendix_layer.source
    assert "def residual_jacobian" in src and "y[0] = y1" in src
    assert appendix_layer.path.exists()
    assert "appendix" in repr(appendix_layer)


def test_named_groups_with_matrix_param_broadcast():
    # Linear system A u = b with A shared (unbatched) and b per sample.
    A = sp.Matrix(2, 2, sp.symbols("a0:4"))
    b = sp.Matrix(sp.symbols("b0:2"))
    u = sp.Matrix(sp.symbols("u0:2"))
    layer = ic.compile(ic.ResidualSystem(list(A * u - b), unknowns={"u": u}, params={"A": A, "b": b}))
    At = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    bt = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    out = layer(A=At, b=bt)
    assert out.shape == (5, 2)
    ref = torch.linalg.solve(At.detach(), bt.detach().T).T
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=1e-12)
    w = torch.randn(5, 2, dtype=torch.float64)
    (out * w).sum().backward()
    # reference gradients by autograd through torch.linalg.solve (A shared: summed over the batch)
    A2 = At.detach().clone().requires_grad_()
    b2 = bt.detach().clone().requires_grad_()
    (torch.linalg.solve(A2, b2.T).T * w).sum().backward()
    torch.testing.assert_close(At.grad, A2.grad, rtol=0, atol=1e-11)
    torch.testing.assert_close(bt.grad, b2.grad, rtol=0, atol=1e-11)
    assert torch.autograd.gradcheck(lambda a, bb: layer(a, bb), (At, bt))


def test_param_without_grad_gets_none_and_multiple_outputs():
    a, b, c = sp.symbols("a b c")
    u, v = sp.symbols("u v")
    layer = ic.compile(ic.ResidualSystem([u - a * b, v**3 + v - c], unknowns={"u": u, "v": v},
                                         params={"a": a, "b": b, "c": c}))
    at = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(5.0, dtype=torch.float64)  # shared, no grad
    ct = torch.tensor([2.0, 10.0], dtype=torch.float64, requires_grad=True)
    uu, vv = layer(at, bt, ct)
    assert uu.shape == (2,) and vv.shape == (2,)
    torch.testing.assert_close(uu, at.detach() * 5.0)
    torch.testing.assert_close(vv, torch.tensor([1.0, 2.0], dtype=torch.float64))
    (uu.sum() + vv.sum()).backward()
    torch.testing.assert_close(at.grad, torch.full((2,), 5.0, dtype=torch.float64))
    # dv/dc = 1 / (3 v^2 + 1)
    torch.testing.assert_close(ct.grad, 1.0 / (3.0 * torch.tensor([1.0, 4.0], dtype=torch.float64) + 1.0))
    assert bt.grad is None


def test_numpy_entry_point(appendix_layer):
    res = appendix_layer.solve(np.array([[1.0], [0.5]]), y0=np.array([1.0, 1.5]))
    assert res.y.shape == (2, 2)
    assert res.converged.tolist() == [True, False]  # x = 0.5 has no real solution
    assert res.status[1] != 0 and "did not converge" in res.summary()
    assert appendix_layer.split(res.y)["y"].shape == (2, 2)
