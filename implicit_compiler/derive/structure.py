"""Structural rank: can dF/dy be invertible for some values of the symbols?

dF/dy is structurally non-singular exactly when its sparsity pattern has a
perfect matching between residuals (rows) and unknowns (columns).
"""

from __future__ import annotations


def maximum_matching(incidence: list[set[int]], n_cols: int) -> list[int]:
    """Kuhn's augmenting-path bipartite matching: row -> matched column (or -1)."""
    col_of_row = [-1] * len(incidence)
    row_of_col = [-1] * n_cols

    def augment(r, seen):
        for c in sorted(incidence[r]):
            if c in seen:
                continue
            seen.add(c)
            if row_of_col[c] < 0 or augment(row_of_col[c], seen):
                row_of_col[c] = r
                col_of_row[r] = c
                return True
        return False

    for r in range(len(incidence)):
        augment(r, set())
    return col_of_row


def hall_violator(incidence: list[set[int]], col_of_row: list[int]) -> tuple[list[int], list[int]]:
    """Rows reachable from an unmatched row by alternating paths, and their columns.

    There are more such rows than columns, which is why no perfect matching exists.
    """
    row_of_col = {c: r for r, c in enumerate(col_of_row) if c >= 0}
    start = next(r for r, c in enumerate(col_of_row) if c < 0)
    rows, cols, stack = {start}, set(), [start]
    while stack:
        r = stack.pop()
        for c in incidence[r]:
            if c not in cols:
                cols.add(c)
                r2 = row_of_col.get(c)
                if r2 is not None and r2 not in rows:
                    rows.add(r2)
                    stack.append(r2)
    return sorted(rows), sorted(cols)
