"""Sparsity patterns known at compile time, and the elimination they allow.

``symbolic_lu`` runs Gaussian elimination on the pattern alone in the natural
order, giving the fill-in; when the filled pattern is sparse and has a full
diagonal, the code generator emits elimination for exactly those positions
(no pivoting, with a pivot-size check that falls back to dense LU).
"""

from __future__ import annotations

import numpy as np

# Emit fixed-order sparse elimination only when it saves real work.
SPARSE_MIN_SIZE = 8
SPARSE_MAX_FILL_FRACTION = 0.35
SPARSE_MAX_UPDATES = 20000


def pattern_matrix(entries, shape) -> np.ndarray:
    pat = np.zeros(shape, dtype=bool)
    for i, j, _ in entries:
        pat[i, j] = True
    return pat


def symbolic_lu(pattern: np.ndarray) -> np.ndarray:
    """Fill pattern of L+U for elimination in the natural order without pivoting."""
    fill = pattern.copy()
    n = fill.shape[0]
    for k in range(n):
        rows = np.flatnonzero(fill[k + 1:, k]) + k + 1
        cols = np.flatnonzero(fill[k, k + 1:]) + k + 1
        if rows.size and cols.size:
            fill[np.ix_(rows, cols)] = True
    return fill


def elimination_updates(fill: np.ndarray) -> int:
    n = fill.shape[0]
    total = 0
    for k in range(n):
        total += int(fill[k + 1:, k].sum()) * (1 + int(fill[k, k + 1:].sum()))
    return total


def bandwidths(pattern: np.ndarray) -> tuple[int, int]:
    i, j = np.nonzero(pattern)
    if i.size == 0:
        return 0, 0
    return int(max(0, (i - j).max())), int(max(0, (j - i).max()))


def choose_factorization(pattern: np.ndarray) -> tuple[str, np.ndarray | None]:
    """``("sparse", fill)`` when fixed-order elimination pays off, else ``("dense", None)``."""
    n = pattern.shape[0]
    if n < SPARSE_MIN_SIZE:
        return "dense", None
    fill = symbolic_lu(pattern)
    if not fill.diagonal().all():
        return "dense", None
    if fill.sum() > SPARSE_MAX_FILL_FRACTION * n * n:
        return "dense", None
    if elimination_updates(fill) > SPARSE_MAX_UPDATES:
        return "dense", None
    return "sparse", fill
