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
