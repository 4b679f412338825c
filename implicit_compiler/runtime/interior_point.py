"""Primal-dual interior point for one sample of ``min f(y) s.t. h(y) = 0, g(y) <= 0``.

**Scaling.** At the initial point the objective and each constraint are scaled by
``min(1, 100 / ||∇·||_∞)`` (as IPOPT does), so that no gradient exceeds 100; the
iteration runs on the scaled problem and the multipliers are unscaled at the end.
Every convergence test is relative to the size of the terms it compares (see
``weights``), so problems whose data or solutions are huge or tiny (1e-200 .. 1e200)
are solved to the same relative accuracy as problems of size one.

Slacks ``s > 0`` turn the inequalities into ``g + s = 0``. With multipliers
``λ`` (equalities) and ``ν > 0`` (inequalities) and barrier parameter ``μ``,
each iteration takes a Newton step on the perturbed KKT system

    r_d = ∇f + J_hᵀ λ + J_gᵀ ν = 0,   h = 0,   g + s = 0,   s ∘ ν = μ

in the reduced form (``Σ = diag(ν / s)``)

    [ W + δI   J_hᵀ ] [Δy]   [ -r_d + J_gᵀ ((s∘ν - μ - ν∘(g+s)) / s) ]
    [ J_h      0    ] [Δλ] = [ -h                                   ],   W = ∇²L + J_gᵀ Σ J_g,

then ``Δs = -(g + s) - J_g Δy`` and ``Δν = (μ - s∘ν - ν∘Δs) / s``.
``δ >= 0`` is the smallest of ``0, 1e-8 ρ, 1e-7 ρ, …`` (ρ the size of W's diagonal)
for which ``W + δI`` has a Cholesky factor. The step is cut by the
fraction-to-the-boundary rule (``s, ν`` stay positive) and then backtracked:

* on the penalty-barrier merit ``Φ = f - μ Σ log s + ρ (||h||₁ + ||g + s||₁)``, for which
  the modified step is a descent direction (``ρ`` is raised as needed, as in Nocedal &
  Wright, eq. 18.36). A step is accepted when ``Φ`` falls by at least a quarter of the
  decrease its quadratic model ``t DΦ + ½ t² Δyᵀ(W + δI)Δy`` predicts (a trust-region
  ratio test along the step): decreasing the objective is what steers the iteration away
  from maxima and saddle points, and the ratio test shortens steps that would leave the
  region where the model holds (jump into another basin), so the iterate stays near the
  start's local minimum;
* if ``Φ`` is not finite (e.g. an objective that overflows) or not reduced, on the merit
  ``||r_μ||²`` (the squared residual of the perturbed system, each component weighted by
  the size of its terms), first along the modified step, then along the exact Newton step.

``μ`` is one tenth of the average relative complementarity ``s_i ν_i / max(1, s_i)``.

Without inequalities this is Newton on the Lagrange system (with the same
Hessian modification); without constraints, Newton on ``∇f = 0``.

Converged when every weighted residual component is at most ``tol``. Statuses:
``INFEASIBLE`` when the primal residual cannot be reduced or the multipliers
diverge, ``UNBOUNDED`` when ``y`` diverges.

The KKT point ``z = (y, λ, ν)`` is then checked with the KKT residual system's
own Jacobian (which the backward pass reuses). Constraints with both
``g_i`` and ``ν_i`` within ``weak_tol`` of zero (relative, in the scaled problem) are
weakly active (no strict complementarity): they are treated as inactive (``ν_i = 0``
and the complementarity row replaced by ``dν_i = 0``), counted in ``info[2]``.
Clearly inactive constraints get ``ν_i = 0`` exactly.

**Second-order check** (``second_order``). A KKT point is a strict local minimum when
the Hessian of the Lagrangian is positive definite on the null space of the
Jacobian of the active constraints (equalities and strongly active inequalities).
The null space comes from a Householder QR of that Jacobian (whose normalised rows
must be independent: LICQ), the reduced Hessian ``Zᵀ ∇²L Z`` is equilibrated
symmetrically, and two Cholesky tests classify it: negative curvature →
``NOT_A_MINIMUM``; positive semidefinite but singular (zero curvature, e.g. ``y⁴`` at
0) or LICQ failing → ``SINGULAR_AT_SOLUTION`` (the KKT matrix is singular there, so no
implicit gradient). These relative tests replace the absolute pivot test of
residual systems for the KKT matrix.
"""

import numpy as np
from numba import njit

from . import status as st
from .linalg import lu_factor, lu_solve

IP_TAU = 0.995
IP_SIGMA = 0.1
IP_ARMIJO = 1e-4
IP_RATIO = 0.25  # actual / predicted decrease of the penalty-barrier merit
IP_MIN_STEP = 1e-12
IP_DIVERGED = 1e12
IP_GMAX = 100.0  # gradients are scaled down to at most this size
# (Functions that take generated kernels as arguments are inlined, which is what lets Numba
# cache the drivers; the others that run once per sample, kkt_error and second_order, are
# compiled once here and called, which keeps each problem's compile small.)
POLISH_FROM = 1e-6  # KKT residual below which the active-set finish is tried


@njit(cache=True, inline="always", error_model="numpy")
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


@njit(cache=True, inline="always", error_model="numpy")
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


@njit(cache=True, inline="always", error_model="numpy")
def problem_scaling(n, q, r, gradf, Jh, Jg, sc):
    """``sc = (σ_f, σ_h, σ_g)``: ``min(1, 100 / ||∇·||_∞)`` per function. False if a
    gradient is not finite."""
    ok = True
    m = 0.0
    for j in range(n):
        if not np.isfinite(gradf[j]):
            ok = False
        m = max(m, abs(gradf[j]))
    sc[0] = IP_GMAX / m if m > IP_GMAX else 1.0
    for i in range(q):
        m = 0.0
        for j in range(n):
            if not np.isfinite(Jh[i, j]):
                ok = False
            m = max(m, abs(Jh[i, j]))
        sc[1 + i] = IP_GMAX / m if m > IP_GMAX else 1.0
    for i in range(r):
        m = 0.0
        for j in range(n):
            if not np.isfinite(Jg[i, j]):
                ok = False
            m = max(m, abs(Jg[i, j]))
        sc[1 + q + i] = IP_GMAX / m if m > IP_GMAX else 1.0
    return ok


@njit(cache=True, inline="always", error_model="numpy")
def apply_scaling(n, q, r, sc, gradf, h, Jh, g, Jg):
    for j in range(n):
        gradf[j] *= sc[0]
    for i in range(q):
        c = sc[1 + i]
        h[i] *= c
        for j in range(n):
            Jh[i, j] *= c
    for i in range(r):
        c = sc[1 + q + i]
        g[i] *= c
        for j in range(n):
            Jg[i, j] *= c


@njit(cache=True, inline="always", error_model="numpy")
def weights(n, q, r, y, lam, nu, s, gradf, Jh, Jg, wd, wh, wg, wc):
    """Per-component weights of the (scaled) KKT residual: one over the size of the terms
    each component adds up (at least 1), so that the tests are relative."""
    for j in range(n):
        v = abs(gradf[j])
        for i in range(q):
            v += abs(Jh[i, j] * lam[i])
        for i in range(r):
            v += abs(Jg[i, j] * nu[i])
        wd[j] = 1.0 / max(1.0, v)
    for i in range(q):
        v = 0.0
        for j in range(n):
            v += abs(Jh[i, j] * y[j])
        wh[i] = 1.0 / max(1.0, v)
    for i in range(r):
        v = abs(s[i])
        for j in range(n):
            v += abs(Jg[i, j] * y[j])
        wg[i] = 1.0 / max(1.0, v)
        wc[i] = 1.0 / max(1.0, s[i])


@njit(cache=True, inline="always", error_model="numpy")
def merit(n, q, r, lam, nu, s, mu, gradf, h, Jh, g, Jg, rd, wd, wh, wg, wc):
    """Weighted ``||r_μ||²``; also writes the dual residual ``r_d`` into ``rd``."""
    phi = 0.0
    for j in range(n):
        v = gradf[j]
        for i in range(q):
            v += Jh[i, j] * lam[i]
        for i in range(r):
            v += Jg[i, j] * nu[i]
        rd[j] = v
        v *= wd[j]
        phi += v * v
    for i in range(q):
        v = h[i] * wh[i]
        phi += v * v
    for i in range(r):
        a = (g[i] + s[i]) * wg[i]
        c = (s[i] * nu[i] - mu) * wc[i]
        phi += a * a + c * c
    return phi


@njit(cache=True, inline="always", error_model="numpy")
def barrier_merit(q, r, fval, s, mu, rho, h, g):
    """``Φ = f - μ Σ log s + ρ (||h||₁ + ||g + s||₁)`` (scaled quantities)."""
    v = fval
    c = 0.0
    for i in range(q):
        c += abs(h[i])
    for i in range(r):
        v -= mu * np.log(s[i])
        c += abs(g[i] + s[i])
    return v + rho * c


@njit(cache=True, inline="always", error_model="numpy")
def primal_infeasibility(q, r, h, g, wh, wg):
    v = 0.0
    for i in range(q):
        v = max(v, abs(h[i]) * wh[i])
    for i in range(r):
        v = max(v, g[i] * wg[i])
    return v


@njit(cache=True, error_model="numpy")
def kkt_error(n, q, r, z, gradf, h, Jh, g, Jg, sc):
    """The relative KKT error of ``z = (y, λ, ν)`` (unscaled; ``gradf, h, Jh, g, Jg``
    evaluated, unscaled, at ``y``), measured as the interior point measures its own:
    stationarity, feasibility ``h = 0, g <= 0``, ``ν >= 0`` and complementarity."""
    sf = sc[0]
    err = 0.0
    for j in range(n):
        v = gradf[j]
        a = abs(gradf[j])
        for i in range(q):
            v += Jh[i, j] * z[n + i]
            a += abs(Jh[i, j] * z[n + i])
        for i in range(r):
            v += Jg[i, j] * z[n + q + i]
            a += abs(Jg[i, j] * z[n + q + i])
        err = max(err, sf * abs(v) / max(1.0, sf * a))
    for i in range(q):
        c = sc[1 + i]
        a = 0.0
        for j in range(n):
            a += abs(Jh[i, j] * z[j])
        err = max(err, c * abs(h[i]) / max(1.0, c * a))
    for i in range(r):
        c = sc[1 + q + i]
        nu = z[n + q + i]
        a = abs(g[i])
        for j in range(n):
            a += abs(Jg[i, j] * z[j])
        err = max(err, c * max(g[i], 0.0) / max(1.0, c * a))
        err = max(err, sf / c * max(-nu, 0.0))
        err = max(err, sf * abs(nu * g[i]) / max(1.0, c * abs(g[i])))
    return err


@njit(cache=True, inline="always", error_model="numpy")
def ip_one(n, q, r, m, ip_eval, ip_obj, ip_hess, residual, residual_jacobian, factor_dense,
           y0, p, tol, max_iter, singular_tol, weak_tol, vecs, mats, kpiv, z, J, piv, F, info, tab):
    """Solve one sample; writes the KKT point ``z``, the factorised KKT Jacobian
    ``J``/``piv`` and ``info = (iterations, KKT residual, weakly active count)``.

    ``vecs`` and ``mats`` bundle the scratch arrays (Numba inlines functions of at most
    32 arguments, and inlining is what lets it cache a driver that takes kernels as
    arguments)."""
    (y, lam, nu, s, gradf, h, g, rd, rhs, rhs0, ds, dnu, yt, lamt, nut, st_, gradft, ht, gt, yt_z, Ft,
     sc, wd, wh, wg, wc, gw) = vecs
    Jh, Jg, H, K, Jht, Jgt = mats
    nk = n + q
    info[0] = 0.0
    info[1] = np.inf
    info[2] = 0.0
    for i in range(n):
        y[i] = y0[i]
    big_p = 0.0
    for i in range(m):
        if not np.isfinite(p[i]):
            return st.NONFINITE
        big_p = max(big_p, abs(p[i]))
    for i in range(n):
        if not np.isfinite(y[i]):
            return st.NONFINITE
        big_p = max(big_p, abs(y[i]))
    # y diverges when it outgrows the data by far (not at a fixed size: solutions of
    # problems with huge data are huge)
    y_diverged = IP_DIVERGED * max(1.0, big_p)
    ip_eval(y, p, gradf, h, Jh, g, Jg, tab)
    finite = problem_scaling(n, q, r, gradf, Jh, Jg, sc)
    for i in range(q):
        finite = finite and np.isfinite(h[i])
    for i in range(r):
        finite = finite and np.isfinite(g[i])
    if not finite:
        return st.NONFINITE
    apply_scaling(n, q, r, sc, gradf, h, Jh, g, Jg)
    for i in range(q):
        lam[i] = 0.0
    for i in range(r):
        s[i] = max(-g[i], 1.0)
        nu[i] = 1.0
    rho = 0.0
    it = 0
    status = -1
    while True:
        weights(n, q, r, y, lam, nu, s, gradf, Jh, Jg, wd, wh, wg, wc)
        avg = 0.0
        for i in range(r):
            avg += s[i] * nu[i] * wc[i]
        if r > 0:
            avg /= r
        phi0 = merit(n, q, r, lam, nu, s, 0.0, gradf, h, Jh, g, Jg, rd, wd, wh, wg, wc)
        if not np.isfinite(phi0):
            status = st.NONFINITE
            break
        res = 0.0
        for j in range(n):
            res = max(res, abs(rd[j]) * wd[j])
        for i in range(q):
            res = max(res, abs(h[i]) * wh[i])
        for i in range(r):
            res = max(res, abs(g[i] + s[i]) * wg[i], s[i] * nu[i] * wc[i])
        info[1] = res
        if res <= tol:
            status = st.CONVERGED
            break
        if res <= POLISH_FROM and it > 0:
            # Close enough for the active set to show: try finishing with the active-set
            # Newton step instead of driving mu all the way down. Kept only if the polished
            # point solves the KKT conditions to tol (feasibility included); otherwise the
            # interior point goes on from where it was.
            unscale_point(n, q, r, sc, y, lam, nu, z)
            kkt_polish(n, q, r, residual, residual_jacobian, ip_eval, factor_dense,
                       z, p, weak_tol, sc, J, piv, F, yt_z, Ft, gradft, ht, Jht, gt, Jgt, gw, info, tab)
            rp = kkt_error(n, q, r, z, gradft, ht, Jht, gt, Jgt, sc)
            if rp <= tol:
                info[1] = rp
                return kkt_factor(n, q, r, residual_jacobian, ip_hess, factor_dense,
                                  z, p, gt, Jht, Jgt, gw, singular_tol, J, piv, F, H, tab)
            info[2] = 0.0
        if it >= max_iter:
            status = st.INFEASIBLE if primal_infeasibility(q, r, h, g, wh, wg) > np.sqrt(tol) else st.MAX_ITERATIONS
            break
        mu = max(IP_SIGMA * avg, 0.1 * tol)
        # reduced Newton matrix W = H + Jg^T diag(nu/s) Jg and right-hand side; the
        # Hessian of the scaled Lagrangian is sf * (the Lagrangian's, at unscaled multipliers)
        for i in range(q):
            lamt[i] = lam[i] * sc[1 + i] / sc[0]
        for i in range(r):
            nut[i] = nu[i] * sc[1 + q + i] / sc[0]
        ip_hess(y, lamt, nut, p, H, tab)
        for a in range(n):
            for b in range(a + 1):
                v = H[a, b] * sc[0]
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
        phi = merit(n, q, r, lam, nu, s, mu, gradf, h, Jh, g, Jg, rd, wd, wh, wg, wc)
        for i in range(nk):
            rhs0[i] = rhs[i]
        accepted = False
        singular = False
        # First the step with the Hessian modification, on the penalty-barrier merit; if that
        # merit is not usable or not reduced along it, the exact Newton step of the perturbed
        # KKT system on ||r_mu||^2 (a descent direction of it wherever that system is nonsingular).
        used_phi = False
        for attempt in range(2):
            if attempt == 1:
                if delta == 0.0 and ok and not used_phi:
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
            # the penalty-barrier merit (where the objective is finite and the step descends on it)
            use_phi = attempt == 0
            Phi0 = 0.0
            dPhi = 0.0
            quad = 0.0
            if use_phi:
                dobj = 0.0
                dd = 0.0
                for a in range(n):
                    dobj += gradf[a] * rhs[a]
                    dd += rhs[a] * rhs[a]
                    for b in range(n):
                        quad += rhs[a] * H[a, b] * rhs[b]
                quad = max(quad + delta * dd, 0.0)
                for i in range(r):
                    dobj -= mu * ds[i] / s[i]
                cviol = 0.0
                for i in range(q):
                    cviol += abs(h[i])
                for i in range(r):
                    cviol += abs(g[i] + s[i])
                if cviol > 0.0:
                    rho = max(rho, (dobj + 0.5 * quad) / (0.9 * cviol))
                dPhi = dobj - rho * cviol
                Phi0 = barrier_merit(q, r, sc[0] * ip_obj(y, p, tab), s, mu, rho, h, g)
                if not (np.isfinite(Phi0) and dPhi < 0.0):
                    use_phi = False
                used_phi = use_phi
            t = alpha
            while t >= IP_MIN_STEP:
                for a in range(n):
                    yt[a] = y[a] + t * rhs[a]
                for i in range(q):
                    lamt[i] = lam[i] + t * rhs[n + i]
                for i in range(r):
                    nut[i] = nu[i] + t * dnu[i]
                    st_[i] = s[i] + t * ds[i]
                ip_eval(yt, p, gradft, ht, Jht, gt, Jgt, tab)
                apply_scaling(n, q, r, sc, gradft, ht, Jht, gt, Jgt)
                if use_phi:
                    # Accepted when the merit falls by at least a quarter of what its quadratic
                    # model predicts (a trust-region ratio test along the step): a step that
                    # leaves the region where the model holds (into another basin) is shortened.
                    Phit = barrier_merit(q, r, sc[0] * ip_obj(yt, p, tab), st_, mu, rho, ht, gt)
                    pred = -(t * dPhi + 0.5 * t * t * quad)
                    if pred > 0.0:
                        ok_t = Phi0 - Phit >= IP_RATIO * pred
                    else:
                        ok_t = Phit <= Phi0 + IP_ARMIJO * t * dPhi
                    if ok_t:
                        accepted = True
                        break
                else:
                    phit = merit(n, q, r, lamt, nut, st_, mu, gradft, ht, Jht, gt, Jgt, rd, wd, wh, wg, wc)
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
            status = st.INFEASIBLE if primal_infeasibility(q, r, h, g, wh, wg) > np.sqrt(tol) else st.LINE_SEARCH_FAILED
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
        if not (big_y < y_diverged):
            status = st.UNBOUNDED
            break
        if not (big_m < IP_DIVERGED):
            status = st.INFEASIBLE
            break
    unscale_point(n, q, r, sc, y, lam, nu, z)
    if status != st.CONVERGED:
        return status
    return kkt_finalize(n, q, r, residual, residual_jacobian, ip_eval, ip_hess, factor_dense,
                        z, p, weak_tol, singular_tol, sc, J, piv, F, yt_z, Ft, gradf, h, Jh, g, Jg, gw, H, info, tab)


@njit(cache=True, inline="always", error_model="numpy")
def unscale_point(n, q, r, sc, y, lam, nu, z):
    """``z = (y, λ, ν)`` with the multipliers of the unscaled problem."""
    for a in range(n):
        z[a] = y[a]
    for i in range(q):
        z[n + i] = lam[i] * sc[1 + i] / sc[0]
    for i in range(r):
        z[n + q + i] = nu[i] * sc[1 + q + i] / sc[0]


@njit(cache=True, inline="always", error_model="numpy")
def _active_set_jacobian(n, q, r, residual_jacobian, z, p, g, gw, J, F, tab):
    """KKT Jacobian at ``z`` with each complementarity row in its active-set form:
    active (``ν_i > 0``): ``ν_i ∇g_i·dy = …`` (the ``g_i dν_i`` term dropped, as ``g_i = 0``
    at the exact solution); inactive (``ν_i = 0``): ``g_i dν_i = …``; weakly active
    (``ν_i = 0``, ``g_i >= -gw_i``): ``dν_i = …``."""
    nz = n + q + r
    for i in range(nz):
        for j in range(nz):
            J[i, j] = 0.0
    residual_jacobian(z, p, F, J, tab)
    for i in range(r):
        k = n + q + i
        if z[k] > 0.0:
            J[k, k] = 0.0
        elif g[i] >= -gw[i]:
            for j in range(nz):
                J[k, j] = 0.0
            J[k, k] = 1.0


@njit(cache=True, inline="always", error_model="numpy")
def kkt_polish(n, q, r, residual, residual_jacobian, ip_eval, factor_dense,
               z, p, weak_tol, sc, J, piv, F, zt, Ft, gradf, h, Jh, g, Jg, gw, info, tab):
    """Classify the inequalities at the KKT point ``z`` and polish it with one Newton step
    on the active-set KKT system. An interior point stops at ``g_i ν_i ≈ μ``, so active
    constraints hold only to about ``μ / ν_i``; the step removes that error (exactly, for
    a QP). It is kept when it keeps the active set and does not increase the residual.
    "≈ 0" is ``weak_tol`` relative to the scaled problem: ``ν_i σ_f / σ_g,i <= weak_tol``
    and ``g_i >= -gw_i`` with ``gw_i = weak_tol max(1, σ_g,i Σ_j |∂g_i/∂y_j y_j|) / σ_g,i``.
    Returns the KKT residual (∞-norm) at the final ``z``; ``gradf, h, Jh, g, Jg`` are left
    evaluated there."""
    nz = n + q + r
    ip_eval(z[:n], p, gradf, h, Jh, g, Jg, tab)
    weak = 0
    for i in range(r):
        k = n + q + i
        c = sc[1 + q + i]
        a = 0.0
        for j in range(n):
            a += abs(Jg[i, j] * z[j])
        gw[i] = weak_tol * max(1.0, c * a) / c
        if z[k] * sc[0] / c <= weak_tol:
            if g[i] >= -gw[i]:
                weak += 1  # weakly active: treated as inactive
            z[k] = 0.0
    info[2] = weak
    _active_set_jacobian(n, q, r, residual_jacobian, z, p, g, gw, J, F, tab)
    r0 = 0.0
    for i in range(nz):
        r0 = max(r0, abs(F[i]))
    if not (factor_dense(J, piv, tab) > 0.0):
        return r0
    for i in range(nz):
        Ft[i] = -F[i]
    lu_solve(nz, J, piv, Ft)
    for i in range(nz):
        zt[i] = z[i] + Ft[i]
    residual(zt, p, Ft, tab)
    r1 = 0.0
    for i in range(nz):
        r1 = max(r1, abs(Ft[i]))
    keep = r1 <= r0 and np.isfinite(r1)
    if keep:
        ip_eval(zt[:n], p, gradf, h, Jh, g, Jg, tab)
        for i in range(r):
            k = n + q + i
            if (z[k] > 0.0 and not (zt[k] > 0.0)) or (z[k] == 0.0 and g[i] > gw[i]):
                keep = False
    if not keep:
        ip_eval(z[:n], p, gradf, h, Jh, g, Jg, tab)
        return r0
    for i in range(r):
        k = n + q + i
        if z[k] == 0.0:
            zt[k] = 0.0  # inactive stays exactly inactive (its step is rounding noise)
        elif zt[k] * sc[0] / sc[1 + q + i] <= weak_tol:
            zt[k] = 0.0  # the polished multiplier vanishes: weakly active after all
            weak += 1
    info[2] = weak
    for i in range(nz):
        z[i] = zt[i]
    return r1


@njit(cache=True, error_model="numpy")
def second_order(n, q, r, H, z, Jh, Jg, singular_tol):
    """Second-order status of the KKT point ``z`` (``H = ∇²_y L`` there): ``CONVERGED``
    when ``H`` is positive definite on the null space of the active constraints'
    Jacobian (equalities and inequalities with ``ν_i > 0``), ``NOT_A_MINIMUM`` when it
    has a direction of negative curvature there, ``SINGULAR_AT_SOLUTION`` when it is
    only semidefinite (zero curvature) or the active gradients are dependent (LICQ)."""
    k = q
    for i in range(r):
        if z[n + q + i] > 0.0:
            k += 1
    if k > n:
        return st.SINGULAR_AT_SOLUTION  # more active constraints than variables: no LICQ
    # A^T (n x k), columns the active gradients normalised to unit length
    At = np.empty((n, max(k, 1)))
    c = 0
    for i in range(q + r):
        if i >= q and not (z[n + i] > 0.0):
            continue
        nrm = 0.0
        for j in range(n):
            v = Jh[i, j] if i < q else Jg[i - q, j]
            At[j, c] = v
            nrm += v * v
        nrm = np.sqrt(nrm)
        if not (nrm > 0.0):
            return st.SINGULAR_AT_SOLUTION
        for j in range(n):
            At[j, c] /= nrm
        c += 1
    # Householder QR: A^T = Q R, Q accumulated; its last n - k columns span null(A)
    Qm = np.zeros((n, n))
    for j in range(n):
        Qm[j, j] = 1.0
    v = np.empty(n)
    for j in range(k):
        nrm = 0.0
        for i in range(j, n):
            nrm += At[i, j] * At[i, j]
        nrm = np.sqrt(nrm)
        if not (nrm > singular_tol):
            return st.SINGULAR_AT_SOLUTION  # active gradients (nearly) dependent
        alpha = -nrm if At[j, j] >= 0.0 else nrm
        vv = 0.0
        for i in range(j, n):
            v[i] = At[i, j]
        v[j] -= alpha
        for i in range(j, n):
            vv += v[i] * v[i]
        if vv == 0.0:
            continue
        for col in range(j, k):
            d = 0.0
            for i in range(j, n):
                d += v[i] * At[i, col]
            d *= 2.0 / vv
            for i in range(j, n):
                At[i, col] -= d * v[i]
        for row in range(n):
            d = 0.0
            for i in range(j, n):
                d += Qm[row, i] * v[i]
            d *= 2.0 / vv
            for i in range(j, n):
                Qm[row, i] -= d * v[i]
    nr = n - k
    if nr == 0:
        return st.CONVERGED
    # reduced Hessian Hr = Z^T H Z, Z = Qm[:, k:]
    HZ = np.empty((n, nr))
    for a in range(n):
        for b in range(nr):
            d = 0.0
            for i in range(n):
                d += H[a, i] * Qm[i, k + b]
            HZ[a, b] = d
    Hr = np.empty((nr, nr))
    smax = 0.0
    for a in range(nr):
        for b in range(nr):
            d = 0.0
            for i in range(n):
                d += Qm[i, k + a] * HZ[i, b]
            Hr[a, b] = d
    for a in range(nr):
        for b in range(a):
            d = 0.5 * (Hr[a, b] + Hr[b, a])
            Hr[a, b] = d
            Hr[b, a] = d
        for b in range(nr):
            smax = max(smax, abs(Hr[a, b]))
    if not np.isfinite(smax):
        return st.NONFINITE
    if smax == 0.0:
        return st.SINGULAR_AT_SOLUTION
    # symmetric equilibration, then Cholesky of Hr ± singular_tol I
    dg = np.empty(nr)
    for a in range(nr):
        dg[a] = 1.0 / np.sqrt(max(abs(Hr[a, a]), singular_tol * smax))
    M = np.empty((nr, nr))
    for a in range(nr):
        for b in range(nr):
            M[a, b] = Hr[a, b] * dg[a] * dg[b]
        M[a, a] += singular_tol
    if not cholesky(nr, M):
        return st.NOT_A_MINIMUM
    for a in range(nr):
        for b in range(nr):
            M[a, b] = Hr[a, b] * dg[a] * dg[b]
        M[a, a] -= singular_tol
    if not cholesky(nr, M):
        return st.SINGULAR_AT_SOLUTION
    return st.CONVERGED


@njit(cache=True, inline="always", error_model="numpy")
def kkt_factor(n, q, r, residual_jacobian, ip_hess, factor_dense,
               z, p, g, Jh, Jg, gw, singular_tol, J, piv, F, H, tab):
    """Factor the active-set KKT Jacobian at ``z`` for the backward pass and check the
    second-order condition; returns the status. ``g, Jh, Jg`` are evaluated at ``z``."""
    _active_set_jacobian(n, q, r, residual_jacobian, z, p, g, gw, J, F, tab)
    # Dense LU with partial pivoting: the KKT matrix is indefinite and, with the rows
    # replaced, not the matrix a fixed elimination order was chosen for.
    min_pivot = factor_dense(J, piv, tab)
    ip_hess(z[:n], z[n:n + q], z[n + q:], p, H, tab)
    status = second_order(n, q, r, H, z, Jh, Jg, singular_tol)
    if status == st.CONVERGED and not (min_pivot > 0.0):
        return st.SINGULAR_AT_SOLUTION
    return status


@njit(cache=True, inline="always", error_model="numpy")
def kkt_finalize(n, q, r, residual, residual_jacobian, ip_eval, ip_hess, factor_dense,
                 z, p, weak_tol, singular_tol, sc, J, piv, F, zt, Ft, gradf, h, Jh, g, Jg, gw, H, info, tab):
    """Classify, polish and factor at the KKT point ``z`` (see the module docstring)."""
    kkt_polish(n, q, r, residual, residual_jacobian, ip_eval, factor_dense,
               z, p, weak_tol, sc, J, piv, F, zt, Ft, gradf, h, Jh, g, Jg, gw, info, tab)
    info[1] = min(info[1], kkt_error(n, q, r, z, gradf, h, Jh, g, Jg, sc))
    return kkt_factor(n, q, r, residual_jacobian, ip_hess, factor_dense,
                      z, p, g, Jh, Jg, gw, singular_tol, J, piv, F, H, tab)
