"""The autograd Function of every compiled layer.

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

import numpy as np
import torch

from ..runtime import status as st
from .shapes import to_numpy


class ImplicitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, *params):
        res = call.run()
        ctx.call = call
        ctx.res = res
        ctx.save_for_backward(*params)
        return call.outputs(res.y)

    @staticmethod
    def backward(ctx, *grads):
        # Unpacking raises torch's "modified by an inplace operation" error when a
        # parameter tensor changed in place (its version counter moved) since the forward.
        params = ctx.saved_tensors
        call, res = ctx.call, ctx.res
        flags = ctx.needs_input_grad[1:]
        if not any(flags):
            return (None,) * (1 + len(flags))
        need = np.array(flags, dtype=np.bool_)
        B, n = res.y.shape
        groups = call.unknown_groups
        gr = grads[0]
        if (len(groups) == 1 and gr is not None and gr.device.type == "cpu" and gr.dtype == torch.float64
                and len(groups[0]["symbols"]) == n):
            # one unknown group covering y: its gradient is ybar (copied only if not C-contiguous)
            ybar = np.ascontiguousarray(gr.detach().numpy().reshape(B, n))
        else:
            ybar = np.zeros((B, n))
            for grp, gr in zip(groups, grads):
                if gr is None:
                    continue
                ybar[:, grp["offset"]:grp["offset"] + len(grp["symbols"])] = to_numpy(gr).reshape(B, -1)
        pbar = call.kernels.vjp(res, ybar, need, call.options.parallel_threshold)
        if call.options.on_failure == "nan":
            pbar[res.status != st.CONVERGED] = np.nan
        out = [None]
        for g, (grp, t) in enumerate(zip(call.param_groups, params)):
            if not need[g]:
                out.append(None)
                continue
            off, size = grp["offset"], len(grp["symbols"])
            blk = pbar if size == pbar.shape[1] else pbar[:, off:off + size]
            if call.batched[g] and t.shape[0] == B:
                gt = torch.from_numpy(np.ascontiguousarray(blk)).reshape(t.shape)
            else:  # shared by the batch, or a batch of 1 broadcast over it
                gt = torch.from_numpy(blk.sum(axis=0)).reshape(t.shape)
            if gt.dtype != t.dtype or t.device.type != "cpu":
                gt = gt.to(dtype=t.dtype, device=t.device)
            out.append(gt)
        if torch.is_grad_enabled():
            # create_graph=True: these gradients would be differentiated again
            return (None, *SecondOrderUnsupported.wrap(call.kernels.layout["name"], params, out[1:]))
        return tuple(out)


class SecondOrderUnsupported(torch.autograd.Function):
    """Identity on the gradients an implicit layer's backward returns under
    ``create_graph=True``, whose own backward raises :class:`NotImplementedError`.

    The gradients then require grad (they depend on the parameters through ``y*``),
    so a loss built from them cannot silently treat them as constants: differentiating
    it raises, naming the layer.
    """

    @staticmethod
    def forward(ctx, name, k, *tensors):
        ctx.layer_name = name
        return tuple(t.clone() for t in tensors[:k])

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
