"""``ProblemLayer``: the layer of an optimization :class:`Problem`.

It is an :class:`ImplicitLayer` over the problem's KKT system whose forward pass
is the generated interior-point solver (or the user's ``forward`` callable) and
whose outputs are the variable groups (plus the multiplier groups ``lam`` and
``nu`` with ``return_multipliers=True``).
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import InputError
from ..runtime.kernels import SolveResult
from ..runtime.problem_kernels import ProblemKernels
from .module import ImplicitLayer
from .shapes import to_numpy


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
        self._default_y0 = self._default_y0[:nv]
        self.return_multipliers = return_multipliers
        self.warn_weakly_active = warn_weakly_active

    def extra_repr(self) -> str:
        ins = ", ".join(f"{g['name']}{tuple(g['shape'])}" for g in self._param_groups)
        outs = ", ".join(f"{g['name']}{tuple(g['shape'])}" for g in self._unknown_groups)
        k = self.kernels
        forward = "custom forward" if k.forward is not None else "interior point"
        return (f"{self.layout['name']}: ({ins}) -> ({outs}), optimization problem with {k.nv} variables, "
                f"{k.nq} equalities, {k.nr} inequalities ({forward})")

    def export_kwargs(self) -> dict:
        """The constructor arguments a standalone export needs (plain data only)."""
        if self.kernels.forward is not None:
            raise ValueError(
                "this layer's forward pass is a Python callable, which cannot be written into a "
                "standalone module; export the problem without forward= (interior-point forward) instead"
            )
        return {"return_multipliers": self.return_multipliers, "weak_tol": self.kernels.weak_tol,
                "warn_weakly_active": self.warn_weakly_active}

    def _initial(self, y0, B: int) -> np.ndarray:
        nv = self.kernels.nv
        if y0 is None:
            last = self._last
            if self.options.warm_start and last is not None and last[0].shape[0] == B:
                return np.ascontiguousarray(last[0][:, :nv])
            return np.tile(self._default_y0, (B, 1))
        if isinstance(y0, dict):
            Y0 = np.tile(self._default_y0, (B, 1))
            for g in self._variable_groups:
                if g["name"] in y0:
                    a = to_numpy(y0[g["name"]]).astype(np.float64)
                    size = len(g["symbols"])
                    Y0[:, g["offset"]:g["offset"] + size] = a.reshape(-1, size)
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
