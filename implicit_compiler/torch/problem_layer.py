"""``ProblemLayer``: the layer of an optimization :class:`Problem`.

It is an :class:`ImplicitLayer` over the problem's KKT system whose forward pass
is the generated interior-point solver (or the user's ``forward`` callable) and
whose outputs are the variable groups (plus the multiplier groups ``lam`` and
``nu`` with ``return_multipliers=True``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import InputError
from ..runtime.kernels import SolveResult
from ..runtime.problem_kernels import ProblemKernels
from .function import call_meta
from .module import ImplicitLayer
from .shapes import to_numpy


def check_problem_options(options: dict) -> None:
    """Reject solver options that do not apply to an optimization layer (instead of ignoring them)."""
    method = options.get("method")
    if method is not None:
        raise InputError(
            f"method={method!r} does not apply to an optimization problem: its forward pass is the generated "
            f"interior point (or the forward= callable); remove the method option (fixed-point methods solve "
            f"residual systems and fixed points)"
        )
    if "anderson_memory" in options:
        raise InputError("anderson_memory does not apply to an optimization problem (it has no fixed-point "
                         "iteration); remove the option")


class ProblemLayer(ImplicitLayer):
    """``y*(θ) = argmin_y f(y, θ)`` s.t. ``h = 0``, ``g <= 0`` as a differentiable layer.

    Weakly active inequalities at a solution (``g_i ≈ 0`` and ``ν_i ≈ 0``, no strict
    complementarity) have no unique derivative; they are treated as inactive and a
    ``RuntimeWarning`` says how many samples had one. ``layer.solve`` returns the
    whole KKT point ``z = (y, λ, ν)`` in ``.y`` and the count in ``.weakly_active``.
    """

    def __init__(self, module, options=None, system=None, compile_report=None, *, forward=None,
                 return_multipliers: bool = False, weak_tol: float | None = None, warn_weakly_active: bool = True):
        super().__init__(module, options, system=system, compile_report=compile_report)
        self.kernels = ProblemKernels(module, forward=forward, weak_tol=weak_tol)
        nv = self.kernels.nv
        groups = self.layout["unknown_groups"]
        self._variable_groups = [g for g in groups if g["offset"] < nv]
        self._unknown_groups = groups if return_multipliers else self._variable_groups
        self._meta = call_meta(self.layout, self._unknown_groups, self._param_groups)
        self._default_y0 = self._default_y0[:nv]
        self.return_multipliers = return_multipliers
        self.warn_weakly_active = warn_weakly_active

    def configure(self, **options) -> ProblemLayer:
        check_problem_options(options)
        return super().configure(**options)

    def extra_repr(self) -> str:
        ins = ", ".join(f"{g['name']}{tuple(g['shape'])}" for g in self._param_groups)
        outs = ", ".join(f"{g['name']}{tuple(g['shape'])}" for g in self._unknown_groups)
        k = self.kernels
        forward = "custom forward" if k.forward is not None else "interior point"
        dropped = f" ({k.nq_given - k.nq} redundant dropped)" if k.nq_given != k.nq else ""
        return (f"{self.layout['name']}: ({ins}) -> ({outs}), optimization problem with {k.nv} variables, "
                f"{k.nq} equalities{dropped}, {k.nr} inequalities ({forward})")

    def equality_multipliers(self, lam: torch.Tensor) -> torch.Tensor:
        """The ``lam`` output (one multiplier per kept equality, last axis) spread over the
        equalities as given: a redundant constraint the compiler dropped gets multiplier zero, and
        zero gradient. Differentiable (a torch ``index_copy``); ``lam`` itself when nothing was dropped."""
        k = self.kernels
        if lam.shape[-1] != k.nq:
            raise InputError(f"lam has {lam.shape[-1]} entries on its last axis; this layer's lam output has "
                             f"{k.nq} (one per kept equality constraint)")
        if k.nq_given == k.nq:
            return lam
        idx = torch.as_tensor(k.equality_rows, device=lam.device)
        return lam.new_zeros((*lam.shape[:-1], k.nq_given)).index_copy(-1, idx, lam)

    def export_kwargs(self) -> dict:
        """The constructor arguments a standalone export needs (plain data only)."""
        if self.kernels.forward is not None:
            raise ValueError(
                "this layer's forward pass is a Python callable, which cannot be written into a "
                "standalone module; export the problem without forward= (interior-point forward) instead"
            )
        return {"return_multipliers": self.return_multipliers, "weak_tol": self.kernels.weak_tol,
                "warn_weakly_active": self.warn_weakly_active}

    def _kernel_kwargs(self) -> dict:
        k = self.kernels
        return {"forward": k.forward, "weak_tol": k.weak_tol, "kkt_tol": k.kkt_tol}

    def _make_kernels(self, module, kwargs: dict):
        return ProblemKernels(module, **kwargs)

    def _probe(self) -> SolveResult:
        k = self.kernels
        opts = self.options.replace(max_iter=0)
        if k.forward is not None:  # not the user's callable: the KKT check its results go through
            return k.finalize(np.zeros((1, k.n)), np.zeros((1, k.m)), opts)
        return k.solve(np.zeros((1, k.m)), np.zeros((1, k.nv)), opts)

    def _initial(self, y0, B: int) -> np.ndarray:
        nv = self.kernels.nv
        if y0 is None:
            last = self._last
            if self.options.warm_start and last is not None and last[0].shape[0] == B:
                return np.ascontiguousarray(last[0][:, :nv])
            return np.tile(self._default_y0, (B, 1))
        if isinstance(y0, dict):
            names = [g["name"] for g in self._variable_groups]
            unknown = sorted(set(y0) - set(names), key=str)
            if unknown:
                hint = (" (the multipliers lam/nu are not given a start: the interior point starts them itself)"
                        if set(unknown) & {"lam", "nu"} else "")
                raise InputError(
                    f"y0 names unknown variable group(s) {unknown}; the problem's variable groups are "
                    f"{names}{hint}"
                )
            Y0 = np.tile(self._default_y0, (B, 1))
            for g in self._variable_groups:
                if g["name"] in y0:
                    a = to_numpy(y0[g["name"]]).astype(np.float64)
                    size = len(g["symbols"])
                    shape = tuple(g["shape"])
                    if a.size == size:
                        Y0[:, g["offset"]:g["offset"] + size] = a.reshape(1, size)
                    elif a.size == B * size and a.shape[0] == B:
                        Y0[:, g["offset"]:g["offset"] + size] = a.reshape(B, size)
                    else:
                        raise InputError(
                            f"y0[{g['name']!r}] has shape {tuple(a.shape)}; variable group {g['name']!r} has "
                            f"shape {shape}, so y0[{g['name']!r}] must have shape {shape} (shared by the batch) "
                            f"or {(B, *shape)} (one start per sample)"
                        )
            return Y0
        a = to_numpy(y0).astype(np.float64)
        if a.shape == (nv,):
            return np.tile(a, (B, 1))
        if a.shape == (B, nv):
            return np.ascontiguousarray(a)
        raise InputError(f"y0 must have shape ({nv},) or ({B}, {nv}) (the problem's variables), got {a.shape}")

    def _remember(self, res: SolveResult) -> None:
        weak = getattr(res, "weakly_active", None)
        if self.warn_weakly_active and weak is not None and weak.any():
            idx = np.flatnonzero(weak)
            warnings.warn(
                f"{idx.size} sample(s) ({', '.join(map(str, idx[:10]))}{' ...' if idx.size > 10 else ''}) have "
                f"weakly active inequality constraints (g = 0 and multiplier = 0); their gradients treat those "
                f"constraints as inactive",
                RuntimeWarning,
                stacklevel=4,
            )
        super()._remember(res)
