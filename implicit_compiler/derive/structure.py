"""Structural rank: can dF/dy be invertible for some values of the symbols?

dF/dy is structurally non-singular exactly when its sparsity pattern has a
perfect matching between residuals (rows) and unknowns (columns).
"""

from __future__ import annotations


def maximum_matching(incidence: list[set[int]], n_cols: int) -> list[int]:
    """Maximum bipartite matching by Hopcroft–Karp: row -> matched column (or -1).

    Iterative (an explicit stack, no recursion), O(E sqrt(V)): a 10^5-unknown
    system is matched in well under a second and never reaches Python's recursion limit.
    Columns are tried in increasing order, so the result is deterministic.
    """
    n_rows = len(incidence)
    adj = [sorted(c for c in cols if 0 <= c < n_cols) for cols in incidence]
    col_of_row = [-1] * n_rows
    row_of_col = [-1] * n_cols
    # Greedy start: most rows of a sparse system are matched without any search.
    for r in range(n_rows):
        for c in adj[r]:
            if row_of_col[c] < 0:
                row_of_col[c] = r
                col_of_row[r] = c
                break
    inf = n_rows + 1
    while True:
        # BFS from the free rows: layer of each row along shortest alternating paths.
        dist = [inf] * n_rows
        queue = [r for r in range(n_rows) if col_of_row[r] < 0]
        for r in queue:
            dist[r] = 0
        found = False
        head = 0
        while head < len(queue):
            r = queue[head]
            head += 1
            for c in adj[r]:
                r2 = row_of_col[c]
                if r2 < 0:
                    found = True
                elif dist[r2] == inf:
                    dist[r2] = dist[r] + 1
                    queue.append(r2)
        if not found:
            return col_of_row
        # DFS along the layers from each free row, one augmenting path at a time.
        nxt = [0] * n_rows
        for start in range(n_rows):
            if col_of_row[start] >= 0:
                continue
            path = [start]  # rows on the current alternating path
            while path:
                r = path[-1]
                advanced = False
                while nxt[r] < len(adj[r]):
                    c = adj[r][nxt[r]]
                    nxt[r] += 1
                    r2 = row_of_col[c]
                    if r2 < 0:
                        # augment along the path: every row takes the column it was tried with
                        for k in range(len(path) - 1, -1, -1):
                            rk = path[k]
                            ck = c if k == len(path) - 1 else adj[rk][nxt[rk] - 1]
                            row_of_col[ck] = rk
                            col_of_row[rk] = ck
                        path = []
                        advanced = True
                        break
                    if dist[r2] == dist[r] + 1:
                        path.append(r2)
                        advanced = True
                        break
                if not advanced:
                    dist[r] = inf  # dead end: no augmenting path through r in this phase
                    path.pop()


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
