"""``Problem``: an optimization layer ``y*(θ) = argmin_y f(y, θ)`` subject to
``h(y, θ) = 0`` and ``g(y, θ) <= 0``, compiled through its KKT system.

The forward pass is a primal-dual interior-point method generated for the
problem (Newton on the Lagrange system when there are no inequalities), or any
Python callable (``forward=``); the backward pass is the implicit function
theorem applied to the KKT system at the solution.
"""

from __future__ import annotations

import hashlib
from functools import cached_property

import sympy as sp

from ..derive.families import fingerprint
from ..errors import SystemDefinitionError
from .groups import Group, flat_symbols, make_groups
from .kkt import KKT, RedundantEquality, hessian_entries, independent_equalities, kkt_conditions, lagrangian
from .system import ResidualSystem


def _constraint_list(items, kind: str) -> list:
    if items is None:
        return []
    items = [items] if isinstance(items, sp.Basic) and not isinstance(items, sp.MatrixBase) else list(items)
    out = []
    for i, c in enumerate(items):
        if isinstance(c, sp.MatrixBase):
            raise SystemDefinitionError(f"{kind} constraint {i} is a Matrix; pass list(M) to constrain each entry")
        if kind == "equality":
            if isinstance(c, sp.Equality):
                c = c.lhs - c.rhs
            elif isinstance(c, sp.Rel):
                raise SystemDefinitionError(
                    f"equality constraint {i} ({c}) is an inequality; put it in inequalities="
                )
        else:
            if isinstance(c, (sp.LessThan, sp.StrictLessThan)):
                c = c.lhs - c.rhs  # a <= b  ->  a - b <= 0
            elif isinstance(c, (sp.GreaterThan, sp.StrictGreaterThan)):
                c = c.rhs - c.lhs  # a >= b  ->  b - a <= 0
            elif isinstance(c, sp.Rel):
                raise SystemDefinitionError(
                    f"inequality constraint {i} ({c}) is an equation; put it in equalities="
                )
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            c = sp.sympify(c)
        if not isinstance(c, sp.Expr):
            raise SystemDefinitionError(
                f"{kind} constraint {i} is a {type(c).__name__} ({c!r}), not a SymPy expression"
            )
        out.append(c)
    return out


def _fresh_symbols(prefix: str, count: int, taken: set) -> tuple:
    names = {str(s) for s in taken}
    base = prefix
    while any(f"{base}{i}" in names for i in range(count)):
        base = base + "_"
    return tuple(sp.Symbol(f"{base}{i}", real=True) for i in range(count))


class Problem:
    """``argmin_y f(y, θ)`` s.t. ``equalities == 0``, ``inequalities <= 0``.

    Parameters
    ----------
    objective
        A scalar SymPy expression.
    variables, params
        Symbols or named groups, as for :class:`ResidualSystem`.
    inequalities
        Expressions ``g_i <= 0`` or relationals ``a <= b`` / ``a >= b``.
    equalities
        Expressions ``h_i = 0`` or ``sp.Eq(a, b)``.
    maximize
        Maximise instead (the objective is negated internally).

    The multipliers are ``lam0, lam1, …`` (equalities) and ``nu0, nu1, …``
    (inequalities), renamed if those names are taken.

    Redundant constant-linear equalities (``a·y = b(θ)`` with numeric ``a`` that is a combination of
    the ``a`` of other such constraints, e.g. the row and column sums of an assignment matrix) are
    found exactly at construction and left out of the KKT system, whose Jacobian would otherwise be
    singular: ``equalities`` are the constraints kept, ``equalities_as_given`` all of them,
    ``redundant_equalities`` the dropped ones with the combination that implies each
    (:class:`~implicit_compiler.symbolic.kkt.RedundantEquality`), ``equality_rows`` the positions of
    the kept ones among those given. ``lam`` has one multiplier per kept constraint (``lam<i>`` for
    given constraint ``i``); a dropped constraint's multiplier is zero by definition. Constraints that
    contradict each other raise :class:`~implicit_compiler.errors.InconsistentConstraintsError`.
    """

    kind = "problem"

    def __init__(self, objective, variables, params=None, *, inequalities=None, equalities=None,
                 maximize: bool = False, name: str | None = None, initial_guess=None):
        self.name = name or "Problem"
        if isinstance(objective, sp.MatrixBase):
            if objective.shape == (1, 1):
                objective = objective[0, 0]
            else:
                raise SystemDefinitionError(
                    f"the objective is a {objective.shape[0]}x{objective.shape[1]} Matrix; it must be a scalar "
                    f"(for y.T*Q*y write (y.T*Q*y)[0])"
                )
        if isinstance(objective, (int, float)) and not isinstance(objective, bool):
            objective = sp.sympify(objective)
        if not isinstance(objective, sp.Expr) or isinstance(objective, sp.Rel):
            raise SystemDefinitionError(f"the objective must be a scalar SymPy expression, got {objective!r}")
        self.maximize = bool(maximize)
        self.objective = objective
        self.variable_groups: tuple[Group, ...] = make_groups(variables, "variables", "y")
        self.param_groups: tuple[Group, ...] = make_groups(params, "params", "theta")
        self.variables = flat_symbols(self.variable_groups)
        self.params = flat_symbols(self.param_groups)
        self.equalities_as_given = _constraint_list(equalities, "equality")
        self.equalities = self.equalities_as_given
        self.inequalities = _constraint_list(inequalities, "inequality")
        self._validate()
        kept, redundant = independent_equalities(self.equalities_as_given, self.variables, self.params)
        self.equality_rows: tuple[int, ...] = kept
        self.redundant_equalities: tuple[RedundantEquality, ...] = redundant
        self.equalities = [self.equalities_as_given[i] for i in kept]
        if len(self.equalities) > len(self.variables):
            raise SystemDefinitionError(
                f"{len(self.equalities)} equality constraints for {len(self.variables)} variables: "
                f"the constraint Jacobian cannot have full row rank"
            )
        taken = set(self.variables) | set(self.params)
        lam = _fresh_symbols("lam", len(self.equalities_as_given), taken)
        self.lam = tuple(lam[i] for i in kept)
        self.nu = _fresh_symbols("nu", len(self.inequalities), taken | set(lam))
        self._initial_guess = initial_guess

    def _validate(self) -> None:
        declared = set(self.variables) | set(self.params)
        both = set(self.variables) & set(self.params)
        if both:
            raise SystemDefinitionError(
                f"symbol(s) {', '.join(sorted(map(str, both)))} declared both as variable and as parameter"
            )
        items = [("the objective", self.objective)]
        items += [(f"equality constraint {i} ({e} = 0)", e) for i, e in enumerate(self.equalities)]
        items += [(f"inequality constraint {i} ({e} <= 0)", e) for i, e in enumerate(self.inequalities)]
        for what, e in items:
            free = e.free_symbols - declared
            if free:
                raise SystemDefinitionError(
                    f"{what} uses symbol(s) {', '.join(sorted(map(str, free)))} that are neither variables nor "
                    f"params; declare them in params="
                )
        if not (self.objective.free_symbols & set(self.variables)) and not self.equalities:
            raise SystemDefinitionError("the objective does not depend on any variable")

    # ------------------------------------------------------------------ derived objects
    @property
    def f(self) -> sp.Expr:
        """The objective that is minimised (negated when ``maximize=True``)."""
        return -self.objective if self.maximize else self.objective

    @cached_property
    def lagrangian(self) -> sp.Expr:
        """``L = f + λᵀh + νᵀg``."""
        return lagrangian(self.f, self.equalities, self.inequalities, self.lam, self.nu)

    @cached_property
    def kkt(self) -> KKT:
        """Stationarity, primal feasibility and complementary slackness (dual feasibility ``ν >= 0``
        and ``g <= 0`` are enforced by the solver)."""
        return kkt_conditions(self.lagrangian, self.variables, self.equalities, self.inequalities, self.nu)

    @cached_property
    def hessian(self) -> sp.Matrix:
        """∇²_y L as a SymPy Matrix."""
        n = len(self.variables)
        H = sp.zeros(n, n)
        for i, j, e in self.hessian_entries:
            H[i, j] = H[j, i] = e
        return H

    @cached_property
    def hessian_entries(self) -> list:
        return hessian_entries(self.lagrangian, self.variables)

    @cached_property
    def system(self) -> ResidualSystem:
        """The KKT equations as a square :class:`ResidualSystem` in ``(y, λ, ν)``."""
        unknowns = {g.name: (list(g.symbols) if g.shape != () else g.symbols[0]) for g in self.variable_groups}
        for name, syms in (("lam", self.lam), ("nu", self.nu)):
            if syms:
                if name in unknowns:
                    raise SystemDefinitionError(f"variable group name {name!r} is reserved for multipliers")
                unknowns[name] = list(syms)
        params = {g.name: _group_value(g) for g in self.param_groups} or None
        return ResidualSystem(self.kkt.residuals(), unknowns=unknowns, params=params,
                              name=self.name, initial_guess=self._initial_guess)

    @property
    def n_variables(self) -> int:
        return len(self.variables)

    def layout(self) -> dict:
        """The KKT system's layout (plain data, stored in the generated module), plus, when equality
        constraints were dropped, ``"equalities"``: how many were given, the positions kept and, per
        dropped constraint, its position, the combination of kept constraints that implies it and
        the per-sample consistency check (``None`` when it holds for every parameter value)."""
        out = self.system.layout()
        if self.redundant_equalities:
            out["equalities"] = {
                "given": len(self.equalities_as_given),
                "kept": list(self.equality_rows),
                "redundant": [
                    {"index": r.index,
                     "combination": [[self.equality_rows.index(j), float(c)] for j, c in r.combination],
                     "check": None if r.check is None else [[k, a] for k, a in r.check[0]],
                     "check_constant": None if r.check is None else r.check[1],
                     "relation": r.relation()}
                    for r in self.redundant_equalities
                ],
            }
        return out

    def content_hash(self) -> str:
        """Hash of the problem's definition: its groups, symbols (the multipliers' included), the
        objective that is minimised, the constraints, name and initial guess.

        The KKT system and everything generated from it are functions of these and of the package's
        code (``symbolic/`` is part of the cache's toolchain hash), so finding a cached module does not
        need the KKT system derived — that derivation was most of a cache hit's time (13 of 16 s for
        a 100-variable QP). An ``initial_guess`` is hashed as the KKT system normalises it, which
        builds the system."""
        h = hashlib.sha256()
        memo: dict = {}
        h.update(b"problem-definition|")
        for g in self.variable_groups + self.param_groups:
            h.update(repr((g.name, g.shape)).encode())
            h.update(sp.srepr(g.symbols).encode())
        h.update(sp.srepr(tuple(self.lam) + tuple(self.nu)).encode())
        h.update(fingerprint(self.f, memo).encode())
        for e in self.equalities + self.inequalities:
            h.update(fingerprint(e, memo).encode())
        h.update(repr((self.name, len(self.equalities), len(self.inequalities))).encode())
        if self.redundant_equalities:  # the dropped constraints are in the layout (and its checks)
            h.update(f"|dropped {list(self.equality_rows)}|".encode())
            for r in self.redundant_equalities:
                h.update(fingerprint(r.constraint, memo).encode())
        if self._initial_guess is not None:
            h.update(repr(self.system.layout()["initial_guess"]).encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        k = len(self.redundant_equalities)
        dropped = f" ({k} redundant dropped)" if k else ""
        return (f"Problem({self.name!r}: {'max' if self.maximize else 'min'} over {len(self.variables)} variables, "
                f"{len(self.equalities)} equalities{dropped}, {len(self.inequalities)} inequalities, "
                f"{len(self.params)} params)")


def _group_value(g: Group):
    if g.shape == ():
        return g.symbols[0]
    if len(g.shape) == 2:
        return sp.Matrix(g.shape[0], g.shape[1], list(g.symbols))
    return list(g.symbols)
