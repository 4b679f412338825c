"""Solver options, shared by every layer kind."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

FAILURE_POLICIES = ("raise", "nan", "keep")
METHODS = ("newton", "trust-region", "anderson", "picard")


@dataclass(frozen=True)
class SolverOptions:
    """How the forward solve runs and what failed samples do.

    tol
        Converged when ``||F(y)||_inf <= tol`` ...
    xtol
        ... and the Newton step satisfies ``||dy||_inf <= xtol (1 + ||y||_inf)``.
    max_iter
        Iteration cap per sample.
    singular_tol
        At a converged point, dF/dy counts as singular (status
        ``SINGULAR_AT_SOLUTION``: no implicit gradient) when its smallest LU pivot is
        below ``singular_tol`` times the largest entry of ``[dF/dy, dF/dtheta]``.
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

    def __post_init__(self):
        if self.on_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_failure must be one of {FAILURE_POLICIES}, got {self.on_failure!r}")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("tol", "xtol", "singular_tol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 0):
            raise ValueError(f"max_iter must be a non-negative int, got {self.max_iter!r}")
        if not (isinstance(self.anderson_memory, int) and 0 <= self.anderson_memory <= 50):
            raise ValueError(f"anderson_memory must be an int in [0, 50], got {self.anderson_memory!r}")

    def replace(self, **changes) -> SolverOptions:
        names = {f.name for f in fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise TypeError(f"unknown solver option(s) {sorted(unknown)}; valid: {sorted(names)}")
        return replace(self, **changes)
