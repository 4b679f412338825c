"""Trust-region Newton (Powell's dogleg with diagonal scaling) for one sample of ``F(y, theta) = 0``.

The globalisation of MINPACK's ``hybrj`` (More, Garbow, Hillstrom, "User guide for
MINPACK-1", 1980), with the exact Jacobian evaluated at every accepted iterate
instead of Broyden updates. With ``phi(y) = ||F(y)||_2^2`` and the linear model
``m(s) = ||F + J s||_2^2``, each trial step ``s`` solves the model approximately
inside the scaled trust region ``||D s||_2 <= delta``::

    Newton step      d = -J^{-1} F                      (taken if ||D d|| <= delta)
    Cauchy point     the minimiser of m along the scaled steepest-descent
                     direction -D^{-2} J^T F, cut at the boundary
    dogleg           otherwise the point where the segment Cauchy -> Newton
                     leaves the region

``D`` holds the column norms of ``J(y_0)`` (1 for a zero column) and is then
updated as ``D_j <- max(D_j, ||J(y_k)[:, j]||)``; ``delta_0 = 100 ||D y_0||``
(100 if that is 0), cut to the first step's length. After each trial, with
``rho`` = actual / predicted reduction of ``||F||^2``: ``rho < 0.1`` halves
``delta``; ``rho >= 0.5`` (or two successes in a row) sets ``delta >= 2 ||D s||``,
and ``|rho - 1| <= 0.1`` sets ``delta = 2 ||D s||``. The step is accepted when
``rho >= 1e-4``. A singular (or numerically useless) Jacobian at an iterate still
gives the Cauchy step.

Stopping, as :func:`implicit_compiler.runtime.newton.newton_one`: converged when every
``|F_i| <= max(ftol, rtol S_i)`` and the Newton step ``||d||_inf <= xtol (s0 + ||y||_inf)``;
the final Newton step is applied, F and dF/dy are evaluated and factored again there (the
factorisation the backward pass reuses), and the point is classified by
:func:`~implicit_compiler.runtime.newton.solution_status` (equilibrated condition test).
Every trial step (accepted or not: each one evaluates ``F`` once) counts as an iteration
against ``max_iter``. The iteration stalls (status ``LINE_SEARCH_FAILED``, a local minimum
of ``||F||`` that is not a root) after ``TR_MAX_SLOW`` trials in a row that reduce
``||F||^2`` by less than 0.1 % (a step cut by the region and accepted with ``rho >= 0.5``
does not count: the region grows then), or when the trust region has shrunk below rounding
relative to ``||D y||``; a stall where the residual test holds but the Newton step is not
below ``xtol`` is ``SINGULAR_AT_SOLUTION`` (the root is not determined to ``xtol``), as in Newton.
"""

import numpy as np
from numba import njit

from . import status as st
from .linalg import copy_jacobian, pattern_column_norms, pattern_matvec_add, pattern_rmatvec
from .newton import (
    all_finite,
    converged_linearly,
    factor_checked,
    inf_norm,
    linear_run,
    reevaluate,
    residual_ok,
    solution_status,
    step_floor,
)

TR_FACTOR = 100.0  # initial trust radius, relative to ||D y0|| (hybrj's ``factor``)
TR_ACCEPT = 1e-4  # accept a step when actual / predicted reduction >= this
TR_MAX_SLOW = 10  # trials in a row reducing ||F||^2 by < 0.1 % before giving up
TR_EPS = 2.220446049250313e-16


@njit(cache=True, inline="always")
def tr_norm2(n, v):
    """``||v||_2`` without overflow or underflow of the squares; NaN if an entry is NaN."""
    vmax = inf_norm(n, v)
    if vmax == 0.0 or not np.isfinite(vmax):
        return vmax
    s = 0.0
    for i in range(n):
        t = v[i] / vmax
        s += t * t
    return vmax * np.sqrt(s)


@njit(cache=True, inline="always")
def tr_scaled_norm2(n, diag, v, w):
    """``||D v||_2`` (``w`` is scratch)."""
    for i in range(n):
        w[i] = diag[i] * v[i]
    return tr_norm2(n, w)


@njit(cache=True, inline="always")
def tr_column_norm(n, J, j):
    cmax = 0.0
    for i in range(n):
        a = abs(J[i, j])
        if a > cmax:
            cmax = a
    if cmax == 0.0:
        return 0.0
    s = 0.0
    for i in range(n):
        t = J[i, j] / cmax
        s += t * t
    return cmax * np.sqrt(s)


@njit(cache=True, inline="always")
def tr_update_scaling(n, J, diag, first, tab):
    """``D_j = ||J[:, j]||_2`` (1 for a zero column) on the first call, then ``max`` with it.
    (``J``: a plain (n, n) matrix, or pattern values, see ``runtime.linalg``.)"""
    pattern = J.shape[0] != n
    norms = np.empty(n if pattern else 0)
    if pattern:
        pattern_column_norms(n, J, norms, tab)
    for j in range(n):
        c = norms[j] if pattern else tr_column_norm(n, J, j)
        if first:
            diag[j] = c if c > 0.0 else 1.0
        elif c > diag[j]:
            diag[j] = c


@njit(cache=True, inline="always")
def tr_model_residual(n, J, F, s, w, tab):
    """``w = F + J s``; returns ``||w||_2``."""
    if J.shape[0] != n:
        for i in range(n):
            w[i] = F[i]
        pattern_matvec_add(n, J, s, w, tab)
        return tr_norm2(n, w)
    for i in range(n):
        acc = F[i]
        for j in range(n):
            acc += J[i, j] * s[j]
        w[i] = acc
    return tr_norm2(n, w)


@njit(cache=True, inline="always")
def tr_gradient_direction(n, J, F, diag, u, w, tab):
    """Scaled steepest ascent of ``||F||^2 / 2``: ``u = D^{-1} (D^{-1} g) / ||D^{-1} g||`` with
    ``g = J^T F`` (so ``||D u|| = 1``). Returns ``(gnorm, sgnorm)``: ``||D^{-1} g||`` and the
    scaled length of the step to the minimiser of ``||F + t J (-u)||`` (0, 0 when g = 0)."""
    pattern = J.shape[0] != n
    if pattern:
        pattern_rmatvec(n, J, F, u, tab)
        for j in range(n):
            u[j] = u[j] / diag[j]
    else:
        for j in range(n):
            acc = 0.0
            for i in range(n):
                acc += J[i, j] * F[i]
            u[j] = acc / diag[j]
    gnorm = tr_norm2(n, u)
    if not (gnorm > 0.0) or not np.isfinite(gnorm):
        return 0.0, 0.0
    for j in range(n):
        u[j] = (u[j] / gnorm) / diag[j]
    if pattern:
        for i in range(n):
            w[i] = 0.0
        pattern_matvec_add(n, J, u, w, tab)
    else:
        for i in range(n):
            acc = 0.0
            for j in range(n):
                acc += J[i, j] * u[j]
            w[i] = acc
    ju = tr_norm2(n, w)
    if not (ju > 0.0) or not np.isfinite(ju):
        return 0.0, 0.0
    return gnorm, (gnorm / ju) / ju


@njit(cache=True, inline="always")
def tr_dogleg(n, have_newton, d, qnorm, u, gnorm, sgnorm, bnorm, delta, s):
    """The dogleg step ``s`` for trust radius ``delta`` (MINPACK ``dogleg``, in the
    scaled norm): ``d`` is the Newton step with ``qnorm = ||D d||``, ``u`` the unit
    scaled ascent direction, ``bnorm = ||F||_2``."""
    if have_newton and qnorm <= delta:
        for i in range(n):
            s[i] = d[i]
        return
    if not have_newton:
        t = min(sgnorm, delta)
        for i in range(n):
            s[i] = -t * u[i]
        return
    if gnorm == 0.0:
        a = delta / qnorm
        for i in range(n):
            s[i] = a * d[i]
        return
    alpha = 0.0
    if sgnorm < delta:
        dq = delta / qnorm
        sd = sgnorm / delta
        temp = (bnorm / gnorm) * (bnorm / qnorm) * sd
        temp = temp - dq * sd * sd + np.sqrt((temp - dq) ** 2 + (1.0 - dq * dq) * (1.0 - sd * sd))
        alpha = dq * (1.0 - sd * sd) / temp
    t = (1.0 - alpha) * min(sgnorm, delta)
    for i in range(n):
        s[i] = -t * u[i] + alpha * d[i]


@njit(cache=True, inline="always")
def trust_region_one(n, m, residual, residual_jacobian, residual_scale, factor, factor_dense, solve,
                     solve_transpose, y0, p, ftol, rtol, xtol, max_iter, singular_tol,
                     y, J, piv, Jc, F, V, W, info, tab):
    """Solve one sample. Writes ``y``, the factorisation in ``J``/``piv``, and
    ``info = (iterations, ||F||_inf)``; returns the status code.

    ``Jc`` holds dF/dy unfactored (for the gradient, the model and the scaling);
    it must be zero outside the positions ``residual_jacobian`` writes. ``V``: (7, n) and ``W``:
    (3, n) scratch.
    The convergence tests, the final step and the classification of the point are
    newton_one's (:func:`~implicit_compiler.runtime.newton.residual_ok`,
    :func:`~implicit_compiler.runtime.newton.solution_status`).
    """
    d, u, s, yt, Ft, w, diag = V[0], V[1], V[2], V[3], V[4], V[5], V[6]
    info[0] = 0.0
    info[1] = np.inf
    for i in range(n):
        y[i] = y0[i]
    if not all_finite(m, p) or not all_finite(n, y0):
        return st.NONFINITE
    S = W[0]
    s0 = step_floor(n, y0)
    residual_jacobian(y, p, F, Jc, tab)
    fnorm = inf_norm(n, F)
    info[1] = fnorm
    if not np.isfinite(fnorm):
        return st.NONFINITE
    tr_update_scaling(n, Jc, diag, True, tab)
    delta = TR_FACTOR * tr_scaled_norm2(n, diag, y, w)
    if delta == 0.0 or not np.isfinite(delta):
        delta = TR_FACTOR
    it = 0
    nslow = 0  # trials in a row with a relative reduction of ||F||^2 below 1e-3
    ncsuc = 0  # successful trials in a row
    first = True  # no step accepted yet: each trial caps delta at its length
    min_pivot = 0.0
    have_newton = False
    qnorm = 0.0
    gnorm = 0.0
    sgnorm = 0.0
    bnorm = 0.0
    need_factor = True
    prev = 0.0  # length of the last accepted step if it was the full Newton step, else 0
    nlin = 0  # full Newton steps in a row that shrank linearly (newton.linear_run)
    full = False
    while True:
        if need_factor:
            need_factor = False
            copy_jacobian(n, Jc, J, tab)
            min_pivot = factor_checked(n, residual_jacobian, factor, factor_dense, y, p, F, J, piv, tab)
            have_newton = min_pivot > 0.0
            if not have_newton:
                if fnorm <= ftol:
                    return st.SINGULAR_AT_SOLUTION
                residual_scale(y, p, S, tab)
                if residual_ok(n, F, S, ftol, rtol):
                    return st.SINGULAR_AT_SOLUTION
            if have_newton:
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
                    # As newton_one: take the final Newton step, evaluate and factor
                    # dF/dy there again, and classify the point; Newton steps that shrank
                    # only linearly mean a degenerate root (see newton.LINEAR_RATE).
                    linear = converged_linearly(step, prev, nlin)
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
                qnorm = tr_scaled_norm2(n, diag, d, w)
                # A pivot that is positive but tiny can give an overflowing step: use Cauchy then.
                have_newton = np.isfinite(qnorm) and qnorm > 0.0
            bnorm = tr_norm2(n, F)
            gnorm, sgnorm = tr_gradient_direction(n, Jc, F, diag, u, w, tab)
            if not have_newton and gnorm == 0.0:
                # dF/dy singular and J^T F = 0: no descent direction for ||F||^2.
                return st.SINGULAR_JACOBIAN
        if it >= max_iter:
            return st.MAX_ITERATIONS
        if nslow >= TR_MAX_SLOW:
            break
        full = have_newton and qnorm <= delta  # the dogleg takes the whole Newton step
        tr_dogleg(n, have_newton, d, qnorm, u, gnorm, sgnorm, bnorm, delta, s)
        pnorm = tr_scaled_norm2(n, diag, s, w)
        for i in range(n):
            yt[i] = y[i] + s[i]
        residual(yt, p, Ft, tab)
        it += 1
        info[0] = it
        fnorm1 = tr_norm2(n, Ft)  # NaN or inf: rejected below, the region shrinks
        if fnorm1 < bnorm:
            actred = 1.0 - (fnorm1 / bnorm) ** 2
        else:
            actred = -1.0
        prered = 0.0
        if bnorm > 0.0:
            mnorm = tr_model_residual(n, Jc, F, s, w, tab)
            if mnorm < bnorm:
                prered = 1.0 - (mnorm / bnorm) ** 2
        ratio = actred / prered if prered > 0.0 else 0.0
        if first:
            delta = min(delta, pnorm)
        # An accepted step that the region cut (the region then grows) is progress even
        # when it reduces ||F||^2 by little: far from a root the model is good but short.
        boundary = pnorm >= 0.99 * delta
        if ratio < 0.1:
            ncsuc = 0
            delta = 0.5 * delta
        else:
            ncsuc += 1
            if ratio >= 0.5 or ncsuc > 1:
                delta = max(delta, pnorm / 0.5)
            if abs(ratio - 1.0) <= 0.1:
                delta = pnorm / 0.5
        if actred >= 1e-3 or (boundary and ratio >= 0.5):
            nslow = 0
        else:
            nslow += 1
        if ratio >= TR_ACCEPT and all_finite(n, Ft):
            first = False
            snorm = inf_norm(n, s)
            nlin = linear_run(nlin, full, snorm, prev)
            prev = snorm if full else 0.0
            for i in range(n):
                y[i] = yt[i]
            residual_jacobian(y, p, F, Jc, tab)
            fnorm = inf_norm(n, F)
            info[1] = fnorm
            tr_update_scaling(n, Jc, diag, False, tab)
            need_factor = True
        elif 0.1 * max(0.1 * delta, pnorm) <= TR_EPS * tr_scaled_norm2(n, diag, y, w):
            break
    # Stalled: no trial step reduces ||F||^2 any more.
    res_ok = fnorm <= ftol
    if not res_ok:
        residual_scale(y, p, S, tab)
        res_ok = residual_ok(n, F, S, ftol, rtol)
    if res_ok:
        # As newton_one: F is zero to rounding but the Newton step is not below xtol, so
        # the root is not determined to xtol (degenerate, or too ill-conditioned).
        return st.SINGULAR_AT_SOLUTION
    return st.LINE_SEARCH_FAILED
