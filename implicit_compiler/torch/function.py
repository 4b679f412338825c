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

A forward-mode rule fits as a ``jvp`` staticmethod next to ``backward`` calling
a third op (``dy = -(dF/dy)^{-1} (dF/dtheta) dtheta`` from the same saved
tensors); a double backward fits as ``register_autograd`` on the VJP op, which
would then replace :class:`SecondOrderUnsupported`.

What the backward reads is the layer's own: ``theta`` is a private copy taken at
the forward (``pack``), ``y*`` and the factorisation are the kernels' arrays, and
the output tensors are copies of ``y*``, so nothing the caller can reach (a
parameter's ``.data``, the output's NumPy view) changes the gradient. The
parameter tensors are saved with ``save_for_backward``, so an in-place change
that autograd can see raises torch's "modified by an inplace operation" error.

The backward has no derivative of its own yet: when it runs with
``create_graph=True`` its results carry a node whose backward raises (see
:class:`SecondOrderUnsupported`), so a double backward is an error, never zero.
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
    arrays = {k: t.numpy() for k, t in zip(names, tensors)}
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


# ---------------------------------------------------------------------------------------------------
# the forward operator


@torch.library.custom_op(f"{_NS}::solve", mutates_args=())
def solve_op(token: str, params: list[torch.Tensor], y0: Optional[torch.Tensor]) -> list[torch.Tensor]:  # noqa: UP045
    """``[*group outputs, *SolveResult arrays]`` of one batched solve (see ``ImplicitLayer._solve_tensors``)."""
    return _layer(token)._solve_tensors(params, y0)


@solve_op.register_fake
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


@solve_op.register_vmap
def _solve_vmap(info, in_dims, token, params, y0):
    layer = _layer(token)
    groups = layer._param_groups
    V = info.batch_size
    _, pdims, ydim = in_dims
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
    outs = solve_op(token, flat, y0)
    k = len(layer._unknown_groups)
    squeeze = not any(batched)
    shaped = []
    for i, t in enumerate(outs):
        if i < k and squeeze:
            shaped.append(t.reshape(V, *t.shape[1:]))
        else:
            shaped.append(t.reshape(V, B, *t.shape[1:]))
    return shaped, [0] * len(shaped)


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
# the autograd Function


def param_grads(meta, grads, params, flags, yshape, thetabar) -> list:
    """The parameters' gradients from the outputs' ``grads``: ``ybar`` ``(B, n)`` assembled from
    the output groups, ``thetabar(ybar)`` the per-sample ``(B, m)`` VJP, split into the groups
    (summed over the batch for groups shared by it, or given with a batch of 1)."""
    name, outs, pgroups = meta
    k = len(outs)
    B, n = yshape
    gr = grads[0]
    if k == 1 and gr is not None and outs[0][1] == n:
        # one output covering y: its gradient is ybar
        ybar = gr.detach().reshape(B, n)
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
                cols.append(g.detach().reshape(B, size).to(dtype=torch.float64, device="cpu"))
            pos = off + size
        if pos < n:
            cols.append(torch.zeros((B, n - pos), dtype=torch.float64))
        ybar = cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)
    pbar = thetabar(ybar)
    out = []
    for (off, size, ndim), t, need in zip(pgroups, params, flags):
        if not need:
            out.append(None)
            continue
        blk = pbar if size == pbar.shape[1] else pbar[:, off:off + size]
        if t.dim() == ndim + 1 and t.shape[0] == B:
            gt = blk.reshape(t.shape)
        else:  # shared by the batch, or a batch of 1 broadcast over it
            gt = blk.sum(dim=0).reshape(t.shape)
        if gt.dtype != t.dtype or t.device.type != "cpu":
            gt = gt.to(dtype=t.dtype, device=t.device)
        out.append(gt)
    if torch.is_grad_enabled():
        # create_graph=True: these gradients would be differentiated again
        out = SecondOrderUnsupported.wrap(name, params, out)
    return out


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
        params = inputs[3:]
        k = len(meta[1])
        result = output[k:]
        ctx.mark_non_differentiable(*result)
        ctx.save_for_backward(*params, *result)
        ctx.token = token
        ctx.meta = meta
        if not torch.compiler.is_compiling() and all(type(t) is torch.Tensor for t in result):
            layer = _layer(token)
            try:
                # for inspection (grad_fn.res); the backward rebuilds it from the saved tensors
                ctx.res = tensors_to_result(result, layer._result_names)
            except RuntimeError:  # tensors of a torch.func transform have no storage to view
                pass

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
            vjp = _vjp if direct(result) and direct((ybar,)) else vjp_op
            return vjp(ctx.token, list(result), ybar, list(flags))

        return (None, None, None, *param_grads(ctx.meta, grads, params, flags, result[0].shape, thetabar))


class ImplicitFunction(CompilableImplicitFunction):
    """:class:`CompilableImplicitFunction` with its forward-mode rule (eager mode and torch.func)."""

    @staticmethod
    def jvp(ctx, *tangents):
        # forward mode: dy = -(dF/dy)^{-1} (dF/dtheta) dtheta at y*, from the tensors setup_context
        # saved; it needs a JVP kernel the generated modules do not have yet
        raise NotImplementedError(
            f"forward-mode derivatives through the implicit layer {ctx.meta[0]!r} are not supported yet "
            f"(torch.func.jvp, torch.func.jacfwd, torch.autograd.forward_ad): use reverse mode instead "
            f"(torch.func.vjp, torch.func.jacrev, torch.func.grad or loss.backward()), which is exact"
        )


class EagerImplicitFunction(torch.autograd.Function):
    """:class:`ImplicitFunction` in the ``forward(ctx, ...)`` style, applied when no torch.func
    transform is active and nothing is being compiled. ``apply(token, meta, info, y0, *params)``
    returns the group outputs only (with ``info``, then status, iterations and residual norms),
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
        if info:
            # status is copied: the backward reads res.status (which samples get a gradient)
            extra = (torch.from_numpy(res.status.copy()), torch.from_numpy(res.iterations),
                     torch.from_numpy(np.ascontiguousarray(res.residual_norm)))
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

        return (None, None, None, None, *param_grads(ctx.meta, grads, params, flags, res.y.shape, thetabar))

    jvp = ImplicitFunction.jvp


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def eager_call() -> bool:
    """Whether a layer call applies :class:`EagerImplicitFunction`: not while Dynamo traces
    (:class:`CompilableImplicitFunction`), nor under torch.func transforms (:class:`ImplicitFunction`)."""
    return not torch.compiler.is_compiling() and _functorch_active is not None and not _functorch_active()


class SecondOrderUnsupported(torch.autograd.Function):
    """Identity on the gradients an implicit layer's backward returns under
    ``create_graph=True``, whose own backward raises :class:`NotImplementedError`.

    The gradients then require grad (they depend on the parameters through ``y*``),
    so a loss built from them cannot silently treat them as constants: differentiating
    it raises, naming the layer.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(name, k, *tensors):
        return tuple(t.clone() for t in tensors[:k])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.layer_name = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"second-order derivatives through the implicit layer {ctx.layer_name!r} are not supported yet: "
            f"the layer's backward pass (the implicit-function-theorem VJP) has no derivative of its own, so "
            f"double backward, gradient penalties, Hessian-vector products and gradgradcheck through it cannot "
            f"be computed. First-order gradients are exact: differentiate the layer's outputs without "
            f"create_graph=True, or leave them out of the terms that are differentiated twice."
        )

    @classmethod
    def wrap(cls, name: str, params, grads) -> list:
        """``grads`` (one entry per parameter, ``None`` where not needed) passed through this node."""
        idx = [i for i, g in enumerate(grads) if g is not None]
        # the parameters make the outputs require grad, and tie them into the graph
        anchors = [p for p in params if p.requires_grad]
        if not idx or not anchors:
            return list(grads)
        wrapped = cls.apply(name, len(idx), *(grads[i] for i in idx), *anchors)
        out = list(grads)
        for i, w in zip(idx, wrapped):
            out[i] = w
        return out
