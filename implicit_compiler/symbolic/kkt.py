"""KKT conditions of ``min_y f(y, θ)  s.t.  h(y, θ) = 0,  g(y, θ) <= 0``.

With multipliers ``λ`` (equalities) and ``ν >= 0`` (inequalities)::

    L(y, λ, ν; θ) = f + λᵀ h + νᵀ g
    stationarity          ∇_y L = 0
    primal feasibility    h = 0            (and g <= 0)
    complementarity       ν_i g_i = 0      (and ν >= 0)

The equations form a square residual system in ``(y, λ, ν)``: its Jacobian at
a solution gives the backward pass by the implicit function theorem.
"""

from __future__ import annotations

from typing import NamedTuple

import sympy as sp

from ..derive.engine import gradient


class KKT(NamedTuple):
    """The KKT equations as lists of SymPy expressions (each ``= 0``)."""

    stationarity: list
    primal_feasibility: list
    complementarity: list

    def residuals(self) -> list:
        return list(self.stationarity) + list(self.primal_feasibility) + list(self.complementarity)


def lagrangian(f, h, g, lam, nu):
    return f + sum((l * e for l, e in zip(lam, h)), sp.S.Zero) + sum((v * e for v, e in zip(nu, g)), sp.S.Zero)


def kkt_conditions(L, y, h, g, nu) -> KKT:
    stationarity = gradient(L, y)
    return KKT(stationarity, list(h), [v * e for v, e in zip(nu, g)])


def hessian_entries(L, y) -> list:
    """Lower-triangular structural non-zeros ``(i, j, ∂²L/∂y_i∂y_j)``, ``j <= i``."""
    out = []
    for i, yi in enumerate(y):
        di = sp.diff(L, yi)
        for j in range(i + 1):
            if y[j] in di.free_symbols:
                e = sp.diff(di, y[j])
                if e != 0:
                    out.append((i, j, e))
    return out
