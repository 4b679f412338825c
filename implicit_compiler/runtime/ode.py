"""Batched Runge-Kutta integration of ``dx/dt = f(t, x, theta)`` and its exact discrete adjoint.

The system's generated module supplies ``f`` as the kernel ``residual(x, p, F, tab)`` and
``df/dx`` as ``residual_jacobian(x, p, F, J, tab)``, with ``p[0] = t`` and ``p[1:] = theta``;
``vjp_params(x, p, v, need, out, tab)`` gives ``out = -(df/dp)^T v``. The drivers below take
them as first-class functions (as :mod:`.drivers` does), so they are compiled once per
installation, never per system.

One step of an ``s``-stage method with stage values ``X_i = x_n + Z_i`` solves::

    G_i(Z) = Z_i - h sum_j a_ij f(t_n + c_j h, x_n + Z_j) = 0,      x_{n+1} = x_n + Z_s

(every tableau here is stiffly accurate, see :mod:`.ode_tableaus`). Implicit methods solve it by
simplified Newton with the iteration matrix ``I - h A (x) J``, ``J = df/dx`` at some earlier point,
factored once and reused across Newton iterations and across steps while Newton converges fast
(the Jacobian is re-evaluated when the convergence rate exceeds 1e-3, the factorisation when ``h``
changes); a step whose Newton iteration fails is retried with a fresh Jacobian, then with half
the step. Fixed-step methods that still fail switch to full Newton (the exact stage Jacobian).

Each sample has its own step sizes. Adaptive methods estimate the local error with their
embedded formula, measure it in the RMS norm with weights ``atol + rtol max(|x_n|, |x_{n+1}|)``,
reject steps with error above 1 and choose the next step with a PI controller. They step
exactly onto every ``t_eval`` point (a step that would pass one is shortened to end on it), so
the outputs are the integrator's own states, not interpolants.

Adjoint (per accepted step, in reverse): with the stage Jacobian
``M_ij = delta_ij I - h a_ij J(X_j)`` at the stored stage values, ``x_{n+1} = X_s`` and the
implicit function theorem give, for the cotangent ``lam`` of ``x_{n+1}``::

    M^T w = e_s (x) lam,     xbar_n = sum_i w_i,     thetabar += sum_j (df/dtheta (X_j))^T (h sum_i a_ij w_i)

with the step sizes held constant. It is the exact derivative of the computed trajectory up
to the stage-solve tolerance.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types

from . import signatures as sg
from .drivers import Drivers
from .linalg import lu_factor, lu_solve, lu_solve_transpose
from .status import ODE_MAX_STEPS, ODE_NEWTON_FAILED, ODE_NONFINITE_STATE, ODE_STEP_UNDERFLOW

# row layout of the step store: t_n, h_n, output index reached at the end of the step (or -1),
# then the s stage values X_1..X_s (n each); x_n is X_1 - Z_1 and is not needed. With
# checkpointing every K steps a row holds the head and how the stages were solved
# (CKPT_HEAD: + 1 if df/dx was evaluated at x_n, + 2 if by full Newton), and CKPT[b, k // K] what
# the forward had at the start of every K-th step (see _store_checkpoint): 2n + sn + 4 numbers.
STORE_HEAD = 3
CKPT_HEAD = 4

# integer options (IOPT) and float options (FOPT)
I_ADAPTIVE, I_IMPLICIT, I_ERR_KIND, I_ERR_ROW, I_MAX_STEPS, I_STORE, I_CHECKPOINT = range(7)
F_RTOL, F_ATOL, F_H0, F_DT, F_EXPONENT, F_HMAX = range(6)

_SAFETY = 0.9
_FAC_MIN = 0.2
_FAC_MAX = 10.0
_NEWTON_MAXITER = 6
_FULL_NEWTON_MAXITER = 40
_EPS = 2.220446049250313e-16


@njit(cache=True, error_model="numpy", inline="always")
def _rms(v, sc, n):
    acc = 0.0
    for i in range(n):
        q = v[i] / sc[i]
        acc += q * q
    return math.sqrt(acc / n)


@njit(cache=True, error_model="numpy")
def _iteration_matrix(M, J, A, h, n, s, full, JS):
    """``M = I - h A (x) J`` (one J for every stage), or with ``full`` ``J(X_j)`` per stage (JS)."""
    for i in range(s):
        for j in range(s):
            a = h * A[i, j]
            for r in range(n):
                for q in range(n):
                    if full:
                        v = -a * JS[j, r, q]
                    else:
                        v = -a * J[r, q]
                    if i == j and r == q:
                        v += 1.0
                    M[i * n + r, j * n + q] = v


@njit(cache=True, error_model="numpy")
def _stage_values(residual, t, h, x, p, A, cc, Z, X, K, n, s, tab):
    """``X_j = x + Z_j`` and ``K_j = f(t + c_j h, X_j)``; False when a K is not finite."""
    for j in range(s):
        for i in range(n):
            X[j, i] = x[i] + Z[j, i]
        p[0] = t + cc[j] * h
        residual(X[j], p, K[j], tab)
        for i in range(n):
            if not math.isfinite(K[j, i]):
                return False
    return True


@njit(cache=True, error_model="numpy")
def _explicit_stages(residual, t, h, x, p, A, cc, Z, X, K, n, s, tab):
    """The stages of an explicit method, in order (X, K and the increments Z = X - x)."""
    for j in range(s):
        for i in range(n):
            acc = x[i]
            for q in range(j):
                acc += h * A[j, q] * K[q, i]
            X[j, i] = acc
        p[0] = t + cc[j] * h
        residual(X[j], p, K[j], tab)
    for j in range(s):
        for i in range(n):
            Z[j, i] = X[j, i] - x[i]


@njit(cache=True, error_model="numpy")
def _stage_tolerance(adaptive, rtol):
    """The simplified-Newton tolerance of the stage solve, in the weighted RMS norm (the adaptive
    methods' rule of Hairer & Wanner's RADAU5; the fixed-step methods' rtol/atol are this tolerance)."""
    if adaptive:
        return max(10.0 * _EPS / rtol, min(0.03, math.sqrt(rtol)))
    return 1.0


@njit(cache=True, error_model="numpy")
def _initial_stages(Z, Zp, h, hp, cc, extrap, n, s):
    """Newton's starting stage increments: zero, or with ``extrap`` the previous step's collocation
    polynomial (increments ``Zp`` of a step of size ``hp``) extrapolated to this step (Radau)."""
    if extrap:
        for j in range(s):
            tau = 1.0 + cc[j] * h / hp
            for i in range(n):
                Z[j, i] = -Zp[s - 1, i]
            for q in range(s):
                # Lagrange basis of node c_q over the nodes 0, c_0, ..., c_{s-1}
                L = tau / cc[q]
                for r in range(s):
                    if r != q:
                        L *= (tau - cc[r]) / (cc[q] - cc[r])
                for i in range(n):
                    Z[j, i] += L * Zp[q, i]
    else:
        for j in range(s):
            for i in range(n):
                Z[j, i] = 0.0


@njit(cache=True, error_model="numpy")
def _newton(residual, residual_jacobian, t, h, x, p, A, cc, Z, X, K, M, piv, J, JS, d, sc, tol, maxit, full,
            Zp, hp, extrap, n, s, tab):
    """Solve the stage equations for Z; M (and piv) must hold the factored iteration matrix
    unless ``full``. Starts from Z = 0, or with ``extrap`` from the previous step's collocation
    polynomial (stage increments ``Zp`` of a step of size ``hp``; Radau, whose nodes are distinct
    and end at 1). Returns (converged, iterations, rate)."""
    sn = s * n
    _initial_stages(Z, Zp, h, hp, cc, extrap, n, s)
    dn_old = 0.0
    rate = -1.0
    for it in range(maxit):
        if not _stage_values(residual, t, h, x, p, A, cc, Z, X, K, n, s, tab):
            return False, it, rate
        if full:
            for j in range(s):
                p[0] = t + cc[j] * h
                residual_jacobian(X[j], p, K[j], JS[j], tab)
            _iteration_matrix(M, J, A, h, n, s, True, JS)
            if lu_factor(sn, M, piv) == 0.0:
                return False, it, rate
        for i in range(s):
            for r in range(n):
                acc = Z[i, r]
                for j in range(s):
                    acc -= h * A[i, j] * K[j, r]
                d[i * n + r] = -acc
        lu_solve(sn, M, piv, d)
        acc = 0.0
        dmax = 0.0
        zmax = 0.0
        for i in range(s):
            for r in range(n):
                Z[i, r] += d[i * n + r]
                q = d[i * n + r] / sc[r]
                acc += q * q
                dmax = max(dmax, abs(d[i * n + r]))
                zmax = max(zmax, abs(X[i, r]))
        dn = math.sqrt(acc / sn)
        if not math.isfinite(dn):
            return False, it + 1, rate
        if it > 0 and dmax <= 64.0 * _EPS * zmax:
            # the update is at the rounding level of the stage values: as converged as it gets
            ok = _stage_values(residual, t, h, x, p, A, cc, Z, X, K, n, s, tab)
            return ok, it + 1, max(rate, 0.0)
        if it > 0:
            rate = dn / dn_old if dn_old > 0.0 else 0.0
            if not full:
                if rate >= 1.0 or rate ** (maxit - it) / (1.0 - rate) * dn > tol:
                    return False, it + 1, rate
            elif rate >= 1.0 and dn > tol:
                return False, it + 1, rate
        if dn == 0.0 or (rate >= 0.0 and rate < 1.0 and rate / (1.0 - rate) * dn < tol):
            ok = _stage_values(residual, t, h, x, p, A, cc, Z, X, K, n, s, tab)
            return ok, it + 1, rate
        dn_old = dn
    return False, maxit, rate


@njit(cache=True, error_model="numpy")
def _store_checkpoint(crow, x, xJ, tJ, have_J, Zp, hp, have_prev, n, s):
    """What the forward had at the start of a step (layout: ``_ckpt_width``): its state, the point
    ``(tJ, xJ)`` where it evaluated the df/dx in use, the previous step's stage increments and size,
    whether there were a Jacobian and a previous step."""
    for i in range(n):
        crow[i] = x[i]
        crow[n + i] = xJ[i]
    o = 2 * n
    crow[o] = tJ
    for j in range(s):
        for i in range(n):
            crow[o + 1 + j * n + i] = Zp[j, i]
    o += 1 + s * n
    crow[o] = hp
    crow[o + 1] = 1.0 if have_prev else 0.0
    crow[o + 2] = 1.0 if have_J else 0.0


@njit(cache=True, error_model="numpy")
def _load_checkpoint(crow, x, xJ, Zp, n, s):
    """Inverse of :func:`_store_checkpoint`: fills ``x``, ``xJ``, ``Zp``; returns
    ``(tJ, hp, have_prev, have_J)``."""
    for i in range(n):
        x[i] = crow[i]
        xJ[i] = crow[n + i]
    o = 2 * n
    for j in range(s):
        for i in range(n):
            Zp[j, i] = crow[o + 1 + j * n + i]
    tJ = crow[o]
    o += 1 + s * n
    return tJ, crow[o], crow[o + 1] != 0.0, crow[o + 2] != 0.0


def _ckpt_width(n: int, s: int) -> int:
    return 2 * n + s * n + 4


@njit(cache=True, error_model="numpy")
def _store_step(STORE, b, k, t, h, hit, X, n, s):
    row = STORE[b, k]
    row[0] = t
    row[1] = h
    row[2] = hit
    for j in range(s):
        for i in range(n):
            row[STORE_HEAD + j * n + i] = X[j, i]


@njit(cache=True, error_model="numpy")
def _one_sample(residual, residual_jacobian, b, X0, P, TEV, A, E, cc, IOPT, FOPT, OUT, STORE, CKPT, NSTEP, INFO,
                tab, x, xn, p, Z, X, K, M, piv, J, JS, d, sc, E1, piv1, f0, err, tmp, Zp, x_jac):
    n = X0.shape[1]
    s = A.shape[0]
    sn = s * n
    T = TEV.shape[1]
    tb = b if TEV.shape[0] > 1 else 0
    adaptive = IOPT[I_ADAPTIVE] != 0
    implicit = IOPT[I_IMPLICIT] != 0
    err_kind = IOPT[I_ERR_KIND]
    err_row = IOPT[I_ERR_ROW]
    max_steps = IOPT[I_MAX_STEPS]
    store = IOPT[I_STORE] != 0
    ck = IOPT[I_CHECKPOINT]
    cap = STORE.shape[1]
    rtol = FOPT[F_RTOL]
    atol = FOPT[F_ATOL]
    dt = FOPT[F_DT]
    kexp = FOPT[F_EXPONENT]
    hmax = FOPT[F_HMAX]
    for c in range(P.shape[1]):
        p[c] = P[b, c]
    for i in range(n):
        x[i] = X0[b, i]
        OUT[b, 0, i] = x[i]
    for k in range(1, T):
        for i in range(n):
            OUT[b, k, i] = math.nan
    INFO[b, 0] = 0.0
    INFO[b, 1] = 0.0
    INFO[b, 2] = 0.0
    INFO[b, 3] = 0.0
    NSTEP[b] = 0
    for c in range(1, P.shape[1]):
        if not math.isfinite(p[c]):
            return ODE_NONFINITE_STATE
    for i in range(n):
        if not math.isfinite(x[i]):
            return ODE_NONFINITE_STATE
    t = TEV[tb, 0]
    nst = 0  # stored steps
    attempts = 0
    naccept = 0
    nreject = 0
    njac = 0
    newton_tol = _stage_tolerance(adaptive, rtol) if implicit else 0.0
    # ---- step size
    t_end = TEV[tb, T - 1]
    if adaptive:
        h = FOPT[F_H0]
        if not h > 0.0:
            # explicit Euler probe (Hairer, Norsett & Wanner, II.4)
            p[0] = t
            residual(x, p, f0, tab)
            for i in range(n):
                sc[i] = atol + rtol * abs(x[i])
            d0 = _rms(x, sc, n)
            d1 = _rms(f0, sc, n)
            h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
            if not math.isfinite(h0):
                h0 = 1e-6
            h0 = min(h0, t_end - t)
            for i in range(n):
                tmp[i] = x[i] + h0 * f0[i]
            p[0] = t + h0
            residual(tmp, p, err, tab)
            for i in range(n):
                err[i] = (err[i] - f0[i]) / h0
            d2 = _rms(err, sc, n)
            q = max(d1, d2)
            if not math.isfinite(q):
                h = 1e-6 * (t_end - t)
            elif q <= 1e-15:
                h = max(1e-6, h0 * 1e-3)
            else:
                h = (0.01 / q) ** kexp
            h = min(100.0 * h0, h)
        if hmax > 0.0:
            h = min(h, hmax)
    else:
        h = dt
    have_jac = False
    jac_current = False
    jac_here = False  # df/dx was evaluated at this step's start state (checkpoint replays repeat it)
    jac_ever = False
    t_jac = t  # where the df/dx in use was evaluated: (t_jac, x_jac)
    lu_h = math.nan  # step size the factored iteration matrix was built for
    err_prev = 1.0
    h_acc = 1.0  # the last accepted step
    have_prev = False  # Zp, hp hold the last accepted step (Radau: Newton starts from its extrapolation)
    hp = 1.0
    extrapolate = err_kind == 3
    rejected_last = False
    first = True
    for k in range(1, T):
        target = TEV[tb, k]
        if not adaptive:
            span = target - t
            nsub = int(math.ceil(span / dt * (1.0 - 1e-12)))
            if nsub < 1:
                nsub = 1
            h = span / nsub
        else:
            nsub = 0
        isub = 0
        while True:
            # ---- choose this step
            if adaptive:
                remaining = target - t
                if not remaining > 0.0:
                    break
                hstep = h
                clipped = False
                if hstep >= remaining * (1.0 - 1e-4):
                    hstep = remaining
                    clipped = True
                elif hstep > 0.5 * remaining:
                    hstep = 0.5 * remaining  # two steps, not one and a sliver
                if hstep < 10.0 * _EPS * max(abs(t), abs(target)) or hstep <= 0.0:
                    NSTEP[b] = nst
                    INFO[b, 0] = naccept
                    INFO[b, 1] = nreject
                    INFO[b, 3] = njac
                    return ODE_STEP_UNDERFLOW
            else:
                if isub >= nsub:
                    break
                hstep = h
                clipped = isub == nsub - 1
            attempts += 1
            if attempts > max_steps:
                NSTEP[b] = nst
                INFO[b, 0] = naccept
                INFO[b, 1] = nreject
                INFO[b, 3] = njac
                return ODE_MAX_STEPS
            for i in range(n):
                sc[i] = atol + rtol * abs(x[i])
            ok = True
            nit = 0
            rate = -1.0
            full_newton = False
            if implicit:
                # ---- stage solve (simplified Newton), retried once with a fresh Jacobian
                while True:
                    if not have_jac:
                        p[0] = t
                        residual_jacobian(x, p, f0, J, tab)
                        njac += 1
                        have_jac = True
                        jac_current = True
                        jac_here = True
                        jac_ever = True
                        t_jac = t
                        for i in range(n):
                            x_jac[i] = x[i]
                        lu_h = math.nan
                    ok = True
                    if lu_h != hstep:
                        _iteration_matrix(M, J, A, hstep, n, s, False, JS)
                        if lu_factor(sn, M, piv) == 0.0:
                            ok = False
                        else:
                            lu_h = hstep
                    if ok:
                        ok, nit, rate = _newton(residual, residual_jacobian, t, hstep, x, p, A, cc, Z, X, K, M, piv,
                                                J, JS, d, sc, newton_tol, _NEWTON_MAXITER,
                                                False, Zp, hp, have_prev, n, s, tab)
                    if ok or jac_current:
                        break
                    have_jac = False
                if not ok and not adaptive:
                    # fixed step: full Newton on the exact stage Jacobian
                    ok, nit, rate = _newton(residual, residual_jacobian, t, hstep, x, p, A, cc, Z, X, K, M, piv, J,
                                            JS, d, sc, 1.0, _FULL_NEWTON_MAXITER, True, Zp, hp, False, n, s, tab)
                    lu_h = math.nan
                    full_newton = True
                    if not ok:
                        NSTEP[b] = nst
                        INFO[b, 0] = naccept
                        INFO[b, 1] = nreject
                        INFO[b, 3] = njac
                        return ODE_NEWTON_FAILED
                if not ok:
                    # adaptive: halve the step and try again
                    nreject += 1
                    h = 0.5 * hstep
                    rejected_last = True
                    continue
            else:
                _explicit_stages(residual, t, hstep, x, p, A, cc, Z, X, K, n, s, tab)
            finite = True
            for i in range(n):
                xn[i] = X[s - 1, i]
                if not math.isfinite(xn[i]):
                    finite = False
            for j in range(s):
                for i in range(n):
                    if not math.isfinite(K[j, i]):
                        finite = False
            if not adaptive:
                if not finite:
                    NSTEP[b] = nst
                    INFO[b, 0] = naccept
                    INFO[b, 1] = nreject
                    INFO[b, 3] = njac
                    return ODE_NONFINITE_STATE
                enorm = 0.0
            else:
                # ---- local error estimate
                for i in range(n):
                    sc[i] = atol + rtol * max(abs(x[i]), abs(xn[i]))
                if not finite:
                    enorm = math.inf
                elif err_kind == 1:
                    for i in range(n):
                        acc = 0.0
                        for j in range(s):
                            acc += E[j] * K[j, i]
                        err[i] = hstep * acc
                    enorm = _rms(err, sc, n)
                elif err_kind == 2:
                    for i in range(n):
                        err[i] = X[s - 1, i] - X[err_row, i]
                    enorm = _rms(err, sc, n)
                else:
                    # Radau IIA: (I - h g0 J)^{-1} (h g0 f(x_n) + g0 sum_i d_i Z_i), g0 = 1 / mu_real
                    g0 = E[s]
                    for r in range(n):
                        for q in range(n):
                            E1[r, q] = -hstep * g0 * J[r, q]
                        E1[r, r] += 1.0
                    if lu_factor(n, E1, piv1) == 0.0:
                        enorm = math.inf
                    else:
                        p[0] = t
                        residual(x, p, f0, tab)
                        for i in range(n):
                            acc = 0.0
                            for j in range(s):
                                acc += E[j] * Z[j, i]
                            tmp[i] = g0 * acc
                            err[i] = hstep * g0 * f0[i] + tmp[i]
                        lu_solve(n, E1, piv1, err)
                        enorm = _rms(err, sc, n)
                        if enorm >= 1.0 and (first or rejected_last) and math.isfinite(enorm):
                            for i in range(n):
                                f0[i] = x[i] + err[i]
                            residual(f0, p, err, tab)
                            for i in range(n):
                                err[i] = hstep * g0 * err[i] + tmp[i]
                            lu_solve(n, E1, piv1, err)
                            enorm = _rms(err, sc, n)
                if not math.isfinite(enorm):
                    enorm = math.inf
            if adaptive and enorm > 1.0:
                # ---- reject
                nreject += 1
                if enorm == math.inf:
                    fac = _FAC_MIN
                else:
                    fac = max(_FAC_MIN, _SAFETY * enorm ** (-kexp))
                h = hstep * fac
                rejected_last = True
                if implicit and not jac_current:
                    have_jac = False
                continue
            # ---- accept
            hit = -1.0
            if clipped:
                hit = float(k)
            if store:
                if nst >= cap:
                    NSTEP[b] = -1  # store full: the caller runs this sample again with a larger store
                    return 0
                if ck > 0:
                    row = STORE[b, nst]
                    row[0] = t
                    row[1] = hstep
                    row[2] = hit
                    row[3] = (1.0 if jac_here else 0.0) + (2.0 if full_newton else 0.0)
                    if nst % ck == 0:
                        _store_checkpoint(CKPT[b, nst // ck], x, x_jac, t_jac, jac_ever, Zp, hp, have_prev, n, s)
                else:
                    _store_step(STORE, b, nst, t, hstep, hit, X, n, s)
            nst += 1
            naccept += 1
            jac_here = False
            if extrapolate:
                for j in range(s):
                    for i in range(n):
                        Zp[j, i] = Z[j, i]
                hp = hstep
                have_prev = True
            if clipped:
                t = target
            else:
                t = t + hstep
            for i in range(n):
                x[i] = xn[i]
            first = False
            isub += 1
            if adaptive:
                if enorm == 0.0:
                    fac = _FAC_MAX
                elif implicit:
                    # Gustafsson's predictive controller (Hairer & Wanner IV.8, as RADAU5)
                    mult = 1.0
                    if naccept > 1:
                        mult = min(1.0, hstep / h_acc * (err_prev / enorm) ** kexp)
                    fac = _SAFETY * mult * enorm ** (-kexp)
                else:
                    # PI controller: h err_n^(-0.7/k) err_(n-1)^(0.4/k)
                    fac = _SAFETY * enorm ** (-0.7 * kexp) * err_prev ** (0.4 * kexp)
                if implicit:
                    fac *= (2 * _NEWTON_MAXITER + 1) / (2 * _NEWTON_MAXITER + nit)
                fac = min(1.0 if rejected_last else _FAC_MAX, max(_FAC_MIN, fac))
                # keep df/dx unless Newton needed more than 2 iterations at a rate above 1e-3
                recompute = implicit and nit > 2 and rate > 1e-3
                if implicit and not recompute and fac < 1.2:
                    fac = 1.0  # keep h (an accepted step): the factored iteration matrix stays valid
                err_prev = max(enorm, 1e-10) if implicit else max(enorm, 1e-4)
                h_acc = hstep
                hnew = hstep * fac
                if clipped and hnew < h and fac >= 1.0:
                    hnew = h  # a step shortened onto an output point does not shrink the next one
                h = hnew
                if hmax > 0.0:
                    h = min(h, hmax)
                rejected_last = False
                if implicit:
                    if recompute:
                        have_jac = False
                    jac_current = False
            elif implicit:
                have_jac = False  # fixed step: df/dx at every step start
        for i in range(n):
            OUT[b, k, i] = x[i]
    NSTEP[b] = nst
    INFO[b, 0] = naccept
    INFO[b, 1] = nreject
    INFO[b, 3] = njac
    return 0


@njit(cache=True, error_model="numpy", nogil=True)
def drive_ode_range(residual, residual_jacobian, lo, hi, X0, P, TEV, A, E, cc, IOPT, FOPT, OUT, STORE, CKPT, NSTEP,
                    STATUS, INFO, tab):
    """Integrate samples ``lo..hi-1``; ``OUT[b, k]`` is the state at ``TEV[b or 0, k]``."""
    n = X0.shape[1]
    s = A.shape[0]
    sn = s * n
    m = P.shape[1]
    x = np.empty(n)
    xn = np.empty(n)
    p = np.empty(m)
    Z = np.empty((s, n))
    X = np.empty((s, n))
    K = np.empty((s, n))
    M = np.empty((sn, sn))
    piv = np.empty(sn + 1, dtype=np.int64)
    J = np.zeros((n, n))
    JS = np.zeros((s, n, n))
    d = np.empty(sn)
    sc = np.empty(n)
    E1 = np.empty((n, n))
    piv1 = np.empty(n + 1, dtype=np.int64)
    f0 = np.empty(n)
    err = np.empty(n)
    tmp = np.empty(n)
    Zp = np.zeros((s, n))
    x_jac = np.zeros(n)
    for b in range(lo, hi):
        STATUS[b] = _one_sample(residual, residual_jacobian, b, X0, P, TEV, A, E, cc, IOPT, FOPT, OUT, STORE, CKPT,
                                NSTEP, INFO, tab, x, xn, p, Z, X, K, M, piv, J, JS, d, sc, E1, piv1, f0, err, tmp, Zp,
                                x_jac)


@njit(cache=True, error_model="numpy", parallel=True)
def drive_ode_batch_parallel(residual, residual_jacobian, X0, P, TEV, A, E, cc, IOPT, FOPT, OUT, STORE, CKPT, NSTEP,
                             STATUS, INFO, tab):
    B = X0.shape[0]
    # one sample per work item: samples take very different numbers of steps
    for b in prange(B):
        drive_ode_range(residual, residual_jacobian, b, b + 1, X0, P, TEV, A, E, cc, IOPT, FOPT, OUT, STORE, CKPT,
                        NSTEP, STATUS, INFO, tab)


@njit(cache=True, error_model="numpy")
def _adjoint_step(residual_jacobian, vjp_params, X, t, h, p, lam, A, cc, need, cols, PBAR_b, F, JS, M, piv, w, u,
                  out, J, n, s, tab):
    """One accepted step in reverse: ``lam`` (the cotangent of ``x_{n+1} = X_s``) becomes the
    cotangent of ``x_n``, and ``PBAR_b`` gathers the step's ``thetabar``. False when the stage
    matrix is singular."""
    sn = s * n
    m = p.shape[0]
    for j in range(s):
        p[0] = t + cc[j] * h
        residual_jacobian(X[j], p, F, JS[j], tab)
    _iteration_matrix(M, J, A, h, n, s, True, JS)
    if lu_factor(sn, M, piv) == 0.0:
        return False
    for i in range(sn):
        w[i] = 0.0
    for i in range(n):
        w[(s - 1) * n + i] = lam[i]
    lu_solve_transpose(sn, M, piv, w)
    for i in range(n):
        acc = 0.0
        for j in range(s):
            acc += w[j * n + i]
        lam[i] = acc
    for j in range(s):
        nz = False
        for i in range(n):
            acc = 0.0
            for q in range(s):
                acc += A[q, j] * w[q * n + i]
            u[i] = h * acc
            if acc != 0.0:
                nz = True
        if nz:
            p[0] = t + cc[j] * h
            vjp_params(X[j], p, u, need, out, tab)
            for c in range(m):
                if cols[c]:
                    PBAR_b[c] -= out[c]
    return True


@njit(cache=True, error_model="numpy")
def _start_adjoint(b, P, STATUS, XBAR, PBAR, p, lam):
    """Zero sample ``b``'s gradients; False (nothing to sweep) unless its forward converged, else
    load its parameters into ``p`` and zero the cotangent ``lam``."""
    for c in range(PBAR.shape[1]):
        PBAR[b, c] = 0.0
    if STATUS[b] != 0:
        for i in range(XBAR.shape[1]):
            XBAR[b, i] = 0.0
        return False
    for c in range(P.shape[1]):
        p[c] = P[b, c]
    for i in range(lam.shape[0]):
        lam[i] = 0.0
    return True


@njit(cache=True, error_model="numpy")
def _finish_adjoint(ok, b, lam, GOUT, XBAR, PBAR):
    """``XBAR[b]`` from the swept cotangent and the first output's own, or NaN gradients for a sample
    whose sweep failed."""
    if ok:
        for i in range(XBAR.shape[1]):
            XBAR[b, i] = lam[i] + GOUT[b, 0, i]
        return
    for i in range(XBAR.shape[1]):
        XBAR[b, i] = math.nan
    for c in range(PBAR.shape[1]):
        PBAR[b, c] = math.nan


@njit(cache=True, error_model="numpy", nogil=True)
def drive_ode_adjoint_range(residual_jacobian, vjp_params, lo, hi, P, STORE, NSTEP, STATUS, GOUT, A, cc, need, cols,
                            XBAR, PBAR, tab):
    """Reverse sweep over the stored steps: ``XBAR[b]`` and ``PBAR[b]`` (the columns ``cols``
    marks) from the cotangents ``GOUT[b, k]`` of the outputs, for samples with status 0; NaN
    for a sample whose stage matrix is singular at a stored step."""
    n = XBAR.shape[1]
    m = P.shape[1]
    s = A.shape[0]
    sn = s * n
    p = np.empty(m)
    lam = np.empty(n)
    X = np.empty((s, n))
    F = np.empty(n)
    JS = np.empty((s, n, n))
    M = np.empty((sn, sn))
    piv = np.empty(sn + 1, dtype=np.int64)
    w = np.empty(sn)
    u = np.empty(n)
    out = np.empty(m)
    J = np.empty((1, 1))
    for b in range(lo, hi):
        if not _start_adjoint(b, P, STATUS, XBAR, PBAR, p, lam):
            continue
        ok = True
        for k in range(NSTEP[b] - 1, -1, -1):
            row = STORE[b, k]
            hit = int(row[2])
            if hit >= 1:
                for i in range(n):
                    lam[i] += GOUT[b, hit, i]
            for j in range(s):
                for i in range(n):
                    X[j, i] = row[STORE_HEAD + j * n + i]
            if not _adjoint_step(residual_jacobian, vjp_params, X, row[0], row[1], p, lam, A, cc, need, cols, PBAR[b],
                                 F, JS, M, piv, w, u, out, J, n, s, tab):
                ok = False
                break
        _finish_adjoint(ok, b, lam, GOUT, XBAR, PBAR)


@njit(cache=True, error_model="numpy", nogil=True)
def drive_ode_adjoint_checkpoint_range(residual, residual_jacobian, vjp_params, lo, hi, P, STORE, CKPT, XEND, NSTEP,
                                       STATUS, GOUT, A, cc, IOPT, FOPT, need, cols, XBAR, PBAR, tab):
    """The reverse sweep of :func:`drive_ode_adjoint_range` from checkpoints: the segments of
    ``K = IOPT[I_CHECKPOINT]`` steps are taken last to first; each is integrated again from its
    checkpoint into a buffer of ``K`` steps, then swept in reverse. The replay repeats the
    forward's accepted attempts exactly (same step sizes, df/dx evaluated where the forward
    evaluated it, the same simplified or full Newton iteration from the same start), so its stage
    values are the forward's, bit for bit; each replayed segment is checked to end exactly where the
    forward went on (the next checkpoint's state, or ``XEND``, the final state). NaN for a sample
    whose replay does not, or whose stage matrix is singular."""
    n = XBAR.shape[1]
    m = P.shape[1]
    s = A.shape[0]
    sn = s * n
    ck = IOPT[I_CHECKPOINT]
    implicit = IOPT[I_IMPLICIT] != 0
    adaptive = IOPT[I_ADAPTIVE] != 0
    extrapolate = IOPT[I_ERR_KIND] == 3
    rtol = FOPT[F_RTOL]
    atol = FOPT[F_ATOL]
    newton_tol = _stage_tolerance(adaptive, rtol)
    longest = 0  # a segment is at most K steps and at most a sample's steps
    for b in range(lo, hi):
        longest = max(longest, NSTEP[b])
    SEG = np.empty((min(ck, longest), s, n))
    p = np.empty(m)
    lam = np.empty(n)
    x = np.empty(n)
    Z = np.empty((s, n))
    K = np.empty((s, n))
    F = np.empty(n)
    J = np.zeros((n, n))
    JS = np.zeros((s, n, n))
    M = np.empty((sn, sn))
    piv = np.empty(sn + 1, dtype=np.int64)
    d = np.empty(sn)
    sc = np.empty(n)
    w = np.empty(sn)
    u = np.empty(n)
    out = np.empty(m)
    Zp = np.zeros((s, n))
    xJ = np.empty(n)
    for b in range(lo, hi):
        if not _start_adjoint(b, P, STATUS, XBAR, PBAR, p, lam):
            continue
        nsteps = NSTEP[b]
        nseg = (nsteps + ck - 1) // ck
        ok = True
        for g in range(nseg - 1, -1, -1):
            k0 = g * ck
            k1 = min(k0 + ck, nsteps)
            tJ, hp, have_prev, have_J = _load_checkpoint(CKPT[b, g], x, xJ, Zp, n, s)
            if implicit and have_J:
                p[0] = tJ
                residual_jacobian(xJ, p, F, J, tab)  # the df/dx the forward had in use
            for k in range(k0, k1):
                t = STORE[b, k, 0]
                h = STORE[b, k, 1]
                mode = int(STORE[b, k, 3])
                X = SEG[k - k0]
                if implicit:
                    for i in range(n):
                        sc[i] = atol + rtol * abs(x[i])
                    if mode & 1:
                        p[0] = t
                        residual_jacobian(x, p, F, J, tab)
                    if mode & 2:
                        ok = _newton(residual, residual_jacobian, t, h, x, p, A, cc, Z, X, K, M, piv, J, JS, d, sc,
                                     1.0, _FULL_NEWTON_MAXITER, True, Zp, hp, False, n, s, tab)[0]
                    else:
                        _iteration_matrix(M, J, A, h, n, s, False, JS)
                        ok = lu_factor(sn, M, piv) != 0.0
                        if ok:
                            ok = _newton(residual, residual_jacobian, t, h, x, p, A, cc, Z, X, K, M, piv, J, JS, d,
                                         sc, newton_tol, _NEWTON_MAXITER, False, Zp, hp,
                                         extrapolate and have_prev, n, s, tab)[0]
                    if not ok:
                        break
                    if extrapolate:
                        for j in range(s):
                            for i in range(n):
                                Zp[j, i] = Z[j, i]
                        hp = h
                        have_prev = True
                else:
                    _explicit_stages(residual, t, h, x, p, A, cc, Z, X, K, n, s, tab)
                for i in range(n):
                    x[i] = X[s - 1, i]
            if not ok:
                break
            for i in range(n):
                if x[i] != (CKPT[b, g + 1, i] if g + 1 < nseg else XEND[b, i]):
                    ok = False
            if not ok:
                break
            for k in range(k1 - 1, k0 - 1, -1):
                hit = int(STORE[b, k, 2])
                if hit >= 1:
                    for i in range(n):
                        lam[i] += GOUT[b, hit, i]
                if not _adjoint_step(residual_jacobian, vjp_params, SEG[k - k0], STORE[b, k, 0], STORE[b, k, 1], p,
                                     lam, A, cc, need, cols, PBAR[b], F, JS, M, piv, w, u, out, J, n, s, tab):
                    ok = False
                    break
            if not ok:
                break
        _finish_adjoint(ok, b, lam, GOUT, XBAR, PBAR)


@njit(cache=True, error_model="numpy", parallel=True)
def drive_ode_adjoint_batch_parallel(residual_jacobian, vjp_params, P, STORE, NSTEP, STATUS, GOUT, A, cc, need, cols,
                                     XBAR, PBAR, tab):
    B = P.shape[0]
    for b in prange(B):
        drive_ode_adjoint_range(residual_jacobian, vjp_params, b, b + 1, P, STORE, NSTEP, STATUS, GOUT, A, cc, need,
                                cols, XBAR, PBAR, tab)


@njit(cache=True, error_model="numpy", parallel=True)
def drive_ode_adjoint_checkpoint_batch_parallel(residual, residual_jacobian, vjp_params, P, STORE, CKPT, XEND, NSTEP,
                                                STATUS, GOUT, A, cc, IOPT, FOPT, need, cols, XBAR, PBAR, tab):
    B = P.shape[0]
    for b in prange(B):
        drive_ode_adjoint_checkpoint_range(residual, residual_jacobian, vjp_params, b, b + 1, P, STORE, CKPT, XEND,
                                           NSTEP, STATUS, GOUT, A, cc, IOPT, FOPT, need, cols, XBAR, PBAR, tab)


_f1, _f2, _f3, _i1, _b1, _s1 = sg.f1, sg.f2, sg.f3, sg.i1, sg.b1, sg.s1
_i64 = types.int64
_FWD_KERNELS = (sg.fn(sg.RESIDUAL), sg.fn(sg.JACOBIAN))
_FWD_ARGS = (_f2, _f2, _f2, _f2, _f1, _f1, _i1, _f1, _f3, _f3, _f3, _i1, _s1, _f2, _i1)
_BWD_KERNELS = (sg.fn(sg.JACOBIAN), sg.fn(sg.VJP_PARAMS))
_BWD_ARGS = (_f2, _f3, _i1, _s1, _f3, _f2, _f1, _b1, _b1, _f2, _f2, _i1)
_CKPT_KERNELS = (sg.fn(sg.RESIDUAL), sg.fn(sg.JACOBIAN), sg.fn(sg.VJP_PARAMS))
_CKPT_ARGS = (_f2, _f3, _f3, _f2, _i1, _s1, _f3, _f2, _f1, _i1, _f1, _b1, _b1, _f2, _f2, _i1)

SIGNATURES = {
    "ode_range": types.void(*_FWD_KERNELS, _i64, _i64, *_FWD_ARGS),
    "ode_batch_parallel": types.void(*_FWD_KERNELS, *_FWD_ARGS),
    "ode_adjoint_range": types.void(*_BWD_KERNELS, _i64, _i64, *_BWD_ARGS),
    "ode_adjoint_batch_parallel": types.void(*_BWD_KERNELS, *_BWD_ARGS),
    "ode_adjoint_checkpoint_range": types.void(*_CKPT_KERNELS, _i64, _i64, *_CKPT_ARGS),
    "ode_adjoint_checkpoint_batch_parallel": types.void(*_CKPT_KERNELS, *_CKPT_ARGS),
}

_DRIVERS = Drivers(globals(), SIGNATURES)


# ---------------------------------------------------------------- NumPy level
class ODEResult:
    """A batched integration (NumPy arrays, batch first): ``x`` ``(B, T, n)`` states at the
    output times, ``status`` per sample, ``steps`` / ``rejected`` / ``jacobians`` counts;
    ``store`` holds the accepted steps for the adjoint (None when not kept)."""

    def __init__(self, x, status, info, P, store, nstep, tableau, ckpt=None, iopt=None, fopt=None):
        self.x = x
        self.status = status
        self.steps = info[:, 0].astype(np.int64)
        self.rejected = info[:, 1].astype(np.int64)
        self.jacobians = info[:, 3].astype(np.int64)
        self.p = P
        self.store = store
        self.nstep = nstep
        self.tableau = tableau
        self.ckpt = ckpt  # checkpointed states (B, segments, n), or None when every step's stages are stored
        self.iopt = iopt
        self.fopt = fopt

    @property
    def store_bytes(self) -> int:
        """Memory the adjoint keeps from the forward (the step store and the checkpoints)."""
        return sum(a.nbytes for a in (self.store, self.ckpt) if a is not None)


class ODEKernels:
    """The integrator and adjoint drivers bound to one generated module of ``f``."""

    INITIAL_STORE = 256

    def __init__(self, module):
        from .drivers import function

        self.module = module
        self.layout = module.LAYOUT
        self.n = module.N
        self.m = module.M
        self.tab = module.TABLES
        self.k_res = module._fn_residual
        self.k_jac = module._fn_residual_jacobian
        self.k_vjp = function(module.vjp_params, sg.VJP_PARAMS)
        d = _DRIVERS
        self._range = d("ode_range")
        self._parallel = d("ode_batch_parallel")
        self._adj_range = d("ode_adjoint_range")
        self._adj_parallel = d("ode_adjoint_batch_parallel")
        self._ck_range = d("ode_adjoint_checkpoint_range")
        self._ck_parallel = d("ode_adjoint_checkpoint_batch_parallel")
        self._store_hint = self.INITIAL_STORE

    @staticmethod
    def _call(entry, *args):
        if entry._addr is None:
            import warnings

            from numba.core.errors import NumbaExperimentalFeatureWarning

            with warnings.catch_warnings():
                # Numba flags its first-class function types (how every driver takes its kernels)
                warnings.simplefilter("ignore", NumbaExperimentalFeatureWarning)
                entry.__wrapper_address__()  # compiles (or loads) the driver for its one signature, once
        entry.dispatcher(*args)

    def warm_up(self, method: str) -> None:
        """Compile (or load from Numba's cache) the serial and ``prange`` forward and adjoint drivers
        with this module's kernels, on one sample integrated over an empty interval."""
        from .ode_tableaus import TABLEAUS

        tb = TABLEAUS[method]
        X0 = np.zeros((1, self.n))
        P = np.zeros((1, self.m))
        TEV = np.zeros((1, 1))
        for threshold in (2, 1):
            for checkpoint in (0, 1):
                res = self.integrate(X0, P, TEV, tb, 1e-6, 1e-9, None, 1.0, 1, store=True,
                                     parallel_threshold=threshold, checkpoint=checkpoint)
                self.adjoint(res, np.zeros((1, 1, self.n)),
                             np.zeros(len(self.layout["param_groups"]), dtype=np.bool_),
                             np.zeros(self.m, dtype=np.bool_), parallel_threshold=threshold)

    @staticmethod
    def _threaded(B: int, threshold: int) -> bool:
        from . import threads

        return B >= threshold and threads.parallel_allowed()

    def integrate(self, X0, P, TEV, tableau, rtol, atol, h0, dt, max_steps, hmax=0.0, store=False,
                  parallel_threshold=8, checkpoint=0) -> ODEResult:
        """Integrate every sample. ``X0`` ``(B, n)``, ``P`` ``(B, m)`` (column 0 is time, ignored),
        ``TEV`` ``(1, T)`` or ``(B, T)`` strictly increasing. With ``store``, keep what the adjoint
        needs: every accepted step's stage values, or with ``checkpoint = K > 0`` only the step
        sizes and the state at every K-th step (the adjoint then integrates each segment again)."""
        from . import threads

        X0 = np.ascontiguousarray(X0, dtype=np.float64)
        P = np.ascontiguousarray(P, dtype=np.float64)
        TEV = np.ascontiguousarray(TEV, dtype=np.float64)
        B, n = X0.shape
        T = TEV.shape[1]
        s = tableau.stages
        E = np.zeros(s + 1)
        if tableau.e is not None:
            E[:s] = tableau.e
        if tableau.err_kind == 3:
            E[s] = 1.0 / (3 + 3 ** (2 / 3) - 3 ** (1 / 3))
        ck = int(checkpoint) if store else 0
        IOPT = np.array([int(tableau.adaptive), int(tableau.implicit), tableau.err_kind, tableau.err_row,
                         int(max_steps), int(store), ck], dtype=np.int64)
        FOPT = np.array([rtol, atol, h0 if h0 is not None else 0.0, dt if dt is not None else 0.0,
                         tableau.err_exponent, hmax], dtype=np.float64)
        A = np.ascontiguousarray(tableau.A)
        cc = np.ascontiguousarray(tableau.c, dtype=np.float64)
        OUT = np.empty((B, T, n))
        NSTEP = np.zeros(B, dtype=np.int64)
        STATUS = np.zeros(B, dtype=np.int8)
        INFO = np.zeros((B, 4))
        width = CKPT_HEAD if ck else STORE_HEAD + s * n

        def segments(c):  # checkpoint rows for a store of c steps
            return (c + ck - 1) // ck if ck else 0
        # room for the steps of the last calls (a training loop integrates similar samples again)
        cap = min(self._store_hint, int(max_steps) + 1) if store else 0
        if not tableau.adaptive and store:
            span = TEV[:, -1] - TEV[:, 0]
            cap = int(np.max(np.ceil(span / dt * (1 - 1e-12)))) + T + 1
        STORE = np.empty((B, max(cap, 0), width))
        ckw = _ckpt_width(n, s)
        CKPT = np.empty((B, segments(max(cap, 0)), ckw))
        idx = np.arange(B)
        args_x0, args_p, args_t = X0, P, TEV
        while True:
            sub_out = np.empty((idx.size, T, n))
            sub_store = np.empty((idx.size, cap, width))
            sub_ckpt = np.empty((idx.size, segments(cap), ckw))
            sub_nstep = np.zeros(idx.size, dtype=np.int64)
            sub_status = np.zeros(idx.size, dtype=np.int8)
            sub_info = np.zeros((idx.size, 4))
            args = (args_x0, args_p, args_t, A, E, cc, IOPT, FOPT, sub_out, sub_store, sub_ckpt, sub_nstep,
                    sub_status, sub_info, self.tab)
            if self._threaded(idx.size, parallel_threshold):
                self._call(self._parallel, self.k_res, self.k_jac, *args)
                threads.note_started()
            else:
                self._call(self._range, self.k_res, self.k_jac, 0, idx.size, *args)
            if idx.size == B and cap == STORE.shape[1]:
                OUT, NSTEP, STATUS, INFO, STORE, CKPT = sub_out, sub_nstep, sub_status, sub_info, sub_store, sub_ckpt
            else:
                OUT[idx], NSTEP[idx], STATUS[idx], INFO[idx] = sub_out, sub_nstep, sub_status, sub_info
                if STORE.shape[1] < cap:
                    grown = np.empty((B, cap, width))
                    grown[:, :STORE.shape[1]] = STORE
                    STORE = grown
                    grown = np.empty((B, segments(cap), ckw))
                    grown[:, :CKPT.shape[1]] = CKPT
                    CKPT = grown
                STORE[idx] = sub_store
                CKPT[idx] = sub_ckpt
            full = np.flatnonzero(sub_nstep < 0)
            if full.size == 0:
                break
            # samples whose store filled up run again with twice the room (up to max_steps)
            idx = idx[full]
            cap = min(4 * cap, int(max_steps) + 1)
            args_x0 = np.ascontiguousarray(X0[idx])
            args_p = np.ascontiguousarray(P[idx])
            args_t = TEV if TEV.shape[0] == 1 else np.ascontiguousarray(TEV[idx])
        if tableau.adaptive and B:  # (steps are counted with or without the store)
            self._store_hint = max(self._store_hint, int(1.25 * NSTEP.max()) + 1)
        return ODEResult(OUT, STATUS, INFO, P, STORE if store else None, NSTEP, tableau,
                         ckpt=CKPT if ck else None, iopt=IOPT, fopt=FOPT)

    def adjoint(self, res: ODEResult, GOUT, need, cols, parallel_threshold=8):
        """``(XBAR (B, n), PBAR (B, m))``: the gradient of ``sum(GOUT * x)`` with respect to the
        initial states and the parameters (the columns ``cols`` marks; the others are zero)."""
        GOUT = np.ascontiguousarray(GOUT, dtype=np.float64)
        B = GOUT.shape[0]
        XBAR = np.zeros((B, self.n))
        PBAR = np.zeros((B, self.m))
        tb = res.tableau
        A = np.ascontiguousarray(tb.A)
        cc = np.ascontiguousarray(tb.c, dtype=np.float64)
        need = np.asarray(need, dtype=np.bool_)
        cols = np.asarray(cols, dtype=np.bool_)
        threaded = self._threaded(B, parallel_threshold)
        if res.ckpt is not None:
            xend = np.ascontiguousarray(res.x[:, -1])
            args = (res.p, res.store, res.ckpt, xend, res.nstep, res.status, GOUT, A, cc, res.iopt, res.fopt, need,
                    cols, XBAR, PBAR, self.tab)
            kernels = (self.k_res, self.k_jac, self.k_vjp)
            entry_range, entry_parallel = self._ck_range, self._ck_parallel
        else:
            args = (res.p, res.store, res.nstep, res.status, GOUT, A, cc, need, cols, XBAR, PBAR, self.tab)
            kernels = (self.k_jac, self.k_vjp)
            entry_range, entry_parallel = self._adj_range, self._adj_parallel
        if threaded:
            from . import threads

            self._call(entry_parallel, *kernels, *args)
            threads.note_started()
        else:
            self._call(entry_range, *kernels, 0, B, *args)
        return XBAR, PBAR
