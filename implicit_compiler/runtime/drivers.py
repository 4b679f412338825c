"""Batched drivers: one compiled function per solver, shared by every system.

Each driver takes the system's kernels as first-class functions (their types are in
:mod:`implicit_compiler.runtime.signatures`) followed by the batch arrays and the
module's table ``tab``. It is compiled once, for that one signature, the first time any
system needs it, and cached with the package: a new system compiles only its own
expression kernels, never a solver.

``drive_<kind>_range(kernels..., lo, hi, ...)`` runs samples ``lo..hi-1`` on the calling thread
(``nogil``); ``drive_<kind>_batch_parallel`` splits the batch into chunks of ``BATCH_CHUNK`` samples with
``prange`` and calls the range driver per chunk, so Numba's parallel compiler never sees
a solver body. The generated module binds its kernels to these drivers in small
uncached wrappers (a call from Python that converted each kernel to a function pointer
would cost ~35 µs per kernel per call).
"""

import threading

import numpy as np
from numba import njit, prange, types
from numba.core.compiler_lock import global_compiler_lock
from numba.core.types import WrapperAddressProtocol
from numba.experimental.function_type import _get_wrapper_address

from . import signatures as sg
from .fixed_point import fixed_point_one
from .interior_point import ip_one, kkt_error, kkt_finalize, problem_scaling
from .linalg import (
    PIV_DENSE,
    PIV_DENSE_IN_PATTERN,
    PIV_NEEDS_DENSE,
    PIV_SPARSE,
    PT_CCPOS,
    PT_CCPTR,
    PT_COL,
    PT_DIAG,
    PT_LCPOS,
    PT_LCPTR,
    PT_N,
    PT_NV,
    PT_PERM,
    PT_PERMUTED,
    PT_ROWP,
    PT_RPTR,
    PT_THRESHOLD,
    dense_area,
    lu_factor,
    lu_solve,
    lu_solve_transpose,
    pattern_lu_factor,
    pattern_lu_solve,
    pattern_lu_solve_transpose,
    pattern_to_dense,
    sparse_lu_factor,
    sparse_lu_solve,
    sparse_lu_solve_transpose,
)
from .newton import newton_one
from .status import NONFINITE
from .trust_region import trust_region_one

BATCH_CHUNK = 64  # samples per prange work item, at most


@njit(cache=True, inline="always")
def batch_chunk(B):
    """Samples per ``prange`` work item: at most ``BATCH_CHUNK``, and at least 8 items when the
    batch allows, so that the threads (prange splits the items evenly) get about the same number
    of samples (B = 100 in chunks of 64 gave one thread 64 samples, the other 36)."""
    return max(1, min(BATCH_CHUNK, (B + 7) // 8))

_f1, _f2, _f3, _i1, _i2, _b1, _s1 = sg.f1, sg.f2, sg.f3, sg.i1, sg.i2, sg.b1, sg.s1
_f64, _i64 = types.float64, types.int64
_NEWTON_KERNELS = (sg.fn(sg.RESIDUAL), sg.fn(sg.JACOBIAN), sg.fn(sg.SCALE), sg.fn(sg.FACTOR),
                   sg.fn(sg.FACTOR), sg.fn(sg.SOLVE), sg.fn(sg.SOLVE))
_FP_KERNELS = (sg.fn(sg.RESIDUAL), sg.fn(sg.JACOBIAN), sg.fn(sg.FACTOR), sg.fn(sg.FACTOR),
               sg.fn(sg.SOLVE), sg.fn(sg.SOLVE))
_VJP_KERNELS = (sg.fn(sg.SOLVE), sg.fn(sg.VJP_PARAMS))
_IP_KERNELS = (sg.fn(sg.IP_EVAL), sg.fn(sg.IP_OBJ), sg.fn(sg.IP_HESS), sg.fn(sg.RESIDUAL), sg.fn(sg.JACOBIAN),
               sg.fn(sg.FACTOR))
_FIN_KERNELS = (sg.fn(sg.IP_EVAL), sg.fn(sg.IP_HESS), sg.fn(sg.RESIDUAL), sg.fn(sg.JACOBIAN), sg.fn(sg.FACTOR))

# The batch arguments after the kernels (and after lo, hi for the range drivers).
_NEWTON_ARGS = (_f2, _f2, _f64, _f64, _f64, _i64, _f64, _f2, _f3, _i2, _s1, _f2, _i1)
_FP_ARGS = (_f2, _f2, _f64, _f64, _i64, _f64, _i64, _f2, _f3, _i2, _s1, _f2, _i1)
_VJP_ARGS = (_f2, _f2, _f3, _i2, _s1, _f2, _b1, _f2, _i1)
_IP_ARGS = (_i64, _i64, _f2, _f2, _f64, _i64, _f64, _f64, _f2, _f3, _i2, _s1, _f2, _i1)
_FIN_ARGS = (_i64, _i64, _f2, _f2, _f64, _f64, _f3, _i2, _s1, _f2, _i1)


def _signatures():
    out = {}
    for kind, kern, args in (("newton", _NEWTON_KERNELS, _NEWTON_ARGS), ("trust_region", _NEWTON_KERNELS, _NEWTON_ARGS),
                             ("fixed_point", _FP_KERNELS, _FP_ARGS), ("vjp", _VJP_KERNELS, _VJP_ARGS),
                             ("ip", _IP_KERNELS, _IP_ARGS), ("kkt_finalize", _FIN_KERNELS, _FIN_ARGS)):
        out[kind + "_range"] = types.void(*kern, _i64, _i64, *args)
        out[kind + "_batch_parallel"] = types.void(*kern, *args)
    out["residual_batch"] = types.void(sg.fn(sg.RESIDUAL), _f2, _f2, _f2, _i1)
    out["solve_batch"] = types.void(sg.fn(sg.SOLVE), sg.fn(sg.SOLVE), _f3, _i2, _s1, _f2, types.boolean, _i1)
    for name in ("dense_factor", "fill_factor", "pattern_factor", "pattern_factor_dense"):
        out[name] = sg.FACTOR
    for name in ("dense_solve", "dense_solve_transpose", "fill_solve", "fill_solve_transpose", "pattern_solve",
                 "pattern_solve_transpose"):
        out[name] = sg.SOLVE
    out["pattern_dense_factor_batch"] = types.void(_f3, _i2, _i1)
    out["ip_eval_batch"] = types.void(sg.fn(sg.IP_EVAL), _f2, _f2, _f2, _f2, _f3, _f2, _f3, _i1)
    return out


# ---------------------------------------------------------------- linear algebra kernels
# For systems above INLINE_MAX_N unknowns (codegen/emit.py) the factorisation kernels are
# these, shared by every module (a module of that size compiles none of its own).
#
# ``fill_*``: fixed-order sparse elimination in the natural order on a dense (n, n) J (the
# optimization problems' modules): ``tab[0:16]`` are the (start, stop) of the compressed
# columns / rows of L and U (pointers, indices: LCOL, LROW, UROW, UCOL), ``tab[16]`` the
# pivot threshold in units of 1e-9.
PATTERN_HEADER = 17


@njit(cache=True, error_model="numpy")
def dense_factor(J, piv, tab):
    n = J.shape[0]
    piv[n] = 1
    return lu_factor(n, J, piv)


@njit(cache=True, error_model="numpy")
def dense_solve(J, piv, b, tab):
    lu_solve(J.shape[0], J, piv, b)


@njit(cache=True, error_model="numpy")
def dense_solve_transpose(J, piv, b, tab):
    lu_solve_transpose(J.shape[0], J, piv, b)


@njit(cache=True, error_model="numpy")
def fill_factor(J, piv, tab):
    return sparse_lu_factor(J.shape[0], J, piv, tab[tab[0]:tab[1]], tab[tab[2]:tab[3]], tab[tab[8]:tab[9]],
                            tab[tab[10]:tab[11]], tab[16] * 1e-9)


@njit(cache=True, error_model="numpy")
def fill_solve(J, piv, b, tab):
    n = J.shape[0]
    if piv[n] == 1:
        lu_solve(n, J, piv, b)
    else:
        sparse_lu_solve(n, J, b, tab[tab[4]:tab[5]], tab[tab[6]:tab[7]], tab[tab[8]:tab[9]], tab[tab[10]:tab[11]])


@njit(cache=True, error_model="numpy")
def fill_solve_transpose(J, piv, b, tab):
    n = J.shape[0]
    if piv[n] == 1:
        lu_solve_transpose(n, J, piv, b)
    else:
        sparse_lu_solve_transpose(n, J, b, tab[tab[0]:tab[1]], tab[tab[2]:tab[3]], tab[tab[12]:tab[13]],
                                  tab[tab[14]:tab[15]])


# ``pattern_*``: pattern-sized storage (residual systems above INLINE_MAX_N unknowns with a
# sparse factorisation): J is ``(1, L)``, the values of the filled pattern of ``P A P^T``
# (layout and the ``piv[n]`` flags in :mod:`implicit_compiler.runtime.linalg`). A storage of
# ``L >= nv + n*n`` has room for dense factors: the kernels then factor by dense LU with
# partial pivoting there (the samples re-solved after a sparse pivot failed).


@njit(cache=True, error_model="numpy")
def pattern_factor_dense(J, piv, tab):
    """Dense LU with partial pivoting of the matrix in ``J``'s pattern values, in its dense
    area; without one, ``piv[n] = 2`` (re-solve with room) and 0.0."""
    n = tab[PT_N]
    if J.shape[1] < tab[PT_NV] + n * n:
        piv[n] = PIV_NEEDS_DENSE
        return 0.0
    D = dense_area(J, n)
    pattern_to_dense(J, D, tab)
    piv[n] = PIV_DENSE_IN_PATTERN
    return lu_factor(n, D, piv)


@njit(cache=True, error_model="numpy")
def pattern_factor(J, piv, tab):
    """Fixed-order elimination over the filled pattern; a failed pivot check falls back to
    :func:`pattern_factor_dense` (never returns < 0)."""
    n = tab[PT_N]
    nv = tab[PT_NV]
    if J.shape[1] >= nv + n * n:
        return pattern_factor_dense(J, piv, tab)
    if piv[n] == PIV_NEEDS_DENSE:  # sticky: the sample is re-solved with room for dense factors
        return 0.0
    v = J[0]
    minp = pattern_lu_factor(n, v, tab, tab[PT_DIAG], tab[PT_LCPTR], tab[PT_LCPOS], tab[PT_CCPTR], tab[PT_CCPOS],
                             tab[PT_ROWP], tab[PT_THRESHOLD] * 1e-9)
    if minp < 0.0:
        return pattern_factor_dense(J, piv, tab)
    piv[n] = PIV_SPARSE
    return minp


@njit(cache=True, inline="always")
def _pattern_solve(J, piv, b, tab, transpose):
    n = b.shape[0]
    flag = piv[n]
    if flag == PIV_DENSE or flag == PIV_DENSE_IN_PATTERN:
        if J.size < n * n:
            # a pattern storage without room: the sample's dense factors are kept beside the
            # result (runtime.kernels: Kernels.vjp / solve_linear use them), not here
            for i in range(n):
                b[i] = np.nan
            return
        if transpose:
            lu_solve_transpose(n, dense_area(J, n), piv, b)
        else:
            lu_solve(n, dense_area(J, n), piv, b)
        return
    if flag != PIV_SPARSE:  # no factors stored
        for i in range(n):
            b[i] = np.nan
        return
    v = J[0]
    rp = tab[PT_RPTR]
    cp = tab[PT_COL]
    dp = tab[PT_DIAG]
    if tab[PT_PERMUTED]:
        pp = tab[PT_PERM]
        x = np.empty(n)
        for k in range(n):
            x[k] = b[tab[pp + k]]
        if transpose:
            pattern_lu_solve_transpose(n, v, x, tab, rp, cp, dp)
        else:
            pattern_lu_solve(n, v, x, tab, rp, cp, dp)
        for k in range(n):
            b[tab[pp + k]] = x[k]
    elif transpose:
        pattern_lu_solve_transpose(n, v, b, tab, rp, cp, dp)
    else:
        pattern_lu_solve(n, v, b, tab, rp, cp, dp)


@njit(cache=True, error_model="numpy")
def pattern_solve(J, piv, b, tab):
    _pattern_solve(J, piv, b, tab, False)


@njit(cache=True, error_model="numpy")
def pattern_solve_transpose(J, piv, b, tab):
    _pattern_solve(J, piv, b, tab, True)


@njit(cache=True, error_model="numpy")
def pattern_dense_factor_batch(LU, PIV, tab):
    """Dense LU with partial pivoting, in place, of every ``LU[b]`` (pattern values with room
    for the dense factors): the factors of samples re-solved after a sparse pivot failed."""
    for b in range(LU.shape[0]):
        pattern_factor_dense(LU[b], PIV[b], tab)


# ---------------------------------------------------------------- residual systems


@njit(cache=True, error_model="numpy", nogil=True)
def drive_newton_range(residual, residual_jacobian, residual_scale, factor, factor_dense, solve, solve_transpose,
                 lo, hi, Y0, P, ftol, rtol, xtol, max_iter, singular_tol, Y, LU, PIV, STATUS, INFO, tab):
    n = Y.shape[1]
    m = P.shape[1]
    F = np.empty(n)
    d = np.empty(n)
    yt = np.empty(n)
    Ft = np.empty(n)
    W = np.empty((3, n))
    sy = 1 if Y0.shape[0] > 1 else 0  # Y0 is (B, n), or (1, n) shared by all samples
    for b in range(lo, hi):
        STATUS[b] = newton_one(n, m, residual, residual_jacobian, residual_scale, factor, factor_dense,
                               solve, solve_transpose, Y0[b * sy], P[b], ftol, rtol, xtol, max_iter,
                               singular_tol, Y[b], LU[b], PIV[b], F, d, yt, Ft, W, INFO[b], tab)


@njit(cache=True, error_model="numpy", parallel=True)
def drive_newton_batch_parallel(residual, residual_jacobian, residual_scale, factor, factor_dense, solve,
                                solve_transpose,
                          Y0, P, ftol, rtol, xtol, max_iter, singular_tol, Y, LU, PIV, STATUS, INFO, tab):
    B = Y.shape[0]
    chunk = batch_chunk(B)
    nchunks = (B + chunk - 1) // chunk
    for c in prange(nchunks):
        drive_newton_range(residual, residual_jacobian, residual_scale, factor, factor_dense, solve, solve_transpose,
                     c * chunk, min(B, (c + 1) * chunk), Y0, P, ftol, rtol, xtol, max_iter, singular_tol,
                     Y, LU, PIV, STATUS, INFO, tab)


@njit(cache=True, error_model="numpy", nogil=True)
def drive_trust_region_range(residual, residual_jacobian, residual_scale, factor, factor_dense, solve, solve_transpose,
                       lo, hi, Y0, P, ftol, rtol, xtol, max_iter, singular_tol, Y, LU, PIV, STATUS, INFO, tab):
    n = Y.shape[1]
    m = P.shape[1]
    # dF/dy unfactored, stored as LU[b] is: only residual_jacobian writes it, the rest stays 0
    Jc = np.zeros((LU.shape[1], LU.shape[2]))
    F = np.empty(n)
    V = np.empty((7, n))
    W = np.empty((3, n))
    sy = 1 if Y0.shape[0] > 1 else 0
    for b in range(lo, hi):
        STATUS[b] = trust_region_one(n, m, residual, residual_jacobian, residual_scale, factor, factor_dense,
                                     solve, solve_transpose, Y0[b * sy], P[b], ftol, rtol, xtol, max_iter,
                                     singular_tol, Y[b], LU[b], PIV[b], Jc, F, V, W, INFO[b], tab)


@njit(cache=True, error_model="numpy", parallel=True)
def drive_trust_region_batch_parallel(residual, residual_jacobian, residual_scale, factor, factor_dense, solve,
                                solve_transpose, Y0, P, ftol, rtol, xtol, max_iter, singular_tol, Y, LU, PIV,
                                STATUS, INFO, tab):
    B = Y.shape[0]
    chunk = batch_chunk(B)
    nchunks = (B + chunk - 1) // chunk
    for c in prange(nchunks):
        drive_trust_region_range(residual, residual_jacobian, residual_scale, factor, factor_dense, solve,
                           solve_transpose, c * chunk, min(B, (c + 1) * chunk), Y0, P, ftol, rtol, xtol,
                           max_iter, singular_tol, Y, LU, PIV, STATUS, INFO, tab)


@njit(cache=True, error_model="numpy", nogil=True)
def drive_fixed_point_range(residual, residual_jacobian, factor, factor_dense, solve, solve_transpose,
                      lo, hi, Y0, P, ftol, rtol, max_iter, singular_tol, memory, Y, LU, PIV, STATUS, INFO, tab):
    n = Y.shape[1]
    m = P.shape[1]
    mem = max(memory, 1)
    F = np.empty(n)
    g = np.empty(n)
    dF = np.empty((mem, n))
    dG = np.empty((mem, n))
    fprev = np.empty(n)
    gprev = np.empty(n)
    H = np.empty((mem, mem))
    hpiv = np.empty(mem, dtype=np.int64)
    rhs = np.empty(mem)
    W = np.empty((3, n))
    sy = 1 if Y0.shape[0] > 1 else 0
    for b in range(lo, hi):
        STATUS[b] = fixed_point_one(n, m, residual, residual_jacobian, factor, factor_dense, solve,
                                    solve_transpose, Y0[b * sy], P[b], ftol, rtol, max_iter,
                                    singular_tol, memory, Y[b], LU[b], PIV[b], F, g, dF, dG,
                                    fprev, gprev, H, hpiv, rhs, W, INFO[b], tab)


@njit(cache=True, error_model="numpy", parallel=True)
def drive_fixed_point_batch_parallel(residual, residual_jacobian, factor, factor_dense, solve, solve_transpose,
                               Y0, P, ftol, rtol, max_iter, singular_tol, memory, Y, LU, PIV, STATUS, INFO, tab):
    B = Y.shape[0]
    chunk = batch_chunk(B)
    nchunks = (B + chunk - 1) // chunk
    for c in prange(nchunks):
        drive_fixed_point_range(residual, residual_jacobian, factor, factor_dense, solve, solve_transpose,
                          c * chunk, min(B, (c + 1) * chunk), Y0, P, ftol, rtol, max_iter, singular_tol,
                          memory, Y, LU, PIV, STATUS, INFO, tab)


@njit(cache=True, error_model="numpy", nogil=True)
def drive_vjp_range(solve_transpose, vjp_params, lo, hi, Y, P, LU, PIV, STATUS, YBAR, need, PBAR, tab):
    """``PBAR[b] = -(dF/dtheta)^T (dF/dy)^{-T} YBAR[b]`` at the solution, for converged samples."""
    n = Y.shape[1]
    v = np.empty(n)
    for b in range(lo, hi):
        if STATUS[b] != 0:
            PBAR[b, :] = 0.0
            continue
        for i in range(n):
            v[i] = YBAR[b, i]
        solve_transpose(LU[b], PIV[b], v, tab)
        vjp_params(Y[b], P[b], v, need, PBAR[b], tab)


@njit(cache=True, error_model="numpy", parallel=True)
def drive_vjp_batch_parallel(solve_transpose, vjp_params, Y, P, LU, PIV, STATUS, YBAR, need, PBAR, tab):
    B = Y.shape[0]
    chunk = batch_chunk(B)
    nchunks = (B + chunk - 1) // chunk
    for c in prange(nchunks):
        drive_vjp_range(solve_transpose, vjp_params, c * chunk, min(B, (c + 1) * chunk), Y, P, LU, PIV,
                        STATUS, YBAR, need, PBAR, tab)


@njit(cache=True, error_model="numpy", nogil=True)
def drive_solve_batch(solve, solve_transpose, LU, PIV, STATUS, X, transpose, tab):
    """``X[b] <- J_b^{-1} X[b]`` (``J_b^{-T}`` with ``transpose``) with the factors a solve left in
    ``LU[b]``, ``PIV[b]``, for the samples with status 0; the other rows are set to zero."""
    for b in range(X.shape[0]):
        if STATUS[b] != 0:
            X[b, :] = 0.0
        elif transpose:
            solve_transpose(LU[b], PIV[b], X[b], tab)
        else:
            solve(LU[b], PIV[b], X[b], tab)


@njit(cache=True, error_model="numpy")
def drive_residual_batch(residual, Y, P, OUT, tab):
    for b in range(Y.shape[0]):
        residual(Y[b], P[b], OUT[b], tab)


# ---------------------------------------------------------------- optimization problems
# nv variables, nq equality and nr inequality constraints (from the shapes of the
# arrays: the Jacobians' rows and the KKT size); N = nv + nq + nr.


@njit(cache=True, error_model="numpy", nogil=True)
def drive_ip_range(ip_eval, ip_obj, ip_hess, residual, residual_jacobian, factor_dense,
             lo, hi, nq, nr, Y0, P, tol, max_iter, singular_tol, weak_tol, Z, LU, PIV, STATUS, INFO, tab):
    NV = Y0.shape[1]
    N = Z.shape[1]
    M = P.shape[1]
    NQ = nq
    NR = nr
    y = np.empty(NV)
    lam = np.empty(NQ)
    nu = np.empty(NR)
    s = np.empty(NR)
    gradf = np.empty(NV)
    h = np.empty(NQ)
    Jh = np.zeros((NQ, NV))
    g = np.empty(NR)
    Jg = np.zeros((NR, NV))
    rd = np.empty(NV)
    H = np.zeros((NV, NV))
    K = np.zeros((NV + NQ, NV + NQ))
    kpiv = np.empty(NV + NQ, dtype=np.int64)
    rhs = np.empty(NV + NQ)
    rhs0 = np.empty(NV + NQ)
    ds = np.empty(NR)
    dnu = np.empty(NR)
    yt = np.empty(NV)
    lamt = np.empty(NQ)
    nut = np.empty(NR)
    st_ = np.empty(NR)
    gradft = np.empty(NV)
    ht = np.empty(NQ)
    Jht = np.zeros((NQ, NV))
    gt = np.empty(NR)
    Jgt = np.zeros((NR, NV))
    F = np.empty(N)
    zt = np.empty(N)
    Ft = np.empty(N)
    sc = np.empty(1 + NQ + NR)
    wd = np.empty(NV)
    wh = np.empty(NQ)
    wg = np.empty(NR)
    wc = np.empty(NR)
    gw = np.empty(NR)
    vecs = (y, lam, nu, s, gradf, h, g, rd, rhs, rhs0, ds, dnu, yt, lamt, nut, st_, gradft, ht, gt, zt, Ft,
            sc, wd, wh, wg, wc, gw)
    mats = (Jh, Jg, H, K, Jht, Jgt)
    for b in range(lo, hi):
        STATUS[b] = ip_one(NV, NQ, NR, M, ip_eval, ip_obj, ip_hess, residual, residual_jacobian, factor_dense,
                           Y0[b], P[b], tol, max_iter, singular_tol, weak_tol,
                           vecs, mats, kpiv, Z[b], LU[b], PIV[b], F, INFO[b], tab)


@njit(cache=True, error_model="numpy", parallel=True)
def drive_ip_batch_parallel(ip_eval, ip_obj, ip_hess, residual, residual_jacobian, factor_dense,
                      nq, nr, Y0, P, tol, max_iter, singular_tol, weak_tol, Z, LU, PIV, STATUS, INFO, tab):
    B = Z.shape[0]
    chunk = batch_chunk(B)
    nchunks = (B + chunk - 1) // chunk
    for c in prange(nchunks):
        drive_ip_range(ip_eval, ip_obj, ip_hess, residual, residual_jacobian, factor_dense,
                 c * chunk, min(B, (c + 1) * chunk), nq, nr, Y0, P, tol, max_iter, singular_tol, weak_tol,
                 Z, LU, PIV, STATUS, INFO, tab)


@njit(cache=True, error_model="numpy", nogil=True)
def drive_kkt_finalize_range(ip_eval, ip_hess, residual, residual_jacobian, factor_dense,
                       lo, hi, nq, nr, Z, P, weak_tol, singular_tol, LU, PIV, STATUS, INFO, tab):
    """For a forward pass computed elsewhere: check, polish and factor the KKT system at Z.
    ``INFO[b, 1]`` is the relative KKT error of the point as given (before the polish)."""
    N = Z.shape[1]
    NQ = nq
    NR = nr
    NV = N - NQ - NR
    H = np.zeros((NV, NV))
    sc = np.empty(1 + NQ + NR)
    gw = np.empty(NR)
    gradf = np.empty(NV)
    h = np.empty(NQ)
    Jh = np.zeros((NQ, NV))
    g = np.empty(NR)
    Jg = np.zeros((NR, NV))
    F = np.empty(N)
    zt = np.empty(N)
    Ft = np.empty(N)
    for b in range(lo, hi):
        INFO[b, 0] = 0.0
        residual(Z[b], P[b], F, tab)
        r = 0.0
        finite = True
        for i in range(N):
            if not np.isfinite(F[i]):
                finite = False
            r = max(r, abs(F[i]))
        INFO[b, 1] = r
        if not finite:
            STATUS[b] = NONFINITE
            continue
        z = Z[b]
        ip_eval(z[:NV], P[b], gradf, h, Jh, g, Jg, tab)
        if not problem_scaling(NV, NQ, NR, gradf, Jh, Jg, sc):
            STATUS[b] = NONFINITE
            continue
        e0 = kkt_error(NV, NQ, NR, z, gradf, h, Jh, g, Jg, sc)
        INFO[b, 1] = np.inf
        STATUS[b] = kkt_finalize(NV, NQ, NR, residual, residual_jacobian, ip_eval, ip_hess, factor_dense,
                                 z, P[b], weak_tol, singular_tol, sc, LU[b], PIV[b],
                                 F, zt, Ft, gradf, h, Jh, g, Jg, gw, H, INFO[b], tab)
        INFO[b, 1] = e0


@njit(cache=True, error_model="numpy", parallel=True)
def drive_kkt_finalize_batch_parallel(ip_eval, ip_hess, residual, residual_jacobian, factor_dense,
                                nq, nr, Z, P, weak_tol, singular_tol, LU, PIV, STATUS, INFO, tab):
    B = Z.shape[0]
    chunk = batch_chunk(B)
    nchunks = (B + chunk - 1) // chunk
    for c in prange(nchunks):
        drive_kkt_finalize_range(ip_eval, ip_hess, residual, residual_jacobian, factor_dense,
                           c * chunk, min(B, (c + 1) * chunk), nq, nr, Z, P, weak_tol, singular_tol,
                           LU, PIV, STATUS,
                           INFO, tab)


@njit(cache=True, error_model="numpy")
def drive_ip_eval_batch(ip_eval, Y, P, GRADF, H, JH, G, JG, tab):
    for b in range(Y.shape[0]):
        ip_eval(Y[b], P[b], GRADF[b], H[b], JH[b], G[b], JG[b], tab)


_SIGNATURES = _signatures()
_lock = threading.Lock()


class _Entry(WrapperAddressProtocol):
    """A compiled function (a driver or a kernel) as a first-class function value: a
    wrapper in a generated module refers to it by address, so compiling the wrapper
    neither links nor re-optimises its code (naming the dispatcher would: measured ~1 s
    per wrapper for a 30-unknown system).

    The function is compiled (or loaded from Numba's cache) for ``sig`` only when its
    address is first needed, i.e. when the first wrapper that calls it is compiled: a
    module binds every kernel and driver it might use, and compiles those a call reaches."""

    def __init__(self, dispatcher, sig, prepare=None):
        self.dispatcher = dispatcher
        self._sig = sig
        self._prepare = prepare
        self._addr = None

    def __wrapper_address__(self):
        if self._addr is None:
            # Numba's own compiler lock: this runs inside the compilation of the wrapper that
            # needs the address, so any other lock could deadlock against a second thread
            # compiling another wrapper.
            with global_compiler_lock:
                if self._addr is None:
                    if self._prepare is not None:
                        self._prepare()
                    self._addr = _get_wrapper_address(self.dispatcher, self._sig)
        return self._addr

    def signature(self):
        return self._sig


def function(dispatcher, sig) -> _Entry:
    """A generated kernel, compiled for ``sig`` when first bound (see :class:`_Entry`)."""
    return _Entry(dispatcher, sig)


class Drivers:
    """The compiled-once functions of one runtime module, by name: ``drivers(name)`` is
    ``drive_<name>`` (or ``<name>``) of ``namespace`` as an :class:`_Entry` for its one
    signature in ``signatures``, compiled (or loaded from Numba's cache) when the first
    wrapper that calls it is compiled, and never compiled for another signature."""

    def __init__(self, namespace: dict, signatures: dict):
        self._namespace = namespace
        self._signatures = signatures
        self._entries: dict = {}

    def __call__(self, name: str) -> _Entry:
        got = self._entries.get(name)
        if got is None:
            with _lock:
                got = self._entries.get(name)
                if got is None:
                    fn = self._namespace.get("drive_" + name) or self._namespace[name]
                    sig = self._signatures[name]

                    def prepare(fn=fn, sig=sig):
                        fn.compile(sig)
                        fn.disable_compile()

                    got = self._entries[name] = _Entry(fn, sig, prepare)
        return got


driver = Drivers(globals(), _SIGNATURES)
"""The driver ``name`` of this module (see :class:`Drivers`)."""
