"""Second order and forward mode through the torch layers: double backward (gradient penalties,
gradgradcheck, Hessians), torch.func.jvp / jacfwd / hessian, failed samples, lazy compilation, and the
clear errors that remain (third order, a layer loaded without its system).

References are closed forms:
  appendix  x^2 + y1^2 + y2^2 = 4, x y1 = 1:  y1 = 1/x, y2 = sqrt(g), g = 4 - x^2 - 1/x^2
            y1'' = 2/x^3, y2'' = g''/(2 y2) - g'^2/(4 y2^3), g' = -2x + 2/x^3, g'' = -2 - 6/x^4
  kepler    E - e sin E = M:                  dE/dM = 1/(1 - e cos E), d2E/dM2 = -e sin E/(1 - e cos E)^3
and central finite differences of the (closed-form-checked) first-order gradients.
"""

import numpy as np
import pytest
import sympy as sp
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp

import implicit_compiler as ic
from implicit_compiler.codegen import cache
from implicit_compiler.runtime.status import CONVERGED
from implicit_compiler.torch.module import ImplicitLayer
from tests.torch.pt_systems import appendix_ref

Y0 = torch.tensor([1.0, 1.5], dtype=torch.float64)
X = [0.9, 1.1, 1.3, 0.7]  # inside the appendix system's domain (4 - x^2 - 1/x^2 > 0)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def appendix_second(x):
    """(y1'', y2'') in closed form."""
    x = np.asarray(x, dtype=np.float64)
    y2 = np.sqrt(4 - x**2 - x**-2)
    g1, g2 = -2 * x + 2 * x**-3, -2 - 6 * x**-4
    return np.stack([2 * x**-3, g2 / (2 * y2) - g1**2 / (4 * y2**3)], axis=-1)


def kepler_system():
    E, e, M = sp.symbols("E e M")
    # one parameter group per symbol: e and M are separate arguments of the layer
    return ic.ResidualSystem([E - e * sp.sin(E) - M], unknowns={"E": E}, params={"e": e, "M": M},
                             initial_guess=1.0, name="kepler")


@pytest.fixture(scope="module")
def kepler():
    return ic.compile(kepler_system())


@pytest.fixture(scope="module")
def cos_layer():
    y, t = sp.symbols("y t")
    # the same fixed point as tests/torch/test_reliability.py
    return ic.compile(ic.FixedPoint(map=[sp.cos(t * y)], unknowns=[y], params=[t], method="anderson"))


@pytest.fixture(scope="module")
def eqqp_layer():
    # argmin |y|^2/2 + q.y  s.t.  y0 + y1 + y2 = s,  y <= h: one inequality active at the samples below
    y = sp.Matrix(sp.symbols("y0:3"))
    q = sp.Matrix(sp.symbols("q0:3"))
    h = sp.Matrix(sp.symbols("h0:3"))
    s = sp.Symbol("s")
    return ic.compile(ic.Problem((y.T * y)[0] / 2 + (q.T * y)[0], variables={"y": y}, params={"q": q, "h": h, "s": s},
                                 equalities=[sum(y) - s], inequalities=list(y - h), name="eqqp"),
                      tol=1e-12)


def eqqp_ref(q, h, s):
    """Solution with y0 <= h0 active and the others inactive: y0 = h0, y1 + y2 = s - h0,
    y_i = -q_i - nu (i = 1, 2)."""
    nu = -(s - h[0] + q[1] + q[2]) / 2
    return np.array([h[0], -q[1] - nu, -q[2] - nu])


EQQP = (torch.tensor([[-2.0, 0.3, -0.1], [-3.0, 0.5, 0.2]], dtype=torch.float64),
        torch.tensor([[0.5, 5.0, 5.0], [0.2, 4.0, 6.0]], dtype=torch.float64),
        torch.tensor([1.0, 0.5], dtype=torch.float64))


def fd(f, x, eps=1e-6):
    """Central finite differences of f (tensor -> tensor) along each entry of x: (*f.shape, *x.shape)."""
    cols = []
    flat = x.detach().reshape(-1)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = eps
        cols.append((f((flat + e).reshape(x.shape)) - f((flat - e).reshape(x.shape))) / (2 * eps))
    return torch.stack(cols, dim=-1).reshape(*cols[0].shape, *x.shape)


# ---------------------------------------------------------------------------------------------------
# double backward: closed forms


def test_double_backward_appendix_closed_form(appendix_layer):
    x = torch.tensor([[v] for v in X], dtype=torch.float64, requires_grad=True)
    y = appendix_layer(x, y0=Y0)
    for i in range(2):
        (g,) = torch.autograd.grad(y[:, i].sum(), x, create_graph=True)
        np.testing.assert_allclose(g.detach().numpy()[:, 0], appendix_ref(X)[1][:, i], rtol=1e-9)
        (h,) = torch.autograd.grad(g.sum(), x, retain_graph=True)
        np.testing.assert_allclose(h.numpy()[:, 0], appendix_second(X)[:, i], rtol=1e-9)


def test_double_backward_kepler_closed_form(kepler):
    e = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=torch.float64)
    M = torch.tensor([0.3, 1.0, 2.5, -4.0], dtype=torch.float64, requires_grad=True)
    E = kepler(e, M)
    (dM,) = torch.autograd.grad(E.sum(), M, create_graph=True)
    (d2M,) = torch.autograd.grad(dM.sum(), M)
    En, en = E.detach().numpy(), e.numpy()
    d = 1 - en * np.cos(En)
    np.testing.assert_allclose(dM.detach().numpy(), 1 / d, rtol=1e-12)
    np.testing.assert_allclose(d2M.numpy(), -en * np.sin(En) / d**3, rtol=1e-9, atol=1e-13)
    # mixed: d/de (dE/dM) = d/de 1/(1 - e cos E) = (cos E - e sin E dE/de) / d^2, dE/de = sin E / d
    e.requires_grad_(True)
    E = kepler(e, M)
    (dM,) = torch.autograd.grad(E.sum(), M, create_graph=True)
    (d2eM,) = torch.autograd.grad(dM.sum(), e)
    np.testing.assert_allclose(d2eM.numpy(), (np.cos(En) - en * np.sin(En) ** 2 / d) / d**2, rtol=1e-9, atol=1e-13)


# ---------------------------------------------------------------------------------------------------
# gradgradcheck: residual, fixed-point and QP layers


def test_gradgradcheck_residual_layers(appendix_layer, kepler):
    x = torch.tensor([[0.9], [1.2]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: appendix_layer(t, y0=Y0), (x,))
    e = torch.tensor([0.2, 0.6], dtype=torch.float64, requires_grad=True)
    M = torch.tensor([0.7, -1.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(kepler, (e, M))
    # a parameter shared by the batch (no batch dimension): its gradients are sums over the samples
    e1 = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(kepler, (e1, M))


def test_gradgradcheck_fixed_point_layer(cos_layer):
    t = torch.tensor([[0.5], [1.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(cos_layer, (t,), atol=1e-6)


def test_gradgradcheck_qp_with_equality_and_active_inequality(eqqp_layer):
    q, h, s = (t.clone().requires_grad_(True) for t in EQQP)
    y = eqqp_layer(q, h, s)
    for b in range(2):
        np.testing.assert_allclose(y[b].detach().numpy(), eqqp_ref(q[b].detach().numpy(), h[b].detach().numpy(),
                                                                  s[b].item()), atol=1e-8)
    assert torch.autograd.gradgradcheck(lambda *a: eqqp_layer(*a), (q, h, s), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# torch.func: hessian, jvp, jacfwd


def test_hessian_of_a_loss_equals_finite_differences_of_its_gradient(appendix_layer):
    def loss(t):
        y = appendix_layer(t, y0=Y0)
        return (y[..., 0] * y[..., 1] + y[..., 1] ** 2).sum()

    x = torch.tensor([[0.9], [1.2]], dtype=torch.float64)
    H = hessian(loss)(x)
    assert H.shape == (2, 1, 2, 1)
    Hfd = fd(lambda t: grad(loss)(t), x)
    torch.testing.assert_close(H, Hfd, rtol=0, atol=1e-7)
    # against the closed form: d2/dx2 (y1 y2 + y2^2) per sample, no coupling between samples
    xs = x.numpy()[:, 0]
    (y1, y2), (d1, d2), (s1, s2) = appendix_ref(xs)[0].T, appendix_ref(xs)[1].T, appendix_second(xs).T
    exact = s1 * y2 + 2 * d1 * d2 + y1 * s2 + 2 * d2**2 + 2 * y2 * s2
    np.testing.assert_allclose(np.diag(H.reshape(2, 2).numpy()), exact, rtol=1e-9)
    assert H[0, 0, 1, 0].item() == 0.0 and H[1, 0, 0, 0].item() == 0.0


def test_jvp_and_jacfwd_match_jacrev_appendix(appendix_layer):
    f = lambda t: appendix_layer(t, y0=Y0)  # noqa: E731
    x = torch.tensor([[v] for v in X], dtype=torch.float64)
    torch.testing.assert_close(jacfwd(f)(x), jacrev(f)(x), rtol=0, atol=1e-10)
    v = torch.tensor([[1.0], [-2.0], [0.5], [3.0]], dtype=torch.float64)
    y, ydot = jvp(f, (x,), (v,))
    np.testing.assert_allclose(ydot.numpy(), appendix_ref(X)[1] * v.numpy(), rtol=1e-9)
    # unbatched, and the eager forward-AD API
    x1 = torch.tensor([1.1], dtype=torch.float64)
    torch.testing.assert_close(jacfwd(f)(x1), jacrev(f)(x1), rtol=0, atol=1e-10)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = f(fwAD.make_dual(x, v))
        ydot2 = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(ydot2, ydot, rtol=0, atol=1e-14)


def test_jvp_and_jacfwd_match_jacrev_qp(eqqp_layer):
    q, h, s = EQQP
    for argnums in (0, 1, 2):
        Jf = jacfwd(eqqp_layer, argnums=argnums)(q, h, s)
        Jr = jacrev(eqqp_layer, argnums=argnums)(q, h, s)
        torch.testing.assert_close(Jf, Jr, rtol=0, atol=1e-10)
    # y0 = h0 (active), y1, y2 = -q_i + (s - h0 + q1 + q2)/2: dy/ds = (0, 1/2, 1/2)
    _, ydot = jvp(lambda t: eqqp_layer(q, h, t), (s,), (torch.ones_like(s),))
    np.testing.assert_allclose(ydot.numpy(), [[0.0, 0.5, 0.5]] * 2, atol=1e-9)


def test_jvp_with_shared_parameter_and_float32(kepler):
    e = torch.tensor(0.5, dtype=torch.float32)
    M = torch.tensor([1.0, 2.0], dtype=torch.float32)
    E, Edot = jvp(kepler, (e, M), (torch.tensor(1.0, dtype=torch.float32), torch.zeros(2, dtype=torch.float32)))
    assert Edot.dtype == torch.float32
    En = E.double().numpy()
    np.testing.assert_allclose(Edot.numpy(), np.sin(En) / (1 - 0.5 * np.cos(En)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# training with a gradient penalty


def test_gradient_penalty_training_step_matches_finite_differences(appendix_layer):
    lin = torch.nn.Linear(1, 1, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.fill_(0.3)
        lin.bias.fill_(0.8)
    inp = torch.tensor([[0.5], [1.0], [1.5]], dtype=torch.float64)

    def total(w, b):
        x = (inp * w + b).requires_grad_(True) if not (w.requires_grad or b.requires_grad) else inp * w + b
        y = appendix_layer(x, y0=Y0)
        loss = (y[:, 1] ** 2).sum()
        gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
        return loss + gw.pow(2).sum() + gb.pow(2).sum()

    w, b = lin.weight, lin.bias
    opt = torch.optim.SGD(lin.parameters(), lr=1e-3)
    opt.zero_grad()
    value = total(w, b)
    value.backward()
    gw, gb = w.grad.clone(), b.grad.clone()

    def at(wv, bv):
        wt = torch.tensor([[wv]], dtype=torch.float64, requires_grad=True)
        bt = torch.tensor([bv], dtype=torch.float64, requires_grad=True)
        return total(wt, bt).item()

    eps = 1e-6
    fw = (at(0.3 + eps, 0.8) - at(0.3 - eps, 0.8)) / (2 * eps)
    fb = (at(0.3, 0.8 + eps) - at(0.3, 0.8 - eps)) / (2 * eps)
    assert gw.item() == pytest.approx(fw, rel=1e-6, abs=1e-8)
    assert gb.item() == pytest.approx(fb, rel=1e-6, abs=1e-8)
    opt.step()
    np.testing.assert_allclose(w.detach().numpy(), 0.3 - 1e-3 * gw.numpy(), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------------
# failed samples, lazy compilation, what still raises


@pytest.mark.parametrize("policy", ["keep", "nan"])
def test_failed_samples_get_no_second_order_contribution(appendix_layer, policy):
    # x = 2.5: 4 - x^2 - 1/x^2 < 0, no real solution; the other samples must match the closed forms
    xs = [0.9, 2.5, 1.2]
    appendix_layer.configure(on_failure=policy)
    try:
        x = torch.tensor([[v] for v in xs], dtype=torch.float64, requires_grad=True)
        y, info = appendix_layer(x, y0=Y0, return_info=True)
        assert (info.status != CONVERGED).tolist() == [False, True, False]
        (g,) = torch.autograd.grad(y[:, 0].sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), x)
        _, ydot = jvp(lambda t: appendix_layer(t, y0=Y0), (x.detach(),), (torch.ones_like(x),))
    finally:
        appendix_layer.configure(on_failure="raise")
    good = [0, 2]
    ref = np.array([xs[i] for i in good])
    np.testing.assert_allclose(h.numpy()[good, 0], appendix_second(ref)[:, 0], rtol=1e-9)
    np.testing.assert_allclose(ydot.numpy()[good], appendix_ref(ref)[1], rtol=1e-9)
    if policy == "keep":
        assert h[1, 0].item() == 0.0 and g[1, 0].item() == 0.0 and ydot[1].tolist() == [0.0, 0.0]
    else:
        assert np.isnan(h[1, 0].item()) and np.isnan(g[1, 0].item()) and np.isnan(ydot[1].numpy()).all()


def test_first_order_training_never_builds_the_second_order_module(tmp_path):
    layer = ic.compile(kepler_system(), cache_dir=tmp_path, warmup=False)
    path2 = tmp_path / f"{cache.MODULE_PREFIX}{cache.module_key(layer.system.content_hash() + 'second')}.py"
    M = torch.tensor([0.5, 1.5], dtype=torch.float64, requires_grad=True)
    e = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([M, e], lr=0.1)
    (layer(e, M) ** 2).sum().backward()
    opt.step()
    (g,) = torch.autograd.grad(layer(e, M).sum(), M)  # first order with grad mode off in the backward
    assert not layer.kernels.second_order.built and not path2.exists()
    assert [p.name for p in tmp_path.glob("*.py")] == [layer.path.name]
    # create_graph=True alone does not build it; differentiating the gradient does
    (g,) = torch.autograd.grad(layer(e, M).sum(), M, create_graph=True)
    assert not layer.kernels.second_order.built and not path2.exists()
    g.sum().backward()
    assert layer.kernels.second_order.built and path2.exists()


def test_third_order_raises_naming_the_layer(appendix_layer):
    x = torch.tensor([[0.9]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(appendix_layer(x, y0=Y0)[:, 0].sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x, create_graph=True)
    assert h.item() == pytest.approx(2 / 0.9**3, rel=1e-9)
    with pytest.raises(NotImplementedError, match="third-order derivatives through the implicit layer 'appendix'"):
        h.sum().backward()


def test_layer_without_its_system_raises_on_second_order_and_forward_mode(kepler):
    bare = ImplicitLayer(kepler.kernels.module)  # as a standalone export loads it: no symbolic system
    e = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    M = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(bare(e, M).sum(), M, create_graph=True)  # first order works
    assert g.item() == pytest.approx(1 / (1 - 0.2 * np.cos(bare(e, M).item())), rel=1e-12)
    msg = "needs its second-order module, which is generated from the symbolic system"
    with pytest.raises(NotImplementedError, match=f"double backward .* layer 'kepler' {msg}"):
        g.sum().backward()
    with pytest.raises(NotImplementedError, match=f"forward-mode differentiation .* layer 'kepler' {msg}"):
        jvp(bare, (e.detach(), M.detach()), (torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)))
    with pytest.raises(NotImplementedError, match=msg):
        jacrev(jacrev(bare, argnums=1), argnums=1)(e.detach(), M.detach())


def test_reverse_over_reverse_and_vmap_agree_with_forward_over_reverse(appendix_layer):
    def loss(t):
        y = appendix_layer(t, y0=Y0)
        return (y[..., 0] * y[..., 1]).sum()

    x = torch.tensor([[0.9], [1.2], [0.8]], dtype=torch.float64)
    Hrr = jacrev(jacrev(loss))(x)  # vmap over the double backward
    torch.testing.assert_close(Hrr, hessian(loss)(x), rtol=0, atol=1e-10)
    # per-sample second derivatives through vmap: the batch of 3 folded into one kernel call
    d2 = torch.vmap(grad(grad(lambda s: loss(s.reshape(1, 1)))))(x[:, 0])
    xs = x.numpy()[:, 0]
    (y1, y2), (d1, dd2), (s1, s2) = appendix_ref(xs)[0].T, appendix_ref(xs)[1].T, appendix_second(xs).T
    np.testing.assert_allclose(d2.numpy(), s1 * y2 + 2 * d1 * dd2 + y1 * s2, rtol=1e-9)


def test_deepcopied_and_pickled_layers_keep_second_order(kepler):
    import copy
    import pickle

    e = torch.tensor([0.5], dtype=torch.float64)
    M = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    En = kepler(e, M).item()
    d = 1 - 0.5 * np.cos(En)
    for twin in (copy.deepcopy(kepler), pickle.loads(pickle.dumps(kepler))):
        assert twin.kernels.second_order is not kepler.kernels.second_order
        E = twin(e, M)
        (g,) = torch.autograd.grad(E.sum(), M, create_graph=True)
        assert g.item() == pytest.approx(1 / d, rel=1e-12)
        (h,) = torch.autograd.grad(g.sum(), M)  # d2E/dM2 = -e sin E / (1 - e cos E)^3
        assert h.item() == pytest.approx(-0.5 * np.sin(En) / d**3, rel=1e-9)
        _, Edot = jvp(twin, (e, M.detach()), (torch.ones_like(e), torch.zeros_like(e)))  # dE/de = sin E / d
        assert Edot.item() == pytest.approx(np.sin(En) / d, rel=1e-12)


def test_pickled_layer_without_its_system_says_why_it_has_no_second_order(kepler):
    # a system that cannot be pickled is left out of the pickle: the first order still works
    state = kepler.__getstate__()
    state["system"] = None
    restored = type(kepler).__new__(type(kepler))
    restored.__setstate__(state)
    e = torch.tensor([0.5], dtype=torch.float64)
    M = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(restored(e, M).sum(), M, create_graph=True)
    assert g.item() == pytest.approx(1 / (1 - 0.5 * np.cos(kepler(e, M).item())), rel=1e-12)
    with pytest.raises(NotImplementedError, match="double backward .* 'kepler' needs its second-order module, which "
                                                  "is generated from the symbolic system; this layer has none"):
        g.sum().backward()
