"""Sparsity patterns known at compile time, and the elimination they allow.

The pattern of dF/dy is kept as index lists (compressed rows), never as a dense n x n
matrix: everything here costs O(nnz) or O(fill-in), so a 10^5-unknown tridiagonal system
is analysed in well under a second.

:func:`symbolic_elimination` runs Gaussian elimination on the pattern alone (no pivoting)
in a given symmetric order ``perm`` (row and column ``perm[k]`` are eliminated k-th), giving
the filled pattern of ``L + U`` of ``P A P^T`` and the number of multiply-adds. For systems
above the unrolled size the elimination order is chosen at compile time: the natural one,
or reverse Cuthill-McKee (scipy.sparse.csgraph) of ``A + A^T`` when it fills in less
(:func:`choose_factorization`). When the filled pattern is sparse and has a full diagonal,
the code generator emits elimination for exactly those positions (no pivoting, with a
pivot-size check that falls back to dense LU with partial pivoting).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

# Emit fixed-order sparse elimination only when it saves real work.
SPARSE_MIN_SIZE = 8
SPARSE_MAX_FILL_FRACTION = 0.35
# Up to the unrolled size (straight-line code, codegen.emit.SPARSE_LOOPS_MIN_N) the number of
# multiply-adds is capped (each is one printed statement); above it the elimination runs
# over index tables and is worth it while it is a small part of dense LU's n^3 / 3.
SPARSE_MAX_UPDATES = 20000
SPARSE_LOOPS_MIN_N = 13
SPARSE_MAX_UPDATE_FRACTION = 0.25


def pattern_matrix(entries, shape) -> np.ndarray:
    pat = np.zeros(shape, dtype=bool)
    for i, j, _ in entries:
        pat[i, j] = True
    return pat


def csr_pattern(ij: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indptr, indices)`` of the positions ``ij`` (``(k, 2)`` array) of an n x n pattern:
    rows in order, columns sorted and unique within a row."""
    ij = np.asarray(ij, dtype=np.int64).reshape(-1, 2)
    key = np.unique(ij[:, 0] * n + ij[:, 1])
    rows, cols = key // n, key % n
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(indptr, rows + 1, 1)
    return np.cumsum(indptr), cols.astype(np.int64)


@dataclass(frozen=True)
class Elimination:
    """Fixed-order elimination of ``P A P^T`` over its filled pattern.

    ``perm[k]``: the original unknown (and residual) eliminated k-th; ``order``: how it was
    chosen (``"natural"`` or ``"rcm"``). The filled pattern of ``P A P^T`` in compressed rows
    (``indptr``, ``indices``, columns sorted; permuted indices) is also the storage order of the
    factors: position ``q`` holds entry ``(row of q, indices[q])``. ``updates``: multiply-adds
    of the elimination; ``nnz``: structural non-zeros of A."""

    n: int
    perm: np.ndarray
    order: str
    indptr: np.ndarray
    indices: np.ndarray
    updates: int
    nnz: int
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def fill_nnz(self) -> int:
        return int(self.indices.size)

    @property
    def permuted(self) -> bool:
        return not np.array_equal(self.perm, np.arange(self.n))

    @property
    def inverse_perm(self) -> np.ndarray:
        ip = np.empty(self.n, dtype=np.int64)
        ip[self.perm] = np.arange(self.n)
        return ip

    @property
    def rows(self) -> np.ndarray:
        """Permuted row index of every position."""
        return np.repeat(np.arange(self.n, dtype=np.int64), np.diff(self.indptr))

    @property
    def diagonal_full(self) -> bool:
        return bool(self._diag_or_none() is not None)

    def _diag_or_none(self):
        if "diag" not in self._cache:
            rows = self.rows
            d = np.flatnonzero(rows == self.indices)
            self._cache["diag"] = d if d.size == self.n else None
        return self._cache["diag"]

    @property
    def diag(self) -> np.ndarray:
        d = self._diag_or_none()
        if d is None:
            raise ValueError("the filled pattern has a structurally zero diagonal entry")
        return d

    def positions(self, i, j) -> np.ndarray:
        """Storage positions of the original entries ``(i[k], j[k])`` (all in the filled pattern)."""
        ip = self.inverse_perm
        r = ip[np.asarray(i, dtype=np.int64)]
        c = ip[np.asarray(j, dtype=np.int64)]
        key = r * self.n + c
        allkeys = self.rows * self.n + self.indices  # sorted: rows ascending, columns sorted
        q = np.searchsorted(allkeys, key)
        if key.size and (np.any(q >= allkeys.size) or np.any(allkeys[np.minimum(q, allkeys.size - 1)] != key)):
            raise ValueError("an entry is not in the filled pattern")
        return q.astype(np.int64)

    def lower_columns(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ptr, pos)``: for each permuted column k, the positions of its entries below the
        diagonal, by increasing row."""
        rows = self.rows
        below = np.flatnonzero(rows > self.indices)
        order = np.lexsort((rows[below], self.indices[below]))  # by column, then row
        pos = below[order]
        ptr = np.zeros(self.n + 1, dtype=np.int64)
        np.add.at(ptr, self.indices[pos] + 1, 1)
        return np.cumsum(ptr), pos.astype(np.int64)

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ptr, pos)``: for each permuted column j, the positions of all its entries (U's above
        the diagonal, the diagonal, L's below), by increasing row: the left-looking elimination's
        view of the storage (``runtime.linalg.pattern_lu_factor``)."""
        rows = self.rows
        order = np.lexsort((rows, self.indices))  # by column, then row
        ptr = np.zeros(self.n + 1, dtype=np.int64)
        np.add.at(ptr, self.indices + 1, 1)
        return np.cumsum(ptr), order.astype(np.int64)

    def dense_fill(self) -> np.ndarray:
        """The filled pattern as a dense boolean matrix in the ORIGINAL numbering (small systems only)."""
        out = np.zeros((self.n, self.n), dtype=bool)
        out[self.perm[self.rows], self.perm[self.indices]] = True
        return out


def symbolic_elimination(indptr: np.ndarray, indices: np.ndarray, n: int, perm: np.ndarray | None = None,
                         order: str = "natural", max_fill: int | None = None) -> Elimination | None:
    """Fill pattern of L+U for elimination of ``P A P^T`` without pivoting (row-merge: row i of
    L+U is row i of A joined with U's row k for every k in L's row i, taken in increasing k).
    ``max_fill``: give up (return None) as soon as the filled pattern has more entries."""
    perm = np.arange(n, dtype=np.int64) if perm is None else np.asarray(perm, dtype=np.int64)
    ip = np.empty(n, dtype=np.int64)
    ip[perm] = np.arange(n)
    nnz = int(indices.size)
    # rows of P A P^T: row r is original row perm[r], columns mapped through ip
    urows: list[list[int]] = []
    out_ptr = [0]
    out_idx: list[int] = []
    updates = 0
    for r in range(n):
        orig = perm[r]
        cols = ip[indices[indptr[orig]:indptr[orig + 1]]].tolist()
        seen = set(cols)
        heap = [c for c in cols if c < r]
        heapq.heapify(heap)
        nl = 0
        while heap:
            k = heapq.heappop(heap)
            nl += 1
            uk = urows[k]
            updates += len(uk)
            for j in uk:
                if j not in seen:
                    seen.add(j)
                    if j < r:
                        heapq.heappush(heap, j)
        row = sorted(seen)
        urows.append([j for j in row if j > r])
        out_idx.extend(row)
        out_ptr.append(len(out_idx))
        if max_fill is not None and len(out_idx) > max_fill:
            return None
    return Elimination(n=n, perm=perm, order=order, indptr=np.asarray(out_ptr, dtype=np.int64),
                       indices=np.asarray(out_idx, dtype=np.int64), updates=updates, nnz=nnz)


def rcm_order(indptr: np.ndarray, indices: np.ndarray, n: int) -> np.ndarray:
    """Reverse Cuthill-McKee order of the symmetrised pattern ``A + A^T``."""
    import scipy.sparse as sps
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    A = sps.csr_matrix((np.ones(indices.size, dtype=np.int8), indices, indptr), shape=(n, n))
    S = (A + A.T).tocsr()
    S.sort_indices()
    return np.asarray(reverse_cuthill_mckee(S, symmetric_mode=True), dtype=np.int64)


def dense_threshold(n: int) -> int:
    """Degree above which a node of ``A + A^T`` counts as dense in :func:`minimum_degree_order`."""
    return max(16, int(10 * np.sqrt(n)))


def minimum_degree_order(indptr: np.ndarray, indices: np.ndarray, n: int) -> np.ndarray:
    """A minimum-degree order of the symmetrised pattern ``A + A^T`` (the fill-reducing order of
    grids, meshes and other non-banded sparse systems, where a band order leaves a band of fill).

    Each step eliminates a node of least current degree (ties: the lowest index, so the order is
    deterministic) and joins its neighbours into a clique (the elimination graph). A node with no
    diagonal entry (a multiplier's row of a KKT system, the normalisation of an eigenproblem) waits
    until a neighbour's elimination has filled its diagonal. Dense nodes (degree above
    :func:`dense_threshold`: a border coupling to nearly everything) are set aside and put last.

    Border nodes (dense, or without a diagonal entry) that end the order are then moved before the
    same number of nodes: eliminated last they would follow the whole block they border, and for a
    bordered singular block (``L - λD`` at an eigenvalue, a Hessian singular on the constraints'
    null space) that block is singular and fails its last pivot; eliminated before its last few
    nodes they meet a block already filled in by the border, which is not singular. (Those last
    nodes are coupled to nearly everything left, so the move adds little or no fill.)"""
    import scipy.sparse as sps

    A = sps.csr_matrix((np.ones(indices.size, dtype=np.int8), indices, indptr), shape=(n, n))
    has_diag = np.asarray(A.diagonal() != 0).copy()
    S = (A + A.T).tocsr()
    S.setdiag(0)
    S.eliminate_zeros()
    deg0 = np.diff(S.indptr)
    limit = dense_threshold(n)
    dense = [int(u) for u in np.flatnonzero(deg0 > limit)]
    is_dense = deg0 > limit
    adj = [set() if is_dense[u] else {int(w) for w in S.indices[S.indptr[u]:S.indptr[u + 1]] if not is_dense[w]}
           for u in range(n)]
    done = is_dense.copy()
    heap = [(len(adj[u]), u) for u in range(n) if not done[u] and has_diag[u]]
    heapq.heapify(heap)
    waiting = {u for u in range(n) if not done[u] and not has_diag[u]}
    order: list[int] = []
    while len(order) < n - len(dense):
        if not heap:  # only nodes without a diagonal are left: take them as they come
            u = min(waiting)
            waiting.discard(u)
            heap.append((len(adj[u]), u))
        d, u = heapq.heappop(heap)
        if done[u] or d != len(adj[u]):
            continue  # eliminated, or a stale degree
        done[u] = True
        order.append(u)
        nbrs = adj[u]
        for w in nbrs:
            aw = adj[w]
            aw.discard(u)
            aw |= nbrs
            aw.discard(w)
            if w in waiting:  # its diagonal is filled by this elimination
                waiting.discard(w)
            heapq.heappush(heap, (len(aw), w))
        adj[u] = set()
    order += dense
    border = is_dense | ~has_diag
    k = 0
    while k < n and border[order[n - 1 - k]]:
        k += 1
    if 0 < k and 2 * k <= n:
        order = order[:n - 2 * k] + order[n - k:] + order[n - 2 * k:n - k]
    return np.asarray(order, dtype=np.int64)


def symbolic_lu(pattern: np.ndarray) -> np.ndarray:
    """Fill pattern of L+U for elimination in the natural order without pivoting (dense
    boolean in, dense boolean out: for small systems and tests)."""
    n = pattern.shape[0]
    indptr, indices = csr_pattern(np.argwhere(pattern), n)
    return symbolic_elimination(indptr, indices, n).dense_fill() | pattern


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


def _acceptable(e: Elimination) -> bool:
    n = e.n
    if not e.diagonal_full:
        return False
    if e.fill_nnz > SPARSE_MAX_FILL_FRACTION * n * n:
        return False
    # statements of the straight-line code: one per L entry (the scaling) plus one per update
    work = e.updates + int(np.count_nonzero(e.rows > e.indices))
    if work <= SPARSE_MAX_UPDATES:
        return True
    return n >= SPARSE_LOOPS_MIN_N and work <= SPARSE_MAX_UPDATE_FRACTION * n ** 3 / 3.0


def candidate_orders(indptr, indices, n) -> list[Elimination]:
    """The natural order, and (for systems above the unrolled size) reverse Cuthill-McKee and
    minimum degree. The natural order is left out when it fills in more than the best other one
    (its analysis stopped there: the fill of a banded order on a grid costs seconds to count)."""
    nnz = int(indices.size)
    none = symbolic_elimination(indptr, indices, n, max_fill=nnz)
    if none is not None:  # no fill-in in the natural order: nothing to gain from another
        return [none]
    if n < SPARSE_LOOPS_MIN_N:
        return [symbolic_elimination(indptr, indices, n)]
    # minimum degree first: the others' analyses stop once they fill in more than it does
    md = symbolic_elimination(indptr, indices, n, minimum_degree_order(indptr, indices, n), "minimum degree")
    best = md.fill_nnz if md.diagonal_full else None
    perm = rcm_order(indptr, indices, n)
    rcm = symbolic_elimination(indptr, indices, n, perm, "rcm", max_fill=best)
    out = ([rcm] if rcm is not None else []) + [md]
    full = [e.fill_nnz for e in out if e.diagonal_full]
    natural = symbolic_elimination(indptr, indices, n, max_fill=min(full) if full else None)
    return ([natural] if natural is not None else []) + out


def choose_order(indptr, indices, n) -> Elimination:
    """The candidate order with the least fill-in (then the fewest updates); the natural
    order on ties."""
    cands = candidate_orders(indptr, indices, n)
    ok = [e for e in cands if e.diagonal_full] or cands
    return min(ok, key=lambda e: (e.fill_nnz, e.updates))  # min is stable: natural first


def choose_factorization(pattern) -> tuple[str, Elimination | None]:
    """``("sparse", elimination)`` when fixed-order elimination pays off, else ``("dense", None)``.

    ``pattern``: a dense boolean matrix, or ``(indptr, indices, n)`` in compressed rows."""
    if isinstance(pattern, np.ndarray):
        n = pattern.shape[0]
        indptr, indices = csr_pattern(np.argwhere(pattern), n)
    else:
        indptr, indices, n = pattern
    if n < SPARSE_MIN_SIZE:
        return "dense", None
    e = choose_order(indptr, indices, n)
    if not _acceptable(e):
        return "dense", None
    return "sparse", e
