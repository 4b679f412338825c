"""``ODE``: an initial value problem ``dx/dt = f(t, x, theta)`` written in SymPy.

The layer's output ``x(t_k)`` at the requested times is the implicit function defined by
``dx/dt - f(x, t, theta) = 0`` with ``x(t_0) = x0``. The right-hand side is compiled like a
residual system whose "residuals" are ``f``, whose unknowns are the state and whose parameters
are the time followed by the user's parameter groups: the generated module's ``residual`` is
``f``, ``residual_jacobian`` gives ``df/dx`` and ``vjp_params`` gives ``(df/d(t, theta))^T v``.
The integration method is a run-time choice (``compile(ode, method=...)``); the generated code
depends on ``f`` only.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from functools import cached_property

import sympy as sp
from sympy.core.function import AppliedUndef

from ..errors import StructuralSingularityError, SystemDefinitionError
from .groups import flat_symbols, make_groups
from .system import ResidualSystem, _as_residual_list, _check_real_constructs

TIME_GROUP = "_time"
SHIFT_GROUP = "_zero"


class _RHSSystem(ResidualSystem):
    """``f`` as a residual system (no structural check: ``df/dx`` may be singular, e.g. ``dx/dt = k``)."""

    kind = "ode"

    def _check_structure(self) -> None:
        pass


def _group_value(g):
    if g.shape == ():
        return g.symbols[0]
    if len(g.shape) == 1:
        return list(g.symbols)
    return sp.Matrix(g.shape[0], g.shape[1], list(g.symbols))


class ODE:
    """An ODE layer's system: ``dx/dt = rhs(t, x, params)``.

    Parameters
    ----------
    rhs
        One SymPy expression per state component (a list or a Matrix): ``dx_i/dt``.
    state
        The state symbols, in the order of the layer's ``x0`` and output columns.
    params
        The parameters: a list of Symbols (one group ``theta``) or a dict of named groups
        (as :class:`ResidualSystem` takes them); one layer argument per group.
    time
        The time symbol, which ``rhs`` may use (non-autonomous systems); optional.
    name
        Shown in reports and the generated file header.
    """

    kind = "ode"

    def __init__(self, rhs, state, params=None, *, time=None, name=None):
        self.name = name or "ODE"
        self.rhs = _as_residual_list(rhs)
        self.state_groups = make_groups(state, "state", "x")
        if len(self.state_groups) != 1:
            raise SystemDefinitionError(
                "state must be one list (or column Matrix) of Symbols, the layer's x0 columns in order; "
                f"got {len(self.state_groups)} groups"
            )
        self.state = flat_symbols(self.state_groups)
        self.param_groups = make_groups(params, "params", "theta")
        self.params = flat_symbols(self.param_groups)
        if time is not None and not isinstance(time, sp.Symbol):
            raise SystemDefinitionError(f"time must be a sympy Symbol, got {type(time).__name__} {time!r}")
        self.time = time
        self._validate()

    def _validate(self) -> None:
        if not self.state:
            raise SystemDefinitionError("the ODE has no state; give the state symbols")
        if len(self.rhs) != len(self.state):
            raise SystemDefinitionError(
                f"the ODE has {len(self.rhs)} right-hand sides but {len(self.state)} state symbols "
                f"({', '.join(map(str, self.state))}); give one rhs entry dx_i/dt per state symbol"
            )
        if any(g.name == TIME_GROUP for g in self.param_groups):
            raise SystemDefinitionError(f"the parameter group name {TIME_GROUP!r} is reserved for the time")
        t = self.time
        if t is not None:
            if t in self.state:
                raise SystemDefinitionError(
                    f"the time symbol {t} is also listed as a state; the time is the independent variable "
                    f"(pass it as time=, and give the state without it)"
                )
            if t in self.params:
                raise SystemDefinitionError(
                    f"the time symbol {t} is also listed as a parameter; pass it only as time="
                )
        for what, syms in (("state", self.state), ("params", self.params)):
            dup = [s for s, k in Counter(syms).items() if k > 1]
            if dup:
                raise SystemDefinitionError(
                    f"symbol(s) {', '.join(map(str, dup))} listed more than once in {what}"
                )
        both = sorted(set(self.state) & set(self.params), key=str)
        if both:
            raise SystemDefinitionError(
                f"symbol(s) {', '.join(map(str, both))} declared both as state and as parameter"
            )
        names = Counter(str(s) for s in self.state + self.params + ((t,) if t is not None else ()))
        clash = [k for k, v in names.items() if v > 1]
        if clash:
            raise SystemDefinitionError(
                f"two different symbols share the name(s) {', '.join(clash)}; rename one"
            )
        declared = set(self.state) | set(self.params) | ({t} if t is not None else set())
        for i, r in enumerate(self.rhs):
            undef = sorted(r.atoms(AppliedUndef), key=str)
            if undef:
                raise SystemDefinitionError(
                    f"rhs {i} (d{self.state[i]}/dt = {r}) uses the undefined function {undef[0]}; "
                    f"only functions SymPy knows (sin, exp, ...) can be compiled"
                )
            free = r.free_symbols - declared
            if free:
                hint = "" if t is not None else " (if one of them is the time, pass it as time=)"
                raise SystemDefinitionError(
                    f"rhs {i} (d{self.state[i]}/dt = {r}) uses symbol(s) {', '.join(sorted(map(str, free)))} "
                    f"that are neither state, params nor the time; declare them in params={hint}"
                )
            if r.has(sp.zoo, sp.oo, -sp.oo, sp.nan):
                raise SystemDefinitionError(f"rhs {i} (d{self.state[i]}/dt = {r}) contains an infinity or NaN")
            try:
                _check_real_constructs(i, r)
            except SystemDefinitionError as e:
                raise SystemDefinitionError(f"in rhs {i} (d{self.state[i]}/dt): {e}") from None
        for s in self.state + self.params + ((t,) if t is not None else ()):
            if s.is_real is False or s.is_imaginary:
                raise SystemDefinitionError(
                    f"symbol {s} is declared non-real; the kernels compute in real numbers: declare it "
                    f"without those assumptions"
                )

    # ------------------------------------------------------------------ the compiled system
    @cached_property
    def system(self) -> ResidualSystem:
        """``f`` as the residual system the kernels are generated from (params: the time, then the
        user's groups).

        The kernel generator needs ``df/dx`` to be structurally nonsingular (it is a residual
        system's Newton matrix). When it is not (``dx/dt = k``, a state no right-hand side reads),
        the residuals are ``f_i + z x_i`` with one more parameter ``z`` (group ``_zero``, last),
        which the integrator always sets to 0: the kernels then compute ``f`` and ``df/dx``
        exactly, with a structural diagonal.
        """
        t = self.time if self.time is not None else sp.Symbol("_t_unused")
        params = {TIME_GROUP: t}
        for g in self.param_groups:
            params[g.name] = _group_value(g)
        sysm = _RHSSystem(list(self.rhs), list(self.state), params, name=self.name)
        try:
            _ = sysm.derivation  # derives now: the generator checks the structure of df/dx
        except StructuralSingularityError:
            z = sp.Symbol("_zero")
            params[SHIFT_GROUP] = z
            sysm = _RHSSystem([r + z * s for r, s in zip(self.rhs, self.state)], list(self.state), params,
                              name=self.name)
        return sysm

    @property
    def n_state(self) -> int:
        return len(self.state)

    @property
    def n_params(self) -> int:
        return len(self.params)

    @property
    def jacobian_state(self) -> sp.Matrix:
        """``df/dx`` as a SymPy Matrix."""
        return sp.Matrix(list(self.rhs)).jacobian(list(self.state))

    def content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(b"ode")
        h.update(self.system.content_hash().encode())
        return h.hexdigest()

    def layout(self) -> dict:
        out = self.system.layout()
        out["ode"] = {
            "time": str(self.time) if self.time is not None else None,
            "state": [str(s) for s in self.state],
            "param_groups": [g.layout() for g in self.param_groups],
        }
        return out

    def __repr__(self) -> str:
        return (f"ODE({self.name!r}: {self.n_state} states, {self.n_params} params "
                f"[{', '.join(g.name for g in self.param_groups)}])")
