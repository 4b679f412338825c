"""Saving and loading layers and models containing them: pickle, copy.deepcopy, torch.save/torch.load
(whole model and state_dict), in this process and in a fresh one whose kernel cache does not exist yet.

References: the original layer's own outputs and gradients (the loaded layer runs the same generated
module, so they agree to the last bit in this process) and the closed forms of tests/torch/pt_systems.py.
"""

import copy
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import implicit_compiler as ic
from implicit_compiler.errors import ImplicitCompilerError
from tests.torch.pt_systems import (
    AppendixModel,
    appendix_ref,
    appendix_system,
    cos_system,
    qp_problem,
    qp_projection,
    qp_ref,
)

ROOT = Path(__file__).resolve().parents[2]
X = torch.tensor([[0.6], [1.0], [1.4]], dtype=torch.float64)  # the layer sees 0.5 x + 0.5
T = torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64)
Q = torch.tensor([[0.5, -1.0, 2.0], [-3.0, 0.2, -0.1]], dtype=torch.float64)
H = torch.tensor([[0.0, 2.0, -3.0], [1.0, -1.0, 0.5]], dtype=torch.float64)


@pytest.fixture(scope="module")
def models(appendix_layer):
    qp = ic.compile(qp_problem())
    return {
        "appendix_model": AppendixModel(appendix_layer),
        "fixed_point": ic.compile(cos_system()),
        "qp": qp,
        "qp_custom_forward": ic.compile(qp_problem(), forward=qp_projection),
        "qp_multipliers": ic.compile(qp_problem(), return_multipliers=True),
    }


INPUTS = {"appendix_model": (X,), "fixed_point": (T,), "qp": (Q, H), "qp_custom_forward": (Q, H),
          "qp_multipliers": (Q, H)}


def run(model, inputs):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = model(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.sum() for o in outs).backward()
    return [o.detach() for o in outs], [x.grad for x in xs]


def check_references(name, got):
    """The values and gradients against the closed forms."""
    outs, grads = got
    if name in ("appendix_model", "state_dict"):
        z = 0.5 * X.numpy()[:, 0] + 0.5
        yr, dr = appendix_ref(z)
        np.testing.assert_allclose(outs[0].numpy(), yr @ [1.0, 2.0], rtol=1e-10)
        np.testing.assert_allclose(grads[0].numpy()[:, 0], 0.5 * (dr @ [1.0, 2.0]), rtol=1e-10)
    elif name == "fixed_point":
        y, t = outs[0].numpy()[:, 0], T.numpy()[:, 0]
        np.testing.assert_allclose(y, np.cos(t * y), atol=1e-10)
        np.testing.assert_allclose(grads[0].numpy()[:, 0], -y * np.sin(t * y) / (1 + t * np.sin(t * y)), atol=1e-9)
    elif name == "qp_multipliers":
        # outputs y and nu = -(y + q) >= 0 (no equalities: no lam); d(sum y + sum nu)/dq = -1, d/dh = 0
        yr = qp_ref(Q.numpy(), H.numpy())[0]
        np.testing.assert_allclose(outs[0].numpy(), yr, atol=1e-8)
        assert len(outs) == 2
        np.testing.assert_allclose(outs[1].numpy(), np.maximum(-(Q + H).numpy(), 0.0), atol=1e-8)
        np.testing.assert_allclose(grads[0].numpy(), -1.0, atol=1e-7)
        np.testing.assert_allclose(grads[1].numpy(), 0.0, atol=1e-7)
    else:
        yr, dq, dh = qp_ref(Q.numpy(), H.numpy())
        np.testing.assert_allclose(outs[0].numpy(), yr, atol=1e-8)
        np.testing.assert_allclose(grads[0].numpy(), dq, atol=1e-7)
        np.testing.assert_allclose(grads[1].numpy(), dh, atol=1e-7)


def assert_same(a, b):
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def torch_roundtrip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


ROUNDTRIPS = {
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "deepcopy": copy.deepcopy,
    "torch.save": torch_roundtrip,
}


@pytest.mark.parametrize("how", list(ROUNDTRIPS))
@pytest.mark.parametrize("name", list(INPUTS))
def test_roundtrip_in_this_process(models, name, how):
    model = models[name]
    ref = run(model, INPUTS[name])
    check_references(name, ref)
    loaded = ROUNDTRIPS[how](model)
    assert type(loaded) is type(model)
    assert_same(run(loaded, INPUTS[name]), ref)
    layer = loaded.layer if name == "appendix_model" else loaded
    original = model.layer if name == "appendix_model" else model
    # an independent layer: its own options, token and warm-start memory
    assert layer._token != original._token
    layer.configure(on_failure="nan")
    assert original.options.on_failure == "raise"
    if name == "appendix_model":
        assert loaded.lin is not model.lin
        torch.testing.assert_close(loaded.lin.weight, model.lin.weight, rtol=0, atol=0)
    # the symbolic system came along (deepcopy shares it: it is immutable)
    assert layer.system is not None and layer.system.content_hash() == original.system.content_hash()
    assert (layer.system is original.system) == (how == "deepcopy")


def test_loaded_layer_keeps_statuses_and_failure_policy(appendix_layer):
    layer = pickle.loads(pickle.dumps(appendix_layer.configure(on_failure="nan")))
    appendix_layer.configure(on_failure="raise")
    x = torch.tensor([[0.9], [0.5]], dtype=torch.float64)  # x = 0.5: no real root
    y, info = layer(x, y0=torch.tensor([1.0, 1.5], dtype=torch.float64), return_info=True)
    assert info.converged.tolist() == [True, False]
    assert torch.isnan(y[1]).all()
    np.testing.assert_allclose(y[0].numpy(), appendix_ref(0.9)[0], rtol=1e-10)
    with pytest.raises(ic.ConvergenceError, match="1 of 2 samples"):
        pickle.loads(pickle.dumps(appendix_layer))(x, y0=torch.tensor([1.0, 1.5], dtype=torch.float64))


def test_custom_forward_that_cannot_be_pickled_is_named():
    layer = ic.compile(qp_problem(), forward=lambda q, h: np.minimum(-q, h))
    msg = r"the layer 'Problem' cannot be pickled: its forward= callable <function .*<lambda>.* cannot be pickled"
    with pytest.raises(ImplicitCompilerError, match=msg):
        pickle.dumps(layer)
    model = torch.nn.ModuleDict({"qp": layer})
    with pytest.raises(ImplicitCompilerError, match=msg):
        torch.save(model, io.BytesIO())
    # deepcopy shares the callable: it works, and gives the original's results
    got = run(copy.deepcopy(model)["qp"], (Q, H))
    check_references("qp", got)
    assert_same(got, run(layer, (Q, H)))


def test_state_dict_roundtrip(appendix_layer):
    model = AppendixModel(appendix_layer)
    with torch.no_grad():
        model.lin.weight.fill_(0.25)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = AppendixModel(ic.compile(appendix_system()))
    fresh.load_state_dict(torch.load(buf))
    assert_same(run(fresh, (X,)), run(model, (X,)))


def _state(layer):
    state = layer.__getstate__()
    state["_kernels_spec"] = dict(state["_kernels_spec"])
    return state


def _restore(cls, state):
    new = cls.__new__(cls)
    new.__setstate__(state)
    return new


@pytest.mark.parametrize("name", ["fixed_point", "qp"])
def test_another_toolchain_regenerates_the_module_from_the_system(models, name):
    layer = models[name]
    state = _state(layer)
    state["_kernels_spec"]["toolchain"] = "another version"
    state["_kernels_spec"]["source"] = "raise RuntimeError('this source must not be used')\n"
    loaded = _restore(type(layer), state)
    assert_same(run(loaded, INPUTS[name]), run(layer, INPUTS[name]))


def test_another_toolchain_without_the_system_is_a_clear_error(models):
    state = _state(models["qp"])
    state["_kernels_spec"]["toolchain"] = "another version"
    state["system"] = None
    with pytest.raises(ImplicitCompilerError, match=r"generated by another version of implicit_compiler.*does "
                                                    r"not carry its symbolic system.*load the model's state_dict"):
        _restore(type(models["qp"]), state)


def test_corrupt_module_source_is_a_clear_error(models):
    state = _state(models["fixed_point"])
    state["_kernels_spec"]["source"] = state["_kernels_spec"]["source"].replace("def ", "def  ", 1)
    with pytest.raises(ImplicitCompilerError, match=r"the saved kernel module ic_\w+\.py is corrupt"):
        _restore(type(models["fixed_point"]), state)


SECOND_ORDER = ("appendix_model", "fixed_point", "qp")  # a residual, a fixed-point and a QP layer


def second_order_ref(model, inputs):
    """What the worker's ``second_order`` computes, here, with the original model."""
    from tests.torch.pickle_worker import second_order

    return second_order(model, inputs)


# torch.func.jvp imports torch's jvp decompositions, which call the deprecated torch.jit.script
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_fresh_process_with_a_cache_directory_that_does_not_exist(models, tmp_path):
    saved = {"models": models, "inputs": INPUTS, "second_order": SECOND_ORDER}
    torch.save(saved, tmp_path / "saved.pt")
    torch.save(models["appendix_model"].state_dict(), tmp_path / "state.pt")
    cache = tmp_path / "not" / "created" / "yet"
    env = dict(os.environ, IMPLICIT_COMPILER_CACHE=str(cache), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tests.torch.pickle_worker", str(tmp_path / "saved.pt"),
                           str(tmp_path / "state.pt"), str(tmp_path / "out.pt")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    # the modules were written into the new cache from the pickles; the appendix system compiled in the
    # child then found its module there
    assert got.pop("cache_hit") is True
    # the first-order modules from the pickles, and the second-order modules the child generated from the
    # systems the pickles carry (loaded layers keep forward mode and double backward)
    from implicit_compiler.codegen.cache import MODULE_PREFIX, module_key

    layers = {n: (m.layer if n == "appendix_model" else m) for n, m in models.items()}
    expected = {Path(layer.kernels.module.__file__).name for layer in layers.values()}
    expected |= {f"{MODULE_PREFIX}{module_key(layers[n].system.content_hash() + 'second')}.py" for n in SECOND_ORDER}
    written = sorted(p.name for p in cache.glob("ic_*.py"))
    assert written == sorted(expected)
    second = got.pop("second_order")
    assert sorted(second) == sorted(SECOND_ORDER)
    for name in SECOND_ORDER:
        ref = second_order_ref(models[name], INPUTS[name])
        for a, b in zip(second[name][0] + second[name][1], ref[0] + ref[1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # closed forms: the fixed point y = cos(t y) has dy/dt = -y sin(ty) / (1 + t sin(ty)) (the jvp's tangent)
    t = T.numpy()[:, 0]
    y = run(models["fixed_point"], (T,))[0][0].numpy()[:, 0]
    np.testing.assert_allclose(second["fixed_point"][1][0].numpy()[:, 0],
                               -y * np.sin(t * y) / (1 + t * np.sin(t * y)), rtol=1e-9)
    # the QP is piecewise linear: its gradient penalty has zero gradient, its jvp is dy/dq + dy/dh
    _, dq, dh = qp_ref(Q.numpy(), H.numpy())
    np.testing.assert_allclose(second["qp"][0][0].numpy(), 0.0, atol=1e-7)
    np.testing.assert_allclose(second["qp"][1][0].numpy(), dq + dh, atol=1e-7)
    for name, result in got.items():
        check_references(name, result)
        ref = run(models["appendix_model" if name == "state_dict" else name], INPUTS[name if name != "state_dict"
                                                                                   else "appendix_model"])
        for a, b in zip(result[0] + result[1], ref[0] + ref[1]):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


# torch.func.jvp imports torch's jvp decompositions, which call the deprecated torch.jit.script
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_standalone_export_next_to_the_package(appendix_layer, tmp_path, monkeypatch):
    # an export inlines the torch boundary: its operators get their own namespace (no clash with the
    # package's), it works under torch.func, and pickling its layer is a clear error
    import importlib

    path = ic.export_layer(appendix_layer, tmp_path / "appendix_export.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = importlib.import_module(Path(path).stem)
    y0 = torch.tensor([1.0, 1.5], dtype=torch.float64)
    x = torch.tensor([[0.9], [1.1]], dtype=torch.float64)
    torch.testing.assert_close(m.layer(x, y0=y0), appendix_layer(x, y0=y0), rtol=0, atol=0)
    yv = torch.func.vmap(lambda t: m.layer(t, y0=y0))(x)
    np.testing.assert_allclose(yv.numpy(), appendix_ref(x.numpy()[:, 0])[0], rtol=1e-10)
    with pytest.raises(m.ImplicitCompilerError, match="of a standalone export cannot be pickled.*state_dict"):
        pickle.dumps(m.layer)
    # first order works; the second order needs the module generated from the symbolic system
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m.layer(xr, y0=y0).sum(), xr, create_graph=True)
    np.testing.assert_allclose(g.detach().numpy()[:, 0], appendix_ref(x.numpy()[:, 0])[1].sum(-1), rtol=1e-9)
    with pytest.raises(NotImplementedError, match="double backward .* 'appendix' needs its second-order module"):
        g.sum().backward()
    with pytest.raises(NotImplementedError, match="forward-mode differentiation .* 'appendix' needs its second-order"):
        torch.func.jvp(lambda t: m.layer(t, y0=y0), (x,), (torch.ones_like(x),))
