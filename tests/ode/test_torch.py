"""The ODE layer among torch tools: saving and loading, what is refused (torch.func transforms,
second-order derivatives, in-place changes) with a clear error, torch.compile with graph breaks."""

import copy
import io
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import implicit_compiler as ic

TE = torch.linspace(0.0, 2.0, 6, dtype=torch.float64)


@pytest.fixture(scope="module")
def layer(oscillator):
    return ic.compile(oscillator, method="radau5", rtol=1e-10, atol=1e-12)


def closed_form(x0, w, t):
    """q(t), p(t) of dq/dt = w p, dp/dt = -w q."""
    c, s = np.cos(w * t), np.sin(w * t)
    return np.stack([x0[0] * c + x0[1] * s, -x0[0] * s + x0[1] * c], axis=-1)


def test_pickle_deepcopy_and_torch_save_rebuild_the_layer(layer, tmp_path):
    x0 = torch.tensor([[1.0, 0.5], [0.2, -1.0]], dtype=torch.float64)
    w = torch.tensor([1.5, 0.7], dtype=torch.float64)
    ref = layer(x0, w, t_eval=TE)
    np.testing.assert_allclose(ref.numpy(), np.stack([closed_form(x0[i].numpy(), w[i].item(), TE.numpy())
                                                      for i in range(2)]), rtol=1e-8, atol=1e-9)
    model = torch.nn.ModuleDict({"ode": layer})
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = [pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer), torch.load(buf, weights_only=False)["ode"]]
    for c in copies:
        assert c is not layer and c.options == layer.options
        torch.testing.assert_close(c(x0, w, t_eval=TE), ref, rtol=0, atol=0)
    # in a fresh process (the kernel cache has the module: it is imported, not generated again)
    path = tmp_path / "layer.pt"
    torch.save(layer, path)
    script = textwrap.dedent(f"""
        import torch
        layer = torch.load({str(path)!r}, weights_only=False)
        x0 = torch.tensor([[1.0, 0.5], [0.2, -1.0]], dtype=torch.float64)
        w = torch.tensor([1.5, 0.7], dtype=torch.float64, requires_grad=True)
        y = layer(x0, w, t_eval=torch.linspace(0.0, 2.0, 6, dtype=torch.float64))
        y[:, -1, 0].sum().backward()
        print(repr(y.detach().numpy().tolist()), repr(w.grad.numpy().tolist()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    y, g = _two_lists(out)
    np.testing.assert_array_equal(y, ref.numpy())
    wr = w.clone().requires_grad_()
    layer(x0, wr, t_eval=TE)[:, -1, 0].sum().backward()
    np.testing.assert_array_equal(g, wr.grad.numpy())


def _two_lists(text):
    """The two nested lists the fresh process printed, as arrays."""
    import ast

    y, g = text.strip().split("]]] ")  # y is (B, T, n), printed first
    return np.array(ast.literal_eval(y + "]]]")), np.array(ast.literal_eval(g))


def test_torch_func_and_second_order_are_refused_clearly(layer):
    x0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    with pytest.raises(ic.ImplicitCompilerError, match="torch.func transforms .* ODE layer 'oscillator'"):
        torch.func.grad(lambda w: layer(x0, w, t_eval=TE).sum())(torch.tensor(1.5, dtype=torch.float64))
    with pytest.raises(ic.ImplicitCompilerError, match="torch.func"):
        torch.func.vmap(lambda w: layer(x0, w, t_eval=TE))(torch.tensor([1.5, 0.7], dtype=torch.float64))
    # double backward: the adjoint's gradients raise when differentiated, never pass for constants,
    # also when something else in the gradient (a Linear before the layer) requires grad
    w = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x0, w, t_eval=TE).sum(), w, create_graph=True)
    np.testing.assert_allclose(g.detach().numpy(), _dsum_dw(x0.numpy(), 1.5), rtol=1e-7)
    with pytest.raises(NotImplementedError, match="second-order derivatives through the ODE layer 'oscillator'"):
        g.sum().backward()
    lin = torch.nn.Linear(2, 2, dtype=torch.float64)
    (gw,) = torch.autograd.grad(layer(lin(x0), w, t_eval=TE).sum(), lin.weight, create_graph=True)
    with pytest.raises(NotImplementedError, match="second-order"):
        torch.autograd.grad((gw**2).sum(), w)
    # first order with create_graph=True and nothing differentiated again works
    (g2,) = torch.autograd.grad(layer(x0, w, t_eval=TE).sum(), w, create_graph=True)
    torch.testing.assert_close(g2.detach(), g.detach(), rtol=0, atol=0)


def _dsum_dw(x0, w, eps=1e-6):
    t = TE.numpy()
    return (closed_form(x0, w + eps, t).sum() - closed_form(x0, w - eps, t).sum()) / (2 * eps)


def test_in_place_change_after_the_forward_is_an_error(layer):
    x0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    w = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    y = layer(x0, w, t_eval=TE)
    with torch.no_grad():
        w.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")  # Dynamo's
def test_torch_compile_with_graph_breaks_equals_eager(layer):
    x0 = torch.tensor([1.0, 0.5], dtype=torch.float64)

    def f(w):
        return (layer(x0, w * 1.0, t_eval=TE) ** 2).sum()

    cf = torch.compile(f, backend="aot_eager")
    for value in (1.5, 0.7):  # a second value: nothing of the first solve is baked into the graph
        w, wc = (torch.tensor(value, dtype=torch.float64, requires_grad=True) for _ in range(2))
        f(w).backward()
        out = cf(wc)
        out.backward()
        torch.testing.assert_close(out.detach(), f(w.detach()), rtol=0, atol=0)
        torch.testing.assert_close(wc.grad, w.grad, rtol=0, atol=0)
