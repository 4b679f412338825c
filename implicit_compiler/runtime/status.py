"""Per-sample solver status codes and their user-facing messages.

Kernels write one ``int8`` code per sample; :class:`Status` turns it into a
message that says what happened and what to try.
"""

from __future__ import annotations

import enum

import numpy as np

CONVERGED = 0
MAX_ITERATIONS = 1
SINGULAR_JACOBIAN = 2
NONFINITE = 3
LINE_SEARCH_FAILED = 4
SINGULAR_AT_SOLUTION = 5
INFEASIBLE = 6
UNBOUNDED = 7
NOT_OPTIMAL = 8
NOT_A_MINIMUM = 9
# ODE layers (implicit_compiler.runtime.ode)
ODE_MAX_STEPS = 10
ODE_STEP_UNDERFLOW = 11
ODE_NEWTON_FAILED = 12
ODE_NONFINITE_STATE = 13


class Status(enum.IntEnum):
    """Outcome of one sample's solve. ``CONVERGED`` is the only success."""

    CONVERGED = CONVERGED
    MAX_ITERATIONS = MAX_ITERATIONS
    SINGULAR_JACOBIAN = SINGULAR_JACOBIAN
    NONFINITE = NONFINITE
    LINE_SEARCH_FAILED = LINE_SEARCH_FAILED
    SINGULAR_AT_SOLUTION = SINGULAR_AT_SOLUTION
    INFEASIBLE = INFEASIBLE
    UNBOUNDED = UNBOUNDED
    NOT_OPTIMAL = NOT_OPTIMAL
    NOT_A_MINIMUM = NOT_A_MINIMUM
    ODE_MAX_STEPS = ODE_MAX_STEPS
    ODE_STEP_UNDERFLOW = ODE_STEP_UNDERFLOW
    ODE_NEWTON_FAILED = ODE_NEWTON_FAILED
    ODE_NONFINITE_STATE = ODE_NONFINITE_STATE

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.CONVERGED: "converged",
    Status.MAX_ITERATIONS: (
        "reached the iteration cap without meeting the tolerance; raise max_iter, "
        "loosen tol, or give a better initial guess y0"
    ),
    Status.SINGULAR_JACOBIAN: (
        "dF/dy became singular at an iterate, so Newton cannot take a step; "
        "try another initial guess y0"
    ),
    Status.NONFINITE: (
        "NaN or inf: either a parameter or the initial guess of this sample is NaN or inf, "
        "or, with finite inputs, the residual or dF/dy evaluated to NaN or inf at the initial "
        "guess, at an iterate or at every trial step (overflow, or a domain error such as the "
        "log of a negative number or a division by zero); check the inputs, or start nearer "
        "the solution"
    ),
    Status.LINE_SEARCH_FAILED: (
        "the line search could not reduce ||F||^2 (a local minimum of the residual "
        "norm that is not a root: the system may have no solution here; for an "
        "optimization problem, no KKT point is reachable, e.g. an unbounded objective)"
    ),
    Status.SINGULAR_AT_SOLUTION: (
        "the residual vanishes here but dF/dy is singular or numerically singular (its "
        "equilibrated condition number exceeds 1/singular_tol, or Newton converged only "
        "linearly, as at a double root), so the root is degenerate and the implicit gradient "
        "dy/dtheta does not exist or is not determined; if the solution is much smaller than 1 "
        "in magnitude, start from a y0 of its magnitude (the step test is absolute below |y0|)"
    ),
    Status.INFEASIBLE: "the constraints could not be satisfied (the problem looks infeasible)",
    Status.UNBOUNDED: "the objective decreased without bound (the problem looks unbounded)",
    Status.NOT_OPTIMAL: (
        "the point returned by the custom forward does not satisfy the KKT conditions "
        "(stationarity or feasibility residual above tolerance); check that it solves the problem"
    ),
    Status.NOT_A_MINIMUM: (
        "the point satisfies the KKT conditions but is not a minimum (a maximum or a saddle "
        "point): the Hessian of the Lagrangian has a direction of negative curvature along the "
        "active constraints (for maximize=True: of positive curvature), so the second-order "
        "condition fails; the objective may have no minimum here (add bounds), or start from "
        "another initial guess y0 (for a custom forward: check that it returns a minimiser)"
    ),
    Status.ODE_MAX_STEPS: (
        "the integrator took max_steps steps (accepted and rejected) before reaching the last output "
        "time; raise max_steps, loosen rtol/atol, or use a stiff method (radau5, esdirk) if the "
        "problem is stiff"
    ),
    Status.ODE_STEP_UNDERFLOW: (
        "the step size fell below the resolution of the time variable (10 machine epsilons of |t|): "
        "the solution may blow up in finite time, or be non-finite or discontinuous here; check the "
        "parameters and the initial state"
    ),
    Status.ODE_NEWTON_FAILED: (
        "the fixed-step method's stage equations could not be solved (simplified and then full Newton "
        "failed to converge): use a smaller dt or an adaptive method"
    ),
    Status.ODE_NONFINITE_STATE: (
        "NaN or inf: the initial state or a parameter of this sample is not finite, or (fixed step) "
        "the state or the right-hand side became non-finite during the integration"
    ),
}


def summarize(status: np.ndarray, limit: int = 10) -> str:
    """One paragraph naming how many samples failed, which, and why."""
    status = np.asarray(status).reshape(-1)
    bad = np.flatnonzero(status != CONVERGED)
    lines = [f"{bad.size} of {status.size} samples did not converge."]
    for code in np.unique(status[bad]):
        idx = np.flatnonzero(status == code)
        shown = ", ".join(str(i) for i in idx[:limit])
        more = f" and {idx.size - limit} more" if idx.size > limit else ""
        lines.append(f"  samples [{shown}{more}]: {Status(int(code)).name}: {Status(int(code)).message}")
    return "\n".join(lines)
