"""Emit the kernel module for one system.

The module holds, for that system only:

* ``residual(y, p, F)`` and ``residual_jacobian(y, p, F, J)`` (one joint CSE for
  F and the structural non-zeros of dF/dy),
* ``jac_params_absmax(y, p)`` (the scale of dF/dtheta, for the singularity test),
* ``vjp_params(y, p, v, need, out)``: ``out = -(dF/dtheta)^T v`` over the
  non-zeros of dF/dtheta only, one block per parameter group, skipped when
  ``need[g]`` is false,
* ``factor / factor_dense / solve / solve_transpose``: dense LU with partial
  pivoting, or fixed-order sparse elimination over the fill pattern with a
  pivot check that falls back to dense LU,
* batched drivers (serial and ``prange``-parallel) that call the generic
  per-sample solvers in :mod:`implicit_compiler.runtime`.

Expression kernels are printed from SymPy with :class:`NumbaPrinter`; the
drivers come from the text template in ``templates/drivers.py.txt``.
"""

from __future__ import annotations

import pprint
from importlib import resources

import numpy as np
import sympy as sp

from .._version import __version__
from .printer import NumbaPrinter

INDENT = "    "
CHUNK = 64  # samples per parallel work item (scratch arrays are allocated per chunk)


def slot_map(unknowns, params) -> dict:
    m = {s: f"y[{j}]" for j, s in enumerate(unknowns)}
    m.update({s: f"p[{j}]" for j, s in enumerate(params)})
    return m


def cse_lines(exprs, base_map: dict, indent: str = INDENT):
    """Joint CSE of ``exprs``; returns (assignment lines, printed outputs)."""
    exprs = [sp.sympify(e) for e in exprs]
    if not exprs:
        return [], []
    free = set().union(*(e.free_symbols for e in exprs))
    gen = sp.numbered_symbols("_cse", exclude=free)
    reps, reduced = sp.cse(exprs, symbols=gen, order="canonical")
    local = dict(base_map)
    lines = []
    for k, (sym, e) in enumerate(reps):
        pr = NumbaPrinter(local)
        name = f"t{k}"
        lines.append(f"{indent}{name} = {pr.doprint(e)}")
        local[sym] = name
    pr = NumbaPrinter(local)
    return lines, [pr.doprint(e) for e in reduced]


def _kernel_residual(d, smap):
    lines, outs = cse_lines(d.residuals, smap)
    body = lines + [f"{INDENT}F[{i}] = {o}" for i, o in enumerate(outs)]
    return ["@njit(cache=True, inline='always')", "def residual(y, p, F):", *body]


def _kernel_residual_jacobian(d, smap):
    exprs = list(d.residuals) + [e for _, _, e in d.jac_y]
    lines, outs = cse_lines(exprs, smap)
    n = d.n
    body = list(lines)
    body += [f"{INDENT}F[{i}] = {o}" for i, o in enumerate(outs[:n])]
    if d.factorization == "dense":
        pattern = d.pattern_unknowns
        if n <= 12:
            body += [f"{INDENT}J[{i}, {j}] = 0.0" for i, j in np.argwhere(~pattern)]
        else:
            body.insert(0, f"{INDENT}for i in range(N):\n{INDENT * 2}for j in range(N):\n{INDENT * 3}J[i, j] = 0.0")
    else:
        # Positions that elimination fills in must start at zero; the rest are never read.
        pattern = d.pattern_unknowns
        fill_only = np.argwhere(d.fill & ~pattern)
        body += [f"{INDENT}J[{i}, {j}] = 0.0" for i, j in fill_only]
    body += [f"{INDENT}J[{i}, {j}] = {o}" for (i, j, _), o in zip(d.jac_y, outs[n:])]
    return ["@njit(cache=True, inline='always')", "def residual_jacobian(y, p, F, J):", *body]


def _kernel_jac_params_absmax(d, smap):
    head = ["@njit(cache=True, inline='always')", "def jac_params_absmax(y, p):"]
    if not d.jac_p:
        return head + [f"{INDENT}return 0.0"]
    lines, outs = cse_lines([e for _, _, e in d.jac_p], smap)
    body = list(lines) + [f"{INDENT}m = 0.0"]
    for o in outs:
        body.append(f"{INDENT}m = max(m, abs({o}))")
    return head + body + [f"{INDENT}return m"]


def _kernel_vjp_params(d, smap, param_groups):
    """``out[c] = -sum_i v[i] dF_i/dtheta_c`` for the columns of needed groups."""
    body = []
    by_col: dict[int, list] = {}
    for i, j, e in d.jac_p:
        by_col.setdefault(j, []).append((i, e))
    for g, grp in enumerate(param_groups):
        cols = range(grp["offset"], grp["offset"] + len(grp["symbols"]))
        body.append(f"{INDENT}if need[{g}]:  # parameter group {grp['name']!r}")
        entries = [(c, i, e) for c in cols for i, e in by_col.get(c, [])]
        lines, outs = cse_lines([e for _, _, e in entries], smap, indent=INDENT * 2)
        body += lines
        terms: dict[int, list[str]] = {c: [] for c in cols}
        for (c, i, _), o in zip(entries, outs):
            terms[c].append(f"v[{i}]*({o})")
        for c in cols:
            rhs = " + ".join(terms[c]) if terms[c] else "0.0"
            body.append(f"{INDENT * 2}out[{c}] = -({rhs})" if terms[c] else f"{INDENT * 2}out[{c}] = 0.0")
    if not body:
        body = [f"{INDENT}pass"]
    return ["@njit(cache=True, inline='always')", "def vjp_params(y, p, v, need, out):", *body]


def _kernels_factor_sparse(d, pivot_threshold: float):
    """Straight-line elimination over the fill pattern in the natural order."""
    fill = d.fill
    n = d.n
    f = ["@njit(cache=True, inline='always')", "def factor(J, piv):",
         f"{INDENT}piv[{n}] = 0", f"{INDENT}minp = math.inf"]
    for k in range(n):
        below = [int(i) for i in np.flatnonzero(fill[k + 1:, k]) + k + 1]
        right = [int(j) for j in np.flatnonzero(fill[k, k + 1:]) + k + 1]
        f.append(f"{INDENT}a = abs(J[{k}, {k}])")
        if below:
            cand = ", ".join(f"abs(J[{i}, {k}])" for i in below)
            cmax = f"max({cand}, 0.0)" if len(below) == 1 else f"max({cand})"
            f.append(f"{INDENT}if not (a > 0.0 and a >= {pivot_threshold!r} * {cmax}):")
        else:
            f.append(f"{INDENT}if not (a > 0.0):")
        f.append(f"{INDENT * 2}return -1.0")
        f.append(f"{INDENT}minp = min(minp, a)")
        if below:
            f.append(f"{INDENT}inv = 1.0 / J[{k}, {k}]")
        for i in below:
            f.append(f"{INDENT}J[{i}, {k}] *= inv")
            for j in right:
                if fill[i, j]:
                    f.append(f"{INDENT}J[{i}, {j}] -= J[{i}, {k}] * J[{k}, {j}]")
    f.append(f"{INDENT}return minp")

    s = ["@njit(cache=True, inline='always')", "def _solve_sparse(J, b):"]
    for i in range(n):
        terms = [f" - J[{i}, {j}] * b[{j}]" for j in range(i) if fill[i, j]]
        if terms:
            s.append(f"{INDENT}b[{i}] = b[{i}]{''.join(terms)}")
    for i in range(n - 1, -1, -1):
        terms = [f" - J[{i}, {j}] * b[{j}]" for j in range(i + 1, n) if fill[i, j]]
        s.append(f"{INDENT}b[{i}] = (b[{i}]{''.join(terms)}) / J[{i}, {i}]")

    t = ["@njit(cache=True, inline='always')", "def _solve_transpose_sparse(J, b):"]
    for i in range(n):
        terms = [f" - J[{j}, {i}] * b[{j}]" for j in range(i) if fill[j, i]]
        t.append(f"{INDENT}b[{i}] = (b[{i}]{''.join(terms)}) / J[{i}, {i}]")
    for i in range(n - 1, -1, -1):
        terms = [f" - J[{j}, {i}] * b[{j}]" for j in range(i + 1, n) if fill[j, i]]
        if terms:
            t.append(f"{INDENT}b[{i}] = b[{i}]{''.join(terms)}")
    return f + [""] + s + [""] + t


def _kernels_factor_wrappers(kind: str):
    """``piv[N]`` records which factorisation is stored in ``J``: 0 sparse, 1 dense."""
    dense = [
        "@njit(cache=True, inline='always')",
        "def factor_dense(J, piv):",
        f"{INDENT}piv[N] = 1",
        f"{INDENT}return lu_factor(N, J, piv)",
    ]
    if kind == "dense":
        return dense + [
            "", "factor = factor_dense", "",
            "@njit(cache=True, inline='always')",
            "def solve(J, piv, b):",
            f"{INDENT}lu_solve(N, J, piv, b)", "",
            "@njit(cache=True, inline='always')",
            "def solve_transpose(J, piv, b):",
            f"{INDENT}lu_solve_transpose(N, J, piv, b)",
        ]
    return dense + [
        "",
        "@njit(cache=True, inline='always')",
        "def solve(J, piv, b):",
        f"{INDENT}if piv[N] == 1:",
        f"{INDENT * 2}lu_solve(N, J, piv, b)",
        f"{INDENT}else:",
        f"{INDENT * 2}_solve_sparse(J, b)", "",
        "@njit(cache=True, inline='always')",
        "def solve_transpose(J, piv, b):",
        f"{INDENT}if piv[N] == 1:",
        f"{INDENT * 2}lu_solve_transpose(N, J, piv, b)",
        f"{INDENT}else:",
        f"{INDENT * 2}_solve_transpose_sparse(J, b)",
    ]


def emit_module(derivation, layout: dict, key: str, options: dict | None = None) -> str:
    """The full source of the generated module."""
    opts = {"pivot_threshold": 0.1, **(options or {})}
    d = derivation
    smap = slot_map(d.unknowns, d.params)
    out = [_header(d, layout, key)]
    out.append(f"N = {d.n}\nM = {d.m}\nCHUNK = {CHUNK}\nFACTORIZATION = {d.factorization!r}\n")
    out.append("LAYOUT = " + pprint.pformat(layout, width=100, sort_dicts=False) + "\n")
    sections = [
        _kernel_residual(d, smap),
        _kernel_residual_jacobian(d, smap),
        _kernel_jac_params_absmax(d, smap),
        _kernel_vjp_params(d, smap, layout["param_groups"]),
    ]
    if d.factorization == "sparse":
        sections.append(_kernels_factor_sparse(d, opts["pivot_threshold"]))
    sections.append(_kernels_factor_wrappers(d.factorization))
    for sec in sections:
        out.append("\n".join(sec) + "\n")
    template = resources.files("implicit_compiler.codegen").joinpath("templates", "drivers.py.txt").read_text()
    for suffix, parallel in (("serial", "False"), ("parallel", "True")):
        out.append(template.replace("{suffix}", suffix).replace("{parallel}", parallel))
    return "\n\n".join(out).rstrip() + "\n"


def _header(d, layout, key) -> str:
    import numba

    def comment(text):
        return "\n".join("#   " + line for line in str(text).splitlines())

    lines = [
        f"# Generated by implicit_compiler {__version__} (sympy {sp.__version__}, numba {numba.__version__}).",
        f"# Content hash: {key}",
        f"# System {layout['name']!r} ({layout['kind']}): {d.n} unknowns, {d.m} parameters,",
        f"# dF/dy: {len(d.jac_y)} structural non-zeros of {d.n * d.n}, factorisation: {d.factorization};",
        f"# dF/dtheta: {len(d.jac_p)} structural non-zeros of {d.n * d.m}.",
        "#",
        "# Argument layout: y[j] is unknown j, p[j] is parameter j:",
    ]
    for j, s in enumerate(d.unknowns):
        lines.append(f"#   y[{j}] = {s}")
    for j, s in enumerate(d.params):
        lines.append(f"#   p[{j}] = {s}")
    lines.append("# Residuals:")
    for i, r in enumerate(d.residuals):
        lines.append(comment(f"F[{i}] = {r}"))
    lines.append("#\n# Do not edit: this file is regenerated from the system when its hash changes.")
    lines += ["", "import math", "", "import numpy as np", "from numba import njit, prange", "",
              "from implicit_compiler.runtime.fixed_point import fixed_point_one",
              "from implicit_compiler.runtime.linalg import lu_factor, lu_solve, lu_solve_transpose",
              "from implicit_compiler.runtime.newton import newton_one"]
    return "\n".join(lines) + "\n"
