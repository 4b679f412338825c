"""torch.compile over models containing implicit layers: one graph (fullgraph=True), the same values,
gradients and statuses as eager mode; torch.jit gives a clear error that points to torch.compile."""

import numpy as np
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import implicit_compiler as ic
from implicit_compiler.errors import ImplicitCompilerError
from tests.torch.pt_systems import AppendixModel, appendix_ref, qp_problem, qp_ref, two_system

Y0 = torch.tensor([1.0, 1.5], dtype=torch.float64)

# torch.compile's own modules warn about their own deprecated calls (Dynamo instantiates
# torch.autograd.Function for a context object, inductor's import uses torch.jit.script_method),
# inside warnings.catch_warnings(record=True), which does not silence them when warnings are errors
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")


@pytest.fixture(scope="module")
def two_layer():
    return ic.compile(two_system())


@pytest.fixture(scope="module")
def qp_layer():
    return ic.compile(qp_problem())


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def one_graph(model):
    """``model`` compiled with fullgraph=True on aot_eager (AOT autograd traces the custom ops'
    fake implementations and the backward) and a counter of the graphs made."""
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    return torch.compile(model, fullgraph=True, backend=cnt), cnt


def test_fullgraph_inductor_matches_eager(appendix_layer):
    model = AppendixModel(appendix_layer)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.tensor([[0.8], [1.0], [1.3]], dtype=torch.float64)
    out = compiled(x)
    ref = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    z = 0.5 * x.numpy()[:, 0] + 0.5
    yr, dr = appendix_ref(z)
    np.testing.assert_allclose(out.detach().numpy(), yr @ [1.0, 2.0], rtol=1e-10)
    out.sum().backward()
    gw = model.lin.weight.grad.clone()
    model.zero_grad()
    ref.sum().backward()
    torch.testing.assert_close(gw, model.lin.weight.grad, rtol=0, atol=1e-15)
    assert gw.item() == pytest.approx(((dr @ [1.0, 2.0]) * x.numpy()[:, 0]).sum(), rel=1e-10)


def test_one_graph_with_several_groups_and_shared_parameters(two_layer):
    b = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def f(a, c):
        u, v = two_layer(a, b, c)
        return (u * v).sum() + u.sum()

    compiled, cnt = one_graph(f)
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.3, 5.0, -1.0], dtype=torch.float64, requires_grad=True)
    out = compiled(a, c)
    out.backward()
    grads = [t.grad.clone() for t in (a, b, c)]
    for t in (a, b, c):
        t.grad = None
    f(a, c).backward()
    assert cnt.frame_count == 1
    for g, t in zip(grads, (a, b, c)):
        torch.testing.assert_close(g, t.grad, rtol=0, atol=1e-15)
    a2 = (a.detach() * 2).requires_grad_()
    u, _ = two_layer(a2, b, c)
    assert compiled(a2, c).item() == pytest.approx(f(a2, c).item(), rel=1e-15)  # no recompilation
    assert cnt.frame_count == 1


def test_compiled_problem_layer_matches_closed_form(qp_layer):
    q = torch.tensor([[0.5, -1.0, 2.0], [-3.0, 0.2, -0.1]], dtype=torch.float64, requires_grad=True)
    h = torch.tensor([[0.0, 2.0, -3.0], [1.0, -1.0, 0.5]], dtype=torch.float64)
    compiled, cnt = one_graph(lambda q, h: qp_layer(q, h))
    y = compiled(q, h)
    assert cnt.frame_count == 1
    yr, dq, _ = qp_ref(q.detach().numpy(), h.numpy())
    np.testing.assert_allclose(y.detach().numpy(), yr, atol=1e-8)
    torch.testing.assert_close(y, qp_layer(q, h), rtol=0, atol=0)
    y.sum().backward()
    np.testing.assert_allclose(q.grad.numpy(), dq, atol=1e-7)


def test_compiled_statuses_and_failure_policies(appendix_layer):
    x = torch.tensor([[0.9], [0.5], [1.1]], dtype=torch.float64)  # x = 0.5: no real root

    def f(x):
        return appendix_layer(x, y0=Y0, return_info=True)

    compiled, cnt = one_graph(f)
    with pytest.raises(ic.ConvergenceError, match=r"1 of 3 samples"):
        compiled(x)
    appendix_layer.configure(on_failure="nan")
    try:
        y, info = compiled(x)
    finally:
        appendix_layer.configure(on_failure="raise")
    assert cnt.frame_count == 1
    assert info.converged.tolist() == [True, False, True]
    assert torch.isnan(y[1]).all()
    np.testing.assert_allclose(y[[0, 2]].numpy(), appendix_ref([0.9, 1.1])[0], rtol=1e-10)
    # the good samples are the eager ones, bit for bit
    torch.testing.assert_close(y[[0, 2]], appendix_layer(x[[0, 2]], y0=Y0), rtol=0, atol=0)


def test_torch_jit_points_to_torch_compile(appendix_layer):
    model = AppendixModel(appendix_layer)
    x = torch.tensor([[0.9]], dtype=torch.float64)
    with pytest.raises(ImplicitCompilerError, match=r"torch.jit.trace cannot record the implicit layer 'appendix'.*"
                                                    r"Use torch.compile\(model\)"):
        torch.jit.trace(model, (x,))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_jit_script_points_to_torch_compile(appendix_layer):
    with pytest.raises(ImplicitCompilerError, match=r"torch.jit.script cannot compile the implicit layer 'appendix'.*"
                                                    r"Use torch.compile\(model\)"):
        torch.jit.script(appendix_layer)


def test_operators_pass_opcheck(appendix_layer, two_layer, qp_layer):
    # schema, fake (meta) implementation against the real one, and AOT tracing with dynamic shapes
    from implicit_compiler.torch.function import solve_op, vjp_op

    x = torch.tensor([[0.9], [1.1]], dtype=torch.float64)
    torch.library.opcheck(solve_op, (appendix_layer._token, [x], Y0))
    outs = solve_op(appendix_layer._token, [x], Y0)
    torch.library.opcheck(vjp_op, (appendix_layer._token, outs[1:], torch.ones(2, 2, dtype=torch.float64), [True]))
    a = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    b = torch.tensor(0.5, dtype=torch.float64)
    torch.library.opcheck(solve_op, (two_layer._token, [a, b, a.float()], None))  # shared group, float32 group
    q = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    torch.library.opcheck(solve_op, (qp_layer._token, [q, torch.zeros(3, dtype=torch.float64)], None))


def test_solve_operator_refuses_autograd(appendix_layer):
    # the solve operator has no derivative of its own (the layer's autograd.Function has): called with
    # autograd on and a parameter that requires grad it is an error, not a result whose gradient is lost
    from implicit_compiler.torch.function import solve_op

    x = torch.tensor([[0.9]], dtype=torch.float64, requires_grad=True)
    with pytest.raises(ImplicitCompilerError, match=r"implicit_compiler::solve was called with autograd on.*"
                                                    r"Call the implicit layer 'appendix' instead"):
        solve_op(appendix_layer._token, [x], Y0)
    with torch.no_grad():
        outs = solve_op(appendix_layer._token, [x], Y0)
    torch.testing.assert_close(outs[0], appendix_layer(x.detach(), y0=Y0), rtol=0, atol=0)


def test_dynamic_batch_sizes_compile_once(appendix_layer):
    model = AppendixModel(appendix_layer)
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=cnt)
    for B in (3, 5, 7):  # (B = 2 would be duck-sized to y0's 2 entries)
        x = torch.linspace(0.6, 1.4, B, dtype=torch.float64).reshape(B, 1).requires_grad_()
        out = compiled(x)
        out.sum().backward()
        g = x.grad.clone()
        x.grad = None
        model(x).sum().backward()
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
        torch.testing.assert_close(g, x.grad, rtol=0, atol=1e-15)
        z = 0.5 * x.detach().numpy()[:, 0] + 0.5
        np.testing.assert_allclose(out.detach().numpy(), appendix_ref(z)[0] @ [1.0, 2.0], rtol=1e-10)
    assert cnt.frame_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_double_backward_through_a_compiled_model_is_torchs_clear_error(appendix_layer, backend):
    # A gradient penalty differentiates the backward again. AOT autograd's compiled backward (every
    # backend but Dynamo's debugging "eager" one) refuses create_graph=True, for any model: a clear
    # error, never a silently first-order result. The forward and the first-order gradient match eager.
    model = AppendixModel(appendix_layer)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.tensor([[0.8], [1.0], [1.3]], dtype=torch.float64, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (ge,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(g, ge, rtol=0, atol=1e-15)
    with pytest.raises(RuntimeError, match="torch.compile with aot_autograd does not currently support double "
                                           "backward"):
        torch.autograd.grad((g**2).sum(), model.lin.weight)
    # the same penalty on the uncompiled model: exact (d/dw of sum_b (dy/dx)^2 against its closed form)
    yx = model(x)
    (g,) = torch.autograd.grad(yx.sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad((g**2).sum(), model.lin.weight)
    z = 0.5 * x.detach().numpy()[:, 0] + 0.5
    xs = x.detach().numpy()[:, 0]
    d1 = appendix_ref(z)[1] @ [1.0, 2.0]  # d(y1 + 2 y2)/dz
    y2 = appendix_ref(z)[0][:, 1]
    d2 = 2 / z**3 + 2 * ((-1 - 3 / z**4) * y2 - (-z + z**-3) * ((-z + z**-3) / y2)) / y2**2  # d2/dz2
    # dy/dx = w d1(w x + b): d/dw [(w d1)^2] = 2 w d1 (d1 + w x d2), w = 0.5
    np.testing.assert_allclose(gw.item(), (2 * 0.5 * d1 * (d1 + 0.5 * xs * d2)).sum(), rtol=1e-9)


def test_gradient_penalty_inside_a_fullgraph_region_is_dynamos_clear_error(appendix_layer):
    # torch.autograd.grad inside the compiled function: Dynamo refuses to trace it (fullgraph=True
    # makes that an error instead of a graph break), for any model
    model = AppendixModel(appendix_layer)

    def penalty(x):
        x = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        return (g**2).sum()

    compiled = torch.compile(penalty, fullgraph=True, backend="aot_eager")
    with pytest.raises(torch._dynamo.exc.Unsupported, match="torch.autograd.grad"):
        compiled(torch.tensor([[0.8], [1.0]], dtype=torch.float64))
