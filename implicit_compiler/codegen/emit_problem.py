"""Emit the kernel module of an optimization :class:`Problem`.

The module is the KKT residual system's module (residual, Jacobians, VJP,
factorisations: the backward pass) plus, for the interior-point forward:

* ``ip_eval(y, p, gradf, h, Jh, g, Jg)``: ∇f, the constraints and their
  Jacobians, one joint CSE;
* ``ip_obj(y, p)``: the objective value f (minimised), for the interior point's
  penalty-barrier merit;
* ``ip_hess(y, lam, nu, p, H)``: ∇²_y L, symmetric, from its lower triangle;
* batched drivers calling :func:`implicit_compiler.runtime.interior_point.ip_one`.
"""

from __future__ import annotations

import numpy as np
import sympy as sp

from .emit import INDENT, cse_lines, driver_bindings, emit_module


# Arithmetic faults (1/0, log(0), 0/0) give inf/NaN, which the solver reports per sample
# as NONFINITE, instead of a ZeroDivisionError for the whole batch.
def _decorator(signature: str) -> str:
    return f"@njit({signature}, cache=True, error_model='numpy')"


def _zero_lines(pattern: np.ndarray, name: str, rows: int, cols: int) -> list[str]:
    if rows * cols <= 400:
        return [f"{INDENT}{name}[{i}, {j}] = 0.0" for i, j in np.argwhere(~pattern)]
    return [f"{INDENT}{name}[:, :] = 0.0"]


def _sparse(exprs, symbols):
    out = []
    for i, e in enumerate(exprs):
        for j, s in enumerate(symbols):
            if s in e.free_symbols:
                d = sp.diff(e, s)
                if d != 0:
                    out.append((i, j, d))
    return out


def problem_sections(problem) -> list[list[str]]:
    y, p = problem.variables, problem.params
    n, q, r = len(y), len(problem.equalities), len(problem.inequalities)
    base = {s: f"y[{j}]" for j, s in enumerate(y)}
    base.update({s: f"p[{j}]" for j, s in enumerate(p)})

    grad = [sp.diff(problem.f, s) for s in y]
    Jh = _sparse(problem.equalities, y)
    Jg = _sparse(problem.inequalities, y)
    exprs = grad + list(problem.equalities) + list(problem.inequalities) + [e for *_, e in Jh] + [e for *_, e in Jg]
    lines, outs = cse_lines(exprs, base)
    body = list(lines)
    k = 0
    for j in range(n):
        body.append(f"{INDENT}gradf[{j}] = {outs[k]}")
        k += 1
    for i in range(q):
        body.append(f"{INDENT}h[{i}] = {outs[k]}")
        k += 1
    for i in range(r):
        body.append(f"{INDENT}g[{i}] = {outs[k]}")
        k += 1
    for name, entries, rows in (("Jh", Jh, q), ("Jg", Jg, r)):
        if rows:
            pat = np.zeros((rows, n), dtype=bool)
            for i, j, _ in entries:
                pat[i, j] = True
            body += _zero_lines(pat, name, rows, n)
        for i, j, _ in entries:
            body.append(f"{INDENT}{name}[{i}, {j}] = {outs[k]}")
            k += 1
    ev = [_decorator("IP_EVAL"), "def ip_eval(y, p, gradf, h, Jh, g, Jg, tab):", *(body or [f"{INDENT}pass"])]

    hmap = dict(base)
    hmap.update({s: f"lam[{i}]" for i, s in enumerate(problem.lam)})
    hmap.update({s: f"nu[{i}]" for i, s in enumerate(problem.nu)})
    entries = problem.hessian_entries
    lines, outs = cse_lines([e for *_, e in entries], hmap)
    pat = np.zeros((n, n), dtype=bool)
    for i, j, _ in entries:
        pat[i, j] = pat[j, i] = True
    hb = _zero_lines(pat, "H", n, n) + list(lines)
    for (i, j, _), o in zip(entries, outs):
        hb.append(f"{INDENT}H[{i}, {j}] = {o}")
        if i != j:
            hb.append(f"{INDENT}H[{j}, {i}] = H[{i}, {j}]")
    hs = [_decorator("IP_HESS"), "def ip_hess(y, lam, nu, p, H, tab):", *(hb or [f"{INDENT}pass"])]
    lines, outs = cse_lines([problem.f], base)
    ob = [_decorator("IP_OBJ"), "def ip_obj(y, p, tab):", *lines, f"{INDENT}return {outs[0]}"]
    return [ev, ob, hs]


# The interior-point drivers of runtime/drivers.py: kernels and arguments after (lo, hi, nq, nr).
PROBLEM_DRIVERS = {
    "ip": (("ip_eval", "ip_obj", "ip_hess", "residual", "residual_jacobian", "factor_dense"),
           ("Y0", "P", "tol", "max_iter", "singular_tol", "weak_tol", "Z", "LU", "PIV", "STATUS", "INFO")),
    "kkt_finalize": (("ip_eval", "ip_hess", "residual", "residual_jacobian", "factor_dense"),
                     ("Z", "P", "weak_tol", "singular_tol", "LU", "PIV", "STATUS", "INFO")),
}

_EVAL_BATCH = """\
_fn_ip_eval_batch = _driver('ip_eval_batch')


@njit(error_model='numpy')
def ip_eval_batch(Y, P, GRADF, H, JH, G, JG, tab):
    _fn_ip_eval_batch(_fn_ip_eval, Y, P, GRADF, H, JH, G, JG, tab)
"""


def emit_problem_module(problem, layout: dict, key: str) -> str:
    system = problem.system
    src, tables, bound = emit_module(system.derivation, layout, key)
    n, q, r = problem.n_variables, len(problem.equalities), len(problem.inequalities)
    extra = [
        "# ---------------------------------------------------------------- optimization problem",
        "from implicit_compiler.runtime.signatures import IP_EVAL, IP_HESS, IP_OBJ  # noqa: E402",
        "",
        f"NV = {n}\nNQ = {q}\nNR = {r}",
        "# objective (minimised): " + str(problem.f).replace("\n", " "),
    ]
    for i, e in enumerate(problem.equalities):
        extra.append(f"#   h[{i}] = {e} = 0")
    for i, e in enumerate(problem.inequalities):
        extra.append(f"#   g[{i}] = {e} <= 0")
    parts = [src, "\n".join(extra) + "\n"]
    for sec in problem_sections(problem):
        parts.append("\n".join(sec) + "\n")
    drivers = driver_bindings(PROBLEM_DRIVERS, ["ip", "kkt_finalize"], extra=("nq", "nr"), bound=bound)
    parts.append("\n".join(drivers).rstrip() + "\n")
    parts.append(_EVAL_BATCH)
    parts.append(tables.source())
    return "\n\n".join(parts).rstrip() + "\n"
