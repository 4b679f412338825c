"""``ResidualSystem``: an implicit layer ``F(y, theta) = 0`` written in SymPy, and
``FixedPoint``: one written as ``y = g(y, theta)``.

Validation happens here, before anything is derived or generated: counts,
undeclared or doubly-declared symbols, non-scalar or non-SymPy residuals,
constructs that have no real-valued code (complex numbers, unevaluated integrals,
sums and derivatives, distributions), the initial guess, and structural
singularity of dF/dy (no perfect matching between residuals and unknowns in the
sparsity pattern).

The kernels compute in real floating point, so the Jacobians are taken as for real
arguments: ``d|g|/dg = sign(g)``, and the piecewise-constant ``floor``, ``ceiling``,
``sign``, ``Heaviside`` have derivative 0, ``frac(g)`` derivative ``g'``,
``Mod(a, b)`` derivatives ``a' - b' floor(a/b)`` (their values almost everywhere,
as automatic differentiation takes them; SymPy itself leaves them unevaluated or
gives the complex formulas).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from functools import cached_property

import numpy as np
import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.logic.boolalg import BooleanAtom, BooleanFunction

from ..derive.families import fingerprint
from ..derive.structure import hall_violator, maximum_matching
from ..errors import StructuralSingularityError, SystemDefinitionError
from .groups import Group, flat_symbols, make_groups

SOLVER_METHODS = ("newton", "anderson", "picard")


# ---------------------------------------------------------------- real-argument derivatives
class _RealAbs(sp.Function):
    def fdiff(self, argindex=1):
        return sp.sign(self.args[0])


class _PiecewiseConstant(sp.Function):
    def fdiff(self, argindex=1):
        return sp.S.Zero


class _Floor(_PiecewiseConstant):
    pass


class _Ceiling(_PiecewiseConstant):
    pass


class _Sign(_PiecewiseConstant):
    pass


class _Heaviside(_PiecewiseConstant):
    pass


class _Frac(sp.Function):
    def fdiff(self, argindex=1):
        return sp.S.One


class _Mod(sp.Function):
    def fdiff(self, argindex=1):
        a, b = self.args
        return sp.S.One if argindex == 1 else -sp.floor(a / b)


_FOR_DIFF = {sp.Abs: _RealAbs, sp.floor: _Floor, sp.ceiling: _Ceiling, sp.sign: _Sign,
             sp.Heaviside: _Heaviside, sp.frac: _Frac, sp.Mod: _Mod}
_BACK = {v: k for k, v in _FOR_DIFF.items()}


def _for_diff(e: sp.Expr) -> sp.Expr:
    if not e.has(*_FOR_DIFF):
        return e
    for f, g in _FOR_DIFF.items():
        e = e.replace(f, g)
    return e


def _back(e: sp.Expr) -> sp.Expr:
    if not e.has(*_BACK):
        return e
    for g, f in _BACK.items():
        e = e.replace(g, f)
    return e


# Constructs with no real-valued kernel code, and what to do instead.
_UNEVALUATED = (sp.Integral, sp.Sum, sp.Product, sp.Derivative, sp.Limit, sp.Subs)
_COMPLEX_FUNCTIONS = (sp.re, sp.im, sp.arg, sp.conjugate)
_DISTRIBUTIONS = (sp.DiracDelta,)


def _first(r: sp.Expr, types) -> sp.Basic | None:
    for sub in sp.preorder_traversal(r):
        if isinstance(sub, types):
            return sub
    return None


def _check_real_constructs(i: int, r: sp.Expr) -> None:
    """Reject what the real-valued kernels cannot compute, naming the subexpression and the fix."""
    sub = _first(r, _UNEVALUATED)
    if sub is not None:
        raise SystemDefinitionError(
            f"residual {i} ({r}) contains the unevaluated {type(sub).__name__} {sub}; generated code "
            f"needs it in closed form: call .doit() on it (or on the residual), or rewrite it with "
            f"elementary functions (a Sum with symbolic bounds has no fixed number of terms)"
        )
    if r.has(sp.I):
        inner = [a for a in sp.preorder_traversal(r) if a.has(sp.I) and a != sp.I]
        sub = inner[-1] if inner else sp.I  # the smallest subexpression holding I
        raise SystemDefinitionError(
            f"residual {i} ({r}) is complex-valued ({sub} contains the imaginary unit I); the kernels "
            f"compute in real numbers: write the real and imaginary parts as two real residuals"
        )
    sub = _first(r, _COMPLEX_FUNCTIONS)
    if sub is not None:
        raise SystemDefinitionError(
            f"residual {i} ({r}) uses {type(sub).__name__}() in {sub}; the symbols are real numbers at "
            f"run time, so drop re() and conjugate() (the value itself) and im() (zero)"
        )
    sub = _first(r, _DISTRIBUTIONS)
    if sub is not None:
        raise SystemDefinitionError(
            f"residual {i} ({r}) contains the distribution {sub}, which has no pointwise value; "
            f"use a smooth approximation (e.g. a narrow Gaussian) instead"
        )


def _as_expr(r, i: int) -> sp.Expr:
    if isinstance(r, sp.Equality):
        return sp.sympify(r.lhs - r.rhs)
    if isinstance(r, sp.Rel):
        raise SystemDefinitionError(
            f"residual {i} is an inequality ({r}); residual systems take equations only "
            f"(use ic.Problem for inequality constraints)"
        )
    if isinstance(r, (int, float)) and not isinstance(r, bool):
        r = sp.sympify(r)
    if isinstance(r, sp.MatrixBase):
        raise SystemDefinitionError(
            f"residual {i} is a {r.shape[0]}x{r.shape[1]} Matrix; residuals must be scalar "
            f"expressions (pass list(M) to use its entries as residuals)"
        )
    if not isinstance(r, sp.Basic):
        raise SystemDefinitionError(
            f"residual {i} is a {type(r).__name__} ({r!r}), not a SymPy expression; "
            f"build residuals from sympy Symbols"
        )
    if not isinstance(r, sp.Expr) or isinstance(r, (BooleanAtom, BooleanFunction)):
        raise SystemDefinitionError(f"residual {i} ({r}) is not a scalar SymPy expression")
    return r


def _as_residual_list(residuals) -> tuple[sp.Expr, ...]:
    if isinstance(residuals, sp.MatrixBase):
        residuals = list(residuals)
    elif isinstance(residuals, (sp.Basic, int, float)):
        residuals = [residuals]
    elif isinstance(residuals, np.ndarray):
        residuals = list(residuals.ravel())
    else:
        try:
            residuals = list(residuals)
        except TypeError:
            raise SystemDefinitionError(
                f"residuals must be a list of SymPy expressions, got {type(residuals).__name__}"
            ) from None
    return tuple(_as_expr(r, i) for i, r in enumerate(residuals))


class ResidualSystem:
    """An implicit layer: find ``y`` with ``F(y, theta) = 0``.

    Parameters
    ----------
    residuals
        Scalar SymPy expressions ``F_i`` (a list or a Matrix); ``sp.Eq(a, b)``
        is read as ``a - b``.
    unknowns
        The symbols solved for: a list of Symbols, or a dict of named groups
        (``{"y": sp.Matrix(...), "s": s}``), one output of the layer per group.
    params
        The inputs ``theta``, same forms; one layer argument per group.
    initial_guess
        Default starting point: a number, or a dict ``{symbol: value}``
        (missing unknowns start at 0). A call's ``y0`` overrides it.
    name
        Shown in reports and the generated file header.
    """

    kind = "residual"

    def __init__(self, residuals, unknowns, params=None, *, initial_guess=None, name=None):
        self.name = name or type(self).__name__
        self.residuals = _as_residual_list(residuals)
        self.unknown_groups: tuple[Group, ...] = make_groups(unknowns, "unknowns", "y")
        self.param_groups: tuple[Group, ...] = make_groups(params, "params", "theta")
        self.unknowns = flat_symbols(self.unknown_groups)
        self.params = flat_symbols(self.param_groups)
        self._validate()
        self.initial_guess = self._initial_guess(initial_guess)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        if not self.residuals:
            raise SystemDefinitionError("the system has no residuals; give at least one equation")
        if not self.unknowns:
            raise SystemDefinitionError("the system has no unknowns; give the symbols to solve for")
        for what, syms in (("unknowns", self.unknowns), ("params", self.params)):
            dup = [s for s, k in Counter(syms).items() if k > 1]
            if dup:
                raise SystemDefinitionError(
                    f"symbol(s) {', '.join(map(str, dup))} listed more than once in {what}; "
                    f"each symbol must appear exactly once"
                )
        both = sorted(set(self.unknowns) & set(self.params), key=str)
        if both:
            raise SystemDefinitionError(
                f"symbol(s) {', '.join(map(str, both))} declared both as unknown and as parameter; "
                f"a symbol is either solved for or given"
            )
        names = Counter(str(s) for s in self.unknowns + self.params)
        clash = [n for n, k in names.items() if k > 1]
        if clash:
            raise SystemDefinitionError(
                f"two different symbols share the name(s) {', '.join(clash)} (they differ in "
                f"assumptions); rename one so reports and errors stay unambiguous"
            )
        if len(self.residuals) != len(self.unknowns):
            raise SystemDefinitionError(
                f"the system has {len(self.residuals)} residuals but {len(self.unknowns)} unknowns "
                f"({', '.join(map(str, self.unknowns))}); a square system needs as many equations "
                f"as unknowns"
            )
        declared = set(self.unknowns) | set(self.params)
        for i, r in enumerate(self.residuals):
            undef = sorted(r.atoms(AppliedUndef), key=str)
            if undef:
                raise SystemDefinitionError(
                    f"residual {i} ({r}) uses the undefined function {undef[0]}; "
                    f"only functions SymPy knows (sin, exp, ...) can be compiled"
                )
            free = r.free_symbols - declared
            if free:
                names_ = ", ".join(sorted(map(str, free)))
                raise SystemDefinitionError(
                    f"residual {i} ({r}) uses symbol(s) {names_} that are neither unknowns nor "
                    f"params; declare them in params= (or substitute a number)"
                )
            if r.has(sp.zoo, sp.oo, -sp.oo, sp.nan):
                raise SystemDefinitionError(f"residual {i} ({r}) contains an infinity or NaN")
            _check_real_constructs(i, r)
        for s in self.unknowns + self.params:
            if s.is_real is False or s.is_imaginary:
                raise SystemDefinitionError(
                    f"symbol {s} is declared non-real ({', '.join(k for k, v in s.assumptions0.items() if v)}); "
                    f"the kernels compute in real numbers: declare it without those assumptions"
                )
        self._check_structure()

    def _incidence(self) -> list[set[int]]:
        pos = {s: j for j, s in enumerate(self.unknowns)}
        return [{pos[s] for s in r.free_symbols if s in pos} for r in self.residuals]

    def _check_structure(self) -> None:
        inc = self._incidence()
        used = set().union(*inc)
        unused = [str(s) for j, s in enumerate(self.unknowns) if j not in used]
        if unused:
            raise StructuralSingularityError(
                f"unknown(s) {', '.join(unused)} appear in no residual, so dF/dy has a zero "
                f"column and is singular for every input; remove them or make a residual use them"
            )
        match = maximum_matching(inc, len(self.unknowns))
        if any(c < 0 for c in match):
            rows, cols = hall_violator(inc, match)
            res = "; ".join(f"F{r}: {self.residuals[r]}" for r in rows)
            unk = ", ".join(str(self.unknowns[c]) for c in cols)
            raise StructuralSingularityError(
                f"dF/dy is structurally singular: the {len(rows)} residuals [{res}] together "
                f"involve only the {len(cols)} unknown(s) [{unk}], so they cannot be independent. "
                f"Rewrite the system so every subset of k residuals involves at least k unknowns"
            )

    def _initial_guess(self, guess) -> np.ndarray:
        n = len(self.unknowns)
        y0 = np.zeros(n)
        if guess is None:
            return y0
        usage = (f"initial_guess must be a number, a sequence of {n} numbers (one per unknown) or a "
                 f"dict {{unknown: number}}")
        if isinstance(guess, dict):
            pos = {s: j for j, s in enumerate(self.unknowns)}
            by_name = {str(s): j for j, s in enumerate(self.unknowns)}
            for s, v in guess.items():
                j = pos.get(s, by_name.get(s) if isinstance(s, str) else None)
                if j is None:
                    raise SystemDefinitionError(
                        f"initial_guess names {s!r}, which is not an unknown (unknowns: "
                        f"{', '.join(map(str, self.unknowns))})"
                    )
                y0[j] = self._guess_value(v, f"initial_guess[{s}]", usage)
            return y0
        if isinstance(guess, (str, bytes)) or isinstance(guess, sp.Basic) and not guess.is_number:
            raise SystemDefinitionError(f"{usage}, got {type(guess).__name__} {guess!r}")
        try:
            arr = np.asarray(guess, dtype=float).ravel()
        except (TypeError, ValueError):
            raise SystemDefinitionError(f"{usage}, got {type(guess).__name__} {guess!r}") from None
        if arr.size == 1:
            return np.full(n, self._guess_value(arr[0], "initial_guess", usage))
        if arr.size != n:
            raise SystemDefinitionError(f"initial_guess has {arr.size} values for {n} unknowns; {usage}")
        for j, v in enumerate(arr):
            self._guess_value(v, f"initial_guess for {self.unknowns[j]}", usage)
        return arr

    @staticmethod
    def _guess_value(v, where: str, usage: str) -> float:
        if isinstance(v, (str, bytes, bool)) or v is None:
            raise SystemDefinitionError(f"{where} is {v!r}; {usage}")
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise SystemDefinitionError(f"{where} is {type(v).__name__} {v!r}, not a real number; {usage}") from None
        if not np.isfinite(x):
            raise SystemDefinitionError(f"{where} is {x}; an initial guess must be finite")
        return x

    # ------------------------------------------------------------------ derived objects
    @property
    def n_unknowns(self) -> int:
        return len(self.unknowns)

    @property
    def n_params(self) -> int:
        return len(self.params)

    @cached_property
    def derivation(self):
        """The :class:`~implicit_compiler.derive.Derivation`: Jacobians, sparsity, CSE."""
        from types import SimpleNamespace

        from ..derive.jacobians import derive

        view = tuple(_for_diff(r) for r in self.residuals)
        if view == self.residuals:
            return derive(self)
        # differentiate with real-argument rules (module docstring), then restore SymPy's functions
        d = derive(SimpleNamespace(residuals=view, unknowns=self.unknowns, params=self.params,
                                   unknown_groups=self.unknown_groups, param_groups=self.param_groups),
                   back=_back)
        d.residuals = self.residuals
        return d

    @property
    def jacobian_unknowns(self) -> sp.Matrix:
        """dF/dy as a SymPy Matrix (rows: residuals, columns: unknowns)."""
        return self.derivation.jacobian_unknowns_matrix()

    @property
    def jacobian_params(self) -> sp.Matrix:
        """dF/dtheta as a SymPy Matrix (rows: residuals, columns: params)."""
        return self.derivation.jacobian_params_matrix()

    def implicit_jacobian(self, simplify: bool = True, max_unknowns: int = 4) -> sp.Matrix:
        """``dy/dtheta = -(dF/dy)^{-1} dF/dtheta`` in closed form (small systems only)."""
        if self.n_unknowns > max_unknowns:
            raise SystemDefinitionError(
                f"the closed-form implicit Jacobian of a {self.n_unknowns}-unknown system is not "
                f"readable; raise max_unknowns= if you really want it"
            )
        Jy, Jp = self.jacobian_unknowns, self.jacobian_params
        out = -Jy.LUsolve(Jp)
        return sp.simplify(out) if simplify else out

    def content_hash(self) -> str:
        """Hash of everything that determines the generated code."""
        h = hashlib.sha256()
        memo: dict = {}
        h.update(self.kind.encode())
        for g in self.unknown_groups + self.param_groups:
            h.update(repr((g.name, g.shape)).encode())
            h.update(sp.srepr(g.symbols).encode())
        for r in self.residuals:
            h.update(fingerprint(r, memo).encode())
        h.update(repr(self.layout()).encode())  # names, initial guess, default method
        return h.hexdigest()

    def layout(self) -> dict:
        return {
            "kind": self.kind,
            "name": self.name,
            "n_unknowns": self.n_unknowns,
            "n_params": self.n_params,
            "unknown_groups": [g.layout() for g in self.unknown_groups],
            "param_groups": [g.layout() for g in self.param_groups],
            "initial_guess": [float(v) for v in self.initial_guess],
            "default_method": "newton",
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}: {self.n_unknowns} unknowns "
            f"[{', '.join(g.name for g in self.unknown_groups)}], {self.n_params} params "
            f"[{', '.join(g.name for g in self.param_groups)}])"
        )


class FixedPoint(ResidualSystem):
    """An implicit layer written as ``y = g(y, theta)``; compiled as ``F = y - g``.

    ``method`` picks the default forward solver: ``"anderson"`` (Anderson-accelerated
    fixed-point iteration, the default), ``"picard"`` (plain ``y <- g(y)``) or
    ``"newton"``. The backward pass is the same implicit one in every case.
    """

    kind = "fixed_point"

    def __init__(self, map, unknowns, params=None, *, method="anderson", initial_guess=None, name=None):
        if method not in SOLVER_METHODS:
            raise SystemDefinitionError(f"method must be one of {SOLVER_METHODS}, got {method!r}")
        groups = make_groups(unknowns, "unknowns", "y")
        ys = flat_symbols(groups)
        gs = _as_residual_list(map)
        if len(gs) != len(ys):
            raise SystemDefinitionError(
                f"the map has {len(gs)} components but there are {len(ys)} unknowns; "
                f"y = g(y) needs one component per unknown"
            )
        self.map = gs
        self.method = method
        super().__init__([y - g for y, g in zip(ys, gs)], unknowns, params,
                         initial_guess=initial_guess, name=name)

    def layout(self) -> dict:
        out = super().layout()
        out["default_method"] = self.method
        return out
