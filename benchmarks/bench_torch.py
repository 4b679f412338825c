"""PyTorch-integration benchmarks of implicit_compiler, with ratios measured in the same run.

Run by hand (not part of CI), from the repository root::

    python benchmarks/bench_torch.py            # full run (a minute or two on a warm kernel cache)
    python benchmarks/bench_torch.py --quick    # fewer repeats

The package is imported from the repository; compiled layers go to the usual kernel cache
(``$IMPLICIT_COMPILER_CACHE``, else ``~/.cache/implicit_compiler``). All cases use the appendix
system ``x^2 + y1^2 + y2^2 - 4 = 0, x*y1 - 1 = 0`` (unknowns y1, y2, parameter x), float64.

Cases
-----
(a) ``torch.func.vmap`` over a per-sample layer call, 1,000 samples, against the batched call of the
    same 1,000 samples (the vmapped dimension is folded into one kernel call): forward (target: ratio
    <= 1.2), and per-sample gradients (``vmap(grad(f))`` against ``y.sum().backward()``), beside
    torch's floor for the latter: the same transforms over a trivial ``autograd.Function`` around a
    custom operator with as many outputs as the layer's solve operator.
(b) Double backward against the first-order backward at B = 10^4: ``torch.autograd.grad(y.sum(), x)``
    (first order) and ``torch.autograd.grad(g.sum(), x)`` with ``g`` the gradient taken with
    ``create_graph=True`` (the double backward of a gradient penalty), both on a retained graph; and,
    at NumPy level, the batch driver of the double backward against the per-sample Python loop it
    replaced (kept here as the reference). Target: double / first order <= 3.
(c) ``torch.compile`` (inductor, fullgraph) at B = 1 after warm-up against eager: forward only and
    forward + backward; beside it torch's own floors (an inductor-compiled ``x * 2``, and the trivial
    ``autograd.Function`` of (a) compiled against eager) and the cost of calling the solve operator
    through the dispatcher rather than its implementation. Target: <= 10 us added per call.

Times are the minimum over ``timeit`` repeats, in microseconds.
"""

from __future__ import annotations

import argparse
import sys
import timeit
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import sympy as sp  # noqa: E402
import torch  # noqa: E402

import implicit_compiler as ic  # noqa: E402
from implicit_compiler.compiler import compile_second_order  # noqa: E402
from implicit_compiler.runtime.second_order import batched_solve  # noqa: E402
from implicit_compiler.runtime.status import CONVERGED  # noqa: E402
from implicit_compiler.torch import function as F  # noqa: E402

Y0 = torch.tensor([1.0, 1.5], dtype=torch.float64)
_TAB = np.zeros(0, dtype=np.int64)


def appendix_system():
    x = sp.Symbol("x")
    y1, y2 = sp.symbols("y1 y2")
    return ic.ResidualSystem(residuals=[x**2 + y1**2 + y2**2 - 4, x * y1 - 1], unknowns=[y1, y2], params=[x],
                             name="appendix")


def best(fn, number: int, repeat: int) -> float:
    """Minimum time of one call of ``fn`` over ``repeat`` runs of ``number`` calls, in microseconds."""
    fn()
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def loop_double_backward(so, res, Ybar, W):
    """The per-sample double backward the batch driver replaced (kernels called from Python)."""
    ok = np.flatnonzero(res.status == CONVERGED)
    V = batched_solve(so.kernels, res, Ybar, transpose=True)
    R = np.zeros((len(W), so.n))
    for b in ok:
        so.module2.jvp_params(res.y[b], res.p[b], W[b], R[b], _TAB)
    Ydot = -batched_solve(so.kernels, res, R)
    Hy, Hp = np.zeros((len(W), so.n)), np.zeros((len(W), so.m))
    for b in ok:
        so.module2.hvp(res.y[b], res.p[b], V[b], Ydot[b], W[b], Hy[b], Hp[b], _TAB)
    dP = -(so.vjp(res, Hy) + Hp)
    return Ydot, dP


def row(name: str, t: float, ref_name: str = "", ref: float = 0.0, target: str = "") -> None:
    ratio = f"{t / ref:7.2f}" if ref else "       "
    print(f"  {name:46s} {t:10.1f}   {ref_name:34s} {ref if ref else float('nan'):10.1f}   {ratio}   {target}")


def header(title: str) -> None:
    print(f"\n{title}")
    print(f"  {'case':46s} {'us':>10s}   {'reference':34s} {'us':>10s}   {'ratio':>7s}   target")


# --- torch's floors: the same machinery around trivial work ----------------------------------------

_FLOOR = torch.library.Library("bench_torch_floor", "FRAGMENT")
_FLOOR.define("outputs(Tensor x, int k) -> Tensor[]")


def _floor_outputs(x, k):
    return [x * 2] + [x.new_empty((x.shape[0], 3)) for _ in range(k - 1)]


_FLOOR.impl("outputs", _floor_outputs, "CompositeExplicitAutograd")
torch.library.register_fake("bench_torch_floor::outputs", _floor_outputs, lib=_FLOOR)


@torch.library.register_vmap("bench_torch_floor::outputs", lib=_FLOOR)
def _floor_vmap(info, in_dims, x, k):  # fold the vmapped dimension, as the layer's rule does
    outs = torch.ops.bench_torch_floor.outputs(x.movedim(in_dims[0], 0) if in_dims[0] is not None else x, k)
    return outs, [0] * len(outs)


class FloorFunction(torch.autograd.Function):
    """``2 x`` as an ``autograd.Function`` around a custom operator with ``k`` outputs (``k - 1`` of
    them marked non-differentiable), as the layer's Function wraps its solve operator: what torch's
    machinery costs per call with no work inside."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, k):
        with torch.no_grad():
            return tuple(torch.ops.bench_torch_floor.outputs(x, k))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, g, *rest):
        return g * 2, None


def solve_outputs(layer) -> int:
    """How many tensors the layer's forward operator returns (group outputs + result arrays)."""
    return len(layer._unknown_groups) + len(layer._result_names)


def case_vmap(layer, number, repeat):
    header("(a) torch.func.vmap over a layer call, 1,000 samples, vs the batched call")
    xs = torch.linspace(0.8, 1.3, 1000, dtype=torch.float64).reshape(1000, 1)

    def f(x):
        return layer(x, y0=Y0)

    vf = torch.func.vmap(f)
    torch.testing.assert_close(vf(xs), f(xs), rtol=0, atol=0)
    t_b = best(lambda: f(xs), number, repeat)
    t_v = best(lambda: vf(xs), number, repeat)
    row("vmap forward", t_v, "batched forward", t_b, "<= 1.2")

    def loss(x):
        return f(x).sum()

    vg = torch.func.vmap(torch.func.grad(loss))
    xr = xs.clone().requires_grad_()

    def batched_grad():
        return torch.autograd.grad(f(xr).sum(), xr)[0]

    torch.testing.assert_close(vg(xs), batched_grad(), rtol=0, atol=1e-14)
    t_b = best(batched_grad, number, repeat)
    t_v = best(lambda: vg(xs), number, repeat)
    row("vmap(grad) per-sample gradients", t_v, "batched forward + backward", t_b, "(no target)")
    k = solve_outputs(layer)
    fg = torch.func.vmap(torch.func.grad(lambda x: FloorFunction.apply(x, k)[0].sum()))

    def floor_batched():
        return torch.autograd.grad(FloorFunction.apply(xr, k)[0].sum(), xr)[0]

    torch.testing.assert_close(fg(xs), floor_batched(), rtol=0, atol=0)
    t_fb = best(floor_batched, number, repeat)
    t_fv = best(lambda: fg(xs), number, repeat)
    row(f"torch's floor: vmap(grad), trivial Function ({k} outs)", t_fv, "the same, batched", t_fb,
        f"+{t_fv - t_fb:.0f} us (ours +{t_v - t_b:.0f} us)")


def case_double_backward(layer, number, repeat):
    B = 10_000
    header(f"(b) double backward vs first-order backward, B = {B}")
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(0.8, 1.3, size=(B, 1))).requires_grad_()
    y = layer(x, y0=Y0)
    t1 = best(lambda: torch.autograd.grad(y.sum(), x, retain_graph=True), number, repeat)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    t2 = best(lambda: torch.autograd.grad(g.sum(), x, retain_graph=True), number, repeat)
    row("double backward (torch)", t2, "first-order backward (torch)", t1, "<= 3")

    so = compile_second_order(layer)
    res = layer.kernels.solve(x.detach().numpy(), Y0.numpy()[None], layer.options)
    assert (res.status == CONVERGED).all()
    Ybar, W = rng.normal(size=(B, 2)), rng.normal(size=(B, 1))
    pt = layer.options.parallel_threshold
    got, ref = so.double_backward(res, Ybar, W, pt), loop_double_backward(so, res, Ybar, W)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-14, atol=1e-14 * np.abs(ref[1]).max())
    t_d = best(lambda: so.double_backward(res, Ybar, W, pt), number, repeat)
    t_l = best(lambda: loop_double_backward(so, res, Ybar, W), 1, max(3, repeat // 2))
    row("double backward, batch driver (NumPy level)", t_d, "per-sample Python loop", t_l)
    need = np.ones(1, dtype=np.bool_)
    t_v = best(lambda: layer.kernels.vjp(res, Ybar, need, pt), number, repeat)
    row("double backward, batch driver (NumPy level)", t_d, "first-order VJP (NumPy level)", t_v)


def case_compile(layer, number, repeat):
    header("(c) torch.compile (inductor, fullgraph) per call at B = 1, after warm-up, vs eager")

    def f(x):
        return layer(x, y0=Y0)

    x = torch.tensor([[0.9]], dtype=torch.float64)
    xg = x.clone().requires_grad_()
    cf = torch.compile(f, fullgraph=True)
    for _ in range(3):
        cf(x)
        cf(xg).sum().backward()
    torch.testing.assert_close(cf(x), f(x), rtol=0, atol=0)
    t_e = best(lambda: f(x), number, repeat)
    t_c = best(lambda: cf(x), number, repeat)
    row("compiled forward", t_c, "eager forward", t_e, f"+{t_c - t_e:.0f} us (<= +10)")
    t_e = best(lambda: f(xg).sum().backward(), number, repeat)
    t_c = best(lambda: cf(xg).sum().backward(), number, repeat)
    row("compiled forward + backward", t_c, "eager forward + backward", t_e, f"+{t_c - t_e:.0f} us (<= +10)")

    def g(x):
        return x * 2.0

    cg = torch.compile(g, fullgraph=True)
    for _ in range(3):
        cg(x)
    t_g = best(lambda: cg(x), number, repeat)
    t_ge = best(lambda: g(x), number, repeat)
    row("torch's floor: compiled x * 2", t_g, "eager x * 2", t_ge, f"+{t_g - t_ge:.0f} us")
    k = solve_outputs(layer)

    def h(x):
        return FloorFunction.apply(x, k)[0]

    ch = torch.compile(h, fullgraph=True)
    for _ in range(3):
        ch(x)
        ch(xg).sum().backward()
    t_he, t_hc = best(lambda: h(x), number, repeat), best(lambda: ch(x), number, repeat)
    row(f"torch's floor: trivial Function ({k} outs), fwd", t_hc, "eager", t_he, f"+{t_hc - t_he:.0f} us")
    t_he = best(lambda: h(xg).sum().backward(), number, repeat)
    t_hc = best(lambda: ch(xg).sum().backward(), number, repeat)
    row(f"torch's floor: trivial Function ({k} outs), f+b", t_hc, "eager", t_he, f"+{t_hc - t_he:.0f} us")
    tok = layer._token
    t_op = best(lambda: F.solve_op(tok, [x], Y0), number, repeat)
    t_impl = best(lambda: layer._solve_tensors([x], Y0), number, repeat)
    row("solve operator through the dispatcher", t_op, "its implementation called directly", t_impl,
        f"+{t_op - t_impl:.0f} us")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--threads", action="store_true", help="let large batches run on Numba's threads")
    args = ap.parse_args()
    number, repeat = (50, 3) if args.quick else (200, 7)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import numba

    print(f"implicit_compiler {ic.__version__}, torch {torch.__version__}, numba {numba.__version__}, "
          f"{numba.get_num_threads()} Numba threads")
    layer = ic.compile(appendix_system())
    if not args.threads:
        # every batch on the calling thread: on a loaded machine a parallel region can stall for
        # milliseconds, which would measure the machine rather than the code
        layer.configure(parallel_threshold=2**62)
    print("batches run on the calling thread" if not args.threads else
          "large batches on Numba's threads (Kernels._run's rule)")
    case_vmap(layer, number // 4 or 1, repeat)
    case_double_backward(layer, number // 4 or 1, repeat)
    case_compile(layer, number * 5, repeat)


if __name__ == "__main__":
    main()
