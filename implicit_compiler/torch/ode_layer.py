"""``ODELayer``: ``x(t_eval)`` of ``dx/dt = f(t, x, theta)``, ``x(t_eval[0]) = x0``, as a torch layer.

The forward integrates every sample with the compiled kernels (:mod:`implicit_compiler.runtime.ode`);
the backward is the exact discrete adjoint of the computed trajectory (the derivative of the
integrator's own output, each accepted step's stage equations differentiated by the implicit
function theorem at their solution, step sizes held constant).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ConvergenceError, ImplicitCompilerError, InputError
from ..runtime import status as st
from ..runtime.ode import ODEKernels
from ..runtime.ode_tableaus import ODE_METHODS, TABLEAUS
from .function import SecondOrderUnsupported
from .shapes import batch_size, check_tensor, pack, to_numpy

# How a pickled ODELayer is rebuilt: set by ``implicit_compiler.compiler`` (which owns the kernel
# cache) when the package is imported: ``compile_ode(ode, **options)``.
_ODE_COMPILER = None


def set_ode_compiler(compile_ode) -> None:
    global _ODE_COMPILER
    _ODE_COMPILER = compile_ode


def _rebuild(ode, options: dict):
    """Unpickling an :class:`ODELayer`: compile its ODE again (the kernel cache usually has the
    module; otherwise it is generated from the ODE). Importing this module imports the package,
    whose ``compiler`` registers itself (:func:`set_ode_compiler`)."""
    return _ODE_COMPILER(ode, warmup=False, **options)


class _NoSecondOrder(SecondOrderUnsupported):
    """The ODE adjoint's gradients under ``create_graph=True``: differentiating them raises."""

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"second-order derivatives through the ODE layer {ctx.layer_name!r} are not supported: its "
            f"discrete adjoint has no derivative of its own. First derivatives are exact (loss.backward(), "
            f"torch.autograd.grad); leave the ODE layer's gradients out of terms that are differentiated again "
            f"(gradient penalties, Hessian-vector products)"
        )

FAILURE_POLICIES = ("raise", "nan", "keep")
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)


@dataclass(frozen=True)
class ODEOptions:
    """How an :class:`ODELayer` integrates (see docs/ode.md)."""

    method: str = "radau5"
    rtol: float = 1e-6
    atol: float = 1e-9
    max_steps: int = 100_000
    h0: float | None = None
    dt: float | None = None
    hmax: float | None = None
    on_failure: str = "raise"
    parallel_threshold: int = 8
    checkpoint: int | None = None

    def __post_init__(self):
        if self.method not in ODE_METHODS:
            raise InputError(f"ODE method must be one of {ODE_METHODS}, got {self.method!r}")
        tb = TABLEAUS[self.method]
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
                raise InputError(f"ODE option {name} must be a finite number > 0, got {v!r}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise InputError(f"ODE option max_steps must be an int >= 1, got {self.max_steps!r}")
        for name in ("h0", "dt", "hmax"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or not v > 0):
                raise InputError(f"ODE option {name} must be None or a finite number > 0, got {v!r}")
        if tb.adaptive and self.dt is not None:
            raise InputError(f"dt= is the step of the fixed-step methods (backward_euler, trapezoid); "
                             f"{self.method} is adaptive: give rtol/atol (and optionally h0=) instead")
        if not tb.adaptive and self.dt is None:
            raise InputError(f"method {self.method!r} takes fixed steps: give the step size dt=")
        if not tb.adaptive and self.h0 is not None:
            raise InputError(f"h0= is the first step of the adaptive methods; {self.method} takes steps of dt=")
        if self.on_failure not in FAILURE_POLICIES:
            raise InputError(f"ODE option on_failure must be one of {FAILURE_POLICIES}, got {self.on_failure!r}")
        if isinstance(self.parallel_threshold, bool) or not isinstance(self.parallel_threshold, int) \
                or self.parallel_threshold < 1:
            raise InputError(f"ODE option parallel_threshold must be an int >= 1, got {self.parallel_threshold!r}")
        if self.checkpoint is not None and (isinstance(self.checkpoint, bool) or not isinstance(self.checkpoint, int)
                                            or self.checkpoint < 1):
            raise InputError(f"ODE option checkpoint must be None (store every step) or an int K >= 1 (store the "
                             f"state every K accepted steps and integrate each segment again in the backward "
                             f"pass), got {self.checkpoint!r}")

    @classmethod
    def from_kwargs(cls, **options):
        import dataclasses

        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise InputError(f"unknown ODE option(s) {unknown}; the ODE options are {names}")
        if "rtol" not in options and "atol" not in options and options.get("method") in ("backward_euler",
                                                                                          "trapezoid"):
            # the fixed-step methods' rtol/atol are their stage-solve tolerance
            options = dict(options, rtol=1e-13, atol=1e-13)
        return cls(**options)


@dataclass
class ODEInfo:
    """Per-sample diagnostics of a call (``return_info=True``)."""

    status: torch.Tensor
    steps: torch.Tensor
    rejected: torch.Tensor
    jacobians: torch.Tensor

    @property
    def converged(self) -> torch.Tensor:
        return self.status == st.CONVERGED

    def summary(self) -> str:
        return st.summarize(self.status.numpy())


class _ODECall:
    __slots__ = ("layer", "P", "X0", "TEV", "B", "batched", "param_batch", "x0_batched", "squeeze", "dtype",
                 "result", "need_grad", "device", "param_devices")

    def run(self):
        layer = self.layer
        o = layer.options
        res = layer.kernels.integrate(self.X0, self.P, self.TEV, TABLEAUS[o.method], float(o.rtol), float(o.atol),
                                      o.h0, o.dt, o.max_steps, o.hmax or 0.0, store=self.need_grad,
                                      parallel_threshold=o.parallel_threshold, checkpoint=o.checkpoint or 0)
        self.result = res
        bad = res.status != st.CONVERGED
        if bad.any():
            if o.on_failure == "raise":
                raise ConvergenceError(
                    st.summarize(res.status)
                    + "\n(on_failure='nan' or 'keep' returns the failed samples instead of raising)",
                    res.status,
                )
            if o.on_failure == "nan":
                res.x[bad] = np.nan
        return res


class _ODEFunction(torch.autograd.Function):
    """``x = ODE(x0, theta)``; backward: the discrete adjoint (runtime.ode.drive_ode_adjoint_range)."""

    @staticmethod
    def forward(call, x0, *params):
        res = call.run()
        return torch.from_numpy(res.x.copy()).to(device=call.device, dtype=call.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.call = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, gout):
        inputs = ctx.saved_tensors  # raises if x0 or a parameter was modified in place since the forward
        call = ctx.call
        layer = call.layer
        res = call.result
        groups = layer.param_groups
        G = np.ascontiguousarray(to_numpy(gout), dtype=np.float64)
        if G.shape[0] != call.B:
            G = np.ascontiguousarray(np.broadcast_to(G, (call.B, *G.shape[1:])))
        need_x0 = ctx.needs_input_grad[1]
        need = np.zeros(len(layer.layout["param_groups"]), dtype=np.bool_)  # _time, the groups, (_zero)
        cols = np.zeros(layer.kernels.m, dtype=np.bool_)
        for i, g in enumerate(groups):
            if ctx.needs_input_grad[2 + i]:
                need[1 + i] = True
                cols[1 + g["offset"]:1 + g["offset"] + len(g["symbols"])] = True
        XB, PB = layer.kernels.adjoint(res, G, need, cols, layer.options.parallel_threshold)
        bad = res.status != st.CONVERGED
        lost = ~bad & ~(np.isfinite(XB).all(axis=1) & np.isfinite(PB).all(axis=1)) & np.isfinite(G).all(axis=(1, 2))
        if lost.any() and layer.options.on_failure == "raise":
            idx = np.flatnonzero(lost)
            raise ConvergenceError(
                f"the adjoint of ODE layer {layer.layout['name']!r} failed for {idx.size} sample(s) "
                f"(first: {idx[:5].tolist()}): a stage matrix I - h A (x) df/dx was singular at a stored step"
                + (", or a checkpointed segment integrated again did not reproduce the forward"
                   if layer.options.checkpoint else "")
                + "\n(on_failure='nan' or 'keep' returns NaN gradients for these samples instead of raising)",
                np.where(lost, st.ODE_NEWTON_FAILED, res.status).astype(res.status.dtype),
            )
        if bad.any() and layer.options.on_failure == "nan":
            XB[bad] = np.nan
            PB[bad] = np.nan
        grads = [None]
        if need_x0:
            gx = torch.from_numpy(XB).to(device=call.device, dtype=call.dtype)
            if not call.x0_batched:
                gx = gx.sum(0)
            grads.append(gx)
        else:
            grads.append(None)
        for i, g in enumerate(groups):
            if not need[1 + i]:
                grads.append(None)
                continue
            off, size = 1 + g["offset"], len(g["symbols"])
            block = PB[:, off:off + size]
            shape = tuple(g["shape"])
            if call.batched[i]:
                gp = torch.from_numpy(np.ascontiguousarray(block)).reshape((call.B, *shape))
                if call.param_batch[i] == 1 and call.B != 1:
                    gp = gp.sum(0, keepdim=True)
            else:
                gp = torch.from_numpy(block.sum(0)).reshape(shape)
            grads.append(gp.to(device=call.param_devices[i], dtype=call.dtype))
        if torch.is_grad_enabled():  # create_graph=True: these gradients must not pass for constants
            grads[1:] = _NoSecondOrder.wrap(layer.layout["name"], inputs, grads[1:], order="second")
        return tuple(grads)


class ODELayer(nn.Module):
    """A compiled ODE as a torch module: ``layer(x0, *params, t_eval=...)`` -> ``(B, T, n)``.

    ``x0``: ``(B, n)`` or ``(n,)``; one tensor per parameter group, of the group's shape (shared by
    the batch) or ``(B, *shape)``; ``t_eval``: ``(T,)`` shared or ``(B, T)`` per sample, strictly
    increasing, ``t_eval[..., 0]`` the time of ``x0`` (row 0 of the output is ``x0``). The output
    is differentiable in ``x0`` and every parameter group. ``return_info=True`` also returns an
    :class:`ODEInfo` (per-sample status, accepted and rejected steps, Jacobian evaluations).
    """

    def __init__(self, module, options: ODEOptions, ode=None, compile_report=None):
        super().__init__()
        self.kernels = ODEKernels(module)
        self.options = options
        self.ode = ode
        self.layout = module.LAYOUT
        self.param_groups = self.layout["ode"]["param_groups"]
        self.n = self.kernels.n
        self.compile_report = compile_report or {}

    def extra_repr(self) -> str:
        o = self.options
        return f"{self.layout['name']!r}, n={self.n}, method={o.method!r}, rtol={o.rtol}, atol={o.atol}"

    def _check_t_eval(self, t_eval, B):
        if t_eval is None:
            raise InputError("t_eval= is required: the output times, (T,) shared or (B, T) per sample, "
                             "t_eval[..., 0] the time of x0")
        if isinstance(t_eval, torch.Tensor) and t_eval.requires_grad:
            raise InputError("gradients with respect to t_eval are not supported; pass t_eval.detach()")
        tev = np.array(to_numpy(t_eval), dtype=np.float64)
        if tev.ndim == 1:
            tev = tev[None]
        elif tev.ndim != 2 or tev.shape[0] not in (1, B):
            raise InputError(f"t_eval must have shape (T,) or (B, T) with B = {B}, got {tuple(tev.shape)}")
        if tev.shape[1] < 1:
            raise InputError("t_eval is empty; give at least the initial time")
        if not np.isfinite(tev).all():
            raise InputError("t_eval contains NaN or inf; output times must be finite")
        dif = np.diff(tev, axis=1)
        if (dif <= 0).any():
            r, c = np.argwhere(dif <= 0)[0]
            where = f"t_eval[{c}] = {float(tev[r, c])!r}, t_eval[{c + 1}] = {float(tev[r, c + 1])!r}"
            if tev.shape[0] > 1:
                where = f"sample {r}: " + where
            raise InputError(f"t_eval must be strictly increasing ({where}); integrating backwards in "
                             f"time is not supported")
        return np.ascontiguousarray(tev)

    def __reduce__(self):
        if self.ode is None:
            raise TypeError(f"the ODE layer {self.layout['name']!r} was built without its ODE and cannot be "
                            f"pickled; build it with implicit_compiler.compile(ode, ...)")
        return _rebuild, (self.ode, dataclasses.asdict(self.options))

    def forward(self, x0, *params, t_eval=None, return_info: bool = False):
        if _functorch_active is not None and _functorch_active():
            raise ImplicitCompilerError(
                f"torch.func transforms (vmap, grad, jacrev, jvp, ...) of the ODE layer {self.layout['name']!r} are "
                f"not supported: call it with the batch (x0 of shape (B, n), parameters with a batch dimension) "
                f"and differentiate with loss.backward() or torch.autograd.grad"
            )
        groups = self.param_groups
        if len(params) != len(groups):
            names = ", ".join(g["name"] for g in groups) or "none"
            raise InputError(f"the layer takes x0 and {len(groups)} parameter tensor(s) ({names}), "
                             f"got {len(params)} parameter tensor(s)")
        check_tensor(x0, "x0")
        for g, p in zip(groups, params):
            check_tensor(p, f"parameter {g['name']!r}")
        n = self.n
        if x0.ndim == 1 and x0.shape[0] == n:
            xb = None
        elif x0.ndim == 2 and x0.shape[1] == n:
            xb = x0.shape[0]
        else:
            raise InputError(f"x0 must have shape ({n},) or (B, {n}) for the {n} states "
                             f"{self.layout['ode']['state']}, got {tuple(x0.shape)}")
        if groups:
            Bp, batched = batch_size(groups, params, "parameter")
            param_batch = [p.shape[0] if b else None for p, b in zip(params, batched)]
        else:
            Bp, batched, param_batch = 1, [], []
        if xb is not None and Bp != 1 and xb not in (1, Bp):
            raise InputError(f"x0 has batch {xb} but the parameters have batch {Bp}")
        B = max(Bp, xb or 1)
        squeeze = xb is None and not any(batched)
        call = _ODECall()
        call.layer = self
        call.B = B
        call.batched = batched
        call.param_batch = param_batch
        call.x0_batched = xb is not None
        call.squeeze = squeeze
        call.dtype = x0.dtype if x0.dtype in (torch.float64, torch.float32) else torch.float64
        call.device = x0.device
        call.param_devices = [p.device for p in params]
        X0 = np.array(to_numpy(x0), dtype=np.float64).reshape(-1, n)
        if X0.shape[0] != B:
            X0 = np.ascontiguousarray(np.broadcast_to(X0, (B, n)))
        m = self.kernels.m
        m_user = sum(len(g["symbols"]) for g in groups)
        P = np.zeros((B, m))  # column 0: the time; after the user's groups, the zero shift (symbolic.ode)
        if groups:
            arrays = []
            for p, bt in zip(params, batched):
                a = np.asarray(to_numpy(p), dtype=np.float64)
                if bt and a.shape[0] != B:  # a batch of 1 broadcast over the batch
                    a = np.broadcast_to(a, (B, *a.shape[1:]))
                arrays.append(a)
            P[:, 1:1 + m_user] = pack(groups, arrays, B, batched, m_user)
        call.P = P
        call.X0 = X0
        call.TEV = self._check_t_eval(t_eval, B)
        call.need_grad = torch.is_grad_enabled() and (x0.requires_grad or any(p.requires_grad for p in params))
        x0_in = x0 if xb is None or xb == B else x0.expand(B, n)
        out = _ODEFunction.apply(call, x0_in, *params)
        if squeeze:
            out = out[0]
        if return_info:
            res = call.result
            info = ODEInfo(torch.from_numpy(res.status.copy()), torch.from_numpy(res.steps),
                           torch.from_numpy(res.rejected), torch.from_numpy(res.jacobians))
            return out, info
        return out
