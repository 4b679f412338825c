"""Dense LU with (row-scaled) partial pivoting, in place, for one small system.

``A`` is factored as ``P A = L U`` with unit-diagonal ``L`` stored below the
diagonal and ``U`` on and above it; ``piv[k]`` is the row swapped with row ``k``
at step ``k``. The size ``n`` is passed explicitly: generated modules pass their
compile-time constant ``N``, and after inlining LLVM specialises (and for small
systems unrolls) every loop for that size.

Pivots are chosen by scaled partial pivoting: row ``i`` competes with
``|A[i, k]| / max_j |A[i, j]|`` (its entry relative to the largest entry of the original
row). That is ordinary partial pivoting on the row-equilibrated matrix, carried out on
``A`` itself, so the factors and every solve are unchanged when a row of ``A`` is
multiplied by any constant (a residual written in other units, or scaled by 1e150).
Column scaling never changed partial pivoting.

:func:`equilibrate` and :func:`inv_norm1` give the condition number of the
equilibrated matrix, the scale-invariant singularity measure the solvers report.
"""

import numpy as np
from numba import njit

# Up to this size the 1-norm of the inverse is computed exactly (n solves);
# above it, Hager's estimator with Higham's refinements (a few solves).
EXACT_INVERSE_NORM_MAX_N = 8


@njit(cache=True, inline="always")
def _row_weight(A, i, n):
    """``1 / max_j |A[i, j]|`` (1.0 for a zero or non-finite row)."""
    m = 0.0
    for j in range(n):
        v = abs(A[i, j])
        if v > m:
            m = v
    if m > 0.0 and m < np.inf:
        return 1.0 / m
    return 1.0


@njit(cache=True, inline="always")
def lu_factor(n, A, piv):
    """Factor ``A`` in place (scaled partial pivoting). Returns ``min_k |U[k, k]|``
    (0.0 means exactly singular)."""
    w = np.empty(n)
    for i in range(n):
        w[i] = _row_weight(A, i, n)
    min_pivot = np.inf
    for k in range(n):
        p = k
        best = abs(A[k, k]) * w[k]
        for i in range(k + 1, n):
            v = abs(A[i, k]) * w[i]
            if v > best:
                best = v
                p = i
        piv[k] = p
        a = abs(A[p, k])
        if a < min_pivot:
            min_pivot = a
        if a == 0.0:
            return 0.0
        if p != k:
            t = w[k]
            w[k] = w[p]
            w[p] = t
            for j in range(n):
                t = A[k, j]
                A[k, j] = A[p, j]
                A[p, j] = t
        inv = 1.0 / A[k, k]
        for i in range(k + 1, n):
            A[i, k] *= inv
            m = A[i, k]
            if m != 0.0:
                for j in range(k + 1, n):
                    A[i, j] -= m * A[k, j]
    return min_pivot


@njit(cache=True, inline="always")
def equilibrate(n, A, rmax, cmax):
    """Row and column scales of the unfactored ``A``: ``rmax[i] = max_j |A[i, j]|``,
    ``cmax[j] = max_i |A[i, j]| / rmax[i]``, so that ``Ae[i, j] = A[i, j] / (rmax[i] cmax[j])``
    has entries in [-1, 1] and a 1 in every row and column. Returns ``||Ae||_1`` (in [1, n]),
    or -1.0 when ``A`` has a NaN or inf entry. Zero rows/columns get scale 1."""
    for i in range(n):
        m = 0.0
        for j in range(n):
            v = abs(A[i, j])
            if not v <= m:
                m = v
        if not m < np.inf:
            return -1.0
        rmax[i] = m if m > 0.0 else 1.0
    # Row by row (A is C-ordered), skipping zeros: a sparse Jacobian costs its non-zeros'
    # divisions, and no pass walks down the columns of a large matrix.
    for j in range(n):
        cmax[j] = 0.0
    for i in range(n):
        r = rmax[i]
        for j in range(n):
            a = A[i, j]
            if a != 0.0:
                v = abs(a) / r
                if v > cmax[j]:
                    cmax[j] = v
    for j in range(n):
        if not cmax[j] > 0.0:
            cmax[j] = 1.0
    sums = np.zeros(n)
    for i in range(n):
        r = rmax[i]
        for j in range(n):
            a = A[i, j]
            if a != 0.0:
                sums[j] += abs(a) / (r * cmax[j])
    norm = 0.0
    for j in range(n):
        if sums[j] > norm:
            norm = sums[j]
    return norm


@njit(cache=True, inline="always")
def _apply_inv(n, solve, LU, piv, rmax, cmax, v, tab):
    """``v <- Ae^{-1} v = cmax * (A^{-1} (rmax * v))``."""
    for i in range(n):
        v[i] *= rmax[i]
    solve(LU, piv, v, tab)
    for i in range(n):
        v[i] *= cmax[i]


@njit(cache=True, inline="always")
def _apply_inv_t(n, solve_transpose, LU, piv, rmax, cmax, v, tab):
    """``v <- Ae^{-T} v = rmax * (A^{-T} (cmax * v))``."""
    for i in range(n):
        v[i] *= cmax[i]
    solve_transpose(LU, piv, v, tab)
    for i in range(n):
        v[i] *= rmax[i]


@njit(cache=True, inline="always")
def _norm1(n, v):
    s = 0.0
    for i in range(n):
        s += abs(v[i])
    return s


@njit(cache=True, inline="always")
def inv_norm1(n, solve, solve_transpose, LU, piv, rmax, cmax, x, z, tab):
    """``||Ae^{-1}||_1`` of the equilibrated matrix (see :func:`equilibrate`) from the
    factors of ``A``: exact for ``n <= EXACT_INVERSE_NORM_MAX_N`` (n solves), otherwise
    Hager's estimator with Higham's refinements (LAPACK ``dlacon``; a lower bound, in
    practice within a factor 3). ``x``, ``z``: scratch vectors of length n.
    NaN or inf when the solves overflow (a numerically singular matrix)."""
    if n <= EXACT_INVERSE_NORM_MAX_N:
        est = 0.0
        for j in range(n):
            for i in range(n):
                x[i] = 0.0
            x[j] = 1.0
            _apply_inv(n, solve, LU, piv, rmax, cmax, x, tab)
            s = _norm1(n, x)
            if not s <= est:
                est = s
        return est
    for i in range(n):
        x[i] = 1.0 / n
    est = 0.0
    jlast = -1
    for it in range(5):
        _apply_inv(n, solve, LU, piv, rmax, cmax, x, tab)
        s = _norm1(n, x)
        if not s < np.inf:
            return s
        if it > 0 and s <= est:
            break
        est = s
        for i in range(n):
            z[i] = 1.0 if x[i] >= 0.0 else -1.0
        _apply_inv_t(n, solve_transpose, LU, piv, rmax, cmax, z, tab)
        jmax = 0
        zmax = abs(z[0])
        for i in range(1, n):
            if abs(z[i]) > zmax:
                zmax = abs(z[i])
                jmax = i
        if jmax == jlast:
            break
        jlast = jmax
        for i in range(n):
            x[i] = 0.0
        x[jmax] = 1.0
    # Higham's safeguard: a vector with alternating signs and growing entries.
    for i in range(n):
        x[i] = (1.0 + i / (n - 1.0)) * (1.0 if i % 2 == 0 else -1.0)
    _apply_inv(n, solve, LU, piv, rmax, cmax, x, tab)
    s = 2.0 * _norm1(n, x) / (3.0 * n)
    if not s <= est:
        est = s
    return est


@njit(cache=True, inline="always")
def lu_solve(n, LU, piv, b):
    """Overwrite ``b`` with ``A^{-1} b``."""
    for k in range(n):
        p = piv[k]
        if p != k:
            t = b[k]
            b[k] = b[p]
            b[p] = t
    for i in range(n):
        s = b[i]
        for j in range(i):
            s -= LU[i, j] * b[j]
        b[i] = s
    for i in range(n - 1, -1, -1):
        s = b[i]
        for j in range(i + 1, n):
            s -= LU[i, j] * b[j]
        b[i] = s / LU[i, i]


@njit(cache=True, inline="always")
def lu_solve_transpose(n, LU, piv, b):
    """Overwrite ``b`` with ``A^{-T} b`` (``A^T = U^T L^T P``)."""
    for i in range(n):
        s = b[i]
        for j in range(i):
            s -= LU[j, i] * b[j]
        b[i] = s / LU[i, i]
    for i in range(n - 1, -1, -1):
        s = b[i]
        for j in range(i + 1, n):
            s -= LU[j, i] * b[j]
        b[i] = s
    for k in range(n - 1, -1, -1):
        p = piv[k]
        if p != k:
            t = b[k]
            b[k] = b[p]
            b[p] = t


# ---------------------------------------------------------------- fixed-order sparse elimination
# For larger sparse systems the generated module passes its fill pattern as index
# arrays (compressed rows / columns of the strict lower part L and upper part U)
# instead of unrolling the elimination into straight-line code: Numba's and LLVM's
# compile time grows with every emitted statement. The arithmetic, and its order,
# are those of the straight-line code. Position sets are closed under elimination
# (they come from the symbolic factorisation), so every update lands in the pattern.


@njit(cache=True)
def sparse_lu_factor(n, J, piv, lcol_ptr, lcol_idx, urow_ptr, urow_idx, threshold):
    """Eliminate in the natural order over the fill pattern. Returns ``min_k |U[k, k]|``,
    or -1.0 when a pivot fails ``|pivot| >= threshold * max |entries below it|`` (or is 0)."""
    piv[n] = 0
    minp = np.inf
    for k in range(n):
        a = abs(J[k, k])
        lo = lcol_ptr[k]
        hi = lcol_ptr[k + 1]
        cmax = 0.0
        for q in range(lo, hi):
            v = abs(J[lcol_idx[q], k])
            if not v <= cmax:  # NaN propagates and fails the test below
                cmax = v
        if not (a > 0.0 and a >= threshold * cmax):
            return -1.0
        if a < minp:
            minp = a
        if hi > lo:
            inv = 1.0 / J[k, k]
            for q in range(lo, hi):
                i = lcol_idx[q]
                J[i, k] *= inv
                lik = J[i, k]
                for r in range(urow_ptr[k], urow_ptr[k + 1]):
                    j = urow_idx[r]
                    J[i, j] -= lik * J[k, j]
    return minp


@njit(cache=True)
def sparse_lu_solve(n, J, b, lrow_ptr, lrow_idx, urow_ptr, urow_idx):
    """``b <- A^{-1} b`` with the factors of :func:`sparse_lu_factor`."""
    for i in range(n):
        s = b[i]
        for q in range(lrow_ptr[i], lrow_ptr[i + 1]):
            j = lrow_idx[q]
            s -= J[i, j] * b[j]
        b[i] = s
    for i in range(n - 1, -1, -1):
        s = b[i]
        for q in range(urow_ptr[i], urow_ptr[i + 1]):
            j = urow_idx[q]
            s -= J[i, j] * b[j]
        b[i] = s / J[i, i]


@njit(cache=True)
def sparse_lu_solve_transpose(n, J, b, lcol_ptr, lcol_idx, ucol_ptr, ucol_idx):
    """``b <- A^{-T} b`` with the factors of :func:`sparse_lu_factor`."""
    for i in range(n):
        s = b[i]
        for q in range(ucol_ptr[i], ucol_ptr[i + 1]):
            j = ucol_idx[q]
            s -= J[j, i] * b[j]
        b[i] = s / J[i, i]
    for i in range(n - 1, -1, -1):
        s = b[i]
        for q in range(lcol_ptr[i], lcol_ptr[i + 1]):
            j = lcol_idx[q]
            s -= J[j, i] * b[j]
        b[i] = s


# ---------------------------------------------------------------- pattern-sized storage
# Above the unrolled size a sparse module stores dF/dy and its factors as the values of the
# filled pattern only, ``J`` of shape ``(1, L)``: position ``q < nv`` holds entry
# ``(row, col)`` of ``P A P^T`` in compressed rows (columns sorted), for the symmetric
# elimination order ``perm`` chosen at compile time. The module's table ``tab`` describes it,
# from ``tab[0]`` on (offsets into ``tab``; see ``codegen.emit._kernels_factor_pattern``):
PT_N, PT_NV, PT_PERMUTED, PT_THRESHOLD = 0, 1, 2, 3
PT_RPTR, PT_COL, PT_DIAG, PT_LCPTR, PT_LCPOS, PT_CCPTR, PT_CCPOS, PT_PERM, PT_ROWO, PT_COLO, PT_ROWP = range(4, 15)
PT_HEADER_SIZE = 16
# ``piv[n]`` says what ``J`` holds: 0 the sparse factors; 2 nothing (a pivot failed and the
# storage has no room for dense factors: the caller re-solves the sample with room, see
# ``runtime.kernels``); 3 dense LU factors (partial pivoting) of A in the last n*n entries
# of a storage with that room; 1 (the dense modules' flag) dense factors in a plain (n, n) J.
PIV_SPARSE, PIV_DENSE, PIV_NEEDS_DENSE, PIV_DENSE_IN_PATTERN = 0, 1, 2, 3


@njit(cache=True, inline="always")
def dense_area(J, n):
    """The last ``n * n`` entries of ``J`` as an ``(n, n)`` matrix (all of a plain (n, n) J)."""
    return J.reshape(J.size)[J.size - n * n:].reshape((n, n))


# The elimination and the solves read the pattern from ``tab`` at the offsets of its header
# (``tab[rp + i]`` is ``rptr[i]``, ...) instead of taking slices of it, and are inlined into
# their callers: every slice, and every array argument of a call that is not inlined, costs an
# atomic reference-count increment and decrement (measured: a sixth of a Bratu-50 solve's
# time, the condition estimate at y* calling the solve a dozen times).


@njit(cache=True, inline="always")
def pattern_lu_factor(n, v, tab, dp, lcp, lcq, ccp, ccq, rwp, threshold):
    """Left-looking elimination in place over the filled pattern (values ``v``), no pivoting;
    leaves L (unit diagonal) below, U above and ``1 / U[k, k]`` on the diagonal. Returns
    ``min_k |U[k, k]|``, or -1.0 when a pivot fails
    ``|pivot| >= threshold * max |entries below it|`` (or is 0, or NaN is met).

    Column j is scattered into a dense work vector by row, updated by the finished columns k of
    L for every U entry ``(k, j)`` in increasing k, checked, scaled and gathered back. Each entry
    receives the same updates in the same order as in right-looking elimination (the results are
    identical), but no table of update targets is needed: the tables are O(fill), not O(work).
    The pattern: ``diag = tab[dp:]``, ``lcptr = tab[lcp:]`` / ``lcpos = tab[lcq:]`` (L's entries
    by column), ``ccptr = tab[ccp:]`` / ``ccpos = tab[ccq:]`` (every entry of each column, by
    increasing row), ``rowp = tab[rwp:]`` (the permuted row of each position); see the table
    header above."""
    minp = np.inf
    x = np.zeros(n)
    for j in range(n):
        c0 = tab[ccp + j]
        c1 = tab[ccp + j + 1]
        for t in range(c0, c1):
            p = tab[ccq + t]
            x[tab[rwp + p]] = v[p]
        # U's entries of column j, by increasing row k: x[k] is final when k is reached
        for t in range(c0, c1):
            k = tab[rwp + tab[ccq + t]]
            if k >= j:
                break
            ukj = x[k]
            for s in range(tab[lcp + k], tab[lcp + k + 1]):
                p = tab[lcq + s]
                x[tab[rwp + p]] -= v[p] * ukj
        dj = tab[dp + j]
        a = abs(x[j])
        lo = tab[lcp + j]
        hi = tab[lcp + j + 1]
        cmax = 0.0
        for s in range(lo, hi):
            y = abs(x[tab[rwp + tab[lcq + s]]])
            if not y <= cmax:  # NaN propagates and fails the test below
                cmax = y
        if not (a > 0.0 and a >= threshold * cmax):
            return -1.0
        if a < minp:
            minp = a
        inv = 1.0 / x[j]
        # gather: U's entries as they are, L's scaled (the solves multiply by the reciprocal
        # pivot: no division on their dependency chain)
        for t in range(c0, c1):
            p = tab[ccq + t]
            r = tab[rwp + p]
            if r < j:
                v[p] = x[r]
            elif r > j:
                v[p] = x[r] * inv
            x[r] = 0.0
        v[dj] = inv
    return minp


@njit(cache=True, inline="always")
def pattern_lu_solve(n, v, x, tab, rp, cp, dp):
    """``x <- (L U)^{-1} x`` with the factors of :func:`pattern_lu_factor` (permuted numbering);
    ``rptr = tab[rp:]``, ``col = tab[cp:]``, ``diag = tab[dp:]``."""
    for i in range(n):
        s = x[i]
        for q in range(tab[rp + i], tab[dp + i]):
            s -= v[q] * x[tab[cp + q]]
        x[i] = s
    for i in range(n - 1, -1, -1):
        s = x[i]
        d = tab[dp + i]
        for q in range(d + 1, tab[rp + i + 1]):
            s -= v[q] * x[tab[cp + q]]
        x[i] = s * v[d]


@njit(cache=True, inline="always")
def pattern_lu_solve_transpose(n, v, x, tab, rp, cp, dp):
    """``x <- (L U)^{-T} x`` (``U^T`` then ``L^T``, column by column)."""
    for i in range(n):
        d = tab[dp + i]
        xi = x[i] * v[d]
        x[i] = xi
        for q in range(d + 1, tab[rp + i + 1]):
            x[tab[cp + q]] -= v[q] * xi
    for i in range(n - 1, -1, -1):
        xi = x[i]
        for q in range(tab[rp + i], tab[dp + i]):
            x[tab[cp + q]] -= v[q] * xi


@njit(cache=True, inline="always")
def _pt(tab, which, size):
    a = tab[which]
    return tab[a:a + size]


@njit(cache=True)
def pattern_to_dense(J, D, tab):
    """``D`` (n x n, original numbering) <- the matrix whose pattern values are ``J[0, :nv]``."""
    n = tab[PT_N]
    nv = tab[PT_NV]
    rowo = _pt(tab, PT_ROWO, nv)
    colo = _pt(tab, PT_COLO, nv)
    for i in range(n):
        for j in range(n):
            D[i, j] = 0.0
    for q in range(nv):
        D[rowo[q], colo[q]] = J[0, q]


@njit(cache=True)
def equilibrate_pattern(n, A, rmax, cmax, tab):
    """:func:`equilibrate` for pattern storage: the same scales and norm (to rounding), O(nnz)."""
    nv = tab[PT_NV]
    rowo = _pt(tab, PT_ROWO, nv)
    colo = _pt(tab, PT_COLO, nv)
    v = A[0]
    for i in range(n):
        rmax[i] = 0.0
        cmax[i] = 0.0
    for q in range(nv):
        a = abs(v[q])
        r = rowo[q]
        if not a <= rmax[r]:
            rmax[r] = a
    for i in range(n):
        m = rmax[i]
        if not m < np.inf:
            return -1.0
        rmax[i] = m if m > 0.0 else 1.0
    # Multiplications by the reciprocal scales instead of a division per stored entry (two per
    # entry: the largest cost of the status check of a large sparse system), unless a scale is
    # so small that its reciprocal overflows (then the divisions, as in :func:`equilibrate`).
    inv = np.empty(n)
    recip = True
    for i in range(n):
        inv[i] = 1.0 / rmax[i]
        if not inv[i] < np.inf:
            recip = False
    for q in range(nv):
        a = v[q]
        if a != 0.0:
            r = rowo[q]
            t = abs(a) * inv[r] if recip else abs(a) / rmax[r]
            c = colo[q]
            if t > cmax[c]:
                cmax[c] = t
    for j in range(n):
        if not cmax[j] > 0.0:
            cmax[j] = 1.0
    sums = np.zeros(n)
    cinv = np.empty(n)
    for j in range(n):
        cinv[j] = 1.0 / cmax[j]
        if not cinv[j] < np.inf:
            recip = False
    if recip:
        for q in range(nv):
            a = v[q]
            if a != 0.0:
                c = colo[q]
                sums[c] += abs(a) * inv[rowo[q]] * cinv[c]
    else:
        for q in range(nv):
            a = v[q]
            if a != 0.0:
                c = colo[q]
                sums[c] += abs(a) / (rmax[rowo[q]] * cmax[c])
    norm = 0.0
    for j in range(n):
        if sums[j] > norm:
            norm = sums[j]
    return norm


@njit(cache=True, inline="always")
def equilibrate_jacobian(n, A, rmax, cmax, tab):
    """:func:`equilibrate` of dF/dy in either storage: a plain (n, n) ``A`` or pattern values."""
    if A.shape[0] == n:
        return equilibrate(n, A, rmax, cmax)
    return equilibrate_pattern(n, A, rmax, cmax, tab)


@njit(cache=True)
def pattern_column_norms(n, A, out, tab):
    """``out[j] = ||A[:, j]||_2`` (scaled by the column's largest entry, as ``tr_column_norm``)."""
    nv = tab[PT_NV]
    colo = _pt(tab, PT_COLO, nv)
    v = A[0]
    cm = np.zeros(n)
    for q in range(nv):
        a = abs(v[q])
        c = colo[q]
        if a > cm[c]:
            cm[c] = a
    for j in range(n):
        out[j] = 0.0
    for q in range(nv):
        c = colo[q]
        if cm[c] > 0.0:
            t = v[q] / cm[c]
            out[c] += t * t
    for j in range(n):
        out[j] = cm[j] * np.sqrt(out[j]) if cm[j] > 0.0 else 0.0


@njit(cache=True)
def pattern_matvec_add(n, A, x, w, tab):
    """``w += A x`` for pattern storage."""
    nv = tab[PT_NV]
    rowo = _pt(tab, PT_ROWO, nv)
    colo = _pt(tab, PT_COLO, nv)
    v = A[0]
    for q in range(nv):
        w[rowo[q]] += v[q] * x[colo[q]]


@njit(cache=True)
def pattern_rmatvec(n, A, x, u, tab):
    """``u = A^T x`` for pattern storage."""
    nv = tab[PT_NV]
    rowo = _pt(tab, PT_ROWO, nv)
    colo = _pt(tab, PT_COLO, nv)
    v = A[0]
    for j in range(n):
        u[j] = 0.0
    for q in range(nv):
        u[colo[q]] += v[q] * x[rowo[q]]


@njit(cache=True, inline="always")
def copy_jacobian(n, src, dst, tab):
    """``dst <- src`` (unfactored dF/dy): all of a plain (n, n) storage, the pattern values otherwise."""
    if src.shape[0] == n:
        for i in range(n):
            for j in range(n):
                dst[i, j] = src[i, j]
    else:
        for q in range(tab[PT_NV]):
            dst[0, q] = src[0, q]
