"""Damped Newton for one sample of ``F(y, theta) = 0``.

The generated module passes its own kernels in as first-class functions
(``residual``, ``residual_jacobian``, ``residual_scale``, ``factor``, ``solve``, ...)
and its sizes ``n``, ``m`` as compile-time constants; Numba inlines and specialises
this driver for them, and the specialisation is cached with the module.

Iteration, with ``||.||`` the max norm unless marked::

    factor J(y_k) = dF/dy;  d = -J^{-1} F(y_k)
    converged when  ||d|| <= xtol (s0 + ||y_k||)                       (step test)
               and  |F_i| <= max(ftol, rtol * S_i)  for every i          (residual test)
        where S_i = sum_j |dF_i/dy_j| |y_j| (residual_scale: how much F_i moves under
        a relative change of y) and s0 = min(1, ||y0||) (1 when y0 = 0)
    backtrack t = 1, 1/2, ... until ||F(y_k + t d)||_2^2 <= (1 - 2 c t) ||F(y_k)||_2^2
    y_{k+1} = y_k + t d

The full step's trial evaluates F and J together (``residual_jacobian``): when it is accepted,
as it is near a root, the next iterate's F and J are already there (one evaluation per
iteration); a damped step's trials evaluate F only, and J is evaluated once accepted.

On convergence the final step is applied, ``y* = y_k + d``, and F and J are
evaluated and factored once more at ``y*``: that factorisation is kept in ``J``/``piv``
for the backward pass, and :func:`solution_status` classifies the point.

``y*`` is reported ``SINGULAR_AT_SOLUTION`` (a degenerate root: dy/dtheta does not
exist or is not determined) when

* a pivot of J(y*) is exactly zero, or the reciprocal condition number of the
  row- and column-equilibrated J(y*) is below ``singular_tol`` (invariant under
  scaling any residual or any unknown);
* the iteration converged linearly: the last step is more than ``LINEAR_RATE`` times
  the one before (Newton's steps shrink quadratically at a regular root, by half per
  step at a double root and by 2/3 at a triple root); or the last step is exactly zero
  (F underflowed to 0.0, as ``E - sin E`` does near its triple root ``E = 0``) after at
  least ``LINEAR_STEPS`` full Newton steps in a row that each shrank linearly;
* the residual meets its test but the line search cannot reduce it any further
  while the Newton step is still above the step tolerance (F is zero to rounding,
  yet y is not determined to xtol: the root is degenerate or too ill-conditioned).
"""

import numpy as np
from numba import njit

from . import status as st
from .linalg import equilibrate_jacobian, inv_norm1

ARMIJO_C = 1e-4
MIN_STEP = 1e-10
# Converged steps shrinking by more than this factor per step count as linear convergence
# (a double root halves the step; a regular root squares it).
LINEAR_RATE = 0.25
# A zero final step after this many full steps in a row that shrank linearly is a degenerate
# root whose residual rounded to exactly zero, not a regular root reached to rounding (there
# the last steps before F = 0 shrink quadratically).
LINEAR_STEPS = 3


@njit(cache=True, inline="always")
def nan_max(m, a):
    """``max(m, a)`` where a NaN in either argument wins."""
    return a if (a > m or a != a) else m


@njit(cache=True, inline="always")
def inf_norm(n, v):
    """``max_i |v_i|``; NaN if any entry is NaN."""
    m = 0.0
    for i in range(n):
        m = nan_max(m, abs(v[i]))
    return m


@njit(cache=True, inline="always")
def all_finite(n, v):
    for i in range(n):
        if not np.isfinite(v[i]):
            return False
    return True


@njit(cache=True, inline="always")
def half_sq_norm(n, v):
    s = 0.0
    for i in range(n):
        s += v[i] * v[i]
    return 0.5 * s


@njit(cache=True, inline="always")
def max_abs_diag(n, A):
    m = 0.0
    for i in range(n):
        a = abs(A[i, i])
        if a > m:
            m = a
    return m


@njit(cache=True, inline="always")
def check_solution(n, min_pivot, J, jpabs, singular_tol):
    """Pivot-based classification kept for the KKT factorisation of the interior-point
    solver (``runtime.interior_point.kkt_factor``): the smallest |U_kk| against the scale
    of the whole Jacobian [dF/dy, dF/dtheta]. Residual systems use :func:`solution_status`."""
    scale = max(max_abs_diag(n, J), jpabs)
    if min_pivot <= singular_tol * scale:
        return st.SINGULAR_AT_SOLUTION
    return st.CONVERGED


# Sums of squares in this range lost nothing to overflow, nor more than 1e-28 of their value
# to underflow: their square root is the Euclidean norm without the scaling.
NORM2_SAFE_LO = 1e-280
NORM2_SAFE_HI = 1e280


@njit(cache=True, inline="always")
def norm2(n, v):
    """Euclidean norm without overflow or underflow: ``sqrt(sum v_i^2)`` when that sum is in
    ``[NORM2_SAFE_LO, NORM2_SAFE_HI]``, else scaled by the largest entry (no divisions in
    the common case)."""
    s = 0.0
    for i in range(n):
        s += v[i] * v[i]
    if s >= NORM2_SAFE_LO and s <= NORM2_SAFE_HI:
        return np.sqrt(s)
    m = inf_norm(n, v)
    if not (m > 0.0 and m < np.inf):
        return m
    s = 0.0
    for i in range(n):
        t = v[i] / m
        s += t * t
    return m * np.sqrt(s)


@njit(cache=True, inline="always")
def step_floor(n, y0):
    """``s0`` of the step test: ``min(1, ||y0||_inf)``, or 1 when ``y0 = 0``."""
    m = inf_norm(n, y0)
    if m > 0.0 and m < 1.0:
        return m
    return 1.0


@njit(cache=True, inline="always")
def residual_ok(n, F, S, ftol, rtol):
    """``|F_i| <= max(ftol, rtol * S_i)`` for every i (S: the residual scale)."""
    for i in range(n):
        a = abs(F[i])
        if not (a <= ftol or a <= rtol * S[i]):
            return False
    return True


@njit(cache=True, inline="always")
def linear_run(nlin, full, step, prev):
    """Full Newton steps in a row that shrank linearly, after one more accepted step of
    length ``step``: ``full`` when it and the step before (of length ``prev``) were both
    full Newton steps (no damping, not cut by a trust region)."""
    if full and prev > 0.0 and step > LINEAR_RATE * prev:
        return nlin + 1
    return 0


@njit(cache=True, inline="always")
def converged_linearly(step, prev, nlin):
    """Whether a converged iteration reached its point linearly (a degenerate root): the
    final Newton step is more than ``LINEAR_RATE`` times the step before, or it is exactly
    zero after ``nlin >= LINEAR_STEPS`` linearly shrinking full steps."""
    if prev > 0.0 and step > LINEAR_RATE * prev:
        return True
    return step == 0.0 and nlin >= LINEAR_STEPS


@njit(cache=True, inline="always")
def factor_checked(n, residual_jacobian, factor, factor_dense, y, p, F, J, piv, tab):
    """Factor J; if the fixed-order sparse elimination rejects a pivot (returns < 0),
    re-evaluate J and fall back to dense LU with partial pivoting."""
    min_pivot = factor(J, piv, tab)
    if min_pivot < 0.0:
        for i in range(n):
            for j in range(n):
                J[i, j] = 0.0
        residual_jacobian(y, p, F, J, tab)
        min_pivot = factor_dense(J, piv, tab)
    return min_pivot


@njit(cache=True, inline="always")
def reevaluate(n, residual_jacobian, y, p, F, J, piv, tab):
    """F and J at ``y``. After a dense factorisation (``piv[n] == 1``) J is zeroed first:
    a sparse module writes only its fill positions, and the scans of
    :func:`solution_status` read all of J."""
    if piv[n] == 1:
        for i in range(n):
            for j in range(n):
                J[i, j] = 0.0
    residual_jacobian(y, p, F, J, tab)


@njit(cache=True, inline="always")
def solution_status(n, residual_jacobian, factor, factor_dense, solve, solve_transpose,
                    y, p, F, J, piv, singular_tol, rmax, cmax, x, z, tab):
    """Classify the point ``y`` where F and J (unfactored) have just been evaluated;
    leaves the factorisation of J in ``J``/``piv``.

    ``NONFINITE`` if J has a NaN or inf entry; ``SINGULAR_AT_SOLUTION`` if a pivot is
    zero or ``1 / (||Ae||_1 ||Ae^{-1}||_1) < singular_tol`` for the equilibrated ``Ae``
    (see :func:`implicit_compiler.runtime.linalg.equilibrate`); else ``CONVERGED``."""
    anorm = equilibrate_jacobian(n, J, rmax, cmax, tab)
    if anorm < 0.0:
        return st.NONFINITE
    min_pivot = factor_checked(n, residual_jacobian, factor, factor_dense, y, p, F, J, piv, tab)
    if not (min_pivot > 0.0):
        return st.SINGULAR_AT_SOLUTION
    est = inv_norm1(n, solve, solve_transpose, J, piv, rmax, cmax, x, z, tab)
    if not (anorm * est * singular_tol <= 1.0):
        return st.SINGULAR_AT_SOLUTION
    return st.CONVERGED


@njit(cache=True, inline="always")
def newton_one(n, m, residual, residual_jacobian, residual_scale, factor, factor_dense, solve,
               solve_transpose, y0, p, ftol, rtol, xtol, max_iter, singular_tol,
               y, J, piv, F, d, yt, Ft, W, info, tab):
    """Solve one sample. Writes ``y``, the factorisation of J(y) in ``J``/``piv``, and
    ``info = (iterations, ||F(y)||_inf)``; returns the status code. ``W``: (3, n) scratch."""
    info[0] = 0.0
    info[1] = np.inf
    for i in range(n):
        y[i] = y0[i]
    if not all_finite(m, p) or not all_finite(n, y0):
        return st.NONFINITE
    S = W[0]
    s0 = step_floor(n, y0)
    residual_jacobian(y, p, F, J, tab)
    fnorm = inf_norm(n, F)
    info[1] = fnorm
    if not np.isfinite(fnorm):
        return st.NONFINITE
    fn2 = norm2(n, F)
    it = 0
    prev = 0.0  # length of the last step taken
    prev_full = False  # whether it was the full Newton step
    nlin = 0  # full steps in a row that shrank linearly (linear_run)
    while True:
        min_pivot = factor_checked(n, residual_jacobian, factor, factor_dense, y, p, F, J, piv, tab)
        if not (min_pivot > 0.0):
            if fnorm <= ftol:
                return st.SINGULAR_AT_SOLUTION
            residual_scale(y, p, S, tab)
            if residual_ok(n, F, S, ftol, rtol):
                return st.SINGULAR_AT_SOLUTION
            return st.SINGULAR_JACOBIAN
        for i in range(n):
            d[i] = -F[i]
        solve(J, piv, d, tab)
        step = inf_norm(n, d)
        xs = xtol * (s0 + inf_norm(n, y))
        res_ok = fnorm <= ftol
        if step <= xs and not res_ok:
            residual_scale(y, p, S, tab)
            res_ok = residual_ok(n, F, S, ftol, rtol)
        if step <= xs and res_ok:
            linear = converged_linearly(step, prev, nlin)
            # Take the final (tiny) Newton step: the returned y is then accurate to
            # O(step^2); F and J are evaluated and factored again there.
            for i in range(n):
                y[i] += d[i]
            reevaluate(n, residual_jacobian, y, p, F, J, piv, tab)
            info[1] = inf_norm(n, F)
            if not np.isfinite(info[1]):
                return st.NONFINITE
            status = solution_status(n, residual_jacobian, factor, factor_dense, solve, solve_transpose,
                                     y, p, F, J, piv, singular_tol, W[1], W[2], yt, Ft, tab)
            if status == st.CONVERGED and linear:
                return st.SINGULAR_AT_SOLUTION
            return status
        if it >= max_iter:
            return st.MAX_ITERATIONS
        t = 1.0
        accepted = False
        finite_trial = False
        while t >= MIN_STEP:
            for i in range(n):
                yt[i] = y[i] + t * d[i]
            if t == 1.0:
                # The full step is the one accepted nearly always: evaluate dF/dy there with F,
                # so that an accepted full step needs no evaluation at the new iterate. (J's
                # factors at y are not needed any more: d is computed.)
                residual_jacobian(yt, p, Ft, J, tab)
            else:
                residual(yt, p, Ft, tab)
            ft2 = norm2(n, Ft)
            if ft2 <= np.sqrt(1.0 - 2.0 * ARMIJO_C * t) * fn2:  # NaN/inf trial: rejected
                accepted = True
                break
            if ft2 < np.inf:
                finite_trial = True
            t *= 0.5
        if not accepted:
            if not finite_trial:
                return st.NONFINITE  # F overflowed (or NaN) at every trial point
            if not res_ok:
                residual_scale(y, p, S, tab)
                res_ok = residual_ok(n, F, S, ftol, rtol)
            if res_ok:
                # F is zero to rounding but the Newton step is not small: the root is
                # not determined to xtol (degenerate, or too ill-conditioned).
                return st.SINGULAR_AT_SOLUTION
            return st.LINE_SEARCH_FAILED
        nlin = linear_run(nlin, t == 1.0 and prev_full, step, prev)
        prev_full = t == 1.0
        prev = t * step
        for i in range(n):
            y[i] = yt[i]
        it += 1
        info[0] = it
        if t == 1.0:
            # F and J at y were evaluated by the trial (F finite: it was accepted)
            for i in range(n):
                F[i] = Ft[i]
            fn2 = ft2
        else:
            residual_jacobian(y, p, F, J, tab)
            fn2 = norm2(n, F)
        fnorm = inf_norm(n, F)
        info[1] = fnorm
        if not np.isfinite(fnorm):
            return st.NONFINITE
