"""Structural matching (derive/structure.py): maximum size, valid, iterative at any size."""

import numpy as np
import pytest
import scipy.sparse as sps
from scipy.sparse.csgraph import maximum_bipartite_matching

from implicit_compiler.derive.structure import hall_violator, maximum_matching


def _check(incidence, n_cols, match):
    used = [c for c in match if c >= 0]
    assert len(used) == len(set(used)), "a column matched twice"
    for r, c in enumerate(match):
        assert c < 0 or c in incidence[r], f"row {r} matched to column {c} it does not contain"


def _reference_size(incidence, n_cols):
    rows = [r for r, cs in enumerate(incidence) for _ in cs]
    cols = [c for cs in incidence for c in cs]
    A = sps.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(incidence), n_cols))
    return int((maximum_bipartite_matching(A, perm_type="column") >= 0).sum())


@pytest.mark.parametrize("seed", range(40))
def test_random_patterns_reach_the_maximum(seed):
    rng = np.random.default_rng(seed)
    n_rows, n_cols = rng.integers(1, 30, size=2)
    density = rng.uniform(0.02, 0.4)
    incidence = [set(np.flatnonzero(rng.random(n_cols) < density).tolist()) for _ in range(n_rows)]
    match = maximum_matching(incidence, int(n_cols))
    _check(incidence, n_cols, match)
    assert sum(c >= 0 for c in match) == _reference_size(incidence, n_cols)


def test_greedy_start_needs_augmenting_paths():
    # Greedy matches row 0 -> 0 and row 1 -> 1, leaving row 2 (only column 0) free:
    # the maximum needs the alternating path 2 -> 0 -> 0 -> 1 -> 1 -> 2.
    incidence = [{0, 1}, {1, 2}, {0}]
    match = maximum_matching(incidence, 3)
    _check(incidence, 3, match)
    assert sorted(match) == [0, 1, 2]


def test_long_augmenting_path_does_not_recurse():
    # Greedy matches row i -> column i for i < n - 1; the last row has only column 0, so the
    # maximum needs one alternating path through the whole system (n rows deep).
    n = 20000
    incidence = [{i, i + 1} for i in range(n - 1)] + [{0}]
    match = maximum_matching(incidence, n)
    _check(incidence, n, match)
    assert match[-1] == 0 and all(c >= 0 for c in match)


def test_tridiagonal_of_100k_unknowns():
    n = 100_000
    incidence = [{j for j in (i - 1, i, i + 1) if 0 <= j < n} for i in range(n)]
    match = maximum_matching(incidence, n)
    assert all(c >= 0 for c in match)


def test_hall_violator_names_too_many_rows_for_their_columns():
    incidence = [{0}, {0}, {1, 2}]
    match = maximum_matching(incidence, 3)
    rows, cols = hall_violator(incidence, match)
    assert rows == [0, 1] and cols == [0]
