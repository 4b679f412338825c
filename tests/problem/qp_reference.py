"""Exact reference for convex QPs: enumerate the active sets, solve each KKT system.

``min ½ yᵀ Q y + qᵀ y  s.t.  G y <= h,  A y = b``  with ``Q`` symmetric positive definite
(the problem's Hessian is the symmetric part ``(Q + Qᵀ)/2`` when every entry of ``Q`` is a
parameter). For each subset ``S`` of the inequalities the equality-constrained KKT system

    [ Qs   Aᵀ  G_Sᵀ ] [y  ]   [ -q  ]
    [ A    0   0    ] [λ  ] = [  b  ]
    [ G_S  0   0    ] [ν_S]   [ h_S ]

is solved; the solution is the subset whose point is feasible with ``ν_S >= 0`` (unique for a
strictly convex QP). With strict complementarity the solution is locally the smooth map
``x = K⁻¹ rhs``, so ``dy/dθ`` follows from the same linear system: with ``K w = (ȳ, 0, 0)``,

    q̄ = -w_y,  b̄ = w_λ,  h̄_S = w_ν,
    Q̄ = -(w_y yᵀ + y w_yᵀ)/2,  Ā = -(λ w_yᵀ + w_λ yᵀ),  Ḡ_S = -(ν_S w_yᵀ + w_ν yᵀ),

and zero rows of ``Ḡ``, ``h̄`` for inactive constraints. Pure NumPy, to rounding error.
"""

from itertools import combinations

import numpy as np


def solve_qp(Q, q, G, h, A, b, feas_tol=1e-12):
    """Returns ``(y, lam, nu, active)``; ``nu`` is zero off the active set."""
    Qs = (Q + Q.T) / 2
    n, ni, ne = Q.shape[0], G.shape[0], A.shape[0]
    for k in range(0, min(ni, n - ne) + 1):
        for S in combinations(range(ni), k):
            S = list(S)
            C = np.vstack([A, G[S]])
            K = np.block([[Qs, C.T], [C, np.zeros((ne + k, ne + k))]])
            rhs = np.concatenate([-q, b, h[S]])
            try:
                x = np.linalg.solve(K, rhs)
            except np.linalg.LinAlgError:
                continue
            y, lam, nuS = x[:n], x[n:n + ne], x[n + ne:]
            scale = 1.0 + np.abs(x).max()
            if (G @ y <= h + feas_tol * scale).all() and (nuS >= -feas_tol * scale).all():
                nu = np.zeros(ni)
                nu[S] = nuS
                return y, lam, nu, np.array(S, dtype=int)
    raise ValueError("no active set gives a KKT point (infeasible QP?)")


def qp_vjp(Q, q, G, h, A, b, ybar):
    """``(y, grads)`` with ``grads = dict(Q=..., q=..., G=..., h=..., A=..., b=...)``, the
    gradient of ``ybar · y*`` with respect to each parameter (strict complementarity assumed;
    ``margin`` in the returned dict is the smallest active multiplier / inactive slack)."""
    y, lam, nu, S = solve_qp(Q, q, G, h, A, b)
    Qs = (Q + Q.T) / 2
    n, ni, ne, k = Q.shape[0], G.shape[0], A.shape[0], len(S)
    C = np.vstack([A, G[S]])
    K = np.block([[Qs, C.T], [C, np.zeros((ne + k, ne + k))]])
    w = np.linalg.solve(K.T, np.concatenate([ybar, np.zeros(ne + k)]))
    wy, wl, wn = w[:n], w[n:n + ne], w[n + ne:]
    gG = np.zeros_like(G)
    gh = np.zeros_like(h)
    gG[S] = -(np.outer(nu[S], wy) + np.outer(wn, y))
    gh[S] = wn
    inactive = np.setdiff1d(np.arange(ni), S)
    margins = list(nu[S]) + list((h - G @ y)[inactive])
    grads = {
        "Q": -(np.outer(wy, y) + np.outer(y, wy)) / 2,
        "q": -wy,
        "G": gG,
        "h": gh,
        "A": -(np.outer(lam, wy) + np.outer(wl, y)),
        "b": wl,
        "margin": min(margins) if margins else np.inf,
        "active": S,
    }
    return y, grads
