"""Elimination orders chosen at compile time: minimum degree on grids and bordered systems.

Pure pattern analysis (no kernels are compiled): the filled pattern and the multiply-adds of each
order are counted exactly by :func:`symbolic_elimination`, and the left-looking elimination's
column tables are checked against the pattern they describe.
"""

import numpy as np
import pytest

from implicit_compiler.derive.sparsity import (
    candidate_orders,
    choose_factorization,
    csr_pattern,
    dense_threshold,
    minimum_degree_order,
    rcm_order,
    symbolic_elimination,
)


def grid_pattern(k: int, border: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """dF/dy's pattern of a k x k 4-neighbour grid (unknowns row by row), with the normalised-cuts
    border: one more unknown coupled to every grid unknown, with no diagonal entry of its own."""
    N = k * k
    idx = np.arange(N).reshape(k, k)
    ij = [np.stack([np.arange(N)] * 2, 1)]
    for a, b in ((idx[:, :-1], idx[:, 1:]), (idx[:-1, :], idx[1:, :])):
        a, b = a.ravel(), b.ravel()
        ij += [np.stack([a, b], 1), np.stack([b, a], 1)]
    n = N
    if border:
        ij += [np.stack([np.full(N, N), np.arange(N)], 1), np.stack([np.arange(N), np.full(N, N)], 1)]
        n = N + 1
    return (*csr_pattern(np.concatenate(ij), n), n)


@pytest.mark.parametrize("k", [5, 12, 32])
def test_minimum_degree_is_a_permutation_and_beats_band_orders_on_grids(k):
    indptr, indices, n = grid_pattern(k, border=False)
    perm = minimum_degree_order(indptr, indices, n)
    assert sorted(perm.tolist()) == list(range(n))
    md = symbolic_elimination(indptr, indices, n, perm, "minimum degree")
    natural = symbolic_elimination(indptr, indices, n)
    rcm = symbolic_elimination(indptr, indices, n, rcm_order(indptr, indices, n), "rcm")
    assert md.diagonal_full
    assert md.fill_nnz < natural.fill_nnz and md.fill_nnz < rcm.fill_nnz
    if k == 32:  # the band of width 32 fills ~2.5x more and does ~4x the multiply-adds
        assert natural.fill_nnz > 2.5 * md.fill_nnz and natural.updates > 4 * md.updates


@pytest.mark.parametrize("k", [5, 48])
def test_the_border_is_eliminated_before_the_last_grid_unknown(k):
    # eliminated last, the border would follow the singular block L - λD and fail the last pivot
    indptr, indices, n = grid_pattern(k, border=True)
    lam = n - 1
    assert (k * k > dense_threshold(n)) == (k == 48)  # a dense border at 48 x 48, a sparse one at 5 x 5
    perm = minimum_degree_order(indptr, indices, n)
    assert sorted(perm.tolist()) == list(range(n))
    assert perm[-2] == lam and perm[-1] != lam
    kind, e = choose_factorization((indptr, indices, n))
    assert kind == "sparse" and e.order == "minimum degree" and e.perm[-2] == lam
    if k == 48:  # 2,305 unknowns: a few percent of a band order's fill, ~5x fewer multiply-adds
        natural = symbolic_elimination(indptr, indices, n)
        assert e.fill_nnz < natural.fill_nnz / 3 and e.updates < natural.updates / 4


def test_nodes_without_a_diagonal_wait_for_a_neighbour():
    # a KKT-like pattern: unknowns 0..9 on a path with diagonals, multipliers 10..12 without one
    n = 13
    ij = [(i, i) for i in range(10)] + [(i, i + 1) for i in range(9)] + [(i + 1, i) for i in range(9)]
    for m, cols in ((10, (0, 1)), (11, (4, 5)), (12, (8, 9))):
        ij += [(m, c) for c in cols] + [(c, m) for c in cols]
    indptr, indices = csr_pattern(np.array(ij), n)
    perm = minimum_degree_order(indptr, indices, n).tolist()
    for m, cols in ((10, (0, 1)), (11, (4, 5)), (12, (8, 9))):
        assert min(perm.index(c) for c in cols) < perm.index(m)  # a neighbour first: the diagonal fills
    e = symbolic_elimination(indptr, indices, n, np.array(perm))
    assert e.diagonal_full


def test_orders_that_fill_more_are_not_analysed_to_the_end():
    # the natural order's analysis stops once it exceeds minimum degree's fill (at 64 x 64 counting a
    # band order's fill took seconds): it is not among the candidates
    indptr, indices, n = grid_pattern(24, border=True)
    orders = [e.order for e in candidate_orders(indptr, indices, n)]
    assert orders == ["minimum degree"]
    assert symbolic_elimination(indptr, indices, n, max_fill=indices.size) is None
    # a tridiagonal system fills nothing in the natural order: no other order is tried
    i = np.arange(50)
    ij = np.concatenate([np.stack([i, i], 1), np.stack([i[1:], i[:-1]], 1), np.stack([i[:-1], i[1:]], 1)])
    assert [e.order for e in candidate_orders(*csr_pattern(ij, 50), 50)] == ["natural"]


def test_column_tables_describe_the_filled_pattern():
    indptr, indices, n = grid_pattern(6, border=True)
    kind, e = choose_factorization((indptr, indices, n))
    cptr, cpos = e.columns()
    assert cpos.size == e.fill_nnz and sorted(cpos.tolist()) == list(range(e.fill_nnz))
    rows = e.rows
    for j in range(n):
        col = cpos[cptr[j]:cptr[j + 1]]
        assert (e.indices[col] == j).all() and (np.diff(rows[col]) > 0).all()
