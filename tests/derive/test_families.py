"""Index families (derive/families.py): detection is exact, respects groups, and is deterministic."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import implicit_compiler as ic
from implicit_compiler.derive.families import find_families, system_slots, term_families
from implicit_compiler.derive.jacobians import sparse_jacobian

ROOT = Path(__file__).resolve().parents[2]


def bratu(n, perturb=None):
    u = sp.symbols(f"u0:{n}")
    lam = sp.Symbol("lam")
    h2 = sp.Integer(n + 1) ** 2
    res = []
    for i in range(n):
        left = u[i - 1] if i > 0 else 0
        right = u[i + 1] if i < n - 1 else 0
        c = sp.Integer(3) if i == perturb else sp.Integer(2)
        res.append((left - c * u[i] + right) * h2 + lam * sp.exp(u[i]))
    return ic.ResidualSystem(residuals=res, unknowns=list(u), params={"lam": lam})


def qp_kkt(n=6, m=4):
    y = sp.Matrix(sp.symbols(f"y0:{n}"))
    Q = sp.Matrix(n, n, sp.symbols(f"Q0:{n * n}"))
    q = sp.Matrix(sp.symbols(f"q0:{n}"))
    G = sp.Matrix(m, n, sp.symbols(f"G0:{m * n}"))
    h = sp.Matrix(sp.symbols(f"h0:{m}"))
    problem = ic.Problem((y.T * Q * y)[0] / 2 + (q.T * y)[0], variables={"y": y},
                         params={"Q": Q, "q": q, "G": G, "h": h}, inequalities=list(G * y - h))
    return problem.system


def grid_ncut(rows, cols):
    """(L - λD) v = 0 and vᵀ D v = 1 on a 4-neighbour grid; edge weights are parameters."""
    idx = {(r, c): r * cols + c for r in range(rows) for c in range(cols)}
    edges = [(idx[r, c], idx[r, c + 1]) for r in range(rows) for c in range(cols - 1)]
    edges += [(idx[r, c], idx[r + 1, c]) for r in range(rows - 1) for c in range(cols)]
    v = sp.symbols(f"v0:{rows * cols}")
    lam = sp.Symbol("lam")
    w = sp.symbols(f"w0:{len(edges)}")
    nbrs = {i: [] for i in range(rows * cols)}
    for e, (a, b) in enumerate(edges):
        nbrs[a].append((b, w[e]))
        nbrs[b].append((a, w[e]))
    deg = [sum(we for _, we in nbrs[i]) for i in range(rows * cols)]
    res = [sum(we * (v[i] - v[j]) for j, we in nbrs[i]) - lam * deg[i] * v[i] for i in range(rows * cols)]
    res.append(sum(deg[i] * v[i] ** 2 for i in range(rows * cols)) - 1)
    return ic.ResidualSystem(residuals=res, unknowns={"v": list(v), "lam": lam}, params={"w": list(w)})


def _symbols_of(system):
    out = {}
    for kind, groups in (("unknown", system.unknown_groups), ("param", system.param_groups)):
        for g in groups:
            for j, s in enumerate(g.symbols):
                out[(kind, g.offset + j)] = s
    return out


def _check_exact(system, families):
    """Every member rebuilt from its family's template and index row IS the residual."""
    syms = _symbols_of(system)
    for f in families:
        for r, i in enumerate(f.members):
            assert f.instance(r, syms) == system.residuals[i]


@pytest.mark.parametrize("n", [5, 50, 1000])
def test_bratu_is_one_interior_family_and_one_boundary_family(n):
    s = bratu(n)
    fams, singles = find_families(s.residuals, system_slots(s))
    assert singles == []
    assert sorted(f.size for f in fams) == [2, n - 2]
    interior = max(fams, key=lambda f: f.size)
    assert len(interior.slots) == 4  # u[i-1], u[i], u[i+1], lam
    assert sorted(interior.slot_kinds) == ["param", "unknown", "unknown", "unknown"]
    assert interior.table.shape == (n - 2, 4)
    _check_exact(s, fams)


def test_a_perturbed_coefficient_is_not_merged():
    s = bratu(12, perturb=5)
    fams, singles = find_families(s.residuals, system_slots(s))
    assert singles == [5]
    assert sorted(f.size for f in fams) == [2, 9]
    assert all(5 not in f.members for f in fams)
    _check_exact(s, fams)


def test_qp_kkt_rows_are_one_stationarity_and_one_complementarity_family():
    n, m = 6, 4
    s = qp_kkt(n, m)
    fams, singles = find_families(s.residuals, system_slots(s))
    assert singles == []
    assert sorted(f.size for f in fams) == [m, n]
    stationarity = next(f for f in fams if f.size == n)
    # n Q entries on the diagonal-or-pair terms (2n - 1), y (n), q (1), G column (m), nu (m)
    assert len(stationarity.slots) == (2 * n - 1) + n + 1 + 2 * m
    _check_exact(s, fams)


def test_qp_row_with_one_changed_coefficient_is_its_own():
    s = qp_kkt(4, 3)
    res = list(s.residuals)
    res[2] = res[2] + sp.Rational(1, 10) * s.unknowns[2]  # a stray 0.1*y2 in one stationarity row
    fams, singles = find_families(res, system_slots(s))
    assert singles == [2]
    assert sorted(f.size for f in fams) == [3, 3]


def test_grid_graph_families_follow_node_degree():
    rows, cols = 6, 7
    s = grid_ncut(rows, cols)
    fams, singles = find_families(s.residuals, system_slots(s))
    # corners (degree 2), edges (3), interior (4); the normalisation row is alone
    assert singles == [rows * cols]
    assert sorted(f.size for f in fams) == sorted([4, 2 * (rows - 2) + 2 * (cols - 2), (rows - 2) * (cols - 2)])
    _check_exact(s, fams)


def test_renaming_stays_inside_groups():
    y0, y1, p0, p1, c = sp.symbols("y0 y1 p0 p1 c")
    slots = {y0: ("unknown", "y", 0), y1: ("unknown", "y", 1),
             p0: ("param", "a", 0), p1: ("param", "b", 1)}
    # p0 and p1 are in different groups: y0*p0 and y1*p1 are not one family
    fams, singles = find_families([y0 * p0, y1 * p1], slots)
    assert fams == [] and singles == [0, 1]
    # a constant symbol outside every group must match by name
    fams, singles = find_families([c * y0, c * y1, p0 * y1], {**slots, p0: ("param", "a", 0)})
    assert [f.members for f in fams] == [(0, 1)] and singles == [2]
    # one to one: y0*y0 is not an instance of y0*y1
    fams, singles = find_families([y0 * y1, y0**2], slots)
    assert fams == []


def test_template_jacobian_scattered_by_the_table_equals_each_instance_jacobian():
    for s in (bratu(9), qp_kkt(4, 3), grid_ncut(3, 4)):
        fams, _ = find_families(s.residuals, system_slots(s))
        syms = _symbols_of(s)
        for kind, symbols in (("unknown", s.unknowns), ("param", s.params)):
            want = {(i, j): e for i, j, e in sparse_jacobian(s.residuals, symbols)}
            for f in fams:
                derivs = f.jacobian(kind)
                for r, i in enumerate(f.members):
                    sub = {sl: syms[(k, int(p))] for sl, k, p in zip(f.slots, f.slot_kinds, f.table[r])}
                    got = {(i, int(f.table[r, k])): e.xreplace(sub) for k, e in derivs}
                    row_want = {key: e for key, e in want.items() if key[0] == i}
                    assert got == row_want


def test_terms_of_a_quadratic_form_are_families():
    n = 5
    y = sp.Matrix(sp.symbols(f"y0:{n}"))
    Q = sp.Matrix(n, n, sp.symbols(f"Q0:{n * n}"))
    slots = {s: ("unknown", "y", j) for j, s in enumerate(y)}
    slots.update({s: ("param", "Q", j) for j, s in enumerate(Q)})
    fams, singles = term_families((y.T * Q * y)[0], slots)
    # Q_ii y_i^2 (n terms) and Q_ij y_i y_j, i != j (n^2 - n terms)
    assert singles == []
    assert sorted(f.size for f in fams) == [n, n * n - n]


def test_detection_is_deterministic_across_hash_seeds():
    script = (
        f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from tests.derive.test_families import grid_ncut, qp_kkt; "
        "from implicit_compiler.derive.families import find_families, system_slots; "
        "out = []\n"
        "for s in (qp_kkt(4, 3), grid_ncut(3, 4)):\n"
        "    fams, singles = find_families(s.residuals, system_slots(s))\n"
        "    out.append([[str(f.template), f.table.tolist(), list(f.members)] for f in fams] + [singles])\n"
        "print(json.dumps(out))"
    )
    outs = []
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        outs.append(json.loads(proc.stdout))
    assert outs[0] == outs[1] == outs[2]
    assert np.asarray(outs[0][0][0][1]).ndim == 2
