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

from ..derive import jacobians
from ..derive.engine import gradient
from ..derive.families import find_families
from ..derive.reductions import reduce_template
from .emit import (
    INDENT,
    FamilyLoop,
    _loops,
    cse_lines,
    driver_bindings,
    emit_module,
    expr_text,
    reduced_loop,
    reduced_text,
)
from .printer import NumbaPrinter


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


def _straight_sections(problem) -> list[list[str]]:
    """The kernels entry by entry: every ∇f row, constraint, Jacobian and Hessian entry
    derived on its own with ``sp.diff`` (the reference the family path is tested against)."""
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



def problem_slots(problem) -> dict:
    """``{symbol: (kind, group, flat position)}`` of a Problem's variables (kind ``"unknown"``,
    positions in ``y``) and parameters (``"param"``, positions in ``θ``)."""
    out = {}
    for kind, groups in (("unknown", problem.variable_groups), ("param", problem.param_groups)):
        for g in groups:
            for j, s in enumerate(g.symbols):
                out[s] = (kind, g.name, g.offset + j)
    return out


class _Rows:
    """A family of problem-level expressions (constraints, objective terms) as
    :class:`FamilyLoop` wants it: ``family`` and ``residual`` (the template printed)."""

    def __init__(self, family):
        self.family = family
        self.residual = family.template
        self.reduced = reduce_template(family.template, family.slots, family.slot_kinds, family.slot_groups)


def _constraint_block(exprs, name, jname, rows, n, slots, pmap, tables, index, body):
    """``name[i] = c_i`` and ``jname[i, j] = ∂c_i/∂y_j`` for constraints ``exprs``: families as
    loops over their table rows, the rest straight-line (one joint CSE)."""
    fams, single = ([], list(range(len(exprs))))
    if len(exprs) >= jacobians.FAMILY_MIN_SIZE:
        fams, single = find_families(exprs, slots, min_size=jacobians.FAMILY_MIN_SIZE)
    y = [s for s, info in sorted(slots.items(), key=lambda kv: kv[1][2]) if info[0] == "unknown"]
    jac = []
    for i in single:
        cols = [s for s in y if s in exprs[i].free_symbols]
        jac += [(i, y.index(s), e) for s, e in zip(cols, gradient(exprs[i], cols)) if e != 0]
    pat = np.zeros((rows, n), dtype=bool)
    for i, j, _ in jac:
        pat[i, j] = True
    loops = []
    for f in fams:
        ks = [k for k, kind in enumerate(f.slot_kinds) if kind == "unknown"]
        ds = [(k, e) for k, e in zip(ks, gradient(f.template, [f.slots[k] for k in ks])) if e != 0]
        for k, _ in ds:
            pat[np.asarray(f.members), f.table[:, k]] = True
        loops.append((FamilyLoop(_Rows(f), tables, index + len(loops), label="constraints", name=name), ds))
    if rows:
        body += _zero_lines(pat, jname, rows, n)
    lines, outs = cse_lines([exprs[i] for i in single] + [e for *_, e in jac], pmap, prefix=f"{name}t")
    body += lines
    body += [f"{INDENT}{name}[{i}] = {o}" for i, o in zip(single, outs)]
    body += [f"{INDENT}{jname}[{i}, {j}] = {o}" for (i, j, _), o in zip(jac, outs[len(single):])]
    for lp, ds in loops:
        red = lp.reduced_for(lp.keep("unknown"), [k for k, _ in ds])
        if red is not None:
            body += reduced_loop(lp, red, tables, value=f"{name}[i]", keep=lp.keep("unknown"),
                                 zero_slots=[k for k, _ in ds], zero=lambda pos, o: f"{jname}[i, {pos}] = 0.0",
                                 scatter=lambda pos, o, e: f"{jname}[i, {pos}] += {e}")
            continue
        lines, outs = cse_lines([lp.fd.residual] + [e for _, e in ds], lp.smap, indent=INDENT * 2)
        body += lp.head() + lines + [f"{INDENT * 2}{name}[i] = {outs[0]}"]
        body += [f"{INDENT * 2}{jname}[i, s{k}] = {o}" for (k, _), o in zip(ds, outs[1:])]
    return len(loops)


def _split_sum(expr):
    """``(c, terms)`` with ``expr == c * Add(*terms)`` (c a number), terms empty when ``expr``
    is not such a sum."""
    coeff, inner = sp.S.One, expr
    if isinstance(expr, sp.Mul):
        num, rest = expr.as_coeff_Mul()
        if isinstance(rest, sp.Add):
            coeff, inner = num, rest
    return coeff, (sp.Add.make_args(inner) if isinstance(inner, sp.Add) else ())


def _sum_lines(expr, target, slots, pmap, tables, index, indent, depth=0):
    """Lines leaving ``expr`` in the local ``target``: a sum whose terms repeat a shape is
    accumulated by loops over the families of its terms (``c * (a + b + ...)`` is split
    the same way), the other terms straight-line; returns (lines, families used)."""
    coeff, terms = _split_sum(expr)
    if len(terms) < jacobians.FAMILY_MIN_SIZE or depth > 3:
        lines, outs = cse_lines([expr], pmap, indent=indent, prefix=f"o{depth}_")
        return lines + [f"{indent}{target} = {outs[0]}"], 0
    fams, single = find_families(list(terms), slots, min_size=jacobians.FAMILY_MIN_SIZE)
    out, used = [f"{indent}{target} = 0.0"], 0
    small = []
    for i in single:
        t = terms[i]
        if len(_split_sum(t)[1]) >= jacobians.FAMILY_MIN_SIZE:
            sub = f"{target}_{len(out)}"
            lines, k = _sum_lines(t, sub, slots, pmap, tables, index + used, indent, depth + 1)
            if k:
                out += lines + [f"{indent}{target} += {sub}"]
                used += k
                continue
        small.append(t)
    if small:
        lines, outs = cse_lines([sp.Add(*small)], pmap, indent=indent, prefix=f"o{depth}_")
        out += lines + [f"{indent}{target} += {outs[0]}"]
    for f in fams:
        lp = FamilyLoop(_Rows(f), tables, index + used, label="terms", name=target)
        used += 1
        if lp.fd.reduced is not None:  # a term y_j (Q y)_j / 2: its inner sum is a reduction
            out += reduced_loop(lp, lp.fd.reduced, tables, value=target, op="+=", indent=indent,
                                comment=f"{target} += {reduced_text(lp.fd.reduced)}", prefix=f"o{depth}_")
            continue
        lines, outs = cse_lines([f.template], lp.smap, indent=indent + INDENT, prefix=f"o{depth}_")
        out += lp.head(indent, comment=f"{target} += {expr_text(f.template)}") + lines
        out += [f"{indent + INDENT}{target} += {outs[0]}"]
    if coeff != 1:
        out.append(f"{indent}{target} = {NumbaPrinter({}).doprint(coeff)} * {target}")
    return out, used


def _family_sections(problem, d, tables) -> list[list[str]] | None:
    """The kernels through families: the KKT derivation ``d`` already holds the stationarity
    rows ``∇_y L`` (families of rows and their derivatives), so ∇f is a stationarity template
    with its multipliers set to zero and ∇²_y L is the stationarity rows' derivative in ``y``;
    the constraints and the objective's terms are grouped into families of their own. None
    when a KKT family mixes stationarity rows with others (then the kernels are straight-line)."""
    n, q, r = problem.n_variables, len(problem.equalities), len(problem.inequalities)
    loops = _loops(d, tables)
    if any(min(lp.fd.family.members) < n <= max(lp.fd.family.members) for lp in loops):
        return None
    slots = problem_slots(problem)
    pmap = {s: f"y[{j}]" for j, s in enumerate(problem.variables)}
    pmap.update({s: f"p[{j}]" for j, s in enumerate(problem.params)})
    mult = set(problem.lam) | set(problem.nu)
    zero = {s: sp.S.Zero for s in mult}
    stat_loops = [lp for lp in loops if max(lp.fd.family.members) < n]
    index = len(loops)

    # ip_eval: ∇f (stationarity at λ = ν = 0), h, Jh, g, Jg
    body = []
    rows = [i for i in (d.single_rows if d.families else range(d.n)) if i < n]
    grad = [d.residuals[i].xreplace(zero) for i in rows]
    lines, outs = cse_lines(grad, pmap, prefix="dt")
    body += lines + [f"{INDENT}gradf[{i}] = {o}" for i, o in zip(rows, outs)]
    for lp in stat_loops:
        if lp.fd.reduced is not None:
            red = lp.fd.reduced.substitute(zero)
            body += reduced_loop(lp, red, tables, value="gradf[i]", prefix="dt",
                                 comment=f"gradf[i] = {reduced_text(red)}")
            continue
        e = lp.fd.residual.xreplace(zero)
        lines, outs = cse_lines([e], lp.smap, indent=INDENT * 2)
        body += lp.head(comment=f"gradf[i] = {expr_text(e)}") + lines + [f"{INDENT * 2}gradf[i] = {outs[0]}"]
    index += _constraint_block(list(problem.equalities), "h", "Jh", q, n, slots, pmap, tables, index, body)
    index += _constraint_block(list(problem.inequalities), "g", "Jg", r, n, slots, pmap, tables, index, body)
    ev = [_decorator("IP_EVAL"), "def ip_eval(y, p, gradf, h, Jh, g, Jg, tab):", *(body or [f"{INDENT}pass"])]

    # ip_obj
    ob, used = _sum_lines(problem.f, "f", slots, pmap, tables, index, INDENT)
    index += used
    ob = [_decorator("IP_OBJ"), "def ip_obj(y, p, tab):", *ob, f"{INDENT}return f"]

    # ip_hess: rows i < n of dF/dz, columns j < n (the variables)
    hmap = dict(pmap)
    hmap.update({s: f"lam[{i}]" for i, s in enumerate(problem.lam)})
    hmap.update({s: f"nu[{i}]" for i, s in enumerate(problem.nu)})
    jac = [(i, j, e) for i, j, e in (d.jac_y_single if d.families else d.jac_y) if i < n and j < n]
    pat = d.pattern_unknowns[:n, :n]
    hb = _zero_lines(pat, "H", n, n)
    lines, outs = cse_lines([e for *_, e in jac], hmap, prefix="ht")
    hb += lines + [f"{INDENT}H[{i}, {j}] = {o}" for (i, j, _), o in zip(jac, outs)]
    for lp in stat_loops:
        f = lp.fd.family
        smap = dict(lp.smap)
        for k, (s, g) in enumerate(zip(f.slots, f.slot_groups)):
            if s in mult or g in ("lam", "nu"):
                smap[s] = f"lam[s{k} - {n}]" if g == "lam" else f"nu[s{k} - {n + q}]"
        ds = [(k, e) for k, e in lp.fd.d_unknowns if f.slot_groups[k] not in ("lam", "nu")]
        keep = lp.keep("unknown", exclude_groups=("lam", "nu"))
        red = lp.reduced_for(keep, [k for k, _ in ds])
        if red is not None:
            def namer(kind, group, var):
                if group == "lam":
                    return f"lam[{var} - {n}]"
                if group == "nu":
                    return f"nu[{var} - {n + q}]"
                return f"y[{var}]" if kind == "unknown" else f"p[{var}]"

            hb += reduced_loop(lp, red, tables, namer=namer, keep=keep, zero_slots=[k for k, _ in ds],
                               comment=f"H[i, :] = d/dy of {lp.text[:300]}", prefix="ht",
                               zero=lambda pos, o: f"H[i, {pos}] = 0.0",
                               scatter=lambda pos, o, e: f"H[i, {pos}] += {e}")
            continue
        lines, outs = cse_lines([e for _, e in ds], smap, indent=INDENT * 2)
        hb += lp.head(comment=f"H[i, :] = d/dy of {lp.text}") + lines
        hb += [f"{INDENT * 2}H[i, s{k}] = {o}" for (k, _), o in zip(ds, outs)]
    hs = [_decorator("IP_HESS"), "def ip_hess(y, lam, nu, p, H, tab):", *(hb or [f"{INDENT}pass"])]
    return [ev, ob, hs]


def problem_sections(problem, d=None, tables=None) -> list[list[str]]:
    """``ip_eval``, ``ip_obj`` and ``ip_hess``: through families (``d``, the KKT system's
    derivation, and the module's ``tables``) when the KKT rows, the constraints or the
    objective's terms can form one (``jacobians.FAMILY_MIN_SIZE`` members), else straight-line."""
    if d is not None and tables is not None:
        sizes = (len(problem.equalities), len(problem.inequalities), len(_split_sum(problem.f)[1]))
        if d.families or max(sizes) >= jacobians.FAMILY_MIN_SIZE:
            got = _family_sections(problem, d, tables)
            if got is not None:
                return got
    return _straight_sections(problem)


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
    d = system.derivation
    src, tables, bound = emit_module(d, layout, key, root_finding=False)
    n, q, r = problem.n_variables, len(problem.equalities), len(problem.inequalities)
    extra = [
        "# ---------------------------------------------------------------- optimization problem",
        "from implicit_compiler.runtime.signatures import IP_EVAL, IP_HESS, IP_OBJ  # noqa: E402",
        "",
        f"NV = {n}\nNQ = {q}\nNR = {r}",
        "# objective (minimised): " + expr_text(problem.f, 2000).replace("\n", " "),
    ]
    for i, e in enumerate(problem.equalities):
        extra.append(f"#   h[{i}] = {expr_text(e, 2000)} = 0")
    rows = getattr(problem, "equality_rows", None)
    for red in getattr(problem, "redundant_equalities", ()):
        # the dropped constraint's combination, named by kept position (h[k]) like the lines above
        text = red.relation(lambda j, d=red.index: f"h[{rows.index(j)}]" if j != d else f"given equality {j}")
        check = "consistent for every parameter value" if red.check is None else \
            f"checked per sample: {expr_text(red.mismatch, 500)} = 0"
        extra.append(f"#   dropped (redundant): {expr_text(red.constraint, 2000)} = 0; {text}; {check}")
    for i, e in enumerate(problem.inequalities):
        extra.append(f"#   g[{i}] = {expr_text(e, 2000)} <= 0")
    parts = [src, "\n".join(extra) + "\n"]
    for sec in problem_sections(problem, d, tables):
        parts.append("\n".join(sec) + "\n")
    drivers = driver_bindings(PROBLEM_DRIVERS, ["ip", "kkt_finalize"], extra=("nq", "nr"), bound=bound)
    parts.append("\n".join(drivers).rstrip() + "\n")
    parts.append(_EVAL_BATCH)
    parts.append(tables.source())
    return "\n\n".join(parts).rstrip() + "\n"
