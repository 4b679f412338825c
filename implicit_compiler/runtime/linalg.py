"""Dense LU with partial pivoting, in place, for one small system.

``A`` is factored as ``P A = L U`` with unit-diagonal ``L`` stored below the
diagonal and ``U`` on and above it; ``piv[k]`` is the row swapped with row ``k``
at step ``k``. The size ``n`` is passed explicitly: generated modules pass their
compile-time constant ``N``, and after inlining LLVM specialises (and for small
systems unrolls) every loop for that size.
"""

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def lu_factor(n, A, piv):
    """Factor ``A`` in place. Returns ``min_k |U[k, k]|`` (0.0 means exactly singular)."""
    min_pivot = np.inf
    for k in range(n):
        p = k
        best = abs(A[k, k])
        for i in range(k + 1, n):
            v = abs(A[i, k])
            if v > best:
                best = v
                p = i
        piv[k] = p
        if best < min_pivot:
            min_pivot = best
        if best == 0.0:
            return 0.0
        if p != k:
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
