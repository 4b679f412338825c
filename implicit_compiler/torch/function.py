"""The autograd Function of every compiled layer, and the two torch operators it calls.

Forward: pack the parameter groups to ``theta`` of shape ``(B, m)``, solve
``F(y, theta) = 0`` per sample with the generated kernels (float64), apply the
failure policy, and return one tensor per unknown group.

Backward (implicit function theorem): at the solution ``y*``,

    dy*/dtheta = -(dF/dy)^{-1} dF/dtheta,

so for an upstream gradient ``ybar`` the vector-Jacobian product is

    thetabar = -(dF/dtheta)^T v,   where (dF/dy)^T v = ybar.

``v`` reuses the LU factorisation of dF/dy that the forward left at ``y*``;
``(dF/dtheta)^T v`` is generated over the structural non-zeros of dF/dtheta
only, and only for parameter groups that require a gradient. Gradients of
parameters given without a batch dimension (or with a batch of 1 broadcast over
the batch) are summed over the batch.

Structure (so that torch.func, ``torch.compile`` and the JIT-free tools see an
ordinary torch program):

* ``implicit_compiler::solve`` and ``implicit_compiler::vjp`` are
  ``torch.library`` custom operators. They run the Numba kernels on real tensors,
  have fake (meta) implementations giving their output shapes (``torch.compile``
  traces through them without a graph break) and vmap rules that fold a
  ``torch.func.vmap`` dimension into the kernels' batch (one kernel call for the
  whole vmapped batch, never a Python loop). Their non-tensor state (kernels,
  options, warm-start memory) is the layer's, found by the layer's token.
* :class:`ImplicitFunction` is an ``autograd.Function`` in the ``setup_context``
  style over them (``generate_vmap_rule=True``: its vmap is the operators').
  The forward op returns the group outputs and the whole
  :class:`~implicit_compiler.runtime.kernels.SolveResult` (``y*``, ``theta``,
  the factorisation, statuses) as tensors marked non-differentiable; the backward
  rebuilds the result from them and calls the VJP op, then splits and sums the
  ``(B, m)`` gradient with torch operations.

Forward mode is the ``jvp`` staticmethod of :class:`ImplicitFunction` and
:class:`EagerImplicitFunction`: ``dy = -(dF/dy)^{-1} (dF/dtheta) dtheta`` from the
saved result (``implicit_compiler::jvp``, the second-order module's ``jvp``).
Under ``create_graph=True`` (and under torch.func, which always builds the graph of
a backward) the backward's ``thetabar`` is computed by :class:`BackwardFunction`,
an ``autograd.Function`` of ``(ybar, *params)`` whose backward is the exact double
backward (``implicit_compiler::double_backward``) and whose ``jvp`` is the
directional derivative of the VJP (so ``torch.func.hessian`` = jacfwd(jacrev)
works). The second-order module is built the first time one of these runs.

What the backward reads is the layer's own: ``theta`` is a private copy taken at
the forward (``pack``), ``y*`` and the factorisation are the kernels' arrays, and
the output tensors are copies of ``y*``, so nothing the caller can reach (a
parameter's ``.data``, the output's NumPy view) changes the gradient. The
parameter tensors are saved with ``save_for_backward``, so an in-place change
that autograd can see raises torch's "modified by an inplace operation" error.

Third-order derivatives are not available: the double backward's results carry a
node whose backward raises (:class:`SecondOrderUnsupported`), so differentiating
them again is an error, never zero. A layer without its symbolic system (a standalone
export) has no second-order module: forward mode and double backward raise
:class:`NotImplementedError` naming the layer. A layer restored by ``pickle`` /
``torch.load`` carries its system and gets its second-order module back.
"""

from __future__ import annotations

import itertools
import re
import weakref
from dataclasses import fields
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from ..errors import ImplicitCompilerError
from ..runtime import status as st
from ..runtime.kernels import SolveResult
from .shapes import batch_size

# The operators' namespace: this package's, or a standalone export's own (an export inlines this
# module, and may be imported next to the package: the two must not register the same operator).
_NS = "implicit_compiler" if __name__ == "implicit_compiler.torch.function" else "ic_" + re.sub(r"\W", "_", __name__)

# ---------------------------------------------------------------------------------------------------
# layers by token: the operators' arguments are tensors, numbers and strings only

_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_TOKENS = itertools.count()


def register(layer) -> str:
    """A new token naming ``layer`` in operator calls (held weakly)."""
    token = f"{layer.layout['name']}#{next(_TOKENS)}"
    _LAYERS[token] = layer
    return token


def _layer(token: str):
    layer = _LAYERS.get(token)
    if layer is None:
        raise ImplicitCompilerError(
            f"the implicit layer {token!r} this call refers to no longer exists in this process (a traced or "
            f"compiled graph outlived its layer); call the layer itself, or compile the model again"
        )
    return layer


# ---------------------------------------------------------------------------------------------------
# SolveResult <-> tensors

RESULT_FIELDS = tuple(f.name for f in fields(SolveResult))


def result_names(res: SolveResult) -> tuple:
    """The result's arrays in a fixed order: the dataclass fields, then extra attributes
    (``weakly_active`` of an optimization problem)."""
    extra = tuple(sorted(k for k, v in vars(res).items() if k not in RESULT_FIELDS and isinstance(v, np.ndarray)))
    return RESULT_FIELDS + extra


def result_to_tensors(res: SolveResult, names) -> list:
    # C-contiguous, as the fake implementation says (residual_norm is a column of the kernels'
    # info array); the large arrays already are, and are not copied
    return [torch.from_numpy(np.ascontiguousarray(getattr(res, k))) for k in names]


def tensors_to_result(tensors, names) -> SolveResult:
    # C-contiguous: a vmap rule can hand the result back as strided views, and the kernels are
    # compiled for C-contiguous arrays only (a strided one made Numba compile a second
    # specialisation of the VJP on the spot); contiguous tensors are not copied
    arrays = {k: np.ascontiguousarray(t.numpy()) for k, t in zip(names, tensors)}
    res = SolveResult(**{k: arrays[k] for k in RESULT_FIELDS})
    for k in names[len(RESULT_FIELDS):]:
        setattr(res, k, arrays[k])
    return res


# ---------------------------------------------------------------------------------------------------
# when the operators' implementations can be called directly

_is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)


def direct(tensors) -> bool:
    """True for real tensors outside ``torch.compile``, torch.func transforms and dispatch modes:
    there an operator call is its implementation's call plus the dispatcher's custom-op path
    (argument binding, autograd and Dynamo wrappers: about 0.1 ms per call, several times the
    whole solve of a small batch), so the implementation is called directly. Anywhere else
    (fake tensors, vmap's batched tensors, a tracing mode) the operator is called."""
    if torch.compiler.is_compiling() or _is_wrapped is None or _dispatch_modes is None or _dispatch_modes():
        return False
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or _is_wrapped(t)):
            return False
    return True


_interpreters = getattr(torch._C._functorch, "get_interpreter_stack", None)
_unwrap = getattr(torch._C._functorch, "get_unwrapped", None)
_VMAP = getattr(getattr(torch._C._functorch, "TransformType", None), "Vmap", None)


# ---------------------------------------------------------------------------------------------------
# the forward operator


# ``solve`` is defined with torch.library's low-level API (a schema and one implementation for every
# backend) rather than torch.library.custom_op: the call a compiled graph records then goes through the
# C++ dispatcher straight to the implementation, without custom_op's Python autograd and output-aliasing
# wrappers (about 10 us per call). It has no autograd kernel, which is right only because it is always
# called with autograd off (inside an autograd.Function's forward, or a traced forward graph): an output
# computed with autograd on from inputs that require grad would get torch's fallback node, which warns
# and contributes no gradient when backpropagated, so such a call is refused. The other operators are
# also called with autograd on (forward-mode rules) and stay custom_ops (a backward through them raises).
_LIB = torch.library.Library(_NS, "FRAGMENT")
_LIB.define("solve(str token, Tensor[] params, Tensor? y0) -> Tensor[]")


def _solve(token: str, params: list[torch.Tensor], y0: Optional[torch.Tensor]) -> list[torch.Tensor]:  # noqa: UP045
    """``[*group outputs, *SolveResult arrays]`` of one batched solve (see ``ImplicitLayer._solve_tensors``)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in params):
        raise ImplicitCompilerError(
            f"the operator {_NS}::solve was called with autograd on and parameters that require grad: it has "
            f"no derivative of its own. Call the implicit layer {_layer(token).layout['name']!r} instead, whose "
            f"autograd.Function differentiates the solve"
        )
    return _layer(token)._solve_tensors(params, y0)


_LIB.impl("solve", _solve, "CompositeExplicitAutograd")
solve_op = getattr(torch.ops, _NS).solve.default


@torch.library.register_fake(solve_op, lib=_LIB)
def _solve_fake(token, params, y0):
    layer = _layer(token)
    groups = layer._param_groups
    B, batched = batch_size(groups, params, "parameter group")
    squeeze = not any(batched)
    dtype = params[0].dtype
    for t in params[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    device = params[0].device
    outs = [params[0].new_empty(tuple(g["shape"]) if squeeze else (B, *g["shape"]), dtype=dtype, device=device)
            for g in layer._unknown_groups]
    for shape, dt in layer._result_schema()[1]:
        outs.append(torch.empty((B, *shape), dtype=dt, device="cpu"))
    return outs


def _fold(x, d, V: int, B: int, batched: bool, core: tuple):
    """``x`` (vmapped along ``d``, or not vmapped when ``d`` is None) as ``(V * B, *core)``: the
    vmapped dimension folded into the batch. ``batched``: the logical ``x`` has a batch dimension
    (of ``B`` or of 1, broadcast)."""
    if d is None:
        x = x.unsqueeze(0)
    else:
        x = x.movedim(d, 0)
    if not batched:
        x = x.unsqueeze(1)
    return x.expand(V, B, *core).reshape(V * B, *core)


def fold_inputs(layer, V: int, pdims, ydim, params, y0):
    """The parameters and initial guess of ``V`` calls of a vmap level as one call: the vmapped
    dimension (``pdims`` / ``ydim``: its position in each tensor, None where a tensor is not
    vmapped) folded into the batch. Returns ``(params, y0, B, squeeze)``: ``B`` the batch of each
    call, ``squeeze`` True when the calls are unbatched (their outputs have no batch dimension)."""
    groups = layer._param_groups
    logical = [SimpleNamespace(shape=tuple(p.shape) if d is None else tuple(p.movedim(d, 0).shape[1:]))
               for p, d in zip(params, pdims)]
    B, batched = batch_size(groups, logical, "parameter group")
    flat = []
    for g, p, d, b in zip(groups, params, pdims, batched):
        if d is None and not b:
            flat.append(p)  # shared by every sample of every vmapped call
        else:
            flat.append(_fold(p, d, V, B, b, tuple(g["shape"])))
    if y0 is not None:
        n = y0.shape[-1]
        ylog = y0.dim() - (ydim is not None)
        if ydim is not None or ylog == 2:  # per-sample starts: one per sample of the folded batch
            y0 = _fold(y0, ydim, V, B, ylog == 2, (n,))
    return flat, y0, B, not any(batched)


def unfold_outputs(outs, k: int, V: int, B: int, squeeze: bool) -> list:
    """The outputs of a folded call as ``(V, ...)``: the first ``k`` (the group outputs) without a
    batch dimension when ``squeeze``, the others (per-sample arrays) always with one."""
    return [t.reshape(V, *t.shape[1:]) if i < k and squeeze else t.reshape(V, B, *t.shape[1:])
            for i, t in enumerate(outs)]


@torch.library.register_vmap(solve_op, lib=_LIB)
def _solve_vmap(info, in_dims, token, params, y0):
    _, pdims, ydim = in_dims
    layer = _layer(token)
    V = info.batch_size
    flat, y0, B, squeeze = fold_inputs(layer, V, pdims, ydim, params, y0)
    shaped = unfold_outputs(solve_op(token, flat, y0), len(layer._unknown_groups), V, B, squeeze)
    return shaped, [0] * len(shaped)


_level_of = getattr(torch._C._functorch, "maybe_get_level", None)
_bdim_of = getattr(torch._C._functorch, "maybe_get_bdim", None)
_add_batch_dim = getattr(torch._C._functorch, "_add_batch_dim", None)
try:
    from torch._functorch.pyfunctorch import temporarily_pop_interpreter_stack as pop_interpreter
except ImportError:  # another torch: the autograd.Function's vmap rule serves every call
    pop_interpreter = None


def unwrap_vmap_level(tensors):
    """When the innermost active ``torch.func`` transform is ``vmap`` (and nothing is being
    compiled): ``(level, V, plain, dims)``, the tensors unwrapped at that level and the position of
    their vmapped dimension (None: not vmapped at this level); else None.

    A layer called under such a level folds it into its batch itself (:func:`fold_inputs`), calls
    itself on the folded tensors with the level popped (the transforms below it, ``grad`` or
    ``jvp``, then see an ordinary call) and wraps its outputs at the level again
    (:func:`batched_at`). That is what the ``autograd.Function``'s generated vmap rule would do, less
    its cost (argument and output pytrees, about 0.3 ms per call for the operator's rule and
    1-3 ms for the Function's) and without its limits: the generated rule of a ``jvp`` pairs
    tangents with saved tensors in a way ``jvp(vmap(layer))`` failed on."""
    if None in (_interpreters, _level_of, _bdim_of, _add_batch_dim, pop_interpreter, _is_wrapped, _VMAP):
        return None
    if torch.compiler.is_compiling():
        return None
    stack = _interpreters()
    if not stack or stack[-1].key() != _VMAP:
        return None
    level = stack[-1].level()
    plain, dims, V = [], [], None
    for t in tensors:
        d = None
        if t is not None and _is_wrapped(t) and _level_of(t) == level:
            d = _bdim_of(t)
            t = _unwrap(t)
            V = t.shape[d]
        plain.append(t)
        dims.append(d)
    if V is None:  # nothing is vmapped at this level
        return None
    return level, V, plain, dims


def batched_at(t, level: int):
    """``t`` (its first dimension the vmapped one) as a batched tensor of the vmap ``level``."""
    return _add_batch_dim(t, 0, level)


# ---------------------------------------------------------------------------------------------------
# the backward operator


def _vjp(token: str, result: list[torch.Tensor], ybar: torch.Tensor, need: list[bool]) -> torch.Tensor:
    """The implementation of :func:`vjp_op`."""
    layer = _layer(token)
    res = tensors_to_result(result, layer._result_names)
    Ybar = np.ascontiguousarray(ybar.numpy(), dtype=np.float64)
    options = layer.options
    pbar = layer.kernels.vjp(res, Ybar, np.array(need, dtype=np.bool_), options.parallel_threshold)
    if options.on_failure == "nan":
        pbar[res.status != st.CONVERGED] = np.nan
    return torch.from_numpy(pbar)


@torch.library.custom_op(f"{_NS}::vjp", mutates_args=())
def vjp_op(token: str, result: list[torch.Tensor], ybar: torch.Tensor, need: list[bool]) -> torch.Tensor:
    """Per-sample ``thetabar`` ``(B, m)`` for the upstream gradient ``ybar`` ``(B, n)`` (float64):
    ``-(dF/dtheta)^T (dF/dy)^{-T} ybar`` for converged samples, zero (``on_failure='nan'``: NaN) for
    the others; the columns of groups with ``need[g]`` False are unspecified."""
    return _vjp(token, result, ybar, need)


@vjp_op.register_fake
def _vjp_fake(token, result, ybar, need):
    return torch.empty((ybar.shape[0], _layer(token).kernels.m), dtype=torch.float64)


@vjp_op.register_vmap
def _vjp_vmap(info, in_dims, token, result, ybar, need):
    V = info.batch_size
    _, rdims, ydim = in_dims[:3]
    B = ybar.shape[0] if ydim is None else ybar.movedim(ydim, 0).shape[1]
    flat = [_fold(t, d, V, B, True, tuple(t.shape[1:] if d is None else t.movedim(d, 0).shape[2:]))
            for t, d in zip(result, rdims)]
    yb = _fold(ybar, ydim, V, B, True, (ybar.shape[-1],))
    out = vjp_op(token, flat, yb, need)
    return out.reshape(V, B, -1), 0


# ---------------------------------------------------------------------------------------------------
# forward mode and double backward: the second-order module's products


def layer_second_order(layer, what: str):
    """The layer's :class:`~implicit_compiler.runtime.second_order.SecondOrder` (generated and
    compiled on first use), or :class:`NotImplementedError` for a layer loaded without its system."""
    lazy = getattr(layer.kernels, "second_order", None)
    if lazy is None and getattr(layer, "system", None) is not None:
        raise NotImplementedError(
            f"{what} through the implicit layer {layer.layout['name']!r} needs its second-order module, which "
            f"this layer was built without (it was not made by implicit_compiler.compile). Build the layer with "
            f"implicit_compiler.compile(layer.system) to use forward mode or double backward; first-order reverse "
            f"mode (loss.backward(), torch.func.grad / vjp / jacrev) works here"
        )
    if lazy is None:
        raise NotImplementedError(
            f"{what} through the implicit layer {layer.layout['name']!r} needs its second-order module, which is "
            f"generated from the symbolic system; this layer has none (a standalone export, or a pickled layer "
            f"whose system could not be pickled). Build the layer with implicit_compiler.compile(...) to use "
            f"forward mode or double backward, or use first-order reverse mode (loss.backward(), torch.func.grad "
            f"/ vjp / jacrev), which works here"
        )
    return lazy()


def _failed(layer, res, *arrays) -> None:
    """``on_failure='nan'``: NaN rows for the samples that did not converge (zeros otherwise)."""
    if layer.options.on_failure == "nan":
        bad = res.status != st.CONVERGED
        for a in arrays:
            a[bad] = np.nan


def _jvp(token: str, result: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """The implementation of :func:`jvp_op`."""
    layer = _layer(token)
    so = layer_second_order(layer, "forward-mode differentiation")
    # C-contiguous: the second-order kernels take C arrays only (a vmapped result may be a strided view)
    res = tensors_to_result([t.contiguous() for t in result], layer._result_names)
    ydot = so.jvp(res, np.ascontiguousarray(w.numpy(), dtype=np.float64), layer.options.parallel_threshold)
    _failed(layer, res, ydot)
    return torch.from_numpy(ydot)


@torch.library.custom_op(f"{_NS}::jvp", mutates_args=())
def jvp_op(token: str, result: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """Per-sample ``ydot`` ``(B, n)`` for the flat parameter tangent ``w`` ``(B, m)`` (float64):
    ``-(dF/dy)^{-1} (dF/dtheta) w`` for converged samples, zero (``on_failure='nan'``: NaN) for the others."""
    return _jvp(token, result, w)


@jvp_op.register_fake
def _jvp_fake(token, result, w):
    return torch.empty((w.shape[0], _layer(token).kernels.n), dtype=torch.float64)


def _double_backward(token: str, result: list[torch.Tensor], ybar: torch.Tensor,
                     w: torch.Tensor) -> list[torch.Tensor]:
    """The implementation of :func:`double_backward_op`."""
    layer = _layer(token)
    so = layer_second_order(layer, "double backward (differentiating the gradient)")
    res = tensors_to_result([t.contiguous() for t in result], layer._result_names)
    dybar, dp = so.double_backward(res, np.ascontiguousarray(ybar.numpy(), dtype=np.float64),
                                   np.ascontiguousarray(w.numpy(), dtype=np.float64), layer.options.parallel_threshold)
    _failed(layer, res, dybar, dp)
    return [torch.from_numpy(dybar), torch.from_numpy(dp)]


@torch.library.custom_op(f"{_NS}::double_backward", mutates_args=())
def double_backward_op(token: str, result: list[torch.Tensor], ybar: torch.Tensor,
                       w: torch.Tensor) -> list[torch.Tensor]:
    """``[dybar (B, n), dtheta (B, m)]``: the derivatives of ``<w, thetabar(theta, ybar)>`` per
    converged sample (``thetabar`` the VJP of :func:`vjp_op`), zero (``on_failure='nan'``: NaN) for
    the others."""
    return _double_backward(token, result, ybar, w)


@double_backward_op.register_fake
def _double_backward_fake(token, result, ybar, w):
    k = _layer(token).kernels
    return [torch.empty((ybar.shape[0], k.n), dtype=torch.float64),
            torch.empty((ybar.shape[0], k.m), dtype=torch.float64)]


def _fold_result(result, rdims, V: int, B: int) -> list:
    return [_fold(t, d, V, B, True, tuple(t.shape[1:] if d is None else t.movedim(d, 0).shape[2:]))
            for t, d in zip(result, rdims)]


def _logical_batch(t, d) -> int:
    return t.shape[0] if d is None else t.movedim(d, 0).shape[1]


@jvp_op.register_vmap
def _jvp_vmap(info, in_dims, token, result, w):
    V = info.batch_size
    _, rdims, wdim = in_dims
    B = _logical_batch(w, wdim)
    out = jvp_op(token, _fold_result(result, rdims, V, B), _fold(w, wdim, V, B, True, (w.shape[-1],)))
    return out.reshape(V, B, -1), 0


@double_backward_op.register_vmap
def _double_backward_vmap(info, in_dims, token, result, ybar, w):
    V = info.batch_size
    _, rdims, ydim, wdim = in_dims
    B = _logical_batch(ybar, ydim)
    dy, dp = double_backward_op(token, _fold_result(result, rdims, V, B),
                                _fold(ybar, ydim, V, B, True, (ybar.shape[-1],)),
                                _fold(w, wdim, V, B, True, (w.shape[-1],)))
    return [dy.reshape(V, B, -1), dp.reshape(V, B, -1)], [0, 0]


def _call_jvp(token, result, w):
    if direct(result) and direct((w,)):
        return _jvp(token, result, w)
    return jvp_op(token, list(result), w)


def _call_double_backward(token, result, ybar, w):
    if direct(result) and direct((ybar, w)):
        return _double_backward(token, result, ybar, w)
    return double_backward_op(token, list(result), ybar, w)


def _call_vjp(token, result, ybar, need):
    if direct(result) and direct((ybar,)):
        return _vjp(token, result, ybar, need)
    return vjp_op(token, list(result), ybar, need)


def flat_tangent(pgroups, tangents, B: int):
    """The flat float64 ``(B, m)`` tangent (or cotangent) of ``theta`` from one tensor (or
    ``None``: zero) per parameter group, each shaped as its parameter (with a batch of ``B``, of 1,
    or none: broadcast over the batch), as :func:`~implicit_compiler.torch.shapes.pack` packs them."""
    cols = []
    for (_off, size, _ndim), t in sorted(zip(pgroups, tangents), key=lambda e: e[0][0]):
        if t is None:
            cols.append(torch.zeros((B, size), dtype=torch.float64))
        else:
            cols.append(t.reshape(-1, size).to(dtype=torch.float64, device="cpu").expand(B, size))
    return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)


def split_flat(pgroups, flat, params, flags) -> list:
    """The parameters' gradients from the per-sample flat ``(B, m)`` ``flat``: split into the
    groups (summed over the batch for groups shared by it, or given with a batch of 1);
    ``None`` where ``flags`` is False."""
    B = flat.shape[0]
    out = []
    for (off, size, ndim), t, need in zip(pgroups, params, flags):
        if not need:
            out.append(None)
            continue
        blk = flat if size == flat.shape[1] else flat[:, off:off + size]
        if t.dim() == ndim + 1 and t.shape[0] == B:
            gt = blk.reshape(t.shape)
        else:  # shared by the batch, or a batch of 1 broadcast over it
            gt = blk.sum(dim=0).reshape(t.shape)
        if gt.dtype != t.dtype or t.device.type != "cpu":
            gt = gt.to(dtype=t.dtype, device=t.device)
        out.append(gt)
    return out


class _Static:
    """Constant arguments of :class:`BackwardFunction` as one pytree leaf (torch.func flattens
    an ``autograd.Function``'s arguments; nested tuples of numbers would become many leaves)."""

    __slots__ = ("meta", "need")

    def __init__(self, meta, need):
        self.meta, self.need = meta, need


class BackwardFunction(torch.autograd.Function):
    """``apply(token, static, nres, ybar, *result, *params)`` (``static``: a :class:`_Static`
    with the layer's :func:`call_meta` and the first-order ``need`` flags): the per-sample VJP ``thetabar``
    ``(B, m)`` of an implicit layer as a differentiable function of ``ybar`` and the parameters
    (what the layer's backward computes under ``create_graph=True`` and torch.func).

    Its backward is the double backward: for the cotangent ``w`` of ``thetabar``,
    ``d<w, thetabar>/dybar = ydot(w)`` and ``d<w, thetabar>/dtheta = dP`` (the second-order
    module's ``double_backward``). Its ``jvp``: ``thetabar`` is linear in ``ybar`` and, per sample,
    the gradient of ``ybar . y*(theta)``, whose Jacobian in ``theta`` is a symmetric Hessian, so
    ``d thetabar = VJP(d ybar) + dP(w = d theta)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(token, static, nres, ybar, *tensors):
        # a copy: the kernels' VJP may hand out a pooled array, and this one is held by the graph
        return _call_vjp(token, list(tensors[:nres]), ybar, list(static.need)).clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        token, static, nres, ybar = inputs[:4]
        result, params = inputs[4:4 + nres], inputs[4 + nres:]
        ctx.save_for_backward(ybar, *result, *params)
        ctx.save_for_forward(ybar, *result, *params)
        ctx.token, ctx.meta, ctx.nres = token, static.meta, nres

    @staticmethod
    def backward(ctx, w):
        saved = ctx.saved_tensors
        nres = ctx.nres
        ybar, result, params = saved[0], saved[1:1 + nres], saved[1 + nres:]
        flags = ctx.needs_input_grad[4 + nres:]
        need_ybar = ctx.needs_input_grad[3]
        if w is None or not (need_ybar or any(flags)):
            return (None,) * (4 + nres + len(params))
        dybar, dp = _call_double_backward(ctx.token, result, ybar.detach(), w.detach())
        grads = [dybar.to(ybar.dtype) if need_ybar else None, *split_flat(ctx.meta[2], dp, params, flags)]
        if torch.is_grad_enabled():
            grads = SecondOrderUnsupported.wrap(ctx.meta[0], params, grads, order="third")
        return (None, None, None, grads[0], *(None,) * nres, *grads[1:])

    @staticmethod
    def jvp(ctx, *tangents):
        saved = ctx.saved_tensors
        nres = ctx.nres
        ybar, result = saved[0], saved[1:1 + nres]
        tybar, tparams = tangents[3], tangents[4 + nres:]
        B = ybar.shape[0]
        out = None
        if tybar is not None:
            out = _call_vjp(ctx.token, list(result), tybar.to(torch.float64), [True] * len(ctx.meta[2])).clone()
        if any(t is not None for t in tparams):
            w = flat_tangent(ctx.meta[2], tparams, B)
            dp = _call_double_backward(ctx.token, result, ybar, w)[1]
            out = dp if out is None else out + dp
        if out is None:
            out = torch.zeros((B, _layer(ctx.token).kernels.m), dtype=torch.float64)
        return out


def _output_tangents(meta, ydot, shapes, dtypes) -> list:
    """One tangent per output group from the flat ``(B, n)`` ``ydot``."""
    out = []
    for (off, size), shape, dtype in zip(meta[1], shapes, dtypes):
        blk = ydot if size == ydot.shape[1] else ydot[:, off:off + size]
        out.append(blk.reshape(shape).to(dtype))
    return out


# ---------------------------------------------------------------------------------------------------
# the autograd Function


def param_grads(meta, grads, params, flags, yshape, thetabar, token, result) -> list:
    """The parameters' gradients from the outputs' ``grads``: ``ybar`` ``(B, n)`` assembled from
    the output groups, ``thetabar(ybar)`` the per-sample ``(B, m)`` VJP, split into the groups
    (summed over the batch for groups shared by it, or given with a batch of 1).

    Under grad mode (``create_graph=True``, torch.func) the VJP is :class:`BackwardFunction` of
    ``ybar`` and the parameters instead, with ``result`` the solve result's tensors: the gradients
    are then differentiable (double backward, forward-over-reverse)."""
    name, outs, pgroups = meta
    k = len(outs)
    B, n = yshape
    gr = grads[0]
    if k == 1 and gr is not None and outs[0][1] == n:
        # one output covering y: its gradient is ybar
        ybar = gr.reshape(B, n)
        if ybar.dtype != torch.float64 or ybar.device.type != "cpu":
            ybar = ybar.to(dtype=torch.float64, device="cpu")
    else:
        # one column block per output (zeros where an output got no gradient, and for the
        # multipliers of a problem layer that does not return them)
        cols = []
        pos = 0
        for (off, size), g in sorted(zip(outs, grads[:k]), key=lambda e: e[0][0]):
            if off > pos:
                cols.append(torch.zeros((B, off - pos), dtype=torch.float64))
            if g is None:
                cols.append(torch.zeros((B, size), dtype=torch.float64))
            else:
                cols.append(g.reshape(B, size).to(dtype=torch.float64, device="cpu"))
            pos = off + size
        if pos < n:
            cols.append(torch.zeros((B, n - pos), dtype=torch.float64))
        ybar = cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)
    if torch.is_grad_enabled():
        # create_graph=True: these gradients may be differentiated again
        pbar = BackwardFunction.apply(token, _Static(meta, tuple(flags)), len(result), ybar, *result, *params)
    else:
        pbar = thetabar(ybar)
    return split_flat(pgroups, pbar, params, flags)


def call_meta(layout: dict, unknown_groups, param_groups) -> tuple:
    """What the backward needs to know of a layer, as constants (``torch.compile`` bakes them
    into the graph): ``(name, ((offset, size), ...) of the outputs, ((offset, size, ndim), ...)
    of the parameter groups)``."""
    return (layout["name"],
            tuple((g["offset"], len(g["symbols"])) for g in unknown_groups),
            tuple((g["offset"], len(g["symbols"]), len(g["shape"])) for g in param_groups))


class CompilableImplicitFunction(torch.autograd.Function):
    """``apply(token, meta, y0, *params)``: one output per unknown group, then the solve
    result's tensors (non-differentiable). ``meta``: :func:`call_meta` of the layer.

    This class has no forward-mode rule, because Dynamo cannot trace an ``autograd.Function``
    that defines ``jvp``: layers apply it while ``torch.compile`` traces, and
    :class:`ImplicitFunction` (the same with ``jvp``) otherwise.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(token, meta, y0, *params):
        if direct(params) and direct((y0,)):
            return tuple(_layer(token)._solve_tensors(params, y0))
        return tuple(solve_op(token, list(params), y0))

    @staticmethod
    def setup_context(ctx, inputs, output):
        token, meta = inputs[0], inputs[1]
        if isinstance(meta, _Static):  # ImplicitFunction: the meta as one pytree leaf
            meta = meta.meta
        params = inputs[3:]
        k = len(meta[1])
        result = output[k:]
        ctx.mark_non_differentiable(*result)
        ctx.save_for_backward(*params, *result)
        ctx.token = token
        ctx.meta = meta
        if not torch.compiler.is_compiling() and direct(result):
            # for inspection (grad_fn.res); the backward rebuilds it from the saved tensors. Not for
            # the tensors of a torch.func transform, which have no storage to view (trying and
            # catching torch's error costs about 60 us per call: the error records a C++ traceback)
            ctx.res = tensors_to_result(result, _layer(token)._result_names)

    @staticmethod
    def backward(ctx, *grads):
        # Unpacking raises torch's "modified by an inplace operation" error when a
        # parameter tensor changed in place (its version counter moved) since the forward.
        saved = ctx.saved_tensors
        npar = len(ctx.meta[2])
        params, result = saved[:npar], saved[npar:]
        flags = ctx.needs_input_grad[3:]
        if not any(flags):
            return (None,) * (3 + len(flags))

        def thetabar(ybar):
            return _call_vjp(ctx.token, result, ybar, list(flags))

        return (None, None, None, *param_grads(ctx.meta, grads, params, flags, result[0].shape, thetabar,
                                               ctx.token, result))


class ImplicitFunction(CompilableImplicitFunction):
    """:class:`CompilableImplicitFunction` with its forward-mode rule (eager mode and torch.func).
    ``apply(token, static, y0, *params)`` with ``static`` a :class:`_Static` holding the
    :func:`call_meta`: torch.func's generated vmap rule of a ``jvp`` pairs one tangent with each
    argument, and a nested tuple would be many pytree leaves (``jvp(vmap(layer))`` failed so)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        CompilableImplicitFunction.setup_context(ctx, inputs, output)
        k = len(ctx.meta[1])
        # for jvp: the result tensors are non-differentiable outputs (no grad_fn, so no reference
        # cycle through this context); ctx.save_for_forward of tensors also saved for backward
        # breaks the generated vmap rule of the backward
        ctx.fw_result = tuple(output[k:])
        ctx.out_shapes = tuple(tuple(o.shape) for o in output[:k])
        ctx.out_dtypes = tuple(o.dtype for o in output[:k])

    @staticmethod
    def jvp(ctx, *tangents):
        # forward mode: ydot = -(dF/dy)^{-1} (dF/dtheta) thetadot at y*, from the saved result
        result = ctx.fw_result
        tparams = tangents[3:]
        B = result[0].shape[0]
        if all(t is None for t in tparams):
            ydot = torch.zeros(tuple(result[0].shape), dtype=torch.float64)
        else:
            ydot = _call_jvp(ctx.token, list(result), flat_tangent(ctx.meta[2], tparams, B))
        return (*_output_tangents(ctx.meta, ydot, ctx.out_shapes, ctx.out_dtypes), *(None,) * len(result))


class EagerImplicitFunction(torch.autograd.Function):
    """:class:`ImplicitFunction` in the ``forward(ctx, ...)`` style, applied when no torch.func
    transform is active and nothing is being compiled. ``apply(token, meta, info, y0, *params)``
    returns the group outputs only (with ``info``, then status, iterations, residual norms and the
    dense-fallback flags),
    and keeps the :class:`SolveResult` on the context instead of as saved tensors: each output of
    an ``autograd.Function`` and ``Function.apply`` of the ``setup_context`` style (which binds
    the arguments with :mod:`inspect`) cost microseconds, together as much as the solve of a
    small batch. The same solve, backward and forward-mode rule."""

    @staticmethod
    def forward(ctx, token, meta, info, y0, *params):
        layer = _layer(token)
        k = len(meta[1])
        if direct(params) and direct((y0,)):
            outs, res = layer._solve_tensors(params, y0, with_result=True)
        else:  # a dispatch mode is active: through the operator, so that it sees the call
            outs = solve_op(token, list(params), y0)
            res = tensors_to_result(outs[k:], layer._result_names)
        ctx.save_for_backward(*params)
        ctx.token = token
        ctx.meta = meta
        ctx.res = res
        outs = outs[:k]
        ctx.out_shapes = tuple(tuple(o.shape) for o in outs)
        ctx.out_dtypes = tuple(o.dtype for o in outs)
        ctx.info = info
        if info:
            # status is copied: the backward reads res.status (which samples get a gradient)
            fallback = getattr(res, "dense_fallback", None)
            extra = (torch.from_numpy(res.status.copy()), torch.from_numpy(res.iterations),
                     torch.from_numpy(np.ascontiguousarray(res.residual_norm)),
                     torch.zeros(res.status.shape, dtype=torch.bool) if fallback is None
                     else torch.from_numpy(fallback.copy()))
            ctx.mark_non_differentiable(*extra)
            outs = [*outs, *extra]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        params = ctx.saved_tensors  # raises if a parameter was modified in place since the forward
        flags = ctx.needs_input_grad[4:]
        if not any(flags):
            return (None,) * (4 + len(flags))
        res = ctx.res
        layer = _layer(ctx.token)

        def thetabar(ybar):
            if not direct((ybar,)):  # a dispatch mode is active: through the operator
                return vjp_op(ctx.token, result_to_tensors(res, layer._result_names), ybar, list(flags))
            options = layer.options
            pbar = layer.kernels.vjp(res, np.ascontiguousarray(ybar.numpy()), np.array(flags, dtype=np.bool_),
                                     options.parallel_threshold)
            if options.on_failure == "nan":
                pbar[res.status != st.CONVERGED] = np.nan
            return torch.from_numpy(pbar)

        result = result_to_tensors(res, layer._result_names) if torch.is_grad_enabled() else None
        return (None, None, None, None, *param_grads(ctx.meta, grads, params, flags, res.y.shape, thetabar,
                                                     ctx.token, result))

    @staticmethod
    def jvp(ctx, *tangents):
        tparams = tangents[4:]
        res = ctx.res
        if all(t is None for t in tparams):
            ydot = torch.zeros(res.y.shape, dtype=torch.float64)
        else:
            layer = _layer(ctx.token)
            result = result_to_tensors(res, layer._result_names)
            ydot = _call_jvp(ctx.token, result, flat_tangent(ctx.meta[2], tparams, res.y.shape[0]))
        outs = _output_tangents(ctx.meta, ydot, ctx.out_shapes, ctx.out_dtypes)
        if ctx.info:
            outs += [None, None, None, None]
        return tuple(outs)


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def eager_call() -> bool:
    """Whether a layer call applies :class:`EagerImplicitFunction`: not while Dynamo traces
    (:class:`CompilableImplicitFunction`), nor under torch.func transforms (:class:`ImplicitFunction`)."""
    return not torch.compiler.is_compiling() and _functorch_active is not None and not _functorch_active()


class SecondOrderUnsupported(torch.autograd.Function):
    """Identity on the second derivatives an implicit layer's double backward returns under
    ``create_graph=True``, whose own backward raises :class:`NotImplementedError`.

    They then require grad (they depend on the parameters through ``y*``), so a loss
    built from them cannot silently treat them as constants: differentiating them
    again (third order) raises, naming the layer.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(name, order, k, *tensors):
        return tuple(t.clone() for t in tensors[:k])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.layer_name = inputs[0]
        ctx.order = inputs[1]

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"{ctx.order}-order derivatives through the implicit layer {ctx.layer_name!r} are not supported: "
            f"the layer's double backward (the second-order implicit-function-theorem products) has no "
            f"derivative of its own. First and second derivatives are exact (backward, double backward, "
            f"gradient penalties, Hessian-vector products, torch.func.hessian); leave the second derivatives "
            f"out of the terms that are differentiated again."
        )

    @classmethod
    def wrap(cls, name: str, params, grads, order: str = "third") -> list:
        """``grads`` (``None`` where not needed) passed through this node."""
        idx = [i for i, g in enumerate(grads) if g is not None]
        # the parameters make the outputs require grad, and tie them into the graph
        anchors = [p for p in params if p.requires_grad]
        if not idx or not anchors:
            return list(grads)
        wrapped = cls.apply(name, order, len(idx), *(grads[i] for i in idx), *anchors)
        out = list(grads)
        for i, w in zip(idx, wrapped):
            out[i] = w
        return out
