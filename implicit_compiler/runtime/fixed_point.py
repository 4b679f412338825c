"""Fixed-point iteration ``y <- g(y, theta)`` for one sample, plain or Anderson-accelerated.

Layers written as ``y = g(y, theta)`` are compiled with the residual
``F = y - g``, so ``g(y) = y - F(y)``. Iteration stops when
``||F||_inf <= max(ftol, rtol ||y||_inf)`` (``rtol`` relative to the iterate, the scale of
the two terms of ``F = y - g``).
Anderson acceleration (window ``m``) mixes the last ``m`` iterates:
``gamma = argmin ||f_k - dF gamma||`` (regularised normal equations) and
``y_{k+1} = g(y_k) - dG gamma``; a non-finite mixed step falls back to the
plain step and clears the history. At the end ``dF/dy`` is evaluated and
factored at the returned point for the implicit backward pass, and the point is
classified by :func:`implicit_compiler.runtime.newton.solution_status` (the
equilibrated condition number of dF/dy against ``singular_tol``).
"""

import numpy as np
from numba import njit

from . import status as st
from .linalg import lu_factor, lu_solve
from .newton import all_finite, inf_norm, solution_status

ANDERSON_REG = 1e-10


@njit(cache=True, inline="always")
def fixed_point_one(n, m, residual, residual_jacobian, factor, factor_dense, solve, solve_transpose,
                    y0, p, ftol, rtol, max_iter, singular_tol, memory,
                    y, J, piv, F, g, dF, dG, fprev, gprev, H, hpiv, rhs, W, info, tab):
    info[0] = 0.0
    info[1] = np.inf
    for i in range(n):
        y[i] = y0[i]
    if not all_finite(m, p) or not all_finite(n, y0):
        return st.NONFINITE
    residual(y, p, F, tab)
    fnorm = inf_norm(n, F)
    info[1] = fnorm
    if not np.isfinite(fnorm):
        return st.NONFINITE
    it = 0
    hist = 0  # number of stored difference columns
    head = 0  # ring-buffer position of the next column
    while fnorm > max(ftol, rtol * inf_norm(n, y)):
        if it >= max_iter:
            return st.MAX_ITERATIONS
        # f_k = g(y_k) - y_k = -F(y_k);  g_k = y_k - F(y_k)
        for i in range(n):
            g[i] = y[i] - F[i]
        if memory > 0 and it > 0:
            for i in range(n):
                dF[head, i] = -F[i] - fprev[i]
                dG[head, i] = g[i] - gprev[i]
            head = (head + 1) % memory
            if hist < memory:
                hist += 1
        for i in range(n):
            fprev[i] = -F[i]
            gprev[i] = g[i]
        used_anderson = False
        if hist > 0:
            k = hist
            Hs = H[:k, :k]
            for a in range(k):
                for b in range(k):
                    s = 0.0
                    for i in range(n):
                        s += dF[a, i] * dF[b, i]
                    Hs[a, b] = s
                Hs[a, a] += ANDERSON_REG * (1.0 + Hs[a, a])
                s = 0.0
                for i in range(n):
                    s += dF[a, i] * (-F[i])
                rhs[a] = s
            if lu_factor(k, Hs, hpiv) > 0.0:
                lu_solve(k, Hs, hpiv, rhs)
                for i in range(n):
                    s = g[i]
                    for a in range(k):
                        s -= dG[a, i] * rhs[a]
                    y[i] = s
                used_anderson = all_finite(n, y)
        if not used_anderson:
            hist = 0
            head = 0
            for i in range(n):
                y[i] = g[i]
        it += 1
        info[0] = it
        residual(y, p, F, tab)
        fnorm = inf_norm(n, F)
        info[1] = fnorm
        if not np.isfinite(fnorm):
            return st.NONFINITE
    residual_jacobian(y, p, F, J, tab)  # J was never factored here: zero outside the pattern
    return solution_status(n, residual_jacobian, factor, factor_dense, solve, solve_transpose,
                           y, p, F, J, piv, singular_tol, W[0], W[1], W[2], g, tab)
