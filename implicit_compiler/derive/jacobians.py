"""``∂F/∂y`` and ``∂F/∂θ`` as sparse SymPy entries.

Only entries whose derivative is not identically zero are kept, as
``(row, col, expr)`` triples in row-major order; everything downstream (code
generation, reports) works from these triples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from ..errors import StructuralSingularityError
from .sparsity import choose_factorization, pattern_matrix
from .structure import maximum_matching

Entry = tuple[int, int, sp.Expr]


def sparse_jacobian(residuals, symbols) -> list[Entry]:
    pos = {s: j for j, s in enumerate(symbols)}
    out = []
    for i, r in enumerate(residuals):
        cols = sorted(pos[s] for s in r.free_symbols if s in pos)
        for j in cols:
            d = sp.diff(r, symbols[j])
            if d != 0:
                out.append((i, j, d))
    return out


@dataclass
class Derivation:
    """What the compiler derived from a system; the code generator's only input."""

    residuals: tuple[sp.Expr, ...]
    unknowns: tuple[sp.Symbol, ...]
    params: tuple[sp.Symbol, ...]
    jac_y: list[Entry]
    jac_p: list[Entry]
    factorization: str = "dense"
    fill: np.ndarray | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return len(self.unknowns)

    @property
    def m(self) -> int:
        return len(self.params)

    @property
    def pattern_unknowns(self) -> np.ndarray:
        return pattern_matrix(self.jac_y, (self.n, self.n))

    @property
    def pattern_params(self) -> np.ndarray:
        return pattern_matrix(self.jac_p, (self.n, self.m))

    def jacobian_unknowns_matrix(self) -> sp.Matrix:
        M = sp.zeros(self.n, self.n)
        for i, j, e in self.jac_y:
            M[i, j] = e
        return M

    def jacobian_params_matrix(self) -> sp.Matrix:
        M = sp.zeros(self.n, self.m)
        for i, j, e in self.jac_p:
            M[i, j] = e
        return M


def derive(system) -> Derivation:
    jac_y = sparse_jacobian(system.residuals, system.unknowns)
    jac_p = sparse_jacobian(system.residuals, system.params)
    pattern = pattern_matrix(jac_y, (system.n_unknowns, system.n_unknowns))
    # Structural rank of the true derivative pattern (a symbol can cancel in diff).
    inc = [set(np.flatnonzero(row)) for row in pattern]
    if any(c < 0 for c in maximum_matching(inc, system.n_unknowns)):
        raise StructuralSingularityError(
            "dF/dy is structurally singular once derivatives are taken (a symbol cancels "
            "when differentiated); check the residuals for unknowns that enter only trivially"
        )
    kind, fill = choose_factorization(pattern)
    return Derivation(
        residuals=tuple(system.residuals),
        unknowns=tuple(system.unknowns),
        params=tuple(system.params),
        jac_y=jac_y,
        jac_p=jac_p,
        factorization=kind,
        fill=fill,
    )
