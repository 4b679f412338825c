"""torch.func over implicit layers: vmap folds into the kernels' batch, grad and jacrev are exact,
forward mode and second order are exact. References: closed forms (tests/torch/pt_systems.py)
and central finite differences."""

import numpy as np
import pytest
import torch
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

import implicit_compiler as ic
from tests.torch.pt_systems import appendix_ref, qp_problem, qp_ref, two_system, two_v

Y0 = torch.tensor([1.0, 1.5], dtype=torch.float64)
TOL = 1e-10  # Newton stops at ||F|| <= 1e-10: values and gradients agree with the closed forms to ~1e-11


@pytest.fixture(scope="module")
def two_layer():
    return ic.compile(two_system())


@pytest.fixture(scope="module")
def qp_layer():
    return ic.compile(qp_problem())


class Calls:
    """Records the batch size of every kernel solve / vjp of a layer."""

    def __init__(self, layer, monkeypatch):
        self.solves, self.vjps = [], []
        k = layer.kernels
        solve, vjp_ = k.solve, k.vjp

        def counting_solve(P, Y0, options):
            self.solves.append(P.shape[0])
            return solve(P, Y0, options)

        def counting_vjp(res, Ybar, need, threshold=32):
            self.vjps.append(Ybar.shape[0])
            return vjp_(res, Ybar, need, threshold)

        monkeypatch.setattr(k, "solve", counting_solve)
        monkeypatch.setattr(k, "vjp", counting_vjp)


def fd_jacobian(f, x, eps=1e-6):
    """Central differences of f (tensor -> tensor) at x, shape (*f(x).shape, *x.shape)."""
    x = x.detach()
    out = f(x)
    J = torch.zeros(*out.shape, *x.shape, dtype=torch.float64)
    flat = x.reshape(-1)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = eps
        d = (f((flat + e).reshape(x.shape)) - f((flat - e).reshape(x.shape))) / (2 * eps)
        J.reshape(*out.shape, -1)[..., i] = d
    return J


# ---------------------------------------------------------------------------------------------------
# vmap


def test_vmap_of_unbatched_calls_is_one_solve(appendix_layer, monkeypatch):
    calls = Calls(appendix_layer, monkeypatch)
    xs = torch.linspace(0.8, 1.25, 6, dtype=torch.float64).reshape(6, 1)
    y = vmap(lambda x: appendix_layer(x, y0=Y0))(xs)
    assert y.shape == (6, 2)
    assert calls.solves == [6]
    np.testing.assert_allclose(y.numpy(), appendix_ref(xs.numpy()[:, 0])[0], rtol=TOL)


@pytest.mark.parametrize("in_dim", [0, 1])
def test_vmap_of_batched_calls_folds_both_batches(appendix_layer, monkeypatch, in_dim):
    calls = Calls(appendix_layer, monkeypatch)
    x = torch.linspace(0.8, 1.25, 12, dtype=torch.float64).reshape(3, 4, 1)  # V = 3 calls of B = 4
    xv = x if in_dim == 0 else x.transpose(0, 1).contiguous()
    y = vmap(lambda t: appendix_layer(t, y0=Y0), in_dims=in_dim)(xv)
    assert y.shape == (3, 4, 2)
    assert calls.solves == [12]
    np.testing.assert_allclose(y.numpy(), appendix_ref(x.numpy()[..., 0])[0], rtol=TOL)


def test_vmap_with_shared_and_unvmapped_groups(two_layer, monkeypatch):
    # a: vmapped (V = 2) and batched (B = 3); b: one value for everything; c: batched, not vmapped
    calls = Calls(two_layer, monkeypatch)
    a = torch.tensor([[1.0, 2.0, -1.5], [0.5, -3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([-2.0, 0.1, 30.0], dtype=torch.float64, requires_grad=True)
    u, v = vmap(lambda t: two_layer(t, b, c))(a)
    assert u.shape == v.shape == (2, 3)
    assert calls.solves == [6]
    np.testing.assert_allclose(u.detach().numpy(), a.detach().numpy() * 0.7, rtol=1e-13)
    vr = two_v(c.detach().numpy())
    np.testing.assert_allclose(v.detach().numpy(), np.broadcast_to(vr, (2, 3)), rtol=TOL)
    w = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]], dtype=torch.float64)
    (w * u + (w + 1) * v).sum().backward()
    assert calls.vjps == [6]
    np.testing.assert_allclose(a.grad.numpy(), 0.7 * w.numpy(), rtol=1e-12)
    assert b.grad.item() == pytest.approx((w * a.detach()).sum().item(), rel=1e-12)
    np.testing.assert_allclose(c.grad.numpy(), (w.numpy() + 1).sum(0) / (3 * vr**2 + 1), rtol=TOL)


def test_vmap_mixing_good_and_failed_samples(appendix_layer):
    xs = torch.tensor([[0.9], [0.5], [1.1]], dtype=torch.float64)  # x = 0.5: no real root
    with pytest.raises(ic.ConvergenceError, match=r"1 of 3 samples"):
        vmap(lambda x: appendix_layer(x, y0=Y0))(xs)
    appendix_layer.configure(on_failure="nan")
    try:
        y = vmap(lambda x: appendix_layer(x, y0=Y0))(xs)
        g = vmap(grad(lambda x: appendix_layer(x, y0=Y0).sum()))(xs)
    finally:
        appendix_layer.configure(on_failure="raise")
    assert torch.isnan(y[1]).all() and torch.isnan(g[1]).all()
    yr, dr = appendix_ref([0.9, 1.1])
    np.testing.assert_allclose(y[[0, 2]].numpy(), yr, rtol=TOL)
    np.testing.assert_allclose(g[[0, 2], 0].numpy(), dr.sum(-1), rtol=TOL)


def test_vmap_with_per_call_initial_guess(appendix_layer, monkeypatch):
    # y0 vmapped with the parameter: a start near each of the two roots y2 = +-sqrt(...)
    calls = Calls(appendix_layer, monkeypatch)
    xs = torch.tensor([[0.9], [0.9]], dtype=torch.float64)
    y0s = torch.tensor([[1.0, 1.5], [1.0, -1.5]], dtype=torch.float64)
    y = vmap(lambda x, s: appendix_layer(x, y0=s))(xs, y0s)
    assert calls.solves == [2]
    yr = appendix_ref(0.9)[0]
    np.testing.assert_allclose(y.numpy(), [yr, yr * [1, -1]], rtol=TOL)
    # a (1, n) start of a batch-1 call, not vmapped: every vmapped call starts there
    y = vmap(lambda x: appendix_layer(x.reshape(1, 1), y0=y0s[1:]))(xs)
    assert y.shape == (2, 1, 2) and calls.solves == [2, 2]
    np.testing.assert_allclose(y[:, 0].numpy(), [yr * [1, -1]] * 2, rtol=TOL)


def test_dispatch_modes_see_the_operators_and_get_the_same_results(two_layer):
    # outside transforms and modes the layer calls the operators' implementations directly; under a
    # dispatch mode it calls the operators, with the same values and gradients
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    def run():
        a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
        b = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        c = torch.tensor([0.3, 5.0, -1.0], dtype=torch.float32, requires_grad=True)
        u, v = two_layer(a, b, c)
        (u * 2 + v).sum().backward()
        return [u, v, a.grad, b.grad, c.grad]

    direct = run()
    with Ops() as mode:
        through_ops = run()
    assert "implicit_compiler.solve.default" in mode.names and "implicit_compiler.vjp.default" in mode.names
    for x, y in zip(direct, through_ops):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert direct[1].dtype == torch.float64 and direct[4].dtype == torch.float32  # promoted outputs, own-dtype grads
    v = two_v(np.float32([0.3, 5.0, -1.0]).astype(np.float64))
    np.testing.assert_allclose(direct[1].detach().numpy(), v, rtol=1e-10)
    np.testing.assert_allclose(direct[4].numpy(), 1 / (3 * v**2 + 1), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# grad, jacrev, vjp


def test_jacrev_is_exact_and_one_vjp_call(appendix_layer, monkeypatch):
    x = torch.tensor([[0.9], [1.0], [1.2]], dtype=torch.float64)
    calls = Calls(appendix_layer, monkeypatch)
    J = jacrev(lambda t: appendix_layer(t, y0=Y0))(x)
    assert J.shape == (3, 2, 3, 1)
    assert calls.solves == [3] and calls.vjps == [6 * 3]  # 6 basis vectors, folded into one VJP call
    dr = appendix_ref(x.numpy()[:, 0])[1]
    for i in range(3):
        np.testing.assert_allclose(J[i, :, i, 0].numpy(), dr[i], rtol=TOL)
        others = [j for j in range(3) if j != i]
        assert (J[i, :, others, 0] == 0).all()
    Jfd = fd_jacobian(lambda t: appendix_layer(t, y0=Y0), x)
    torch.testing.assert_close(J, Jfd, rtol=0, atol=1e-7)


def test_grad_and_per_sample_grads(appendix_layer):
    xs = torch.tensor([[0.85], [1.05], [1.15]], dtype=torch.float64)
    w = torch.tensor([2.0, -1.0], dtype=torch.float64)

    def loss(x):
        return (appendix_layer(x, y0=Y0) * w).sum()

    g = grad(loss)(xs)
    dr = appendix_ref(xs.numpy()[:, 0])[1]
    np.testing.assert_allclose(g.numpy()[:, 0], dr @ w.numpy(), rtol=TOL)
    per = vmap(grad(loss))(xs)  # one unbatched call per sample, folded
    np.testing.assert_allclose(per.numpy(), g.numpy(), rtol=1e-13)
    torch.testing.assert_close(g, fd_jacobian(loss, xs), rtol=0, atol=1e-7)


def test_jacrev_of_several_groups(two_layer):
    a = torch.tensor([1.5, -2.0], dtype=torch.float64)
    b = torch.tensor([0.5, 3.0], dtype=torch.float64)
    c = torch.tensor([0.2, -7.0], dtype=torch.float64)
    (Ja, Jb, Jc) = jacrev(lambda a, b, c: torch.stack(two_layer(a, b, c)), argnums=(0, 1, 2))(a, b, c)
    assert Ja.shape == (2, 2, 2)  # (u/v, sample, sample)
    torch.testing.assert_close(Ja[0], torch.diag(b), rtol=0, atol=1e-14)
    torch.testing.assert_close(Jb[0], torch.diag(a), rtol=0, atol=1e-14)
    assert (Ja[1] == 0).all() and (Jc[0] == 0).all()
    v = two_v(c.numpy())
    np.testing.assert_allclose(np.diag(Jc[1].numpy()), 1 / (3 * v**2 + 1), rtol=TOL)
    _, pull = vjp(lambda c: two_layer(a, b, c)[1], c)
    np.testing.assert_allclose(pull(torch.ones(2, dtype=torch.float64))[0].numpy(), 1 / (3 * v**2 + 1), rtol=TOL)


def test_jacrev_and_vmap_of_a_problem_layer(qp_layer, monkeypatch):
    # constraints strictly active (h < -q) or inactive in each sample, mixed within samples
    q = torch.tensor([[0.5, -1.0, 2.0], [-3.0, 0.2, -0.1], [1.0, 1.0, -1.0]], dtype=torch.float64)
    h = torch.tensor([[0.0, 2.0, -3.0], [1.0, -1.0, 0.5], [-2.0, 0.0, 0.0]], dtype=torch.float64)
    yr, dq, dh = qp_ref(q.numpy(), h.numpy())
    calls = Calls(qp_layer, monkeypatch)
    y = vmap(qp_layer)(q, h)  # three unbatched calls
    assert calls.solves == [3]
    np.testing.assert_allclose(y.numpy(), yr, atol=1e-8)
    Jq, Jh = jacrev(qp_layer, argnums=(0, 1))(q, h)
    assert Jq.shape == (3, 3, 3, 3)
    for i in range(3):
        np.testing.assert_allclose(Jq[i, :, i, :].numpy(), np.diag(dq[i]), atol=1e-7)
        np.testing.assert_allclose(Jh[i, :, i, :].numpy(), np.diag(dh[i]), atol=1e-7)
    torch.testing.assert_close(Jq, fd_jacobian(lambda t: qp_layer(t, h), q), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# forward mode and second order (tests/torch/test_second_order.py has the rest)


# torch.func.jvp imports torch's jvp decompositions, which call the deprecated torch.jit.script
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_is_exact(appendix_layer):
    x = torch.tensor([[0.9]], dtype=torch.float64)
    _, dref = appendix_ref(0.9)
    f = lambda t: appendix_layer(t, y0=Y0)  # noqa: E731
    _, ydot = jvp(f, (x,), (torch.ones_like(x),))
    np.testing.assert_allclose(ydot.numpy()[0], dref, rtol=1e-9)
    torch.testing.assert_close(jacfwd(f)(x), jacrev(f)(x), rtol=0, atol=1e-10)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = appendix_layer(fwAD.make_dual(x, 2 * torch.ones_like(x)), y0=Y0)
        np.testing.assert_allclose(fwAD.unpack_dual(out).tangent.numpy()[0], 2 * dref, rtol=1e-9)


def test_second_order_through_torch_func_is_exact(appendix_layer):
    x = torch.tensor([0.9], dtype=torch.float64)
    # y1'' = 2/x^3; y2'' from y2 = sqrt(g), g = 4 - x^2 - 1/x^2
    g1, g2, y2 = -2 * 0.9 + 2 / 0.9**3, -2 - 6 / 0.9**4, np.sqrt(4 - 0.81 - 1 / 0.81)
    ref = np.array([2 / 0.9**3, g2 / (2 * y2) - g1**2 / (4 * y2**3)])
    H = jacrev(jacrev(lambda t: appendix_layer(t, y0=Y0)))(x)
    np.testing.assert_allclose(H.numpy()[:, 0, 0], ref, rtol=1e-9)
    h = grad(lambda t: grad(lambda s: appendix_layer(s, y0=Y0).sum())(t).sum())(x)
    np.testing.assert_allclose(h.numpy(), [ref.sum()], rtol=1e-9)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_vmap_level_on_top_is_folded_by_the_layer_and_derivatives_stay_exact(appendix_layer, monkeypatch):
    # the innermost vmap level is folded into the batch by the layer itself (no generated vmap rule
    # of the autograd.Function, no operator vmap rule), whatever transforms are below it; a grad or
    # jvp transform inside the vmap keeps the Function's generated rule. Derivatives stay exact.
    import torch.autograd.forward_ad as fwAD

    from implicit_compiler.torch import function as F

    # the Function applied while a vmap level is innermost: torch.func would run its generated rule
    under_vmap = []
    original = F.ImplicitFunction.apply

    def apply(*a):
        stack = F._interpreters()
        under_vmap.append(bool(stack) and stack[-1].key() == F._VMAP)
        return original(*a)

    monkeypatch.setattr(F.ImplicitFunction, "apply", apply)
    calls = Calls(appendix_layer, monkeypatch)
    x = torch.tensor([[0.8], [1.0], [1.3]], dtype=torch.float64)
    y = vmap(lambda t: appendix_layer(t, y0=Y0))(x)
    assert under_vmap == [] and calls.solves == [3]
    torch.testing.assert_close(y, appendix_layer(x, y0=Y0), rtol=0, atol=0)
    yr, dr = appendix_ref(x.numpy()[:, 0])
    # an input that requires grad, differentiated outside the vmap
    xg = x.clone().requires_grad_()
    vmap(lambda t: appendix_layer(t, y0=Y0))(xg)[:, 1].sum().backward()
    np.testing.assert_allclose(xg.grad.numpy()[:, 0], dr[:, 1], rtol=1e-9)
    # grad and jvp over a vmap: the vmap is innermost, folded by the layer
    g = grad(lambda t: vmap(lambda s: appendix_layer(s, y0=Y0))(t)[:, 1].sum())(x)
    np.testing.assert_allclose(g.numpy()[:, 0], dr[:, 1], rtol=1e-9)
    _, tangent = jvp(vmap(lambda s: appendix_layer(s, y0=Y0)), (x,), (torch.ones_like(x),))
    np.testing.assert_allclose(tangent.numpy(), dr, rtol=1e-9)
    assert under_vmap and not any(under_vmap) and calls.solves == [3] * 5  # one solve per call, all three samples
    # a jvp transform under the vmap, and a forward-AD level (without vmap)
    tangent = vmap(lambda t: jvp(lambda s: appendix_layer(s, y0=Y0), (t,), (torch.ones_like(t),))[1])(x)
    np.testing.assert_allclose(tangent.numpy(), dr, rtol=1e-9)
    assert F.unwrap_vmap_level([x]) is None  # no vmap level here: the eager Function runs
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        tangent = fwAD.unpack_dual(appendix_layer(dual, y0=Y0)).tangent
    np.testing.assert_allclose(tangent.numpy(), dr, rtol=1e-9)
    # vmap of grad
    g = vmap(grad(lambda t: appendix_layer(t, y0=Y0)[1]))(x)
    np.testing.assert_allclose(g.numpy()[:, 0], dr[:, 1], rtol=1e-9)
    # failure policy and statuses through the folded call
    appendix_layer.configure(on_failure="nan")
    try:
        xb = torch.tensor([[0.9], [0.5]], dtype=torch.float64)  # x = 0.5: no real root
        yb = vmap(lambda t: appendix_layer(t, y0=Y0))(xb)
    finally:
        appendix_layer.configure(on_failure="raise")
    assert torch.isnan(yb[1]).all()
    np.testing.assert_allclose(yb[0].numpy(), appendix_ref(0.9)[0], rtol=1e-10)
    with pytest.raises(ic.ConvergenceError, match="1 of 2 samples"):
        vmap(lambda t: appendix_layer(t, y0=Y0))(xb)


def test_vmap_levels_fold_without_the_operator_rule(two_layer, appendix_layer, monkeypatch):
    # vmap levels over a call: the layer unwraps each level itself and solves once (no torch.func
    # dispatch of the operator's vmap rule), equal to the batched call bit for bit, statuses included
    from implicit_compiler.torch import function as F

    through_rule = []
    original = F.solve_op
    monkeypatch.setattr(F, "solve_op", lambda *a: through_rule.append(1) or original(*a))
    calls = Calls(two_layer, monkeypatch)
    a = torch.tensor([[1.0, 2.0, -1.5], [0.5, -3.0, 4.0]], dtype=torch.float64)  # vmapped (V = 2), B = 3
    b = torch.tensor(0.7, dtype=torch.float64)  # shared by everything
    c = torch.tensor([-2.0, 0.1, 30.0], dtype=torch.float64)  # batched, not vmapped
    u, v = vmap(lambda t: two_layer(t, b, c), in_dims=1, out_dims=1)(a.T.contiguous())
    assert through_rule == [] and calls.solves == [6]
    ub, vb = two_layer(a.reshape(6), b, c.repeat(2))
    torch.testing.assert_close(u.T.reshape(6), ub, rtol=0, atol=0)
    torch.testing.assert_close(v.T.reshape(6), vb, rtol=0, atol=0)

    # return_info and a vmapped initial guess through the direct path
    xs = torch.tensor([[0.9], [0.5], [1.1]], dtype=torch.float64)  # x = 0.5: no real root
    starts = torch.tensor([[1.0, 1.5], [1.0, 1.5], [1.0, -1.5]], dtype=torch.float64)
    appendix_layer.configure(on_failure="nan")
    try:
        def solve(x, s):
            y, info = appendix_layer(x, y0=s, return_info=True)
            return y, info.status, info.iterations

        y, status, iterations = vmap(solve)(xs, starts)
        yb, infob = appendix_layer(xs, y0=starts, return_info=True)
    finally:
        appendix_layer.configure(on_failure="raise")
    assert through_rule == []
    torch.testing.assert_close(y, yb, rtol=0, atol=0, equal_nan=True)
    assert status.shape == (3, 1)  # each vmapped call is one unbatched sample
    assert status[:, 0].tolist() == infob.status.tolist() and status[1, 0] != 0
    assert iterations[:, 0].tolist() == infob.iterations.tolist()
    assert y[2, 1] < 0  # the start chose the negative root

    # nested vmaps: each level folded in turn, one solve
    x = torch.linspace(0.8, 1.25, 12, dtype=torch.float64).reshape(3, 4, 1)
    solves = Calls(appendix_layer, monkeypatch).solves
    y = vmap(vmap(lambda t: appendix_layer(t, y0=Y0)))(x)
    assert through_rule == [] and solves == [12]
    torch.testing.assert_close(y, appendix_layer(x.reshape(12, 1), y0=Y0).reshape(3, 4, 2), rtol=0, atol=0)
