"""Damped Newton for one sample of ``F(y, theta) = 0``.

The generated module passes its own kernels in as first-class functions
(``residual``, ``residual_jacobian``, ``factor``, ``solve``) and its sizes
``n``, ``m`` as compile-time constants; Numba inlines and specialises this
driver for them, and the specialisation is cached with the module.

Iteration, with ``phi(y) = ||F(y)||^2 / 2``::

    factor J(y_k);  d = -J^{-1} F(y_k)
    stop (converged) when ||F||_inf <= ftol and ||d||_inf <= xtol (1 + ||y_k||_inf)
    backtrack t = 1, 1/2, ... until phi(y_k + t d) <= (1 - 2 c t) phi(y_k)
    y_{k+1} = y_k + t d

On convergence the final step is applied, ``y* = y_k + d``, and the
factorisation of ``J(y_k)`` is left in ``J``/``piv`` for the backward pass
(``||y* - y_k|| <= xtol (1 + ||y_k||)``, so the gradient error is of that order).
"""

import numpy as np
from numba import njit

from . import status as st

ARMIJO_C = 1e-4
MIN_STEP = 1e-10


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
    """Status of a converged point: is dF/dy numerically singular there?

    ``min_pivot`` is the smallest |U_kk| of the factorisation at the point. It is
    compared with the scale of the whole Jacobian [dF/dy, dF/dtheta], so the test
    does not change when F is multiplied by a constant.
    """
    scale = max(max_abs_diag(n, J), jpabs)
    if min_pivot <= singular_tol * scale:
        return st.SINGULAR_AT_SOLUTION
    return st.CONVERGED


@njit(cache=True, inline="always")
def factor_checked(n, residual_jacobian, factor, factor_dense, y, p, F, J, piv):
    """Factor J; if the fixed-order sparse elimination rejects a pivot (returns < 0),
    re-evaluate J and fall back to dense LU with partial pivoting."""
    min_pivot = factor(J, piv)
    if min_pivot < 0.0:
        for i in range(n):
            for j in range(n):
                J[i, j] = 0.0
        residual_jacobian(y, p, F, J)
        min_pivot = factor_dense(J, piv)
    return min_pivot


@njit(cache=True, inline="always")
def newton_one(n, m, residual, residual_jacobian, factor, factor_dense, solve, jac_params_absmax,
               y0, p, ftol, xtol, max_iter, singular_tol,
               y, J, piv, F, d, yt, Ft, info):
    """Solve one sample. Writes ``y``, the factorisation in ``J``/``piv``, and
    ``info = (iterations, ||F||_inf)``; returns the status code."""
    info[0] = 0.0
    info[1] = np.inf
    if not all_finite(m, p) or not all_finite(n, y0):
        for i in range(n):
            y[i] = y0[i]
        return st.NONFINITE
    for i in range(n):
        y[i] = y0[i]
    residual_jacobian(y, p, F, J)
    fnorm = inf_norm(n, F)
    info[1] = fnorm
    if not np.isfinite(fnorm):
        return st.NONFINITE
    phi = half_sq_norm(n, F)
    it = 0
    while True:
        min_pivot = factor_checked(n, residual_jacobian, factor, factor_dense, y, p, F, J, piv)
        if not (min_pivot > 0.0):
            if fnorm <= ftol:
                return st.SINGULAR_AT_SOLUTION
            return st.SINGULAR_JACOBIAN
        for i in range(n):
            d[i] = -F[i]
        solve(J, piv, d)
        step = inf_norm(n, d)
        if fnorm <= ftol and step <= xtol * (1.0 + inf_norm(n, y)):
            # Take the final (tiny) Newton step: the returned y is then accurate to
            # O(step^2), while the factorisation kept for the backward pass is the one
            # at y_k, a distance <= xtol away (a relative error of that order in the gradient).
            for i in range(n):
                y[i] += d[i]
            return check_solution(n, min_pivot, J, jac_params_absmax(y, p), singular_tol)
        if it >= max_iter:
            return st.MAX_ITERATIONS
        t = 1.0
        accepted = False
        while t >= MIN_STEP:
            for i in range(n):
                yt[i] = y[i] + t * d[i]
            residual(yt, p, Ft)
            phit = half_sq_norm(n, Ft)
            if phit <= (1.0 - 2.0 * ARMIJO_C * t) * phi:
                accepted = True
                break
            t *= 0.5
        if not accepted:
            if fnorm <= ftol:
                # At the floating-point floor: F cannot be reduced further.
                return check_solution(n, min_pivot, J, jac_params_absmax(y, p), singular_tol)
            return st.LINE_SEARCH_FAILED
        for i in range(n):
            y[i] = yt[i]
        it += 1
        info[0] = it
        residual_jacobian(y, p, F, J)
        fnorm = inf_norm(n, F)
        info[1] = fnorm
        phi = half_sq_norm(n, F)
