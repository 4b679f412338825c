"""``∂F/∂y`` and ``∂F/∂θ`` as sparse SymPy entries.

Only entries whose derivative is not identically zero are kept, as
``(row, col, expr)`` triples in row-major order; everything downstream (code
generation, reports) works from these triples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import sympy as sp

from ..errors import StructuralSingularityError
from .engine import gradient
from .families import Family, find_families, system_slots
from .reductions import Reduced, reduce_template
from .sparsity import Elimination, choose_factorization, csr_pattern, symbolic_elimination
from .structure import maximum_matching

Entry = tuple[int, int, sp.Expr]


def sparse_jacobian(residuals, symbols) -> list[Entry]:
    pos = {s: j for j, s in enumerate(symbols)}
    out = []
    for i, r in enumerate(residuals):
        cols = sorted(pos[s] for s in r.free_symbols if s in pos)
        for j, d in zip(cols, gradient(r, [symbols[j] for j in cols])):
            if d != 0:
                out.append((i, j, d))
    return out


@dataclass(frozen=True)
class FamilyDerivative:
    """A family of residuals (:class:`~implicit_compiler.derive.families.Family`) and the
    derivatives of its template with respect to its slots, taken once for all members:
    ``d_unknowns`` / ``d_params`` are ``(slot, expr)`` pairs, ``expr`` over the template's
    slot symbols; member ``r`` has the entry ``∂F_{members[r]}/∂(symbol at table[r, slot])``."""

    family: Family
    d_unknowns: tuple[tuple[int, sp.Expr], ...]
    d_params: tuple[tuple[int, sp.Expr], ...]
    residual: sp.Expr  # the template as the user's residual (what the kernels print)
    # the template with its long sums of like-shaped terms as reductions (inner loops), or None
    reduced: Reduced | None = None

    def entries(self, which: str) -> np.ndarray:
        """``(i, j)`` of the structural non-zeros, one row per (member, derivative slot)."""
        slots = [k for k, _ in (self.d_unknowns if which == "unknowns" else self.d_params)]
        f = self.family
        rows = np.repeat(np.asarray(f.members, dtype=np.int64), len(slots))
        cols = f.table[:, slots].reshape(-1) if slots else np.zeros(0, dtype=np.int64)
        return np.stack([rows, cols], axis=1) if slots else np.zeros((0, 2), dtype=np.int64)


# Residuals repeated at least this often are derived and emitted as one family (a loop);
# rarer shapes stay straight-line code.
FAMILY_MIN_SIZE = 8


@dataclass
class Derivation:
    """What the compiler derived from a system; the code generator's only input.

    Residuals that belong to a family are derived through their template
    (``families``); the others (``single_rows``) entry by entry (``jac_y_single``,
    ``jac_p_single``). ``jac_y`` / ``jac_p`` list every entry (instantiated on first use,
    for reports and small systems)."""

    residuals: tuple[sp.Expr, ...]
    unknowns: tuple[sp.Symbol, ...]
    params: tuple[sp.Symbol, ...]
    jac_y_single: list[Entry]
    jac_p_single: list[Entry]
    families: tuple[FamilyDerivative, ...] = ()
    single_rows: tuple[int, ...] = ()
    factorization: str = "dense"
    # the fixed-order elimination (order, filled pattern) when ``factorization == "sparse"``
    elimination: Elimination | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return len(self.unknowns)

    @property
    def m(self) -> int:
        return len(self.params)

    def _instantiate(self, which: str) -> list[Entry]:
        single = self.jac_y_single if which == "unknowns" else self.jac_p_single
        if not self.families:
            return list(single)
        symbols = {("unknown", j): s for j, s in enumerate(self.unknowns)}
        symbols.update({("param", j): s for j, s in enumerate(self.params)})
        out = list(single)
        for fd in self.families:
            f = fd.family
            for r, i in enumerate(f.members):
                sub = {s: symbols[(k, int(p))] for s, k, p in zip(f.slots, f.slot_kinds, f.table[r])}
                for k, e in (fd.d_unknowns if which == "unknowns" else fd.d_params):
                    out.append((i, int(f.table[r, k]), e.xreplace(sub)))
        out.sort(key=lambda t: (t[0], t[1]))
        return out

    @cached_property
    def jac_y(self) -> list[Entry]:
        return self._instantiate("unknowns")

    @cached_property
    def jac_p(self) -> list[Entry]:
        return self._instantiate("params")

    def pattern_entries(self, which: str) -> np.ndarray:
        """``(i, j)`` of every structural non-zero of dF/dy (``"unknowns"``) or dF/dθ, ``(k, 2)``."""
        single = self.jac_y_single if which == "unknowns" else self.jac_p_single
        parts = [np.array([(i, j) for i, j, _ in single], dtype=np.int64).reshape(-1, 2)]
        parts += [fd.entries(which) for fd in self.families]
        return np.concatenate(parts)

    def pattern_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """dF/dy's pattern in compressed rows ``(indptr, indices)`` (O(nnz), no n x n matrix)."""
        return csr_pattern(self.pattern_entries("unknowns"), self.n)

    def _pattern(self, which: str, cols: int) -> np.ndarray:
        pat = np.zeros((self.n, cols), dtype=bool)
        ij = self.pattern_entries(which)
        pat[ij[:, 0], ij[:, 1]] = True
        return pat

    @property
    def natural_elimination(self) -> Elimination | None:
        """The elimination in the natural order (the unrolled kernels and the problem modules use it)."""
        e = self.elimination
        if e is None or e.order == "natural":
            return e
        cached = getattr(self, "_natural", None)
        if cached is None:
            indptr, indices = self.pattern_csr()
            cached = self._natural = symbolic_elimination(indptr, indices, self.n)
        return cached

    @property
    def fill(self) -> np.ndarray | None:
        """Dense boolean fill pattern of the natural-order elimination (small systems; None when dense)."""
        e = self.natural_elimination
        return None if e is None else e.dense_fill() | self.pattern_unknowns

    @property
    def pattern_unknowns(self) -> np.ndarray:
        return self._pattern("unknowns", self.n)

    @property
    def pattern_params(self) -> np.ndarray:
        return self._pattern("params", self.m)

    def count(self, which: str) -> int:
        """Number of structural non-zeros of dF/dy (``"unknowns"``) or dF/dθ (``"params"``)."""
        single = self.jac_y_single if which == "unknowns" else self.jac_p_single
        return len(single) + sum(len(fd.entries(which)) for fd in self.families)

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


def _slots(system) -> dict:
    groups_u = getattr(system, "unknown_groups", None)
    groups_p = getattr(system, "param_groups", None)
    if groups_u is not None and groups_p is not None:
        return system_slots(system)
    # no groups: one group per kind
    out = {s: ("unknown", "y", j) for j, s in enumerate(system.unknowns)}
    out.update({s: ("param", "p", j) for j, s in enumerate(system.params)})
    return out


# A residual outside every family is printed as a family of one (through its reductions) when
# it holds a sum of at least this many terms; shorter rows stay straight-line.
SINGLE_REDUCTION_MIN_TERMS = 64


def _has_long_sum(expr) -> bool:
    """Does ``expr`` hold a sum of at least ``SINGLE_REDUCTION_MIN_TERMS`` terms?"""
    stack = [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, sp.Add) and len(e.args) >= SINGLE_REDUCTION_MIN_TERMS:
            return True
        stack.extend(e.args)
    return False


def _single_family(expr, slots: dict, i: int) -> Family:
    """Residual ``i`` as a family of one member (its own symbols as the slots)."""
    syms = sorted((s for s in expr.free_symbols if s in slots), key=lambda s: (slots[s][0], slots[s][2]))
    return Family(template=expr, slots=tuple(syms), slot_kinds=tuple(slots[s][0] for s in syms),
                  slot_groups=tuple(slots[s][1] for s in syms),
                  table=np.array([[slots[s][2] for s in syms]], dtype=np.int64).reshape(1, len(syms)),
                  members=(i,))


def derive(system, back=None, families: bool = True, reductions: bool = True) -> Derivation:
    """Derive ``system`` (residuals, unknowns, params; groups where it has them).

    ``back`` maps every derived expression (e.g. from the real-argument view used for
    differentiation back to SymPy's functions); ``families=False`` derives and emits every
    residual on its own (the straight-line reference the family path is tested against);
    ``reductions=False`` keeps every family's template whole (no inner loops over its terms)."""
    back = back or (lambda e: e)
    residuals = tuple(system.residuals)
    n = len(residuals)
    fams: list[Family] = []
    single = list(range(n))
    reduced: dict[int, Reduced] = {}
    if families and n >= FAMILY_MIN_SIZE:
        slots = _slots(system)
        fams, single = find_families(residuals, slots, min_size=FAMILY_MIN_SIZE)
        if reductions:
            # A residual on its own holding a long sum (the normalisation Σ d_i v_i² of a
            # normalised cut) is a family of one member, printed through its reductions.
            keep = []
            for i in single:
                one = _single_family(residuals[i], slots, i) if _has_long_sum(residuals[i]) else None
                red = reduce_template(one.template, one.slots, one.slot_kinds, one.slot_groups, back) if one else None
                if red is None:
                    keep.append(i)
                    continue
                reduced[len(fams)] = red
                fams.append(one)
            single = keep
    single_res = [residuals[i] for i in single]
    jac_y = [(single[i], j, back(e)) for i, j, e in sparse_jacobian(single_res, system.unknowns)]
    jac_p = [(single[i], j, back(e)) for i, j, e in sparse_jacobian(single_res, system.params)]
    fds = []
    for f in fams:
        dy, dp = [], []
        for k, (kind, e) in enumerate(zip(f.slot_kinds, gradient(f.template, f.slots))):
            if e != 0:
                (dy if kind == "unknown" else dp).append((k, back(e)))
        red = reduced.get(len(fds))
        if red is None and reductions and f.size > 1:
            red = reduce_template(f.template, f.slots, f.slot_kinds, f.slot_groups, back)
        fds.append(FamilyDerivative(family=f, d_unknowns=tuple(dy), d_params=tuple(dp), residual=back(f.template),
                                    reduced=red))
    d = Derivation(residuals=residuals, unknowns=tuple(system.unknowns), params=tuple(system.params),
                   jac_y_single=jac_y, jac_p_single=jac_p, families=tuple(fds), single_rows=tuple(single))
    indptr, indices = d.pattern_csr()
    # Structural rank of the true derivative pattern (a symbol can cancel in diff).
    idx = indices.tolist()
    inc = [set(idx[indptr[i]:indptr[i + 1]]) for i in range(n)]
    if any(c < 0 for c in maximum_matching(inc, len(system.unknowns))):
        raise StructuralSingularityError(
            "dF/dy is structurally singular once derivatives are taken (a symbol cancels "
            "when differentiated); check the residuals for unknowns that enter only trivially"
        )
    d.factorization, d.elimination = choose_factorization((indptr, indices, n))
    return d
