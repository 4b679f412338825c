"""What the torch boundary protects against: double backward (exact, never a silent zero), in-place changes of inputs,
writes through an output's NumPy view, unusual dtypes and argument types, batch-1 broadcasting.

References are closed forms:
  appendix  x^2 + y1^2 + y2^2 = 4, x y1 = 1:  y1 = 1/x, y2 = sqrt(4 - x^2 - 1/x^2)
  two       u = a b, v^3 + v = c:              du/da = b, du/db = a, dv/dc = 1 / (3 v^2 + 1)
  sphere    argmin |y - a|^2 s.t. |y| = 1:      y = a/|a|, dy/da = (I - y y^T) / |a|
  cosfp     y = cos(t y):                      dy/dt = -y sin(t y) / (1 + t sin(t y))
"""

import numpy as np
import pytest
import sympy as sp
import torch

import implicit_compiler as ic
from implicit_compiler.errors import InputError

Y0 = torch.tensor([1.0, 1.5], dtype=torch.float64)
# B n 8 >= 65536 for n = 2 and B m 8 >= 65536 for m = 1: y*, the factorisation and the gradient are
# all arrays of the kernels' ArrayPool (runtime/kernels.py), reused once nothing references them
POOL_B = 8192
INPLACE = "modified by an inplace operation"
# Newton stops at ||F||_inf <= 1e-10 (the default tol): y* and its gradients agree with the closed forms to
# about 1e-11 relative; 1e-12 holds only where the residual is linear in y
RTOL = 1e-9


def appendix_ref(x):
    """(y, dy1/dx + dy2/dx) in closed form, float64 NumPy."""
    x = np.asarray(x, dtype=np.float64)
    y1, y2 = 1 / x, np.sqrt(4 - x**2 - 1 / x**2)
    return np.stack([y1, y2], axis=-1), -1 / x**2 + (-x + x**-3) / y2


@pytest.fixture(scope="module")
def two_layer():
    # the same system as tests/torch/test_appendix.py (one compiled kernel module)
    a, b, c = sp.symbols("a b c")
    u, v = sp.symbols("u v")
    return ic.compile(ic.ResidualSystem([u - a * b, v**3 + v - c], unknowns={"u": u, "v": v},
                                        params={"a": a, "b": b, "c": c}))


def two_ref(a, b, c):
    """u, v and du/da, du/db, dv/dc (float64 NumPy)."""
    a, b, c = (np.asarray(t, dtype=np.float64) for t in (a, b, c))
    v = np.cbrt(c / 2 + np.sqrt(c**2 / 4 + 1 / 27)) + np.cbrt(c / 2 - np.sqrt(c**2 / 4 + 1 / 27))
    return a * b, v, b, a, 1 / (3 * v**2 + 1)


@pytest.fixture(scope="module")
def sphere_layer():
    y = sp.Matrix(sp.symbols("y0:3"))
    a = sp.Matrix(sp.symbols("a0:3"))
    # the same problem as tests/problem/test_training.py
    return ic.compile(ic.Problem(((y - a).T * (y - a))[0], variables={"y": y}, params={"a": a},
                                 equalities=[(y.T * y)[0] - 1]))


SPHERE_Y0 = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)


def sphere_grad(a, w):
    """d(w . y)/da for y = a/|a| (NumPy, one sample)."""
    r = np.linalg.norm(a)
    y = a / r
    return (w - y * (y @ w)) / r


@pytest.fixture(scope="module")
def cos_layer():
    y, t = sp.symbols("y t")
    # the same fixed point as tests/runtime/test_fixed_point.py
    return ic.compile(ic.FixedPoint(map=[sp.cos(t * y)], unknowns=[y], params=[t], method="anderson"))


def cos_grad(y, t):
    return -y * np.sin(t * y) / (1 + t * np.sin(t * y))


# ---------------------------------------------------------------------------------------------------
# 1. double backward is exact, never a silent zero (tests/torch/test_second_order.py has the rest)


def appendix_second(x):
    """(y1'', y2'') in closed form: y1 = 1/x, y2 = sqrt(g), g = 4 - x^2 - 1/x^2."""
    x = np.asarray(x, dtype=np.float64)
    y2 = np.sqrt(4 - x**2 - x**-2)
    g1, g2 = -2 * x + 2 * x**-3, -2 - 6 * x**-4
    return np.stack([2 * x**-3, g2 / (2 * y2) - g1**2 / (4 * y2**3)], axis=-1)


def test_gradient_penalty_through_residual_layer_is_exact(appendix_layer):
    x = torch.tensor([[0.9]], dtype=torch.float64, requires_grad=True)
    y = appendix_layer(x, y0=Y0)
    (g,) = torch.autograd.grad(y[:, 0].sum(), x, create_graph=True)
    # the first-order value is exact, and it is not detached from x
    assert g.item() == pytest.approx(-1 / 0.81, abs=1e-12)
    assert g.requires_grad
    (g**2).sum().backward()
    # d/dx (y1')^2 = 2 y1' y1'' = 2 (-1/x^2)(2/x^3)
    assert x.grad.item() == pytest.approx(-4 / 0.9**5, rel=1e-9)
    # a penalty added to an ordinary loss: the case that used to contribute 0 silently
    x.grad = None
    y = appendix_layer(x, y0=Y0)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    _, dsum = appendix_ref(0.9)
    assert g.item() == pytest.approx(dsum, abs=1e-12)
    (y.sum() + 0.1 * (g**2).sum()).backward()
    assert x.grad.item() == pytest.approx(dsum + 0.2 * dsum * appendix_second(0.9).sum(), rel=1e-9)
    y = appendix_layer(x, y0=Y0)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert h.item() == pytest.approx(appendix_second(0.9).sum(), rel=1e-9)


def test_gradgradcheck_passes(appendix_layer, two_layer):
    xs = torch.tensor([[0.9], [1.1]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: appendix_layer(t, y0=Y0), (xs,))
    a = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([2.0, 10.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda *t: two_layer(*t), (a, b, c))


def test_second_order_for_every_group_that_got_a_gradient(two_layer):
    a = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(5.0, dtype=torch.float64)  # no grad: gets none
    c = torch.tensor([2.0, 10.0], dtype=torch.float64, requires_grad=True)
    u, v = two_layer(a, b, c)
    ga, gc = torch.autograd.grad(u.sum() + (v**2).sum(), (a, c), create_graph=True)
    _, vr, dua, _, dvc = two_ref(a.detach(), 5.0, c.detach())
    np.testing.assert_allclose(ga.detach().numpy(), dua, rtol=0, atol=1e-12)
    # d(v^2)/dc = 2 v dv/dc, where v^2 is an ordinary torch op on the layer's output
    np.testing.assert_allclose(gc.detach().numpy(), 2 * vr * dvc, rtol=1e-12, atol=0)
    assert ga.requires_grad and gc.requires_grad
    # ga = b does not depend on a or c; gc' = 2 (dv/dc)^2 + 2 v d2v/dc2, d2v/dc2 = -6 v (dv/dc)^3
    gaa, gac = torch.autograd.grad(ga.sum(), (a, c), retain_graph=True, materialize_grads=True)
    assert gaa.tolist() == [0.0, 0.0] and gac.tolist() == [0.0, 0.0]
    gca, gcc = torch.autograd.grad(gc.sum(), (a, c), materialize_grads=True)
    assert gca.tolist() == [0.0, 0.0]
    np.testing.assert_allclose(gcc.numpy(), 2 * dvc**2 - 12 * vr**2 * dvc**3, rtol=1e-9)


def test_second_order_of_problem_and_fixed_point_layers(sphere_layer, cos_layer):
    a = torch.tensor([1.0, 0.2, 0.1], dtype=torch.float64, requires_grad=True)
    y = sphere_layer(a, y0=SPHERE_Y0)
    w = np.array([0.3, -1.0, 2.0])
    (g,) = torch.autograd.grad((y * torch.from_numpy(w)).sum(), a, create_graph=True)
    np.testing.assert_allclose(g.detach().numpy(), sphere_grad(a.detach().numpy(), w), rtol=0, atol=1e-9)
    (g**2).sum().backward()

    def penalty(a0):
        return (sphere_grad(a0, w) ** 2).sum()

    a0, eps = a.detach().numpy(), 1e-6
    ref = [(penalty(a0 + eps * e) - penalty(a0 - eps * e)) / (2 * eps) for e in np.eye(3)]
    np.testing.assert_allclose(a.grad.numpy(), ref, rtol=0, atol=1e-7)
    assert torch.autograd.gradgradcheck(lambda t: sphere_layer(t, y0=SPHERE_Y0), (a,))

    t = torch.tensor([[0.5], [1.0]], dtype=torch.float64, requires_grad=True)
    y = cos_layer(t)
    (g,) = torch.autograd.grad(y.sum(), t, create_graph=True)
    np.testing.assert_allclose(g.detach().numpy(), cos_grad(y.detach().numpy(), t.detach().numpy()),
                               rtol=1e-9, atol=0)
    (g**2).sum().backward()

    def cos_penalty(tt):
        # the closed-form first derivative at the layer's solution, per sample
        with torch.no_grad():
            yy = cos_layer(torch.from_numpy(tt)).numpy()
        return cos_grad(yy, tt) ** 2

    t0, eps = t.detach().numpy(), 1e-5
    ref = (cos_penalty(t0 + eps) - cos_penalty(t0 - eps)) / (2 * eps)
    np.testing.assert_allclose(t.grad.numpy(), ref, rtol=0, atol=1e-5)
    assert torch.autograd.gradgradcheck(lambda s: cos_layer(s), (t,), atol=1e-6)


def test_create_graph_without_second_differentiation_is_fine(appendix_layer):
    # create_graph alone is not an error: only differentiating the layer's gradient is
    x = torch.tensor([[0.8], [1.2]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    y = appendix_layer(x, y0=Y0)
    gx, gw = torch.autograd.grad((w * y).sum() + (w**3).sum(), (x, w), create_graph=True)
    yr, dsum = appendix_ref([0.8, 1.2])
    np.testing.assert_allclose(gx.detach().numpy().ravel(), 0.7 * dsum, rtol=1e-12)
    # gw = sum(y) + 3 w^2 does not go through the layer's backward: its own derivative is fine
    (ggw,) = torch.autograd.grad(gw.sum(), w)
    assert ggw.item() == pytest.approx(6 * 0.7, abs=1e-14)


# ---------------------------------------------------------------------------------------------------
# 2. in-place changes of inputs between forward and backward


def _modify(kind, t):
    if kind == "no_grad":
        with torch.no_grad():
            t.add_(0.1)
    elif kind == "detach":
        t.detach().add_(0.1)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no_grad", "detach"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1,)])
def test_inplace_change_of_a_leaf_raises(appendix_layer, kind, shape):
    x = torch.full(shape, 0.9, dtype=torch.float64, requires_grad=True)
    y = appendix_layer(x, y0=Y0)
    _modify(kind, x)
    with pytest.raises(RuntimeError, match=INPLACE):
        y.sum().backward()


def test_inplace_change_of_a_non_leaf_raises(appendix_layer, two_layer):
    x = torch.tensor([[0.9], [1.1]], dtype=torch.float64, requires_grad=True)
    z = x * 1.0
    y = appendix_layer(z, y0=Y0)
    z.add_(0.1)  # in grad mode: an ordinary in-place op on a non-leaf
    with pytest.raises(RuntimeError, match=INPLACE):
        y.sum().backward()
    a = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([2.0, 10.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    cc = c + 0.0  # saves nothing for its own backward: only the layer sees the change
    u, v = two_layer(a, b, cc)
    cc.mul_(2.0)
    with pytest.raises(RuntimeError, match=INPLACE):
        (u.sum() + v.sum()).backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B", [1, 5, POOL_B])
def test_writes_that_bypass_autograd_do_not_change_the_gradient(appendix_layer, dtype, B):
    # x.data.add_ and writes through x's NumPy view are invisible to autograd: the backward
    # must still differentiate at the point the forward solved (it reads its own copy of theta)
    xv = np.linspace(0.8, 1.2, B)
    for write in ("data", "numpy"):
        x = torch.tensor(xv.reshape(B, 1), dtype=dtype, requires_grad=True)
        x64 = x.detach().double().numpy().ravel().copy()  # .double() of a float64 tensor is itself
        y = appendix_layer(x, y0=Y0)
        if write == "data":
            x.data.add_(0.1)
        else:
            x.detach().numpy()[:] += 0.1
        y.sum().backward()
        _, dsum = appendix_ref(x64)
        tol = RTOL if dtype == torch.float64 else 1e-6
        np.testing.assert_allclose(x.grad.double().numpy().ravel(), dsum, rtol=tol, atol=0)


def test_data_writes_do_not_change_gradients_of_several_groups_and_problems(two_layer, sphere_layer):
    a = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)  # shared: the packed path
    c = torch.tensor([2.0, 10.0], dtype=torch.float64, requires_grad=True)
    ref = two_ref([2.0, 3.0], 0.5, [2.0, 10.0])
    u, v = two_layer(a, b, c)
    for t in (a, b, c):
        t.data.mul_(3.0)
    (u.sum() + v.sum()).backward()
    np.testing.assert_allclose(a.grad.numpy(), ref[2], rtol=1e-14)
    assert b.grad.item() == pytest.approx(ref[3].sum(), rel=1e-14)
    np.testing.assert_allclose(c.grad.numpy(), ref[4], rtol=1e-12)

    a0 = np.array([[1.0, 0.2, 0.1], [-0.5, 2.0, 1.0]])
    a = torch.tensor(a0, requires_grad=True)
    y = sphere_layer(a, y0=SPHERE_Y0)
    a.data.add_(1.0)
    w = np.array([0.3, -1.0, 2.0])
    (y * torch.from_numpy(w)).sum().backward()
    for k in range(2):
        np.testing.assert_allclose(a.grad[k].numpy(), sphere_grad(a0[k], w), rtol=0, atol=1e-9)


def test_inplace_change_of_a_problem_parameter_raises(sphere_layer):
    a = torch.tensor([1.0, 0.2, 0.1], dtype=torch.float64, requires_grad=True)
    y = sphere_layer(a, y0=SPHERE_Y0)
    with torch.no_grad():
        a.mul_(2.0)
    with pytest.raises(RuntimeError, match=INPLACE):
        y.sum().backward()


# ---------------------------------------------------------------------------------------------------
# 3. outputs never share memory with what the backward reads


def _arrays_of(res):
    return [res.y, res.p, res.lu, res.piv, res.status]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B", [1, POOL_B])
def test_numpy_writes_to_the_output_do_not_change_the_gradient(appendix_layer, dtype, B):
    xv = np.linspace(0.8, 1.2, B).reshape(B, 1)
    x = torch.tensor(xv, dtype=dtype, requires_grad=True)
    y = appendix_layer(x, y0=Y0)
    res = y.grad_fn.res
    assert not any(np.shares_memory(y.detach().numpy(), arr) for arr in _arrays_of(res))
    yref, dsum = appendix_ref(x.detach().double().numpy().ravel())
    tol = RTOL if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(y.detach().double().numpy(), yref, rtol=tol)
    y.detach().numpy()[:] *= 2
    y.sum().backward()
    np.testing.assert_allclose(x.grad.double().numpy().ravel(), dsum, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B", [1, POOL_B])
def test_numpy_writes_to_several_outputs_do_not_change_the_gradient(two_layer, dtype, B):
    rng = np.random.default_rng(B)
    av, cv = rng.uniform(-2, 2, B), rng.uniform(-5, 5, B)
    a = torch.tensor(av, dtype=dtype, requires_grad=True)
    b = torch.tensor(0.7, dtype=dtype, requires_grad=True)
    c = torch.tensor(cv, dtype=dtype, requires_grad=True)
    u, v = two_layer(a, b, c)
    res = u.grad_fn.res
    for out in (u, v):
        assert not any(np.shares_memory(out.detach().numpy(), arr) for arr in _arrays_of(res))
    ur, vr, dua, dub, dvc = two_ref(a.detach().double(), b.detach().double(), c.detach().double())
    u.detach().numpy()[:] = -7.0
    v.detach().numpy()[:] *= 3
    (2 * u.sum() + v.sum()).backward()
    tol = RTOL if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(a.grad.double().numpy(), 2 * dua, rtol=tol)
    assert b.grad.item() == pytest.approx(2 * dub.sum(), rel=tol)
    np.testing.assert_allclose(c.grad.double().numpy(), dvc, rtol=tol)


def test_pooled_arrays_are_not_reused_while_a_graph_or_an_output_holds_them(appendix_layer):
    # two large calls whose graphs are alive at once, backward in reverse order, each gradient
    # kept while the next one is computed
    x1 = torch.linspace(0.8, 1.0, POOL_B, dtype=torch.float64).reshape(-1, 1).requires_grad_()
    x2 = torch.linspace(1.0, 1.2, POOL_B, dtype=torch.float64).reshape(-1, 1).requires_grad_()
    y1 = appendix_layer(x1, y0=Y0)
    y2 = appendix_layer(x2, y0=Y0)
    r1, r2 = y1.grad_fn.res, y2.grad_fn.res
    for a in _arrays_of(r1):
        assert not any(np.shares_memory(a, b) for b in _arrays_of(r2))
    y2.sum().backward()
    y3 = appendix_layer(x1.detach() + 0.05, y0=Y0)  # a third call while x2.grad and y1's graph live
    y1.sum().backward()
    for x, y in ((x1, y1), (x2, y2)):
        yr, dsum = appendix_ref(x.detach().numpy().ravel())
        np.testing.assert_allclose(y.detach().numpy(), yr, rtol=RTOL)
        np.testing.assert_allclose(x.grad.numpy().ravel(), dsum, rtol=RTOL)
    assert not np.shares_memory(x1.grad.numpy(), x2.grad.numpy())
    assert appendix_layer.kernels.pool._arrays["Y"].shape == (POOL_B, 2)  # the pooled path was taken
    np.testing.assert_allclose(y3.numpy(), appendix_ref(x1.detach().numpy().ravel() + 0.05)[0], rtol=RTOL)


def test_torch_inplace_ops_on_the_output_are_differentiated(appendix_layer):
    x = torch.tensor([[0.9], [1.1]], dtype=torch.float64, requires_grad=True)
    y = appendix_layer(x, y0=Y0)
    y.mul_(2.0)
    y[:, 1] += 1.0
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy().ravel(), 2 * appendix_ref([0.9, 1.1])[1], rtol=1e-12)


def test_writes_to_info_status_do_not_change_which_samples_get_a_gradient(appendix_layer):
    appendix_layer.configure(on_failure="keep")
    try:
        x = torch.tensor([[0.9], [0.5]], dtype=torch.float64, requires_grad=True)  # x = 0.5 has no root
        y, info = appendix_layer(x, y0=Y0, return_info=True)
        assert info.converged.tolist() == [True, False]
        info.status.numpy()[:] = 0
        y.sum().backward()
        assert x.grad[0, 0].item() == pytest.approx(appendix_ref(0.9)[1], abs=1e-12)
        assert x.grad[1, 0].item() == 0.0
    finally:
        appendix_layer.configure(on_failure="raise")


# ---------------------------------------------------------------------------------------------------
# 4. dtypes and argument types


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_solved_in_float64(appendix_layer, dtype):
    x = torch.tensor([[0.9], [1.1], [1.3]], dtype=dtype, requires_grad=True)
    y = appendix_layer(x, y0=Y0)
    assert y.dtype == dtype
    xr = x.detach().double().numpy().ravel()  # the rounded inputs, exactly
    yref, dsum = appendix_ref(xr)
    # solved in float64 at the rounded input, then rounded once to the input dtype
    assert torch.equal(y.detach(), torch.from_numpy(yref).to(dtype))
    y.sum().backward()
    assert x.grad.dtype == dtype
    assert torch.equal(x.grad.ravel(), torch.from_numpy(dsum).to(dtype))


def test_mixed_half_precision_groups_promote_like_torch(two_layer):
    a = torch.tensor([2.0, 3.0], dtype=torch.float16, requires_grad=True)
    b = torch.tensor(0.5, dtype=torch.bfloat16, requires_grad=True)
    c = torch.tensor([2.0, 10.0], dtype=torch.float32, requires_grad=True)
    u, v = two_layer(a, b, c)
    assert u.dtype == v.dtype == torch.promote_types(torch.float16, torch.bfloat16) == torch.float32
    ur, vr, dua, dub, dvc = two_ref([2.0, 3.0], 0.5, [2.0, 10.0])
    np.testing.assert_allclose(u.detach().numpy(), ur, rtol=1e-7)
    np.testing.assert_allclose(v.detach().numpy(), vr, rtol=1e-7)
    (u.sum() + v.sum()).backward()
    assert (a.grad.dtype, b.grad.dtype, c.grad.dtype) == (torch.float16, torch.bfloat16, torch.float32)
    assert torch.equal(a.grad, torch.from_numpy(np.broadcast_to(dua, (2,)).copy()).to(torch.float16))
    assert torch.equal(b.grad, torch.tensor(dub.sum()).to(torch.bfloat16))
    np.testing.assert_allclose(c.grad.numpy(), dvc, rtol=1e-7)


@pytest.mark.parametrize("value", [0.9, [0.9], [[0.9], [1.1]], np.array([[0.9]]), 1])
def test_non_tensor_parameters_are_an_input_error(appendix_layer, value):
    with pytest.raises(InputError, match=r"parameter group 'theta' is a \w+; the torch layer takes tensors"):
        appendix_layer(value, y0=Y0)


def test_numpy_entry_point_takes_lists_numbers_and_integer_arrays(appendix_layer, two_layer):
    res = appendix_layer.solve([[0.9], [1.1]], y0=[1.0, 1.5])
    np.testing.assert_allclose(res.y, appendix_ref([0.9, 1.1])[0], rtol=1e-12)
    res = two_layer.solve([2.0, 3.0], 0.5, np.array([2, 10]))
    ur, vr, *_ = two_ref([2.0, 3.0], 0.5, [2.0, 10.0])
    np.testing.assert_allclose(res.y, np.stack([ur, vr], axis=1), rtol=1e-12)
    with pytest.raises(InputError, match="parameter group 'theta' has dtype <U3"):
        appendix_layer.solve("abc")
    with pytest.raises(InputError, match="parameter group 'c' is complex"):
        two_layer.solve(1.0, 1.0, np.array([1.0 + 1j]))
    with pytest.raises(InputError, match="parameter group 'theta' has dtype bool"):
        appendix_layer.solve(np.array([True]))
    with pytest.raises(InputError, match="parameter group 'theta': cannot read a list as an array of numbers"):
        appendix_layer.solve([[0.9], [1.0, 2.0]])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex128, torch.complex64])
def test_non_real_float_tensors_are_an_input_error(appendix_layer, two_layer, dtype):
    msg = "implicit layers are real-valued" if dtype.is_complex else "pass a floating-point tensor"
    with pytest.raises(InputError, match=rf"parameter group 'theta' has dtype {dtype}; {msg}"):
        appendix_layer(torch.ones(2, 1, dtype=dtype), y0=Y0)
    ok = torch.ones(2, dtype=torch.float64)
    with pytest.raises(InputError, match=rf"parameter group 'b' has dtype {dtype}"):
        two_layer(ok, torch.ones((), dtype=dtype), ok)
    with pytest.raises(InputError, match=rf"parameter group 'b' has dtype {dtype}"):
        two_layer.solve(ok, torch.ones((), dtype=dtype), ok)


def test_y0_by_group_names_and_checks_each_group(appendix_layer, two_layer):
    x = torch.tensor([[0.9], [1.1], [1.2], [1.3]], dtype=torch.float64)
    with pytest.raises(InputError, match=r"y0 names unknown group\(s\) 'z'; the unknown groups of this "
                                         r"layer are \['y'\]"):
        appendix_layer(x, y0={"z": Y0})
    with pytest.raises(InputError, match=r"y0\['y'\] has shape \(3,\) \(3 values\); the group 'y' expects shape \(2,\) "
                                         r"\(shared by the batch\) or \(4, 2\) \(one per sample\): 2 or 4x2 values"):
        appendix_layer(x, y0={"y": torch.ones(3, dtype=torch.float64)})
    # 8 values, but batch-last: (2, 4) is not (4, 2)
    with pytest.raises(InputError, match=r"y0\['y'\] has shape \(2, 4\)"):
        appendix_layer(x, y0={"y": torch.ones(2, 4, dtype=torch.float64)})
    with pytest.raises(InputError, match=r"y0\['y'\] has dtype <U3"):
        appendix_layer(x, y0={"y": "abc"})
    with pytest.raises(InputError, match=r"y0\['y'\] is complex"):
        appendix_layer(x, y0={"y": torch.ones(2, dtype=torch.complex128)})
    with pytest.raises(InputError, match="y0: cannot read a list as an array of numbers"):
        appendix_layer(x, y0=[1.0, [1.5, 2.0]])
    with pytest.raises(InputError, match="y0 has dtype bool"):
        appendix_layer(x, y0=torch.ones(2, dtype=torch.bool))
    with pytest.raises(InputError, match=r"y0 must have shape \(2,\) or \(4, 2\) for this call, got \(3,\)"):
        appendix_layer(x, y0=torch.ones(3, dtype=torch.float64))
    # accepted: shared, per sample, bfloat16 and integer guesses; the two roots y2 = +-sqrt(...)
    y = appendix_layer(x, y0={"y": torch.tensor([[1.0, 1.5], [1.0, -1.5], [1, 2], [1, -2]], dtype=torch.bfloat16)})
    yr = appendix_ref(x.numpy().ravel())[0] * np.array([[1, 1], [1, -1], [1, 1], [1, -1]])
    np.testing.assert_allclose(y.numpy(), yr, rtol=1e-12)
    y = appendix_layer(x, y0={"y": torch.tensor([1, 2])})
    np.testing.assert_allclose(y.numpy(), appendix_ref(x.numpy().ravel())[0], rtol=1e-12)

    a = torch.tensor([2.0, 3.0], dtype=torch.float64)
    with pytest.raises(InputError, match=r"y0\['v'\] has shape \(3,\) \(3 values\); the group 'v' expects shape \(\) "
                                         r"\(shared by the batch\) or \(2,\) \(one per sample\): 1 or 2x1 values"):
        two_layer(a, a, a, y0={"v": torch.ones(3)})
    with pytest.raises(InputError, match=r"y0 names unknown group\(s\) 'w', 3; the unknown groups of this "
                                         r"layer are \['u', 'v'\]"):
        two_layer(a, a, a, y0={"u": 1.0, "w": 1.0, 3: 1.0})
    u, v = two_layer(a, a, a, y0={"v": torch.tensor([0.0, 5.0]), "u": 1.0})
    np.testing.assert_allclose(v.numpy(), two_ref(a, a, a)[1], rtol=1e-12)


# ---------------------------------------------------------------------------------------------------
# 5. a batch of 1 broadcasts against a batch of B


def test_batch_one_broadcasts_and_its_gradient_is_summed(two_layer):
    rng = np.random.default_rng(0)
    B = 6
    a = torch.tensor(rng.uniform(-2, 2, B), requires_grad=True)
    b = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)  # batch 1 next to batch 6
    c = torch.tensor(rng.uniform(-5, 5, B), requires_grad=True)
    u, v = two_layer(a, b, c)
    assert u.shape == v.shape == (B,)
    w1, w2 = torch.tensor(rng.standard_normal(B)), torch.tensor(rng.standard_normal(B))
    ((u * w1).sum() + (v * w2).sum()).backward()
    ur, vr, dua, dub, dvc = two_ref(a.detach(), 0.7, c.detach())
    np.testing.assert_allclose(u.detach().numpy(), ur, rtol=1e-14)
    np.testing.assert_allclose(v.detach().numpy(), vr, rtol=RTOL)
    assert b.grad.shape == (1,)
    assert b.grad.item() == pytest.approx((w1.numpy() * dub).sum(), rel=1e-13)
    np.testing.assert_allclose(a.grad.numpy(), w1.numpy() * dua, rtol=1e-14)
    np.testing.assert_allclose(c.grad.numpy(), w2.numpy() * dvc, rtol=RTOL)
    # the same as an explicit expand, as torch broadcasting gives
    be = b.detach().clone().requires_grad_()
    u2, v2 = two_layer(a.detach(), be.expand(B), c.detach())
    ((u2 * w1).sum() + (v2 * w2).sum()).backward()
    torch.testing.assert_close(be.grad, b.grad, rtol=1e-14, atol=0)
    # gradcheck with each of the groups as the broadcast one
    def leaf(t):
        return t.detach().clone().requires_grad_()

    a, b, c = (leaf(t) for t in (a, b, c))
    assert torch.autograd.gradcheck(lambda *t: two_layer(*t), (a, b, c))
    assert torch.autograd.gradcheck(lambda *t: two_layer(*t), (leaf(a[:1]), leaf(b.expand(B)), c))
    assert torch.autograd.gradcheck(lambda *t: two_layer(*t), (a, leaf(b.reshape(())), leaf(c[:1])))


def test_batch_one_with_batch_one_and_mismatched_batches(two_layer):
    one = torch.tensor([0.5], dtype=torch.float64)
    u, v = two_layer(one, one, one)
    assert u.shape == (1,)
    with pytest.raises(InputError, match=r"disagree on the batch size \(a: 3, b: 1, c: 4\).*a batch of 1 broadcasts"):
        two_layer(torch.ones(3, dtype=torch.float64), one, torch.ones(4, dtype=torch.float64))


def test_broadcast_matrix_group_against_batched_vector_group():
    A = sp.Matrix(2, 2, sp.symbols("a0:4"))
    b = sp.Matrix(sp.symbols("b0:2"))
    u = sp.Matrix(sp.symbols("u0:2"))
    # the same system as tests/torch/test_appendix.py
    layer = ic.compile(ic.ResidualSystem(list(A * u - b), unknowns={"u": u}, params={"A": A, "b": b}))
    At = torch.tensor([[[3.0, 1.0], [1.0, 2.0]]], dtype=torch.float64, requires_grad=True)  # (1, 2, 2)
    bt = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = layer(At, bt)
    assert out.shape == (5, 2)
    A2, b2 = At.detach().clone().requires_grad_(), bt.detach().clone().requires_grad_()
    ref = torch.linalg.solve(A2, b2.unsqueeze(-1)).squeeze(-1)  # torch broadcasts A over the batch
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)
    w = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert At.grad.shape == (1, 2, 2)
    torch.testing.assert_close(At.grad, A2.grad, rtol=0, atol=1e-13)
    torch.testing.assert_close(bt.grad, b2.grad, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(lambda a, bb: layer(a, bb), (At, bt))
