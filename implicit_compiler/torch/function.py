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
            blk = pbar if size == pbar.shape[1] else pbar[:, off:off + size]
            if call.batched[g]:
                gt = torch.from_numpy(np.ascontiguousarray(blk)).reshape(t.shape)
            else:
                gt = torch.from_numpy(blk.sum(axis=0)).reshape(t.shape)
            if gt.dtype != t.dtype or t.device.type != "cpu":
                gt = gt.to(dtype=t.dtype, device=t.device)
            out.append(gt)
        return tuple(out)
