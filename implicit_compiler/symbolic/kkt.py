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


# ---------------------------------------------------------------------- redundant equalities
class RedundantEquality(NamedTuple):
    """An equality constraint left out of the KKT system because it is implied by others.

    ``constraint`` (``= 0``) is constant-linear, ``a·y - b(θ)`` with numeric ``a``, and ``a`` is the
    combination ``Σ_j c_j a_j`` of kept constant-linear constraints (``combination`` holds the pairs
    ``(j, c_j)``, ``j`` an index among the equalities as given, ``c_j`` exact). Then
    ``mismatch = constraint - Σ_j c_j h_j`` is free of the variables: where it is zero the dropped
    constraint holds at every point that satisfies the kept ones; where it is not, no point satisfies
    all of them. ``check`` is ``None`` when ``mismatch`` is zero for every θ; otherwise it is affine in
    the parameters and ``check = ((flat parameter position, coefficient), ...), constant`` lets the
    layer test it per sample (such a sample is ``INFEASIBLE``).
    """

    index: int
    constraint: sp.Expr
    combination: tuple
    mismatch: sp.Expr
    check: tuple | None

    def relation(self, names=None) -> str:
        """``h[i] = c_j h[j] + ...`` in the variables (``names``: how to call equality ``j``)."""
        name = names or (lambda j: f"h[{j}]")
        if not self.combination:
            return f"{name(self.index)} does not depend on the variables"
        terms = []
        for j, c in self.combination:
            c = sp.Rational(c)
            sign = "-" if c < 0 else "+"
            mag = "" if abs(c) == 1 else f"{abs(c)} "
            terms.append((sign, f"{mag}{name(j)}"))
        text = ("-" if terms[0][0] == "-" else "") + terms[0][1]
        text += "".join(f" {s} {t}" for s, t in terms[1:])
        return f"{name(self.index)} = {text} in the variables"

    def reason(self) -> str:
        if self.check is None:
            rhs = "the constant parts agree exactly" if not self.mismatch.free_symbols else \
                "the constant parts agree for every value of the parameters"
            return f"{self.relation()}, and {rhs}: dropped"
        return (f"{self.relation()}; the constant parts agree only where {self.mismatch} = 0, "
                f"which is checked per sample (INFEASIBLE where it fails): dropped")


def _exact_number(c):
    """``c`` as an exact Rational (a Float by its binary value), or None for other numbers."""
    if isinstance(c, sp.Rational):
        return c
    if isinstance(c, sp.Float):
        return sp.Rational(float(c))
    return None


def _constant_linear(h, variables):
    """``(a, b)`` with ``h = Σ a[s] s + b``, ``a`` exact numbers by variable (non-zeros only) and
    ``b`` free of the variables, or None when ``h`` is not of that form (a coefficient that involves
    a symbol, or an irrational number)."""
    used = [s for s in variables if s in h.free_symbols]
    a, given = {}, []
    for s in used:
        d = sp.diff(h, s)
        if d.free_symbols or not d.is_number:
            return None
        c = _exact_number(d)
        if c is None:
            return None
        given.append(d * s)
        if c != 0:
            a[s] = c
    b = h.xreplace({s: sp.S.Zero for s in used})
    if sp.expand(h - b - sp.Add(*given)) != 0:
        return None
    return a, b


def _is_inconsistent_constant(m, parts) -> bool:
    """A constant mismatch ``m`` of right-hand sides ``parts``: exact for rationals, within a few
    rounding errors of the parts' magnitudes when floats are involved."""
    if m.is_zero:
        return False
    if any(p.has(sp.Float) for p in parts) or m.has(sp.Float):
        scale = sum((abs(float(p)) for p in parts), 0.0)
        return abs(float(m)) > 8 * 2.0 ** -52 * max(scale, 1e-300)
    return True


def _affine_check(m, params):
    """``(((position, coefficient), ...), constant)`` when ``m`` is affine in ``params`` with numeric
    coefficients (positions in the flat ``params``), else None."""
    pos = {s: k for k, s in enumerate(params)}
    if any(s not in pos for s in m.free_symbols):
        return None
    used = sorted(m.free_symbols, key=pos.get)
    coeffs = []
    for s in used:
        d = sp.diff(m, s)
        if d.free_symbols or not d.is_number:
            return None
        coeffs.append((s, d))
    const = m.xreplace({s: sp.S.Zero for s in used})
    if sp.expand(m - const - sum((d * s for s, d in coeffs), sp.S.Zero)) != 0:
        return None
    return tuple((pos[s], float(d)) for s, d in coeffs if d != 0), float(const)


def independent_equalities(h, variables, params):
    """Split the equality constraints ``h`` into an independent set and the redundant rest.

    Only constant-linear constraints (``a·y - b(θ)``, ``a`` numeric) are examined: their coefficient
    matrix is reduced exactly (rational arithmetic, ``rref`` of ``Aᵀ``), keeping a constraint when it
    is independent of the constant-linear ones before it (so the first of a dependent set are kept).
    Returns ``(kept, redundant)``: the kept positions in ``h`` (every other constraint is kept as is)
    and a tuple of :class:`RedundantEquality`.

    Raises :class:`InconsistentConstraintsError` when the constraints are inconsistent for every
    parameter value (a redundant constraint whose constant parts disagree), and
    :class:`SystemDefinitionError` when whether they agree depends on the parameters in a way that is
    not affine (it cannot be checked per sample from the parameters alone).
    """
    from sympy import QQ
    from sympy.polys.matrices import DomainMatrix

    from ..errors import InconsistentConstraintsError, SystemDefinitionError

    variables = list(variables)
    lin = {}
    for i, e in enumerate(h):
        got = _constant_linear(e, variables)
        if got is not None:
            lin[i] = got
    if not lin:
        return tuple(range(len(h))), ()
    rows = list(lin)
    col = {s: j for j, s in enumerate(variables)}
    At = [[sp.S.Zero] * len(rows) for _ in variables]  # Aᵀ: one column per constant-linear constraint
    for k, i in enumerate(rows):
        for s, c in lin[i][0].items():
            At[col[s]][k] = c
    R, pivots = DomainMatrix(
        [[QQ(int(c.p), int(c.q)) for c in row] for row in At], (len(variables), len(rows)), QQ
    ).rref()
    R = R.to_Matrix()
    pivots = list(pivots)
    redundant = []
    for k, i in enumerate(rows):
        if k in pivots:
            continue
        comb = tuple((rows[p], R[t, k]) for t, p in enumerate(pivots) if R[t, k] != 0)
        b = lin[i][1]
        m = sp.expand(b - sum((c * lin[j][1] for j, c in comb), sp.S.Zero))
        parts = [b] + [c * lin[j][1] for j, c in comb]
        rec = RedundantEquality(i, h[i], comb, m, None)
        if not m.free_symbols:
            if _is_inconsistent_constant(m, parts):
                raise InconsistentConstraintsError(
                    f"the equality constraints are inconsistent: {rec.relation()}, but their constant parts "
                    f"differ by {m} (equality constraint {i}: {h[i]} = 0), so no point satisfies them all; "
                    f"fix the constant of one of these constraints"
                )
            redundant.append(rec._replace(mismatch=sp.S.Zero))
            continue
        check = _affine_check(m, list(params))
        if check is None:
            raise SystemDefinitionError(
                f"equality constraint {i} ({h[i]} = 0) is redundant in the variables ({rec.relation()}), "
                f"but it agrees with the others only where {m} = 0, which is not affine in the parameters, "
                f"so it cannot be checked per sample; write the constraint's constant part so that the "
                f"dependency holds for every parameter value, or leave the constraint out"
            )
        redundant.append(rec._replace(check=check))
    dropped = {r.index for r in redundant}
    return tuple(i for i in range(len(h)) if i not in dropped), tuple(redundant)
