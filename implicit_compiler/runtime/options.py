"""Solver options, shared by every layer kind."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace

from ..errors import InputError

FAILURE_POLICIES = ("raise", "nan", "keep")
METHODS = ("newton", "trust-region", "anderson", "picard")


@dataclass(frozen=True)
class SolverOptions:
    """How the forward solve runs and what failed samples do.

    A Newton iterate ``y`` with step ``d = -J^{-1} F(y)`` is converged when (max norms)::

        ||d|| <= xtol (s0 + ||y||)                      s0 = min(1, ||y0||), 1 if y0 = 0
        |F_i| <= max(tol, rtol * S_i)  for every i      S_i = sum_j |dF_i/dy_j| |y_j|

    (fixed-point iterations: ``||F|| <= max(tol, rtol ||y||)``). See docs/solver-status.md.

    tol
        Absolute residual tolerance.
    rtol
        Relative residual tolerance: ``|F_i|`` against ``S_i``, the change of ``F_i``
        under a relative change of ``y`` of 1; residuals of any magnitude meet it.
    xtol
        Step tolerance, relative to ``||y||`` plus the floor ``s0`` (which follows the
        magnitude of the initial guess when it is below 1).
    max_iter
        Iteration cap per sample.
    singular_tol
        A solution counts as degenerate (status ``SINGULAR_AT_SOLUTION``: no implicit
        gradient) when the reciprocal 1-norm condition number of dF/dy there, after
        scaling its rows and columns to a largest entry of 1, is below ``singular_tol``
        (default 1e-8, about sqrt(machine epsilon): half of the 16 digits lost), or when
        Newton converged linearly, as it does at a double root.
    method
        ``"newton"`` (damped Newton), ``"trust-region"`` (Newton with Powell's dogleg
        trust region, as MINPACK's hybrj), ``"anderson"`` (Anderson-accelerated fixed point)
        or ``"picard"`` (plain fixed point ``y <- y - F(y)``). ``None`` takes the system's default.
    anderson_memory
        History length for Anderson acceleration.
    on_failure
        ``"raise"`` (default): one :class:`ConvergenceError` naming the failed samples;
        ``"nan"``: failed samples return NaN and NaN gradients;
        ``"keep"``: failed samples return their last iterate and a zero gradient.
    warm_start
        Start each call from the previous call's solution (same batch size, converged samples).
    parallel_threshold
        Batches at least this large may run on all cores (``prange`` over chunks of 64
        samples); they do unless the last measured cost per sample says the batch is
        under ~200 us of work. Smaller batches run on the calling thread.
    """

    tol: float = 1e-10
    xtol: float = 1e-10
    max_iter: int = 50
    singular_tol: float = 1e-8
    method: str | None = None
    anderson_memory: int = 5
    on_failure: str = "raise"
    warm_start: bool = False
    parallel_threshold: int = 32
    rtol: float = 1e-10

    def __post_init__(self):
        for name in ("tol", "xtol", "rtol"):
            _check_float(name, getattr(self, name), "a finite number >= 0", lambda v: v >= 0)
        _check_float("singular_tol", self.singular_tol, "a number in [0, 1)", lambda v: 0 <= v < 1)
        _check_int("max_iter", self.max_iter, "an int >= 0", lambda v: v >= 0)
        _check_int("anderson_memory", self.anderson_memory, "an int in [0, 50]", lambda v: 0 <= v <= 50)
        _check_int("parallel_threshold", self.parallel_threshold, "an int >= 1", lambda v: v >= 1)
        if self.method is not None and self.method not in METHODS:
            raise InputError(f"solver option method must be None or one of {METHODS}, got {self.method!r}")
        if self.on_failure not in FAILURE_POLICIES:
            raise InputError(f"solver option on_failure must be one of {FAILURE_POLICIES}, got {self.on_failure!r}")
        if not isinstance(self.warm_start, bool):
            raise InputError(f"solver option warm_start must be True or False, got {self.warm_start!r}")

    @classmethod
    def from_kwargs(cls, **options) -> SolverOptions:
        """``SolverOptions(**options)``, with an :class:`InputError` naming any unknown option."""
        check_names(options)
        return cls(**options)

    def replace(self, **changes) -> SolverOptions:
        check_names(changes)
        return replace(self, **changes)


def check_names(options) -> None:
    """Raise :class:`InputError` for keys of ``options`` that are not solver options."""
    names = [f.name for f in fields(SolverOptions)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        import difflib

        hints = []
        for u in unknown:
            close = difflib.get_close_matches(u, names, n=1)
            hints.append(f"{u!r} (did you mean {close[0]!r}?)" if close else repr(u))
        raise InputError(f"unknown solver option(s) {', '.join(hints)}; the solver options are {names}")


def _check_float(name, value, valid, ok):
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(float(value)) or not ok(float(value))):
        raise InputError(f"solver option {name} must be {valid}, got {value!r}")


def _check_int(name, value, valid, ok):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not ok(int(value)):
        raise InputError(f"solver option {name} must be {valid}, got {value!r}")
