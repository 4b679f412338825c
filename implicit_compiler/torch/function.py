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
parameters given without a batch dimension are summed over the batch.
"""

from __future__ import annotations

import numpy as np
import torch

from ..runtime import status as st


class ImplicitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, *params):
        res = call.run()
        ctx.call = call
        ctx.res = res
        outs = call.outputs(res.y)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        call, res = ctx.call, ctx.res
        need = np.array([bool(x) for x in ctx.needs_input_grad[1:]], dtype=np.bool_)
        if not need.any():
            return (None,) * (1 + len(need))
        B, n = res.y.shape
        ybar = np.zeros((B, n))
        for grp, gr in zip(call.unknown_groups, grads):
            if gr is None:
                continue
            a = gr.detach()
            if a.device.type != "cpu":
                a = a.cpu()
            ybar[:, grp["offset"]:grp["offset"] + len(grp["symbols"])] = a.numpy().reshape(B, -1)
        pbar = call.kernels.vjp(res, ybar, need, call.options.parallel_threshold)
        if call.options.on_failure == "nan":
            pbar[res.status != st.CONVERGED] = np.nan
        out = [None]
        for g, (grp, t) in enumerate(zip(call.param_groups, call.params)):
            if not need[g]:
                out.append(None)
                continue
            off, size = grp["offset"], len(grp["symbols"])
            blk = pbar[:, off:off + size]
            if call.batched[g]:
                gt = torch.from_numpy(np.ascontiguousarray(blk)).reshape(t.shape)
            else:
                gt = torch.from_numpy(blk.sum(axis=0)).reshape(t.shape)
            out.append(gt.to(dtype=t.dtype, device=t.device))
        return tuple(out)
