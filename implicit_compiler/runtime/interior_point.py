"""Primal-dual interior point for one sample of ``min f(y) s.t. h(y) = 0, g(y) <= 0``.

Slacks ``s > 0`` turn the inequalities into ``g + s = 0``. With multipliers
``λ`` (equalities) and ``ν > 0`` (inequalities) and barrier parameter ``μ``,
each iteration takes a Newton step on the perturbed KKT system

    r_d = ∇f + J_hᵀ λ + J_gᵀ ν = 0,   h = 0,   g + s = 0,   s ∘ ν = μ

in the reduced form (``Σ = diag(ν / s)``)

    [ W + δI   J_hᵀ ] [Δy]   [ -r_d + J_gᵀ ((s∘ν - μ - ν∘(g+s)) / s) ]
    [ J_h      0    ] [Δλ] = [ -h                                   ],   W = ∇²L + J_gᵀ Σ J_g,

then ``Δs = -(g + s) - J_g Δy`` and ``Δν = (μ - s∘ν - ν∘Δs) / s``.
``δ >= 0`` is the smallest of ``0, 1e-8 ρ, 1e-7 ρ, …`` (ρ the size of W's diagonal)
for which ``W + δI`` has a Cholesky factor: for a non-convex objective this
makes the step a descent direction of the objective's local model. The step is
cut by the fraction-to-the-boundary rule (``s, ν`` stay positive) and then
backtracked on the merit ``||r_μ||²`` (the squared residual of the perturbed
system). ``μ`` is one tenth of the current average complementarity.

Without inequalities this is Newton on the Lagrange system (with the same
Hessian modification); without constraints, Newton on ``∇f = 0``.

Converged when ``||r_d||, ||h||, ||g + s||`` (all ∞-norm) and ``max s∘ν`` are
at most ``tol``. Statuses: ``INFEASIBLE`` when the primal residual cannot be
reduced or the multipliers diverge, ``UNBOUNDED`` when ``y`` diverges.

The KKT point ``z = (y, λ, ν)`` is then checked with the KKT residual system's
own Jacobian (which the backward pass reuses). Constraints with both
``|g_i| <= weak_tol`` and ``ν_i <= weak_tol`` are weakly active (no strict
complementarity): they are treated as inactive (``ν_i = 0`` and the
complementarity row replaced by ``dν_i = 0``), counted in ``info[2]``.
Clearly inactive constraints get ``ν_i = 0`` exactly.
"""

import numpy as np
from numba import njit

from . import status as st
from .linalg import lu_factor, lu_solve
from .newton import check_solution

IP_TAU = 0.995
IP_SIGMA = 0.1
IP_ARMIJO = 1e-4
IP_MIN_STEP = 1e-12
IP_DIVERGED = 1e12
POLISH_FROM = 1e-6  # KKT residual below which the active-set finish is tried


@njit(cache=True, inline="always")
def cholesky(n, A):
    """In-place lower Cholesky factor of the symmetric ``A``; False if not positive definite."""
    for j in range(n):
        d = A[j, j]
        for k in range(j):
            d -= A[j, k] * A[j, k]
        if not (d > 0.0):
            return False
        d = np.sqrt(d)
        A[j, j] = d
        for i in range(j + 1, n):
            v = A[i, j]
            for k in range(j):
                v -= A[i, k] * A[j, k]
            A[i, j] = v / d
    return True


@njit(cache=True, inline="always")
def cholesky_solve(n, L, b):
    for i in range(n):
        v = b[i]
        for k in range(i):
            v -= L[i, k] * b[k]
        b[i] = v / L[i, i]
    for i in range(n - 1, -1, -1):
        v = b[i]
        for k in range(i + 1, n):
            v -= L[k, i] * b[k]
        b[i] = v / L[i, i]


@njit(cache=True, inline="always")
def merit(n, q, r, lam, nu, s, mu, gradf, h, Jh, g, Jg, rd):
    """``||r_μ||²``; also writes the dual residual ``r_d`` into ``rd``."""
    phi = 0.0
    for j in range(n):
        v = gradf[j]
        for i in range(q):
            v += Jh[i, j] * lam[i]
        for i in range(r):
            v += Jg[i, j] * nu[i]
        rd[j] = v
        phi += v * v
    for i in range(q):
        phi += h[i] * h[i]
    for i in range(r):
        a = g[i] + s[i]
        c = s[i] * nu[i] - mu
        phi += a * a + c * c
    return phi


@njit(cache=True, inline="always")
def primal_infeasibility(q, r, h, g):
    v = 0.0
    for i in range(q):
        v = max(v, abs(h[i]))
    for i in range(r):
        v = max(v, g[i])
    return v


@njit(cache=True, inline="always")
def ip_one(n, q, r, m, ip_eval, ip_hess, residual, residual_jacobian, factor_dense, jac_params_absmax,
           y0, p, tol, max_iter, singular_tol, weak_tol, vecs, mats, kpiv, z, J, piv, F, info):
    """Solve one sample; writes the KKT point ``z``, the factorised KKT Jacobian
    ``J``/``piv`` and ``info = (iterations, KKT residual, weakly active count)``.

    ``vecs`` and ``mats`` bundle the scratch arrays (Numba inlines functions of at most
    32 arguments, and inlining is what lets it cache a driver that takes kernels as
    arguments)."""
    y, lam, nu, s, gradf, h, g, rd, rhs, rhs0, ds, dnu, yt, lamt, nut, st_, gradft, ht, gt, yt_z, Ft = vecs
    Jh, Jg, H, K, Jht, Jgt = mats
    nk = n + q
    info[0] = 0.0
    info[1] = np.inf
    info[2] = 0.0
    for i in range(n):
        y[i] = y0[i]
    for i in range(m):
        if not np.isfinite(p[i]):
            return st.NONFINITE
    for i in range(n):
        if not np.isfinite(y[i]):
            return st.NONFINITE
    ip_eval(y, p, gradf, h, Jh, g, Jg)
    for i in range(q):
        lam[i] = 0.0
    for i in range(r):
        s[i] = max(-g[i], 1.0)
        nu[i] = 1.0
    it = 0
    status = -1
    while True:
        avg = 0.0
        for i in range(r):
            avg += s[i] * nu[i]
        if r > 0:
            avg /= r
        phi0 = merit(n, q, r, lam, nu, s, 0.0, gradf, h, Jh, g, Jg, rd)
        if not np.isfinite(phi0):
            status = st.NONFINITE
            break
        res = 0.0
        for j in range(n):
            res = max(res, abs(rd[j]))
        for i in range(q):
            res = max(res, abs(h[i]))
        for i in range(r):
            res = max(res, abs(g[i] + s[i]), s[i] * nu[i])
        info[1] = res
        if res <= tol:
            status = st.CONVERGED
            break
        if res <= POLISH_FROM and it > 0:
            # Close enough for the active set to show: try finishing with the active-set
            # Newton step instead of driving mu all the way down. Kept only if the polished
            # point solves the KKT conditions to tol and is primal feasible; otherwise the
            # interior point goes on from where it was.
            for a in range(n):
                z[a] = y[a]
            for i in range(q):
                z[n + i] = lam[i]
            for i in range(r):
                z[n + q + i] = nu[i]
            rp = kkt_polish(n, q, r, residual, residual_jacobian, ip_eval, factor_dense,
                            z, p, weak_tol, J, piv, F, yt_z, Ft, gradft, ht, Jht, gt, Jgt, info)
            if rp <= tol and primal_infeasibility(q, r, ht, gt) <= tol:
                info[1] = rp
                return kkt_factor(n, q, r, residual_jacobian, factor_dense, jac_params_absmax,
                                  z, p, gt, weak_tol, singular_tol, J, piv, F)
            info[2] = 0.0
        if it >= max_iter:
            status = st.INFEASIBLE if primal_infeasibility(q, r, h, g) > np.sqrt(tol) else st.MAX_ITERATIONS
            break
        mu = max(IP_SIGMA * avg, 0.1 * tol)
        # reduced Newton matrix W = H + Jg^T diag(nu/s) Jg and right-hand side
        ip_hess(y, lam, nu, p, H)
        for a in range(n):
            for b in range(a + 1):
                v = H[a, b]
                for i in range(r):
                    v += Jg[i, a] * (nu[i] / s[i]) * Jg[i, b]
                H[a, b] = v
                H[b, a] = v
        for a in range(n):
            v = -rd[a]
            for i in range(r):
                v += Jg[i, a] * ((s[i] * nu[i] - mu - nu[i] * (g[i] + s[i])) / s[i])
            rhs[a] = v
        for i in range(q):
            rhs[n + i] = -h[i]
        scale = 0.0
        for a in range(n):
            scale = max(scale, abs(H[a, a]))
        delta = 0.0
        ok = False
        while delta <= 1e10 * (1.0 + scale):
            for a in range(n):
                for b in range(n):
                    K[a, b] = H[a, b]
                K[a, a] += delta
            if cholesky(n, K):
                ok = True
                break
            delta = 1e-8 * (1.0 + scale) if delta == 0.0 else 10.0 * delta
        phi = merit(n, q, r, lam, nu, s, mu, gradf, h, Jh, g, Jg, rd)
        for i in range(nk):
            rhs0[i] = rhs[i]
        accepted = False
        singular = False
        # First the step with the Hessian modification; if the merit cannot be reduced
        # along it, the exact Newton step of the perturbed KKT system (a descent
        # direction of the merit wherever that system is nonsingular).
        for attempt in range(2):
            if attempt == 1:
                if delta == 0.0 and ok:
                    break
                delta = 0.0
                ok = False
            for i in range(nk):
                rhs[i] = rhs0[i]
            if ok and q == 0:
                cholesky_solve(n, K, rhs)
            else:
                for a in range(n):
                    for b in range(n):
                        K[a, b] = H[a, b]
                    K[a, a] += delta
                for i in range(q):
                    for a in range(n):
                        K[n + i, a] = Jh[i, a]
                        K[a, n + i] = Jh[i, a]
                    for k in range(q):
                        K[n + i, n + k] = 0.0
                if not (lu_factor(nk, K, kpiv) > 0.0):
                    singular = True
                    continue
                lu_solve(nk, K, kpiv, rhs)
            # rhs now holds (dy, dlam); recover ds, dnu and the fraction-to-the-boundary step
            alpha = 1.0
            for i in range(r):
                v = -(g[i] + s[i])
                for a in range(n):
                    v -= Jg[i, a] * rhs[a]
                ds[i] = v
                dnu[i] = (mu - s[i] * nu[i] - nu[i] * v) / s[i]
                if ds[i] < 0.0:
                    alpha = min(alpha, -IP_TAU * s[i] / ds[i])
                if dnu[i] < 0.0:
                    alpha = min(alpha, -IP_TAU * nu[i] / dnu[i])
            t = alpha
            while t >= IP_MIN_STEP:
                for a in range(n):
                    yt[a] = y[a] + t * rhs[a]
                for i in range(q):
                    lamt[i] = lam[i] + t * rhs[n + i]
                for i in range(r):
                    nut[i] = nu[i] + t * dnu[i]
                    st_[i] = s[i] + t * ds[i]
                ip_eval(yt, p, gradft, ht, Jht, gt, Jgt)
                phit = merit(n, q, r, lamt, nut, st_, mu, gradft, ht, Jht, gt, Jgt, rd)
                if phit <= (1.0 - IP_ARMIJO * t) * phi:
                    accepted = True
                    break
                t *= 0.5
            if accepted:
                break
        if singular and not accepted:
            status = st.SINGULAR_JACOBIAN  # e.g. dependent equality constraints
            break
        if not accepted:
            status = st.INFEASIBLE if primal_infeasibility(q, r, h, g) > np.sqrt(tol) else st.LINE_SEARCH_FAILED
            break
        big_y = 0.0
        big_m = 0.0
        for a in range(n):
            y[a] = yt[a]
            gradf[a] = gradft[a]
            big_y = max(big_y, abs(y[a]))
            for i in range(q):
                Jh[i, a] = Jht[i, a]
            for i in range(r):
                Jg[i, a] = Jgt[i, a]
        for i in range(q):
            lam[i] = lamt[i]
            h[i] = ht[i]
            big_m = max(big_m, abs(lam[i]))
        for i in range(r):
            nu[i] = nut[i]
            s[i] = st_[i]
            g[i] = gt[i]
            big_m = max(big_m, nu[i])
        it += 1
        info[0] = it
        if not (big_y < IP_DIVERGED):
            status = st.UNBOUNDED
            break
        if not (big_m < IP_DIVERGED):
            status = st.INFEASIBLE
            break
    for a in range(n):
        z[a] = y[a]
    for i in range(q):
        z[n + i] = lam[i]
    for i in range(r):
        z[n + q + i] = nu[i]
    if status != st.CONVERGED:
        return status
    return kkt_finalize(n, q, r, residual, residual_jacobian, ip_eval, factor_dense, jac_params_absmax,
                        z, p, weak_tol, singular_tol, J, piv, F, yt_z, Ft, gradf, h, Jh, g, Jg, info)


@njit(cache=True, inline="always")
def _active_set_jacobian(n, q, r, residual_jacobian, z, p, g, weak_tol, J, F):
    """KKT Jacobian at ``z`` with each complementarity row in its active-set form:
    active (``ν_i > 0``): ``ν_i ∇g_i·dy = …`` (the ``g_i dν_i`` term dropped, as ``g_i = 0``
    at the exact solution); inactive (``ν_i = 0``): ``g_i dν_i = …``; weakly active
    (``ν_i = 0``, ``g_i ≈ 0``): ``dν_i = …``."""
    nz = n + q + r
    for i in range(nz):
        for j in range(nz):
            J[i, j] = 0.0
    residual_jacobian(z, p, F, J)
    for i in range(r):
        k = n + q + i
        if z[k] > 0.0:
            J[k, k] = 0.0
        elif g[i] >= -weak_tol:
            for j in range(nz):
                J[k, j] = 0.0
            J[k, k] = 1.0


@njit(cache=True, inline="always")
def kkt_polish(n, q, r, residual, residual_jacobian, ip_eval, factor_dense,
               z, p, weak_tol, J, piv, F, zt, Ft, gradf, h, Jh, g, Jg, info):
    """Classify the inequalities at the KKT point ``z`` and polish it with one Newton step
    on the active-set KKT system. An interior point stops at ``g_i ν_i ≈ μ``, so active
    constraints hold only to about ``μ / ν_i``; the step removes that error (exactly, for
    a QP). It is kept when it keeps the active set and does not increase the residual.
    Returns the KKT residual (∞-norm) at the final ``z``; ``g`` is left evaluated there."""
    nz = n + q + r
    ip_eval(z[:n], p, gradf, h, Jh, g, Jg)
    weak = 0
    for i in range(r):
        k = n + q + i
        if z[k] <= weak_tol:
            if g[i] >= -weak_tol:
                weak += 1  # weakly active: treated as inactive
            z[k] = 0.0
    info[2] = weak
    _active_set_jacobian(n, q, r, residual_jacobian, z, p, g, weak_tol, J, F)
    r0 = 0.0
    for i in range(nz):
        r0 = max(r0, abs(F[i]))
    if not (factor_dense(J, piv) > 0.0):
        return r0
    for i in range(nz):
        Ft[i] = -F[i]
    lu_solve(nz, J, piv, Ft)
    for i in range(nz):
        zt[i] = z[i] + Ft[i]
    residual(zt, p, Ft)
    r1 = 0.0
    for i in range(nz):
        r1 = max(r1, abs(Ft[i]))
    keep = r1 <= r0 and np.isfinite(r1)
    if keep:
        ip_eval(zt[:n], p, gradf, h, Jh, g, Jg)
        for i in range(r):
            k = n + q + i
            if (z[k] > 0.0 and not (zt[k] > 0.0)) or (z[k] == 0.0 and g[i] > weak_tol):
                keep = False
    if not keep:
        ip_eval(z[:n], p, gradf, h, Jh, g, Jg)
        return r0
    for i in range(r):
        k = n + q + i
        if z[k] == 0.0:
            zt[k] = 0.0  # inactive stays exactly inactive (its step is rounding noise)
        elif zt[k] <= weak_tol:
            zt[k] = 0.0  # the polished multiplier vanishes: weakly active after all
            weak += 1
    info[2] = weak
    for i in range(nz):
        z[i] = zt[i]
    return r1


@njit(cache=True, inline="always")
def kkt_factor(n, q, r, residual_jacobian, factor_dense, jac_params_absmax,
               z, p, g, weak_tol, singular_tol, J, piv, F):
    """Factor the active-set KKT Jacobian at ``z`` for the backward pass; returns the status."""
    nz = n + q + r
    _active_set_jacobian(n, q, r, residual_jacobian, z, p, g, weak_tol, J, F)
    # Dense LU with partial pivoting: the KKT matrix is indefinite and, with the rows
    # replaced, not the matrix a fixed elimination order was chosen for.
    min_pivot = factor_dense(J, piv)
    if not (min_pivot > 0.0):
        return st.SINGULAR_AT_SOLUTION
    return check_solution(nz, min_pivot, J, jac_params_absmax(z, p), singular_tol)


@njit(cache=True, inline="always")
def kkt_finalize(n, q, r, residual, residual_jacobian, ip_eval, factor_dense, jac_params_absmax,
                 z, p, weak_tol, singular_tol, J, piv, F, zt, Ft, gradf, h, Jh, g, Jg, info):
    """Classify, polish and factor at the KKT point ``z`` (see the module docstring)."""
    res = kkt_polish(n, q, r, residual, residual_jacobian, ip_eval, factor_dense,
                     z, p, weak_tol, J, piv, F, zt, Ft, gradf, h, Jh, g, Jg, info)
    info[1] = min(info[1], res)
    return kkt_factor(n, q, r, residual_jacobian, factor_dense, jac_params_absmax,
                      z, p, g, weak_tol, singular_tol, J, piv, F)
