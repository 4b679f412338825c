"""Emit the kernel module for one system.

The module holds, for that system only:

* ``residual(y, p, F)`` and ``residual_jacobian(y, p, F, J)`` (one joint CSE for
  F and the structural non-zeros of dF/dy),
* ``residual_scale(y, p, S)``: ``S_i = sum_j |dF_i/dy_j| |y_j|``, the scale of the
  relative residual test (see :mod:`implicit_compiler.runtime.newton`),
* ``vjp_params(y, p, v, need, out)``: ``out = -(dF/dtheta)^T v`` over the
  non-zeros of dF/dtheta only, one block per parameter group, skipped when
  ``need[g]`` is false,
* ``factor / factor_dense / solve / solve_transpose``: dense LU with partial
  pivoting, or fixed-order sparse elimination over the fill pattern with a
  pivot check that falls back to dense LU,
* range drivers ``newton_range(lo, hi, ...)``, ``trust_region_range``,
  ``fixed_point_range``, ``vjp_range`` (serial, ``nogil``; the runtime splits large
  batches over threads): for small dense systems the Newton and VJP drivers are
  emitted with scalar per-sample state, otherwise they call the generic per-sample
  solvers in :mod:`implicit_compiler.runtime` (the trust-region driver always does).

Expression kernels are printed from SymPy with :class:`NumbaPrinter` and compiled
once each, for their signature in :mod:`implicit_compiler.runtime.signatures`, when a
wrapper that reaches them is first compiled;
the solvers are the runtime drivers of :mod:`implicit_compiler.runtime.drivers`
(compiled once per installation), bound to the module's kernels by small wrappers.
"""

from __future__ import annotations

import pprint

import numpy as np
import sympy as sp

from .._version import __version__
from ..errors import SystemDefinitionError
from . import emit_small
from .printer import NumbaPrinter

INDENT = "    "
CHUNK = 64  # samples per prange work item of the scalar-kernel drivers


def _decorator(signature: str) -> str:
    """Expression kernels are compiled once, for their one signature
    (:mod:`implicit_compiler.runtime.signatures`), when the first wrapper that calls them
    through a function pointer is compiled (``_function(kernel, signature)``): a module
    compiles only the kernels its calls reach (a small system's scalar Newton never needs
    the generic ``residual_jacobian``)."""
    return f"@njit(cache=True, error_model='numpy')  # {signature}, compiled when first bound"


def slot_map(unknowns, params) -> dict:
    m = {s: f"y[{j}]" for j, s in enumerate(unknowns)}
    m.update({s: f"p[{j}]" for j, s in enumerate(params)})
    return m


def cse_lines(exprs, base_map: dict, indent: str = INDENT, prefix: str = "t"):
    """Joint CSE of ``exprs``; returns (assignment lines, printed outputs).

    Temporaries are named ``{prefix}0, {prefix}1, ...``."""
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
        name = f"{prefix}{k}"
        lines.append(f"{indent}{name} = {pr.doprint(e)}")
        local[sym] = name
    pr = NumbaPrinter(local)
    return lines, [pr.doprint(e) for e in reduced]


def expr_text(e, limit: int | None = None) -> str:
    """``str(e)`` for comments; a long sum in its stored term order (``str`` sorts the terms,
    quadratic in practice: seconds for a 10⁴-term objective), cut after ``limit`` characters."""
    terms = sp.Add.make_args(e) if isinstance(e, sp.Add) else ()
    if len(terms) <= 32:
        text = str(e)
        return text if limit is None or len(text) <= limit else text[:limit] + " ..."
    out, size = [], 0
    for k, t in enumerate(terms):
        piece = sp.sstr(t, order="none")
        out.append(piece)
        size += len(piece) + 3
        if limit is not None and size > limit:
            return " + ".join(out) + f" + ... ({len(terms) - k - 1} more terms)"
    return " + ".join(out)


class FamilyLoop:
    """How one family is printed: a loop over the rows of its table in ``tab``.

    Row ``r`` of the table (``width`` entries from ``tab[offset + r * width]``) holds the
    member's residual index, then the flat position of the symbol in each slot; in the loop
    those are the locals ``i``, ``s0``, ``s1``, ..., and ``smap`` prints the template's slot
    symbols as ``y[s0]``, ``p[s1]``, ... ."""

    def __init__(self, fd, tables: Tables, index: int, label: str = "residuals", name: str = "F"):
        f = fd.family
        self.fd = fd
        self.index = index
        self.label, self.name = label, name
        self.rows = f.size
        self.width = 1 + len(f.slots)
        rows = np.concatenate([np.asarray(f.members, dtype=np.int64)[:, None], f.table], axis=1)
        cols = ", ".join(f"s{k}" for k in range(len(f.slots)))
        self.offset, _ = tables.add(f"family {index}: {f.size} {label}, rows (i, {cols})", rows)
        self.smap = {s: (f"y[s{k}]" if kind == "unknown" else f"p[s{k}]")
                     for k, (s, kind) in enumerate(zip(f.slots, f.slot_kinds))}
        self.text = expr_text(fd.residual)

    def head(self, indent: str = INDENT, comment=None, slots=None) -> list[str]:
        """The loop's first lines; ``comment`` replaces ``F[i] = template`` in the heading comment;
        ``slots``: the slot indices read into locals (default all)."""
        f = self.fd.family
        i1 = indent + INDENT
        shown = f"{self.name}[i] = {self.text}" if comment is None else comment
        out = [f"{indent}# family {self.index}: {self.rows} {self.label} {shown}",
               f"{indent}for r in range({self.rows}):",
               f"{i1}k = {self.offset} + {self.width} * r",
               f"{i1}i = tab[k]"]
        ks = range(len(f.slots)) if slots is None else sorted(slots)
        out += [f"{i1}s{k} = tab[k + {k + 1}]" for k in ks]
        return out

    def keep(self, kind: str, exclude_groups=()):
        """Predicate on slot indices: slots of ``kind`` outside ``exclude_groups``."""
        f = self.fd.family
        return lambda k: f.slot_kinds[k] == kind and f.slot_groups[k] not in exclude_groups

    def reduced_for(self, keep, full) -> object:
        """The family's reduced template when its derivative contributions (slots ``keep``)
        reach exactly the slots ``full`` of the template's own derivative; else None (the
        whole template is printed)."""
        red = self.fd.reduced
        if red is None:
            return None
        if keep is not None and red.contributing(keep) != set(full):
            return None
        return red


def _default_namer(kind, group, var):
    return f"y[{var}]" if kind == "unknown" else f"p[{var}]"


def _reduction_offsets(lp, red, tables) -> list[int]:
    """Offsets in ``tab`` of the inner tables of ``red`` (added once per module)."""
    cache = tables.__dict__.setdefault("_reductions", {})
    got = cache.get(id(red))
    if got is None:
        offs = []
        for r in red.reductions:
            cols = ", ".join(f"slot of a{j}" for j in range(len(r.syms)))
            offs.append(tables.add(f"family {lp.index}: reduction {r.acc.name} of {r.size} terms "
                                   f"{expr_text(r.term)}, rows ({cols})", r.table)[0])
        got = cache[id(red)] = (red, offs)
    return got[1]


def reduced_text(red) -> str:
    """``rest`` and its accumulators, for comments: ``acc0 + q0 + ..., acc0 = sum of 99 terms Q1*y1/2``."""
    parts = [expr_text(red.rest, 300)]
    parts += [f"{r.acc.name} = sum of {r.size} terms {expr_text(r.term, 200)}" for r in red.reductions]
    return "; ".join(parts)


def reduced_loop(lp, red, tables, *, namer=None, comment=None, indent=INDENT, value=None, keep=None,
                 scatter=None, zero=None, zero_slots=(), tail=None, op="=", prefix="t") -> list[str]:
    """One family's loop through its reduced template (:mod:`implicit_compiler.derive.reductions`).

    Per row: the locals of the slots ``rest`` reads; ``zero(pos, slot)`` for every outer slot
    in ``zero_slots`` (``pos`` the text of its flat position, ``slot`` of its slot index); one
    inner loop per reduction accumulating ``acc_r``; ``value`` (a target, e.g. ``F[i]``)
    ``op`` (``=`` or ``+=``) ``rest``; then, for the slots with ``keep(k)``, ``scatter(pos, slot, expr)`` of
    ``∂rest/∂slot`` and, in a second inner loop per reduction, of ``∂rest/∂acc_r ·
    ∂term/∂slot``; last ``tail(z0, z1)``, lines given the ``tab`` range of ``zero_slots``.
    ``namer(kind, group, var)`` prints a slot whose position is the local ``var`` (default
    ``y[var]`` / ``p[var]``)."""
    f = lp.fd.family
    namer = namer or _default_namer
    i1, i2 = indent + INDENT, indent + 2 * INDENT
    offs = _reduction_offsets(lp, red, tables)
    smap = {s: namer(f.slot_kinds[k], f.slot_groups[k], f"s{k}") for k, s in enumerate(f.slots)}
    accs = {r.acc: f"acc{j}" for j, r in enumerate(red.reductions)}
    smap.update(accs)
    dr = [(k, e) for k, e in red.d_rest if keep is not None and keep(k)]
    dterms = []  # (reduction index, [(term slot, expr)])
    if keep is not None:
        for j, (r, g) in enumerate(zip(red.reductions, red.d_acc)):
            if g == 0:
                continue
            # the kinds and groups of a term slot are those of the outer slot in every row
            dt = [(jj, e) for jj, e in r.d_term if keep(int(r.table[0, jj]))]
            if dt:
                dterms.append((j, dt))
    outer = [red.rest] if value is not None else []
    outer += [e for _, e in dr] + [red.d_acc[j] for j, _ in dterms]
    free = set().union(*(e.free_symbols for e in outer)) if outer else set()
    used = {k for k, s in enumerate(f.slots) if s in free} | {k for k, _ in dr}
    if comment is None:
        comment = f"{lp.name}[i] = " + reduced_text(red)
    body = lp.head(indent, comment=comment, slots=used)
    z0 = z1 = 0
    if zero_slots:
        z0, z1 = tables.add(f"family {lp.index}: slots whose entries start at zero in each row",
                            np.asarray(sorted(zero_slots), dtype=np.int64))
        body += [f"{i1}for q in range({z0}, {z1}):", f"{i2}{zero('tab[k + 1 + tab[q]]', 'tab[q]')}"]

    def inner(j, exprs_of, emit):
        r = red.reductions[j]
        w = len(r.syms)
        tfree = set().union(*(e.free_symbols for e in exprs_of))
        lines = [f"{i1}for e in range({r.size}):", f"{i2}m = {offs[j]} + {w} * e"]
        tmap = {}
        for jj, s in enumerate(r.syms):
            tmap[s] = namer(r.kinds[jj], r.groups[jj], f"a{jj}")
            if s in tfree or jj in emit:
                lines.append(f"{i2}a{jj} = tab[k + 1 + tab[m + {jj}]]")
        cl, outs = cse_lines(exprs_of, tmap, indent=i2, prefix=f"{prefix}{j}_")
        return lines + cl, outs

    if value is not None or any(a in free for a in accs):
        for j, r in enumerate(red.reductions):
            lines, outs = inner(j, [r.term], ())
            body += [f"{i1}acc{j} = 0.0"] + lines + [f"{i2}acc{j} += {outs[0]}"]
    lines, outs = cse_lines(outer, smap, indent=i1, prefix=prefix)
    body += lines
    at = 0
    if value is not None:
        body.append(f"{i1}{value} {op} {outs[0]}")
        at = 1
    body += [f"{i1}{scatter(f's{k}', str(k), o)}" for (k, _), o in zip(dr, outs[at:at + len(dr)])]
    gs = outs[at + len(dr):]
    for (j, dt), g in zip(dterms, gs):
        one = red.d_acc[j] == 1
        if not one:
            body.append(f"{i1}g{j} = {g}")
        lines, touts = inner(j, [e for _, e in dt], {jj for jj, _ in dt})
        body += lines
        body += [f"{i2}{scatter(f'a{jj}', f'tab[m + {jj}]', o if one else f'g{j} * ({o})')}"
                 for (jj, _), o in zip(dt, touts)]
    if tail is not None:
        body += tail(z0, z1)
    return body


def _loops(d, tables) -> list[FamilyLoop]:
    if tables is None:
        return []
    cached = getattr(tables, "_loops", None)
    if cached is None:
        cached = tables._loops = [FamilyLoop(fd, tables, g) for g, fd in enumerate(d.families)]
    return cached


def _kernel_residual(d, smap, tables=None):
    rows = d.single_rows if d.families else range(d.n)
    lines, outs = cse_lines([d.residuals[i] for i in rows], smap)
    body = lines + [f"{INDENT}F[{i}] = {o}" for i, o in zip(rows, outs)]
    for lp in _loops(d, tables):
        if lp.fd.reduced is not None:
            body += reduced_loop(lp, lp.fd.reduced, tables, value="F[i]")
            continue
        lines, outs = cse_lines([lp.fd.residual], lp.smap, indent=INDENT * 2)
        body += lp.head() + lines + [f"{INDENT * 2}F[i] = {outs[0]}"]
    return [_decorator("RESIDUAL"), "def residual(y, p, F, tab):", *(body or [f"{INDENT}pass"])]


def _kernel_residual_jacobian(d, smap, tables=None, pattern: bool = False):
    """``F`` and dF/dy. ``pattern``: J is the pattern-sized storage ``(1, L)`` of the module's
    elimination (``runtime.linalg``): entry ``(i, j)`` goes to its storage position."""
    if pattern:
        return _kernel_residual_jacobian_pattern(d, smap, tables)
    rows = list(d.single_rows) if d.families else list(range(d.n))
    jac = d.jac_y_single if d.families else d.jac_y
    exprs = [d.residuals[i] for i in rows] + [e for _, _, e in jac]
    lines, outs = cse_lines(exprs, smap)
    n = d.n
    body = []
    if d.factorization == "dense":
        pattern = d.pattern_unknowns
        if n <= 12:
            zero = [f"{INDENT}J[{i}, {j}] = 0.0" for i, j in np.argwhere(~pattern)]
        else:
            zero = [f"{INDENT}for a in range(N):", f"{INDENT * 2}for b in range(N):", f"{INDENT * 3}J[a, b] = 0.0"]
    else:
        # Positions that elimination fills in must start at zero; the rest are never read.
        fill_only = np.argwhere(d.fill & ~d.pattern_unknowns)
        if len(fill_only) <= 64:
            zero = [f"{INDENT}J[{i}, {j}] = 0.0" for i, j in fill_only]
        else:
            a, b = tables.add("fill-in positions (i, j) that start at zero", fill_only)
            zero = [f"{INDENT}for q in range({a}, {b}, 2):", f"{INDENT * 2}J[tab[q], tab[q + 1]] = 0.0"]
    body = zero + list(lines)
    body += [f"{INDENT}F[{i}] = {o}" for i, o in zip(rows, outs[:len(rows)])]
    body += [f"{INDENT}J[{i}, {j}] = {o}" for (i, j, _), o in zip(jac, outs[len(rows):])]
    for lp in _loops(d, tables):
        dy = lp.fd.d_unknowns
        keep = lp.keep("unknown")
        red = lp.reduced_for(keep, [k for k, _ in dy])
        if red is not None:
            # contributions of the rest and of every term add up: the row's entries start at zero
            body += reduced_loop(lp, red, tables, value="F[i]", keep=keep, zero_slots=[k for k, _ in dy],
                                 zero=lambda pos, o: f"J[i, {pos}] = 0.0",
                                 scatter=lambda pos, o, e: f"J[i, {pos}] += {e}")
            continue
        lines, outs = cse_lines([lp.fd.residual] + [e for _, e in dy], lp.smap, indent=INDENT * 2)
        body += lp.head() + lines + [f"{INDENT * 2}F[i] = {outs[0]}"]
        body += [f"{INDENT * 2}J[i, s{k}] = {o}" for (k, _), o in zip(dy, outs[1:])]
    return [_decorator("JACOBIAN"), "def residual_jacobian(y, p, F, J, tab):", *body]


def _kernel_residual_jacobian_pattern(d, smap, tables):
    e = d.elimination
    rows = list(d.single_rows) if d.families else list(range(d.n))
    jac = d.jac_y_single if d.families else d.jac_y
    exprs = [d.residuals[i] for i in rows] + [x for _, _, x in jac]
    lines, outs = cse_lines(exprs, smap)
    single_pos = e.positions([i for i, _, _ in jac], [j for _, j, _ in jac]) if jac else np.zeros(0, np.int64)
    loops = _loops(d, tables)
    fam_pos = []
    for lp in loops:
        ij = lp.fd.entries("unknowns")
        fam_pos.append(e.positions(ij[:, 0], ij[:, 1]) if len(ij) else np.zeros(0, np.int64))
    written = np.zeros(e.fill_nnz, dtype=bool)
    for q in [single_pos, *fam_pos]:
        written[q] = True
    # Positions that elimination fills in must start at zero on every evaluation.
    fill_only = np.flatnonzero(~written)
    if len(fill_only) <= 64:
        body = [f"{INDENT}J[0, {q}] = 0.0" for q in fill_only]
    else:
        a, b = tables.add("fill-in positions of the pattern storage (start at zero)", fill_only)
        body = [f"{INDENT}for q in range({a}, {b}):", f"{INDENT * 2}J[0, tab[q]] = 0.0"]
    body += list(lines)
    body += [f"{INDENT}F[{i}] = {o}" for i, o in zip(rows, outs[:len(rows)])]
    body += [f"{INDENT}J[0, {q}] = {o}  # dF[{i}]/dy[{j}]"
             for (i, j, _), q, o in zip(jac, single_pos, outs[len(rows):])]
    for lp, pos in zip(loops, fam_pos):
        dy = lp.fd.d_unknowns
        keep = lp.keep("unknown")
        red = lp.reduced_for(keep, [k for k, _ in dy])
        if red is not None and dy:
            # storage positions by (row, slot index): the terms name their slot by index
            f = lp.fd.family
            w = len(f.slots)
            by_slot = np.full((f.size, w), -1, dtype=np.int64)
            by_slot[:, [k for k, _ in dy]] = pos.reshape(f.size, len(dy))
            a, _ = tables.add(f"family {lp.index}: storage positions of its dF/dy entries by slot", by_slot)
            def at(o, a=a, w=w):
                return f"J[0, tab[{a} + {w} * r + {o}]]"

            body += reduced_loop(lp, red, tables, value="F[i]", keep=keep, zero_slots=[k for k, _ in dy],
                                 zero=lambda pos, o, at=at: f"{at(o)} = 0.0",
                                 scatter=lambda pos, o, e, at=at: f"{at(o)} += {e}")
            continue
        lines, outs = cse_lines([lp.fd.residual] + [x for _, x in dy], lp.smap, indent=INDENT * 2)
        body += lp.head() + lines + [f"{INDENT * 2}F[i] = {outs[0]}"]
        if dy:
            a, _ = tables.add(f"family {lp.index}: storage positions of its dF/dy entries", pos)
            nd = len(dy)
            body += [f"{INDENT * 2}J[0, tab[{a} + {nd} * r + {kk}]] = {o}" for kk, o in enumerate(outs[1:])]
    return [_decorator("JACOBIAN"), "def residual_jacobian(y, p, F, J, tab):", *body]


def _kernel_residual_scale(d, smap, tables=None):
    """``S[i] = sum_j |dF_i/dy_j| |y_j|`` over the structural non-zeros of dF/dy."""
    head = [_decorator("SCALE"), "def residual_scale(y, p, S, tab):"]
    jac = d.jac_y_single if d.families else d.jac_y
    rows_of = list(d.single_rows) if d.families else list(range(d.n))
    lines, outs = cse_lines([e for _, _, e in jac], smap)
    rows: dict[int, list[str]] = {i: [] for i in rows_of}
    for (i, j, _), o in zip(jac, outs):
        rows[i].append(f"abs({o}) * abs(y[{j}])")
    body = list(lines) + [f"{INDENT}S[{i}] = {' + '.join(t) if t else '0.0'}" for i, t in rows.items()]
    scratch = False
    for lp in _loops(d, tables):
        dy = lp.fd.d_unknowns
        keep = lp.keep("unknown")
        red = lp.reduced_for(keep, [k for k, _ in dy])
        if red is not None and dy:
            # the entries of the row are sums of contributions: added up in a scratch row w first
            scratch = True

            def tail(z0, z1):
                i2, i3 = INDENT * 2, INDENT * 3
                return [f"{i2}S[i] = 0.0", f"{i2}for q in range({z0}, {z1}):",
                        f"{i3}c = tab[k + 1 + tab[q]]", f"{i3}S[i] += abs(w[c]) * abs(y[c])"]

            body += reduced_loop(lp, red, tables, keep=keep, zero_slots=[k for k, _ in dy],
                                 zero=lambda pos, o: f"w[{pos}] = 0.0",
                                 scatter=lambda pos, o, e: f"w[{pos}] += {e}", tail=tail)
            continue
        lines, outs = cse_lines([e for _, e in dy], lp.smap, indent=INDENT * 2)
        terms = [f"abs({o}) * abs(y[s{k}])" for (k, _), o in zip(dy, outs)]
        body += lp.head() + lines + [f"{INDENT * 2}S[i] = {' + '.join(terms) if terms else '0.0'}"]
    if scratch:
        body.insert(0, f"{INDENT}w = np.zeros({d.n})")
    return head + (body or [f"{INDENT}pass"])


def _vjp_body(d, smap, param_groups, indent, v, out, prefix="t"):
    """Lines of ``out(c) = -sum_i v(i) dF_i/dtheta_c`` for the columns of needed groups."""
    body = []
    by_col: dict[int, list] = {}
    for i, j, e in d.jac_p:
        by_col.setdefault(j, []).append((i, e))
    for g, grp in enumerate(param_groups):
        cols = range(grp["offset"], grp["offset"] + len(grp["symbols"]))
        body.append(f"{indent}if need[{g}]:  # parameter group {grp['name']!r}")
        entries = [(c, i, e) for c in cols for i, e in by_col.get(c, [])]
        lines, outs = cse_lines([e for _, _, e in entries], smap, indent=indent + INDENT, prefix=prefix)
        body += lines
        terms: dict[int, list[str]] = {c: [] for c in cols}
        for (c, i, _), o in zip(entries, outs):
            terms[c].append(f"{v(i)}*({o})")
        for c in cols:
            rhs = " + ".join(terms[c])
            body.append(f"{indent + INDENT}{out(c)} = -({rhs})" if terms[c] else f"{indent + INDENT}{out(c)} = 0.0")
    return body


def _kernel_vjp_params(d, smap, param_groups, tables=None):
    """``out[c] = -sum_i v[i] dF_i/dtheta_c`` for the columns of needed groups."""
    loops = [lp for lp in _loops(d, tables) if lp.fd.d_params]
    if not loops:
        body = _vjp_body(d, smap, param_groups, INDENT, lambda i: f"v[{i}]", lambda c: f"out[{c}]")
    else:
        # Families scatter-add into out: every needed column starts at zero.
        body = []
        for g, grp in enumerate(param_groups):
            lo, hi = grp["offset"], grp["offset"] + len(grp["symbols"])
            body += [f"{INDENT}if need[{g}]:  # parameter group {grp['name']!r}",
                     f"{INDENT * 2}for c in range({lo}, {hi}):", f"{INDENT * 3}out[c] = 0.0"]
        group_of = {}
        for g, grp in enumerate(param_groups):
            for c in range(grp["offset"], grp["offset"] + len(grp["symbols"])):
                group_of[c] = g
        by_group: dict[int, list] = {}
        for i, c, e in d.jac_p_single:
            by_group.setdefault(group_of[c], []).append((i, c, e))
        for g, entries in sorted(by_group.items()):
            lines, outs = cse_lines([e for *_, e in entries], smap, indent=INDENT * 2)
            body += [f"{INDENT}if need[{g}]:"] + lines
            body += [f"{INDENT * 2}out[{c}] -= v[{i}] * ({o})" for (i, c, _), o in zip(entries, outs)]
        names = [grp["name"] for grp in param_groups]
        offsets = [(grp["offset"], grp["offset"] + len(grp["symbols"])) for grp in param_groups]
        for lp in loops:
            f = lp.fd.family
            dp = lp.fd.d_params
            reduced = _vjp_reduced(lp, dp, names, tables)
            if reduced is not None:
                body += reduced
                continue
            lines, outs = cse_lines([e for _, e in dp], lp.smap, indent=INDENT * 2)
            body += lp.head() + lines
            # one branch per parameter group (not per entry: a 250-slot row would hold 250 branches)
            by_g: dict[int, list[str]] = {}
            for (k, _), o in zip(dp, outs):
                g = names.index(f.slot_groups[k]) if f.slot_groups[k] in names else \
                    next(g for g, (a, b) in enumerate(offsets) if a <= f.table[0, k] < b)
                by_g.setdefault(g, []).append(f"{INDENT * 3}out[s{k}] -= v[i] * ({o})")
            for g in sorted(by_g):
                body += [f"{INDENT * 2}if need[{g}]:", *by_g[g]]
    if not body:
        body = [f"{INDENT}pass"]
    return [_decorator("VJP_PARAMS"), "def vjp_params(y, p, v, need, out, tab):", *body]


def _vjp_reduced(lp, dp, names, tables) -> list[str] | None:
    """A family's part of ``vjp_params`` through its reduced template: per parameter group
    ``g`` (by name) a loop ``out[slot] -= v[i] * ∂F/∂slot`` under ``if need[g]``; None when
    the family has no reduced form fitting every group (then the whole template is printed)."""
    f = lp.fd.family
    if lp.fd.reduced is None:
        return None
    groups = sorted({f.slot_groups[k] for k, _ in dp})
    if any(g not in names for g in groups):
        return None
    parts = []
    for g in groups:
        def keep(k, g=g):
            return f.slot_kinds[k] == "param" and f.slot_groups[k] == g

        red = lp.reduced_for(keep, [k for k, _ in dp if f.slot_groups[k] == g])
        if red is None:
            return None
        parts += [f"{INDENT}if need[{names.index(g)}]:  # parameter group {g!r}"]
        parts += reduced_loop(lp, red, tables, keep=keep, indent=INDENT * 2,
                              scatter=lambda pos, o, e: f"out[{pos}] -= v[i] * ({e})")
    return parts


def _compressed(mask: np.ndarray, by_rows: bool):
    """(ptr, idx) of the True positions of ``mask``, row by row (or column by column)."""
    m = mask if by_rows else mask.T
    counts = m.sum(axis=1)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    idx = np.concatenate([np.flatnonzero(row) for row in m] + [np.zeros(0, dtype=int)]).astype(int)
    return ptr, idx


def _kernels_factor_sparse_loops(d, pivot_threshold: float, tables: Tables):
    """Elimination over the fill pattern by index arrays (large systems: compiles in constant time).

    The kernels are the runtime's ``pattern_factor`` / ``pattern_solve`` /
    ``pattern_solve_transpose`` (:mod:`implicit_compiler.runtime.drivers`), compiled once
    for every module; the compressed rows / columns of L and U are slices of ``tab``,
    located by its first ``PATTERN_HEADER`` entries (which must therefore come first)."""
    if tables.size:
        raise ValueError("the sparse elimination header must be the first table of a module")
    fill = d.fill
    lower = np.tril(fill, -1)
    upper = np.triu(fill, 1)
    header = np.zeros(17, dtype=np.int64)
    tables.add("sparse elimination: (start, stop) of LCOL, LROW, UROW, UCOL (pointers, indices), "
               "pivot threshold / 1e-9", header)
    arrays = (("LCOL", lower, False), ("LROW", lower, True), ("UROW", upper, True), ("UCOL", upper, False))
    q = 0
    for name, mask, by_rows in arrays:
        ptr, idx = _compressed(mask, by_rows=by_rows)
        header[q:q + 2] = tables.add(f"{name} pointers", ptr)
        header[q + 2:q + 4] = tables.add(f"{name} indices", idx)
        q += 4
    header[16] = int(round(pivot_threshold * 1e9))
    tables.parts[0] = (tables.parts[0][0], 0, header)
    return ["_fn_factor = _driver('fill_factor')",
            "_fn_solve = _driver('fill_solve')",
            "_fn_solve_transpose = _driver('fill_solve_transpose')"]


def _kernels_factor_pattern(d, pivot_threshold: float, tables: Tables):
    """Elimination over the filled pattern of ``P A P^T`` in pattern-sized storage (residual
    systems above the unrolled size): the runtime's ``pattern_factor`` / ``pattern_solve`` /
    ``pattern_solve_transpose`` (:mod:`implicit_compiler.runtime.drivers`) read the pattern from
    the module's table, located by its first ``PT_HEADER_SIZE`` entries (which must come first;
    layout in :mod:`implicit_compiler.runtime.linalg`)."""
    from ..runtime import linalg as la

    if tables.size:
        raise ValueError("the sparse elimination header must be the first table of a module")
    e = d.elimination
    header = np.zeros(la.PT_HEADER_SIZE, dtype=np.int64)
    tables.add(f"sparse elimination ({e.order} order, {e.fill_nnz} stored entries): header", header)
    lptr, lpos = e.lower_columns()
    cptr, cpos = e.columns()
    rows = e.rows
    parts = ((la.PT_RPTR, "RPTR: row pointers of the filled pattern of P A P^T", e.indptr),
             (la.PT_COL, "COL: (permuted) column of each stored entry", e.indices),
             (la.PT_DIAG, "DIAG: position of each diagonal entry", e.diag),
             (la.PT_LCPTR, "LCOL pointers: L's entries by column", lptr),
             (la.PT_LCPOS, "LCOL positions", lpos),
             (la.PT_CCPTR, "CCOL pointers: all entries by column", cptr),
             (la.PT_CCPOS, "CCOL positions (by increasing row)", cpos),
             (la.PT_PERM, "PERM: the unknown eliminated at each step", e.perm),
             (la.PT_ROWO, "ROWO: original row of each stored entry", e.perm[rows]),
             (la.PT_COLO, "COLO: original column of each stored entry", e.perm[e.indices]),
             (la.PT_ROWP, "ROWP: (permuted) row of each stored entry", rows))
    for slot, name, arr in parts:
        header[slot] = tables.add(name, arr)[0]
    header[la.PT_N] = d.n
    header[la.PT_NV] = e.fill_nnz
    header[la.PT_PERMUTED] = int(e.permuted)
    header[la.PT_THRESHOLD] = int(round(pivot_threshold * 1e9))
    tables.parts[0] = (tables.parts[0][0], 0, header)
    return [f"LU_SHAPE = (1, {e.fill_nnz})  # per-sample storage of dF/dy and its factors (pattern values)",
            f"ELIMINATION_ORDER = {e.order!r}",
            "_fn_factor = _driver('pattern_factor')",
            "_fn_factor_dense = _driver('pattern_factor_dense')",
            "_fn_solve = _driver('pattern_solve')",
            "_fn_solve_transpose = _driver('pattern_solve_transpose')"]


def _kernels_factor_sparse(d, pivot_threshold: float, tables: Tables):
    """Straight-line elimination over the fill pattern in the natural order."""
    fill = d.fill
    n = d.n
    if n >= SPARSE_LOOPS_MIN_N:
        return _kernels_factor_sparse_loops(d, pivot_threshold, tables)
    f = [_decorator("FACTOR"), "def factor(J, piv, tab):",
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

    s = ["@njit(cache=True, error_model='numpy', inline='always')", "def _solve_sparse(J, b, tab):"]
    for i in range(n):
        terms = [f" - J[{i}, {j}] * b[{j}]" for j in range(i) if fill[i, j]]
        if terms:
            s.append(f"{INDENT}b[{i}] = b[{i}]{''.join(terms)}")
    for i in range(n - 1, -1, -1):
        terms = [f" - J[{i}, {j}] * b[{j}]" for j in range(i + 1, n) if fill[i, j]]
        s.append(f"{INDENT}b[{i}] = (b[{i}]{''.join(terms)}) / J[{i}, {i}]")

    t = ["@njit(cache=True, error_model='numpy', inline='always')", "def _solve_transpose_sparse(J, b, tab):"]
    for i in range(n):
        terms = [f" - J[{j}, {i}] * b[{j}]" for j in range(i) if fill[j, i]]
        t.append(f"{INDENT}b[{i}] = (b[{i}]{''.join(terms)}) / J[{i}, {i}]")
    for i in range(n - 1, -1, -1):
        terms = [f" - J[{j}, {i}] * b[{j}]" for j in range(i + 1, n) if fill[j, i]]
        if terms:
            t.append(f"{INDENT}b[{i}] = b[{i}]{''.join(terms)}")
    return f + [""] + s + [""] + t


# ---------------------------------------------------------------- scalar kernels (small systems)
# For small dense systems the Newton solve and the VJP are emitted per system with the
# whole per-sample state in local scalars (y_0, F_0, a_0_1, ...), which LLVM keeps in
# registers; they mirror runtime.newton.newton_one and runtime.linalg step by step.
SCALAR_MAX_N = 6
# Above this size the per-system building blocks are compiled as separate functions.
INLINE_MAX_N = 12
# From this size on, sparse elimination loops over index arrays instead of being unrolled.
SPARSE_LOOPS_MIN_N = 13


def use_scalar_kernels(d) -> bool:
    return d.factorization == "dense" and d.n <= SCALAR_MAX_N


def _nan_max_lines(indent, target, values):
    """``target = ||values||_inf`` with NaN propagating (as ``runtime.newton.inf_norm``)."""
    out = [f"{indent}{target} = 0.0"]
    out += [f"{indent}{target} = nan_max({target}, abs({v}))" for v in values]
    return out


def _scalar_res_jac(d, names, indent, with_jac=True, F="F", prefix="r"):
    n = d.n
    exprs = list(d.residuals) + ([e for _, _, e in d.jac_y] if with_jac else [])
    lines, outs = cse_lines(exprs, names, indent=indent, prefix=prefix)
    body = list(lines)
    body += [f"{indent}{F}_{i} = {o}" for i, o in enumerate(outs[:n])]
    if with_jac:
        body += [f"{indent}a_{i}_{j} = 0.0" for i, j in np.argwhere(~d.pattern_unknowns)]
        body += [f"{indent}a_{i}_{j} = {o}" for (i, j, _), o in zip(d.jac_y, outs[n:])]
    return body


def _scalar_lu_factor(n, indent):
    """In-place LU of the scalars a_i_j with row-scaled partial pivoting, as
    ``runtime.linalg.lu_factor`` (weights w_i = 1 / rm_i, the reciprocal largest entry of
    each original row, swapped with their rows); also leaves the reciprocal pivots
    r_k = 1 / U[k, k] for the solve."""
    i1, i2, i3 = indent + INDENT, indent + 2 * INDENT, indent + 3 * INDENT
    out = [f"{indent}minp = math.inf", f"{indent}ok = True"]
    out += [f"{indent}w_{i} = 1.0 / rm_{i} if (rm_{i} > 0.0 and rm_{i} < math.inf) else 1.0" for i in range(n)]
    for k in range(n):
        out.append(f"{indent}if ok:  # column {k}")
        out.append(f"{i1}piv_{k} = {k}")
        out.append(f"{i1}best = abs(a_{k}_{k}) * w_{k}")
        for i in range(k + 1, n):
            out += [f"{i1}v = abs(a_{i}_{k}) * w_{i}", f"{i1}if v > best:", f"{i2}best = v", f"{i2}piv_{k} = {i}"]
        for i in range(k + 1, n):
            out.append(f"{i1}if piv_{k} == {i}:")
            out.append(f"{i2}w_{k}, w_{i} = w_{i}, w_{k}")
            for j in range(n):
                out.append(f"{i2}a_{k}_{j}, a_{i}_{j} = a_{i}_{j}, a_{k}_{j}")
        out += [f"{i1}v = abs(a_{k}_{k})", f"{i1}if v < minp:", f"{i2}minp = v",
                f"{i1}if v == 0.0:", f"{i2}minp = 0.0", f"{i2}ok = False"]
        out += [f"{i1}else:", f"{i2}r_{k} = 1.0 / a_{k}_{k}"]
        for i in range(k + 1, n):
            out += [f"{i2}a_{i}_{k} *= r_{k}", f"{i2}if a_{i}_{k} != 0.0:"]
            out += [f"{i3}a_{i}_{j} -= a_{i}_{k} * a_{k}_{j}" for j in range(k + 1, n)]
    return out


def _scalar_lu_solve(n, indent, b):
    """``b <- A^{-1} b`` with the factors in a_i_j / piv_k, as ``runtime.linalg.lu_solve`` but
    multiplying by the reciprocal pivots: the divisions, computed during the factorisation,
    leave the solve's dependency chain (measured 67 -> 62 ns per appendix sample)."""
    out = []
    for k in range(n - 1):
        for i in range(k + 1, n):
            out += [f"{indent}if piv_{k} == {i}:", f"{indent}{INDENT}{b}_{k}, {b}_{i} = {b}_{i}, {b}_{k}"]
    for i in range(1, n):
        out.append(f"{indent}{b}_{i} = {b}_{i}" + "".join(f" - a_{i}_{j} * {b}_{j}" for j in range(i)))
    for i in range(n - 1, -1, -1):
        terms = "".join(f" - a_{i}_{j} * {b}_{j}" for j in range(i + 1, n))
        out.append(f"{indent}{b}_{i} = ({b}_{i}{terms}) * r_{i}")
    return out


def _scalar_lu_solve_transpose(n, indent, b):
    """``b <- A^{-T} b``, as ``runtime.linalg.lu_solve_transpose``."""
    out = []
    for i in range(n):
        terms = "".join(f" - a_{j}_{i} * {b}_{j}" for j in range(i))
        out.append(f"{indent}{b}_{i} = ({b}_{i}{terms}) / a_{i}_{i}")
    for i in range(n - 2, -1, -1):
        out.append(f"{indent}{b}_{i} = {b}_{i}" + "".join(f" - a_{j}_{i} * {b}_{j}" for j in range(i + 1, n)))
    for k in range(n - 2, -1, -1):
        for i in range(n - 1, k, -1):
            out += [f"{indent}if piv_{k} == {i}:", f"{indent}{INDENT}{b}_{k}, {b}_{i} = {b}_{i}, {b}_{k}"]
    return out


def _kernels_scalar(d, param_groups):
    """``newton_range`` and ``vjp_range`` with scalar per-sample state; the Newton sample
    mirrors ``runtime.newton.newton_one`` (convergence tests, final evaluation and
    factorisation at y*, ``solution_status``), computing the inverse norm exactly."""
    n, m = d.n, d.m
    I1, I2, I3, I4 = INDENT, INDENT * 2, INDENT * 3, INDENT * 4
    ys = [f"y_{i}" for i in range(n)]
    us = [f"u_{i}" for i in range(n)]
    ps = [f"p_{j}" for j in range(m)]
    pmap = {s: ps[j] for j, s in enumerate(d.params)}
    ymap = {**{s: ys[j] for j, s in enumerate(d.unknowns)}, **pmap}
    umap = {**{s: us[j] for j, s in enumerate(d.unknowns)}, **pmap}
    Fs = [f"F_{i}" for i in range(n)]

    def norm2(indent, target, names, ninf):
        # runtime.newton.norm2: scaled by the largest entry, no overflow
        return [f"{indent}if {ninf} > 0.0 and {ninf} < math.inf:",
                f"{indent}{INDENT}{target} = {ninf} * math.sqrt("
                + " + ".join(f"({v} / {ninf}) * ({v} / {ninf})" for v in names) + ")",
                f"{indent}else:", f"{indent}{INDENT}{target} = {ninf}"]

    res_ok_rel = " and ".join(f"(abs(F_{i}) <= ftol or abs(F_{i}) <= rtol * S_{i})" for i in range(n))

    f = ["@njit(cache=True, error_model='numpy', inline='always')",
         "def _newton_sample(b, b0, Y0, P, ftol, rtol, xtol, max_iter, singular_tol, Y, LU, PIV, INFO):"]
    f += [f"{I1}p_{j} = P[b, {j}]" for j in range(m)]
    f += [f"{I1}y_{i} = Y0[b0, {i}]" for i in range(n)]
    f += [f"{I1}INFO[b, 0] = 0.0", f"{I1}INFO[b, 1] = math.inf"]
    f += [f"{I1}Y[b, {i}] = y_{i}" for i in range(n)]
    # Finiteness of the inputs, in a loop over P (one argument per parameter has no limit here).
    f += [f"{I1}for j in range(M):", f"{I2}if not math.isfinite(P[b, j]):", f"{I3}return NONFINITE"]
    f += [f"{I1}if not ({' and '.join(f'math.isfinite({v})' for v in ys)}):", f"{I2}return NONFINITE"]
    # (local names must not start like the CSE temporaries r0.., s0.., w0..)
    f += _nan_max_lines(I1, "yfloor", ys)
    f += [f"{I1}if not (yfloor > 0.0 and yfloor < 1.0):", f"{I2}yfloor = 1.0"]
    f += _scalar_res_jac(d, ymap, I1)
    f += _nan_max_lines(I1, "fnorm", Fs)
    f += [f"{I1}INFO[b, 1] = fnorm", f"{I1}if not math.isfinite(fnorm):", f"{I2}return NONFINITE"]
    f += norm2(I1, "fn2", Fs, "fnorm")
    f += [f"{I1}it = 0", f"{I1}prev = 0.0", f"{I1}prev_full = False", f"{I1}nlin = 0",
          f"{I1}final = False", f"{I1}linear = False",
          f"{I1}minp = 0.0", f"{I1}status = CONVERGED"]
    f += [f"{I1}piv_{k} = {k}" for k in range(n)]
    f += [f"{I1}u_{i} = y_{i}" for i in range(n)]
    f += [f"{I1}r_{i} = 1.0" for i in range(n)]
    f += [f"{I1}while True:"]
    # residual scale S_i = sum_j |dF_i/dy_j| |y_j| (runtime residual_scale) and row maxima
    for i in range(n):
        f.append(f"{I2}S_{i} = " + " + ".join(f"abs(a_{i}_{j}) * abs(y_{j})" for j in range(n)))
    for i in range(n):
        f += [f"{I2}rm_{i} = 0.0"] + [f"{I2}rm_{i} = nan_max(rm_{i}, abs(a_{i}_{j}))" for j in range(n)]
    # final pass: equilibration of J(y*) (runtime.linalg.equilibrate)
    f += [f"{I2}if final:"]
    f += [f"{I3}if not ({' and '.join(f'rm_{i} < math.inf' for i in range(n))}):",
          f"{I4}status = NONFINITE", f"{I4}break"]
    f += [f"{I3}rx_{i} = rm_{i} if rm_{i} > 0.0 else 1.0" for i in range(n)]
    for j in range(n):
        col = ", ".join(f"abs(a_{i}_{j}) / rx_{i}" for i in range(n))
        f += [f"{I3}cm_{j} = max({col}{', 0.0' if n == 1 else ''})"]
        f += [f"{I3}if not cm_{j} > 0.0:", f"{I4}cm_{j} = 1.0"]
    f += [f"{I3}anorm = max(" + ", ".join(
        "(" + " + ".join(f"abs(a_{i}_{j}) / rx_{i}" for i in range(n)) + f") / cm_{j}" for j in range(n))
        + (", 0.0)" if n == 1 else ")")]
    f += _scalar_lu_factor(n, I2)
    f += [f"{I2}if final:", f"{I3}if not (minp > 0.0):", f"{I4}status = SINGULAR_AT_SOLUTION", f"{I4}break"]
    # exact ||Ae^{-1}||_1 = max_j ||cm * J^{-1} (rx_j e_j)||_1 (runtime.linalg.inv_norm1)
    f += [f"{I3}est = 0.0"]
    for j in range(n):
        f += [f"{I3}e_{i} = {'rx_' + str(j) if i == j else '0.0'}" for i in range(n)]
        f += _scalar_lu_solve(n, I3, "e")
        f += [f"{I3}est = nan_max(est, " + " + ".join(f"abs(e_{i}) * cm_{i}" for i in range(n)) + ")"]
    f += [f"{I3}if linear or not (anorm * est * singular_tol <= 1.0):",
          f"{I4}status = SINGULAR_AT_SOLUTION", f"{I3}break"]
    f += [f"{I2}res_ok = fnorm <= ftol or ({res_ok_rel})"]
    f += [f"{I2}if not (minp > 0.0):",
          f"{I3}status = SINGULAR_AT_SOLUTION if res_ok else SINGULAR_JACOBIAN",
          f"{I3}break"]
    f += [f"{I2}d_{i} = -F_{i}" for i in range(n)]
    f += _scalar_lu_solve(n, I2, "d")
    f += _nan_max_lines(I2, "step", [f"d_{i}" for i in range(n)])
    f += _nan_max_lines(I2, "ynorm", ys)
    f += [f"{I2}xs = xtol * (yfloor + ynorm)"]
    f += [f"{I2}if step <= xs and res_ok:",
          f"{I3}linear = converged_linearly(step, prev, nlin)"]
    f += [f"{I3}u_{i} = y_{i} + d_{i}" for i in range(n)]
    f += [f"{I3}final = True", f"{I2}else:"]
    f += [f"{I3}if it >= max_iter:", f"{I4}status = MAX_ITERATIONS", f"{I4}break"]
    f += [f"{I3}t = 1.0", f"{I3}accepted = False", f"{I3}finite_trial = False", f"{I3}while t >= MIN_STEP:"]
    I5 = INDENT * 5
    f += [f"{I4}u_{i} = y_{i} + t * d_{i}" for i in range(n)]
    f += _scalar_res_jac(d, umap, I4, with_jac=False, F="G", prefix="s")
    Gs = [f"G_{i}" for i in range(n)]
    f += _nan_max_lines(I4, "gnorm", Gs)
    f += norm2(I4, "ft2", Gs, "gnorm")
    f += [f"{I4}if ft2 <= math.sqrt(1.0 - 2.0 * ARMIJO_C * t) * fn2:", f"{I5}accepted = True", f"{I5}break",
          f"{I4}if ft2 < math.inf:", f"{I5}finite_trial = True", f"{I4}t *= 0.5"]
    f += [f"{I3}if not accepted:",
          f"{I4}if not finite_trial:", f"{I5}status = NONFINITE",
          f"{I4}else:", f"{I5}status = SINGULAR_AT_SOLUTION if res_ok else LINE_SEARCH_FAILED", f"{I4}break"]
    f += [f"{I3}nlin = linear_run(nlin, t == 1.0 and prev_full, step, prev)", f"{I3}prev_full = t == 1.0",
          f"{I3}prev = t * step", f"{I3}it += 1"]
    f += [f"{I2}y_{i} = u_{i}" for i in range(n)]
    f += _scalar_res_jac(d, ymap, I2)
    f += _nan_max_lines(I2, "fnorm", Fs)
    f += [f"{I2}if not math.isfinite(fnorm):", f"{I3}status = NONFINITE", f"{I3}break"]
    f += norm2(I2, "fn2", Fs, "fnorm")
    f += [f"{I1}Y[b, {i}] = y_{i}" for i in range(n)]
    f += [f"{I1}INFO[b, 0] = it", f"{I1}INFO[b, 1] = fnorm"]
    f += [f"{I1}LU[b, {i}, {j}] = a_{i}_{j}" for i in range(n) for j in range(n)]
    f += [f"{I1}PIV[b, {k}] = piv_{k}" for k in range(n)] + [f"{I1}PIV[b, {n}] = 1"]
    f += [f"{I1}return status"]
    # a_i_j are first assigned in _scalar_res_jac before the loop; minp/piv_k before it too.

    r = ["@njit(cache=True, error_model='numpy', nogil=True)",
         "def newton_range(lo, hi, Y0, P, ftol, rtol, xtol, max_iter, singular_tol, Y, LU, PIV, STATUS, INFO, tab):",
         f"{I1}# Samples lo..hi-1 on the calling thread, all per-sample state in scalars.",
         f"{I1}sy = 1 if Y0.shape[0] > 1 else 0  # Y0 is (B, n), or (1, n) shared by all samples",
         f"{I1}for b in range(lo, hi):",
         f"{I2}STATUS[b] = _newton_sample(b, b * sy, Y0, P, ftol, rtol, xtol, max_iter, singular_tol,",
         f"{I2}                           Y, LU, PIV, INFO)"]

    v = ["@njit(cache=True, error_model='numpy', nogil=True)",
         "def vjp_range(lo, hi, Y, P, LU, PIV, STATUS, YBAR, need, PBAR, tab):",
         f"{I1}# PBAR[b] = -(dF/dtheta)^T (dF/dy)^{{-T}} YBAR[b] at the solution, for converged samples.",
         f"{I1}for b in range(lo, hi):",
         f"{I2}if STATUS[b] != 0:",
         f"{I3}for c in range(M):", f"{I4}PBAR[b, c] = 0.0",
         f"{I3}continue"]
    v += [f"{I2}y_{i} = Y[b, {i}]" for i in range(n)] + [f"{I2}p_{j} = P[b, {j}]" for j in range(m)]
    v += [f"{I2}a_{i}_{j} = LU[b, {i}, {j}]" for i in range(n) for j in range(n)]
    v += [f"{I2}piv_{k} = PIV[b, {k}]" for k in range(n - 1)]
    v += [f"{I2}v_{i} = YBAR[b, {i}]" for i in range(n)]
    v += _scalar_lu_solve_transpose(n, I2, "v")
    v += _vjp_body(d, ymap, param_groups, I2, lambda i: f"v_{i}", lambda c: f"PBAR[b, {c}]", prefix="w")
    return f + [""] + r + [""] + v


def _kernels_factor_wrappers(kind: str, n: int):
    """``factor_dense`` / ``solve`` / ``solve_transpose`` (and ``factor`` for a dense system).

    ``piv[N]`` records which factorisation is stored in ``J``: 0 sparse, 1 dense. Up to
    ``INLINE_MAX_N`` unknowns the dense LU is specialised to ``N``; above, it runs with a
    run-time size (fully unrolled it grows into thousands of instructions for no gain)."""
    if n > INLINE_MAX_N:
        out = ["_fn_factor_dense = _driver('dense_factor')"]
        if kind == "dense":
            out += ["_fn_factor = _fn_factor_dense", "_fn_solve = _driver('dense_solve')",
                    "_fn_solve_transpose = _driver('dense_solve_transpose')"]
        return out
    size = "N"
    dense = [_decorator("FACTOR"), "def factor_dense(J, piv, tab):",
             f"{INDENT}piv[N] = 1", f"{INDENT}return lu_factor({size}, J, piv)"]
    if kind == "dense":
        return dense + [
            "", "factor = factor_dense", "",
            _decorator("SOLVE"), "def solve(J, piv, b, tab):", f"{INDENT}lu_solve({size}, J, piv, b)", "",
            _decorator("SOLVE"), "def solve_transpose(J, piv, b, tab):",
            f"{INDENT}lu_solve_transpose({size}, J, piv, b)",
        ]
    return dense + [
        "",
        _decorator("SOLVE"), "def solve(J, piv, b, tab):",
        f"{INDENT}if piv[N] == 1:", f"{INDENT * 2}lu_solve({size}, J, piv, b)",
        f"{INDENT}else:", f"{INDENT * 2}_solve_sparse(J, b, tab)", "",
        _decorator("SOLVE"), "def solve_transpose(J, piv, b, tab):",
        f"{INDENT}if piv[N] == 1:", f"{INDENT * 2}lu_solve_transpose({size}, J, piv, b)",
        f"{INDENT}else:", f"{INDENT * 2}_solve_transpose_sparse(J, b, tab)",
    ]


# The runtime drivers each module binds its kernels to (runtime/drivers.py): name, kernels, arguments.
_NEWTON_KERNELS = ("residual", "residual_jacobian", "residual_scale", "factor", "factor_dense", "solve",
                   "solve_transpose")
_NEWTON_ARGS = ("Y0", "P", "ftol", "rtol", "xtol", "max_iter", "singular_tol", "Y", "LU", "PIV", "STATUS", "INFO")
DRIVERS = {
    "newton": (_NEWTON_KERNELS, _NEWTON_ARGS),
    "trust_region": (_NEWTON_KERNELS, _NEWTON_ARGS),
    "fixed_point": (("residual", "residual_jacobian", "factor", "factor_dense", "solve", "solve_transpose"),
                    ("Y0", "P", "ftol", "rtol", "max_iter", "singular_tol", "memory", "Y", "LU", "PIV", "STATUS",
                     "INFO")),
    "vjp": (("solve_transpose", "vjp_params"), ("Y", "P", "LU", "PIV", "STATUS", "YBAR", "need", "PBAR")),
    # one wrapper only (no range / parallel pair): solves with the factors a forward left
    "solve_batch": (("solve", "solve_transpose"), ("LU", "PIV", "STATUS", "X", "transpose")),
}
SINGLE_DRIVERS = ("solve_batch",)


KERNEL_SIGNATURES = {"residual": "RESIDUAL", "residual_jacobian": "JACOBIAN", "residual_scale": "SCALE",
                     "factor": "FACTOR", "factor_dense": "FACTOR", "solve": "SOLVE", "solve_transpose": "SOLVE",
                     "vjp_params": "VJP_PARAMS", "ip_eval": "IP_EVAL", "ip_obj": "IP_OBJ", "ip_hess": "IP_HESS"}


def driver_bindings(drivers: dict, kinds, extra: tuple = (), bound: tuple = ()) -> list[str]:
    """Small uncached wrappers that call the runtime drivers with this module's kernels.

    ``<kind>_range(lo, hi, ...args, tab)`` and ``<kind>_batch_parallel(...args, tab)``. The
    drivers and kernels are referred to by address (``_fn_<name>``), so a wrapper compiles
    in milliseconds; it cannot be cached (it holds addresses) and is compiled per process.
    ``bound``: kernels whose ``_fn_<name>`` the module already defines (runtime kernels)."""
    out = []
    kernels_used = []
    for kind in kinds:
        for k in drivers[kind][0]:
            if k not in kernels_used:
                kernels_used.append(k)
    out += [f"_fn_{k} = _function({k}, {KERNEL_SIGNATURES[k]})" for k in kernels_used if k not in bound]
    for kind in kinds:
        kernels, args = drivers[kind]
        variants = (("", ()),) if kind in SINGLE_DRIVERS else (("_range", ("lo", "hi")), ("_batch_parallel", ()))
        for suffix, lead in variants:
            name = kind + suffix
            params = ", ".join((*lead, *extra, *args, "tab"))
            call = (*(f"_fn_{k}" for k in kernels), *lead, *extra, *args, "tab")
            out += ["", "", f"_fn_{name} = _driver({name!r})", "", "",
                    "@njit(error_model='numpy', nogil=True)", *_wrapped(f"def {name}(", params.split(", "), "):", ""),
                    *_wrapped(f"_fn_{name}(", call, ")", INDENT)]
    return out


def _wrapped(head: str, items, tail: str, indent: str, width: int = 100) -> list[str]:
    """``head item, item, ... tail`` broken into lines of at most ``width`` characters."""
    lines, cur = [], indent + head
    pad = " " * len(cur)
    for k, item in enumerate(items):
        piece = item + (", " if k < len(items) - 1 else "")
        if len(cur) + len(piece.rstrip()) > width and cur.strip() != head.strip():
            lines.append(cur.rstrip())
            cur = pad
        cur += piece
    lines.append(cur + tail)
    return lines


class Tables:
    """The module's integer tables (sparse patterns, index families), concatenated into
    one ``int64`` array ``TABLES`` passed to every kernel as ``tab``; printed at the end
    of the module as compressed base64 with a table of contents."""

    def __init__(self):
        self.parts: list[tuple[str, int, np.ndarray]] = []
        self.size = 0

    def add(self, name: str, values) -> tuple[int, int]:
        a = np.ascontiguousarray(values, dtype=np.int64).ravel()
        start = self.size
        self.parts.append((name, start, a))
        self.size += a.size
        return start, self.size

    def source(self) -> str:
        import base64
        import zlib

        lines = ["# ---------------------------------------------------------------- tables",
                 f"# TABLES: {self.size} int64 entries, passed to every kernel as ``tab``:"]
        lines += [f"#   tab[{s}:{s + a.size}]  {name}" for name, s, a in self.parts]
        if not self.parts:
            lines.append("TABLES = np.zeros(0, dtype=np.int64)")
            return "\n".join(lines) + "\n"
        blob = np.concatenate([a for _, _, a in self.parts]).astype("<i8").tobytes()
        text = base64.b64encode(zlib.compress(blob, 6)).decode("ascii")  # (level 9: 20x slower, 0.2 % smaller)
        lines.append("TABLES = _tables(")
        lines += [f"    {text[i:i + 96]!r}" for i in range(0, len(text), 96)]
        lines.append(f"    , {self.size})")
        return "\n".join(lines) + "\n"


def check_printable(d, smap: dict) -> None:
    """Every residual and derivative entry prints as Numba code, else a
    :class:`SystemDefinitionError` naming the residual (or the derivative), the construct and the fix."""
    rows = d.single_rows if d.families else range(d.n)
    jac_y = d.jac_y_single if d.families else d.jac_y
    jac_p = d.jac_p_single if d.families else d.jac_p
    # (the messages are formatted only on failure: printing a 250-term row costs ~0.1 s)
    items = [(lambda i=i: f"residual {i} ({d.residuals[i]})", d.residuals[i], smap) for i in rows]
    items += [(lambda i=i, j=j, e=e: f"the derivative of residual {i} with respect to {d.unknowns[j]} ({e})", e, smap)
              for i, j, e in jac_y]
    items += [(lambda i=i, j=j, e=e: f"the derivative of residual {i} with respect to {d.params[j]} ({e})", e, smap)
              for i, j, e in jac_p]
    for fd in d.families:
        f = fd.family
        first = f.members[0]
        slot_map_ = {s: "y[0]" for s in f.slots}
        items.append((lambda first=first: f"residual {first} ({d.residuals[first]})", fd.residual, slot_map_))
        items += [(lambda s=f.slots[k], e=e, first=first: f"the derivative of residual {first} with respect to "
                   f"{s} ({e})", e, slot_map_)
                  for k, e in fd.d_unknowns + fd.d_params]
    for where, e, names in items:
        try:
            NumbaPrinter(names).doprint(e)
        except SystemDefinitionError as exc:
            raise SystemDefinitionError(f"{where()}: {exc}") from None
        except (NotImplementedError, TypeError, ValueError) as exc:  # SymPy's printer errors
            raise SystemDefinitionError(
                f"{where()}: cannot generate Numba code for it ({type(exc).__name__}: {exc}); rewrite it "
                f"with elementary functions"
            ) from None


_SCALAR_PARALLEL = """\
@njit(cache=True, error_model='numpy', parallel=True)
def newton_batch_parallel(Y0, P, ftol, rtol, xtol, max_iter, singular_tol, Y, LU, PIV, STATUS, INFO, tab):
    B = Y.shape[0]
    nchunks = (B + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        newton_range(c * CHUNK, min(B, (c + 1) * CHUNK), Y0, P, ftol, rtol, xtol, max_iter, singular_tol,
                     Y, LU, PIV, STATUS, INFO, tab)


@njit(cache=True, error_model='numpy', parallel=True)
def vjp_batch_parallel(Y, P, LU, PIV, STATUS, YBAR, need, PBAR, tab):
    B = Y.shape[0]
    nchunks = (B + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        vjp_range(c * CHUNK, min(B, (c + 1) * CHUNK), Y, P, LU, PIV, STATUS, YBAR, need, PBAR, tab)
"""


def emit_module(derivation, layout: dict, key: str, options: dict | None = None,
                tables: Tables | None = None, root_finding: bool = True) -> tuple[str, Tables, tuple]:
    """The source of the generated module without its tables section, its tables (to which a
    caller may add before printing them with :meth:`Tables.source`), and the kernels the module
    binds to runtime kernels (``_fn_<name>`` defined, no function ``<name>``).

    ``root_finding=False`` (an optimization problem's KKT system, whose forward pass is the
    interior point): no ``residual_scale`` and no Newton / trust-region / fixed-point drivers,
    which only a root-finding forward pass calls."""
    opts = {"pivot_threshold": 0.1, "pattern_storage": False, **(options or {})}
    d = derivation
    tables = tables if tables is not None else Tables()
    smap = slot_map(d.unknowns, d.params)
    check_printable(d, smap)
    out = [_header(d, layout, key)]
    out.append(f"N = {d.n}\nM = {d.m}\nCHUNK = {CHUNK}\nFACTORIZATION = {d.factorization!r}\n")
    out.append("LAYOUT = " + pprint.pformat(layout, width=100, sort_dicts=False, compact=True) + "\n")
    # Residual systems above the unrolled size store a sparse dF/dy as its pattern values.
    pattern = bool(opts["pattern_storage"]) and d.factorization == "sparse" and d.n >= SPARSE_LOOPS_MIN_N
    # (first: the sparse elimination's header must be the module's first table)
    if pattern:
        factor = _kernels_factor_pattern(d, opts["pivot_threshold"], tables)
    else:
        factor = _kernels_factor_sparse(d, opts["pivot_threshold"], tables) if d.factorization == "sparse" else []
    sections = [
        _kernel_residual(d, smap, tables),
        _kernel_residual_jacobian(d, smap, tables, pattern),
        _kernel_residual_scale(d, smap, tables) if root_finding else [],
        _kernel_vjp_params(d, smap, layout["param_groups"], tables),
    ]
    sections = [factor, [] if pattern else _kernels_factor_wrappers(d.factorization, d.n)] + sections
    out += ["\n".join(sec) + "\n" for sec in sections if sec]
    bound = tuple(k for k in ("factor", "factor_dense", "solve", "solve_transpose")
                  if any(line.startswith(f"_fn_{k} =") for sec in sections[:2] for line in sec))
    if use_scalar_kernels(d):
        # Small dense systems: Newton and the VJP with the per-sample state in scalars.
        out.append("\n".join(emit_small.kernels_scalar(d, layout["param_groups"])) + "\n")
        out.append(_SCALAR_PARALLEL)
        kinds = ["fixed_point", "trust_region"] if root_finding else []
    else:
        kinds = ["newton", "vjp", "fixed_point", "trust_region"] if root_finding else ["vjp"]
    kinds.append("solve_batch")
    out.append("\n".join(driver_bindings(DRIVERS, kinds, bound=bound)).rstrip() + "\n")
    out.append(_RESIDUAL_BATCH)
    return "\n\n".join(out).rstrip() + "\n", tables, bound


_RESIDUAL_BATCH = """\
@njit(cache=True, error_model='numpy')
def residual_batch_serial(Y, P, OUT, tab):
    for b in range(Y.shape[0]):
        residual(Y[b], P[b], OUT[b], tab)
"""


def module_source(derivation, layout: dict, key: str, options: dict | None = None) -> str:
    """The full source of a residual system's module."""
    src, tables, _ = emit_module(derivation, layout, key, {"pattern_storage": True, **(options or {})})
    return src + "\n\n" + tables.source()


def _header(d, layout, key) -> str:
    import numba

    def comment(text):
        return "\n".join("#   " + line for line in str(text).splitlines())

    lines = [
        f"# Generated by implicit_compiler {__version__} (sympy {sp.__version__}, numba {numba.__version__}).",
        f"# Content hash: {key}",
        f"# System {layout['name']!r} ({layout['kind']}): {d.n} unknowns, {d.m} parameters,",
        f"# dF/dy: {d.count('unknowns')} structural non-zeros of {d.n * d.n}, factorisation: {d.factorization};",
        f"# dF/dtheta: {d.count('params')} structural non-zeros of {d.n * d.m}.",
        "#",
        "# Argument layout: y[j] is unknown j, p[j] is parameter j:",
    ]
    for kind, syms in (("y", d.unknowns), ("p", d.params)):
        if len(syms) <= 24:
            lines += [f"#   {kind}[{j}] = {s}" for j, s in enumerate(syms)]
        else:
            lines += [f"#   {kind}[{j}] = {syms[j]}" for j in range(3)]
            lines += [f"#   ... ({len(syms) - 6} more; LAYOUT lists them all)"]
            lines += [f"#   {kind}[{j}] = {syms[j]}" for j in range(len(syms) - 3, len(syms))]
    if d.families:
        lines.append(f"# Residuals: {len(d.families)} families (one loop each, see the kernels), and")
        lines.append(f"# {len(d.single_rows)} on their own:")
        for i in d.single_rows:
            lines.append(comment(f"F[{i}] = {d.residuals[i]}"))
    else:
        lines.append("# Residuals:")
        for i, r in enumerate(d.residuals):
            lines.append(comment(f"F[{i}] = {r}"))
    lines.append("#\n# Do not edit: this file is regenerated from the system when its hash changes.")
    lines += ["", "import math", "", "import numpy as np", "from numba import njit, prange", "",
              "from implicit_compiler.runtime.drivers import driver as _driver, function as _function",
              "from implicit_compiler.runtime.linalg import (lu_factor, lu_solve, lu_solve_transpose,",
              "                                              sparse_lu_factor, sparse_lu_solve,",
              "                                              sparse_lu_solve_transpose)",
              "from implicit_compiler.runtime.status import (CONVERGED, LINE_SEARCH_FAILED, MAX_ITERATIONS, NONFINITE,",
              "                                              SINGULAR_AT_SOLUTION, SINGULAR_JACOBIAN)",
              "from implicit_compiler.runtime.scalar import ARMIJO_C, MIN_STEP",
              "from implicit_compiler.runtime.scalar import converged_linearly_s as converged_linearly",
              "from implicit_compiler.runtime.scalar import linear_run_s as linear_run, nan_max_s as nan_max",
              "from implicit_compiler.runtime.signatures import (FACTOR, JACOBIAN, RESIDUAL, SCALE, SOLVE, VJP_PARAMS,",
              "                                                  decode_tables as _tables)"]
    return "\n".join(lines) + "\n"
