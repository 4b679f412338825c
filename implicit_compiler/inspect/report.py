"""Reports of what the compiler derives from a system.

``report(obj)`` collects, for a :class:`~implicit_compiler.ResidualSystem` (or a
:class:`~implicit_compiler.FixedPoint`, a compiled layer, or anything with a
``.system`` attribute that leads to one):

* the residuals ``F(y, theta)``,
* ``dF/dy`` and ``dF/dtheta`` (as matrices, or as a list of non-zeros when large),
* their sparsity patterns,
* the common subexpressions shared by the generated kernels,
* the implicit Jacobian ``dy/dtheta = -(dF/dy)^{-1} dF/dtheta`` in closed form
  (small systems only: ``implicit_max_unknowns``).

A report prints as plain text (SymPy pretty printing), and renders as LaTeX
(:meth:`Report.latex`), HTML (:meth:`Report.html`) and in Jupyter
(``_repr_latex_`` / ``_repr_html_``); :meth:`Report.sparsity_png` draws the
patterns with matplotlib (an optional dependency).

Optimisation problems plug in by duck typing: an object with a ``.lagrangian``
(a SymPy expression) and/or a ``.kkt`` named tuple of SymPy lists
(``stationarity``, ``primal_feasibility``, ``complementarity``) gets a
"Lagrangian" and a "KKT conditions" section (and, when it dropped equality constraints as
redundant, a ``.redundant_equalities`` gives a "Redundant equality constraints" section);
its ``.system`` supplies the
residual-system sections. Further sections can be added with
:func:`register_section`.
"""

from __future__ import annotations

import html as _html
import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from ..errors import SystemDefinitionError

MAX_MATRIX_SIDE = 12  # larger Jacobians are listed entry by entry
MAX_LISTED = 80  # entries / subexpressions shown before "... and k more"
MAX_TEXT_PATTERN = 100  # wider patterns are left to sparsity_png()


# ---------------------------------------------------------------------- data
@dataclass
class Item:
    """One displayed thing: a SymPy object with a label, a sparsity pattern, or a line of text.

    ``kind`` is ``"expr"`` (``value`` is a SymPy object shown as ``label = value``),
    ``"pattern"`` (``value`` is a boolean array; ``rows``/``cols`` name its axes)
    or ``"text"`` (``value`` is a string).
    """

    kind: str
    value: object
    label: str = ""
    latex_label: str = ""
    rows: list[str] = field(default_factory=list)
    cols: list[str] = field(default_factory=list)


@dataclass
class Section:
    """A titled part of a report; ``key`` identifies it (``report.section("jacobian_unknowns")``)."""

    key: str
    title: str
    items: list[Item]


@dataclass
class Context:
    """What section builders read: the object reported on and the residual system behind it."""

    obj: object
    system: object
    options: dict

    @property
    def derivation(self):
        return self.system.derivation


SectionBuilder = Callable[[Context], "Section | None"]
_BUILDERS: list[tuple[str, SectionBuilder]] = []


def register_section(key: str, builder: SectionBuilder, *, after: str | None = None) -> None:
    """Add (or replace) a section builder. ``builder(ctx)`` returns a :class:`Section` or
    ``None`` when it does not apply to ``ctx.obj``; ``after`` places it after another key."""
    global _BUILDERS
    _BUILDERS = [(k, b) for k, b in _BUILDERS if k != key]
    pos = len(_BUILDERS)
    if after is not None:
        keys = [k for k, _ in _BUILDERS]
        if after not in keys:
            raise ValueError(f"no report section {after!r}; sections are {keys}")
        pos = keys.index(after) + 1
    _BUILDERS.insert(pos, (key, builder))


# ---------------------------------------------------------------------- helpers
def residual_system_of(obj):
    """The residual system behind ``obj``: itself, or ``obj.system`` (repeatedly)."""
    seen = obj
    for _ in range(5):
        if hasattr(obj, "residuals") and hasattr(obj, "unknowns") and hasattr(obj, "derivation"):
            return obj
        nxt = getattr(obj, "system", None)
        if nxt is None:
            break
        obj = nxt
    if hasattr(seen, "kernels"):
        raise SystemDefinitionError(
            "this layer has no symbolic system attached (a standalone export, or a layer built "
            "from a kernel module alone); report on the ResidualSystem it was compiled from"
        )
    raise SystemDefinitionError(
        f"cannot report on a {type(seen).__name__}: expected a ResidualSystem, a FixedPoint, a "
        f"compiled layer, or an object whose .system is one"
    )


def _find_attr(obj, name: str):
    """``obj.name``, looked up along the ``.system`` chain (problems wrap systems)."""
    for _ in range(5):
        if obj is None:
            return None
        value = getattr(obj, name, None)
        if value is not None:
            return value
        obj = getattr(obj, "system", None)
    return None


def _plural(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def _sub(i) -> str:
    return f"_{{{i}}}"


def _matrix_or_entries(key, title, M, entries, rows, cols, sym_latex, sym_text, ctx) -> Section:
    n_r, n_c = M.shape if M is not None else (len(rows), len(cols))
    side = ctx.options["max_matrix_side"]
    head = Item("text", f"{n_r} x {n_c}, {_plural(len(entries), 'structural non-zero')}")
    if n_r <= side and n_c <= side:
        return Section(key, title, [head, Item("expr", M, sym_text, sym_latex)])
    items = [head]
    for i, j, e in entries[:MAX_LISTED]:
        items.append(Item("expr", e, f"{sym_text}[{i},{j}]  ({rows[i]}, {cols[j]})",
                          rf"\left[{sym_latex}\right]_{{{i},{j}}}"))
    if len(entries) > MAX_LISTED:
        items.append(Item("text", f"... and {len(entries) - MAX_LISTED} more non-zeros"))
    return Section(key, title, items)


def _cse(exprs, free):
    gen = sp.numbered_symbols("t", exclude=free)
    reps, _ = sp.cse(list(exprs), symbols=gen, order="canonical")
    return reps


# ---------------------------------------------------------------------- section builders
def _residuals(ctx: Context) -> Section:
    s = ctx.system
    items = []
    for i, r in enumerate(s.residuals[:MAX_LISTED]):
        items.append(Item("expr", r, f"F[{i}]", f"F{_sub(i)}"))
    if len(s.residuals) > MAX_LISTED:
        items.append(Item("text", f"... and {len(s.residuals) - MAX_LISTED} more residuals"))
    return Section("residuals", "Residuals F(y, θ) = 0", items)


def _lagrangian(ctx: Context) -> Section | None:
    L = _find_attr(ctx.obj, "lagrangian")
    if L is None:
        return None
    return Section("lagrangian", "Lagrangian", [Item("expr", sp.sympify(L), "L", r"\mathcal{L}")])


def _kkt(ctx: Context) -> Section | None:
    kkt = _find_attr(ctx.obj, "kkt")
    if kkt is None:
        return None
    names = getattr(kkt, "_fields", None) or ("stationarity", "primal_feasibility", "complementarity")
    items = []
    for name in names:
        exprs = list(getattr(kkt, name, None) or [])
        items.append(Item("text", f"{name.replace('_', ' ')} ({len(exprs)}):"))
        short = "".join(w[0] for w in name.split("_"))
        for i, e in enumerate(exprs[:MAX_LISTED]):
            items.append(Item("expr", sp.sympify(e), f"{short}[{i}]", rf"\mathrm{{{short}}}{_sub(i)}"))
        if len(exprs) > MAX_LISTED:
            items.append(Item("text", f"... and {len(exprs) - MAX_LISTED} more"))
    return Section("kkt", "KKT conditions", items)


def _redundant_equalities(ctx: Context) -> Section | None:
    """The equality constraints dropped before the KKT system was formed (a problem's
    ``redundant_equalities``), each with the combination that implies it."""
    dropped = _find_attr(ctx.obj, "redundant_equalities")
    if not dropped:
        return None
    given = len(_find_attr(ctx.obj, "equalities_as_given") or ())
    items = [Item("text", f"{len(dropped)} of {given} equality constraints dropped as redundant "
                          f"(constant-linear, implied by the kept ones; exact rank); their multipliers are zero")]
    for r in dropped:
        items.append(Item("expr", sp.Eq(r.constraint, 0), f"h[{r.index}]", rf"h{_sub(r.index)}"))
        items.append(Item("text", f"  {r.reason()}"))
    return Section("redundant_equalities", "Redundant equality constraints", items)


def _jacobian_unknowns(ctx: Context) -> Section:
    d = ctx.derivation
    rows = [f"F[{i}]" for i in range(d.n)]
    cols = [str(s) for s in d.unknowns]
    M = d.jacobian_unknowns_matrix() if d.n <= ctx.options["max_matrix_side"] else None
    return _matrix_or_entries("jacobian_unknowns", "∂F/∂y", M, d.jac_y, rows, cols,
                              r"\frac{\partial F}{\partial y}", "dF/dy", ctx)


def _jacobian_params(ctx: Context) -> Section:
    d = ctx.derivation
    rows = [f"F[{i}]" for i in range(d.n)]
    cols = [str(s) for s in d.params]
    side = ctx.options["max_matrix_side"]
    M = d.jacobian_params_matrix() if d.n <= side and d.m <= side else None
    if d.m == 0:
        return Section("jacobian_params", "∂F/∂θ", [Item("text", "the system has no parameters")])
    return _matrix_or_entries("jacobian_params", "∂F/∂θ", M, d.jac_p, rows, cols,
                              r"\frac{\partial F}{\partial \theta}", "dF/dθ", ctx)


def _sparsity(ctx: Context) -> Section:
    d = ctx.derivation
    rows = [f"F[{i}]" for i in range(d.n)]
    items = [
        Item("text", f"∂F/∂y: {d.n} x {d.n}, {_plural(len(d.jac_y), 'non-zero')} "
                     f"({100.0 * len(d.jac_y) / max(1, d.n * d.n):.0f}%), factorisation: {d.factorization}"),
        Item("pattern", d.pattern_unknowns, "∂F/∂y", r"\frac{\partial F}{\partial y}", rows,
             [str(s) for s in d.unknowns]),
    ]
    if d.m:
        items += [
            Item("text", f"∂F/∂θ: {d.n} x {d.m}, {_plural(len(d.jac_p), 'non-zero')}"),
            Item("pattern", d.pattern_params, "∂F/∂θ", r"\frac{\partial F}{\partial \theta}", rows,
                 [str(s) for s in d.params]),
        ]
    return Section("sparsity", "Sparsity patterns", items)


def _common_subexpressions(ctx: Context) -> Section:
    d = ctx.derivation
    items = []
    free = set(d.unknowns) | set(d.params)
    groups = [
        ("residual and ∂F/∂y kernel", list(d.residuals) + [e for _, _, e in d.jac_y]),
        ("∂F/∂θ kernel", [e for _, _, e in d.jac_p]),
    ]
    for what, exprs in groups:
        reps = _cse(exprs, free) if exprs else []
        if not reps:
            items.append(Item("text", f"{what}: no common subexpressions"))
            continue
        items.append(Item("text", f"{what}: {_plural(len(reps), 'temporary')}"))
        for sym, e in reps[:MAX_LISTED]:
            items.append(Item("expr", e, str(sym), sp.latex(sym)))
        if len(reps) > MAX_LISTED:
            items.append(Item("text", f"... and {len(reps) - MAX_LISTED} more"))
    return Section("cse", "Common subexpressions (as in the generated kernels)", items)


def _implicit_jacobian(ctx: Context) -> Section:
    s = ctx.system
    limit = ctx.options["implicit_max_unknowns"]
    title = "Implicit Jacobian dy/dθ = -(∂F/∂y)⁻¹ ∂F/∂θ"
    if s.n_params == 0:
        return Section("implicit_jacobian", title, [Item("text", "the system has no parameters")])
    if s.n_unknowns > limit:
        return Section("implicit_jacobian", title, [Item(
            "text", f"not shown: {s.n_unknowns} unknowns > implicit_max_unknowns={limit} "
                    f"(the closed form would not be readable; raise the limit to see it)")])
    J = s.implicit_jacobian(simplify=ctx.options["simplify"], max_unknowns=limit)
    return Section("implicit_jacobian", title, [Item("expr", J, "dy/dθ", r"\frac{dy}{d\theta}")])


for _key, _fn in (
    ("residuals", _residuals),
    ("lagrangian", _lagrangian),
    ("kkt", _kkt),
    ("redundant_equalities", _redundant_equalities),
    ("jacobian_unknowns", _jacobian_unknowns),
    ("jacobian_params", _jacobian_params),
    ("sparsity", _sparsity),
    ("cse", _common_subexpressions),
    ("implicit_jacobian", _implicit_jacobian),
):
    register_section(_key, _fn)


# ---------------------------------------------------------------------- rendering
def _beside(label: str, block: str) -> str:
    """``label = block`` with the label on the block's middle line."""
    lines = block.splitlines() or [""]
    mid = (len(lines) - 1) // 2
    prefix = f"{label} = "
    pad = " " * len(prefix)
    return "\n".join((prefix if k == mid else pad) + line for k, line in enumerate(lines))


def _pattern_text(P: np.ndarray, rows, cols, unicode: bool) -> str:
    if P.shape[1] > MAX_TEXT_PATTERN:
        return f"({P.shape[0]} x {P.shape[1]}: too wide for text; use Report.sparsity_png())"
    on, off = ("●", "·") if unicode else ("x", ".")
    short = all(len(c) <= 3 for c in cols)
    names = cols if short else [str(j) for j in range(len(cols))]
    w = max([len(c) for c in names] + [1])
    rw = max(len(r) for r in rows) if rows else 0
    lines = [" " * (rw + 2) + " ".join(c.rjust(w) for c in names)]
    for r, row in zip(rows, P):
        lines.append(r.rjust(rw) + "  " + " ".join((on if v else off).rjust(w) for v in row))
    if not short:
        lines.append("columns: " + ", ".join(f"{j}={c}" for j, c in enumerate(cols)))
    return "\n".join(lines)


def _pattern_latex(P: np.ndarray) -> str:
    if P.shape[1] > MAX_TEXT_PATTERN:
        return r"\text{(too large; see the sparsity picture)}"
    body = r" \\ ".join(" & ".join(r"\bullet" if v else r"\cdot" for v in row) for row in P)
    return r"\left[\begin{array}{" + "c" * P.shape[1] + "}" + body + r"\end{array}\right]"


class Report:
    """What the compiler derived from a system (see :func:`report`).

    ``str(report)`` / :meth:`text` is plain text, :meth:`latex` a LaTeX fragment,
    :meth:`html` an HTML fragment with MathJax-ready math; Jupyter shows the HTML.
    """

    def __init__(self, title: str, summary: str, sections: list[Section], context: Context):
        self.title = title
        self.summary = summary
        self.sections = sections
        self._ctx = context

    def section(self, key: str) -> Section:
        for s in self.sections:
            if s.key == key:
                return s
        raise KeyError(f"no section {key!r}; this report has {[s.key for s in self.sections]}")

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.sections]

    # text
    def text(self, unicode: bool = True) -> str:
        out = [self.title, self.summary if unicode else _ascii(self.summary)]
        for sec in self.sections:
            title = sec.title if unicode else _ascii(sec.title)
            out += ["", title, "-" * len(title)]
            for it in sec.items:
                if it.kind == "text":
                    out.append(it.value if unicode else _ascii(it.value))
                elif it.kind == "pattern":
                    out.append(_pattern_text(it.value, it.rows, it.cols, unicode))
                else:
                    block = sp.pretty(it.value, use_unicode=unicode, wrap_line=False)
                    label = it.label if unicode else _ascii(it.label)
                    out.append(_beside(label, block))
        return "\n".join(out) + "\n"

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return f"<Report {self.title!r}: {', '.join(self.keys)}>"

    # latex
    def _latex_items(self, sec: Section):
        for it in sec.items:
            if it.kind == "text":
                yield "text", it.value
            elif it.kind == "pattern":
                yield "math", f"{it.latex_label} \\sim {_pattern_latex(it.value)}"
            else:
                yield "math", f"{it.latex_label} = {sp.latex(it.value)}"

    def latex(self) -> str:
        """A LaTeX fragment (``\\subsection*`` per section, display math per item)."""
        out = [f"\\section*{{{_latex_text(self.title)}}}", _latex_text(self.summary), ""]
        for sec in self.sections:
            out.append(f"\\subsection*{{{_latex_text(sec.title)}}}")
            for kind, s in self._latex_items(sec):
                out.append(_latex_text(s) + "\n" if kind == "text" else f"\\[ {s} \\]")
            out.append("")
        return "\n".join(out)

    def _repr_latex_(self) -> str:
        parts = [rf"\textbf{{{_latex_text(self.title)}}}\\ \text{{{_latex_text(self.summary)}}}"]
        for sec in self.sections:
            parts.append(rf"\textbf{{{_latex_text(sec.title)}}}")
            for kind, s in self._latex_items(sec):
                parts.append(rf"\text{{{_latex_text(s)}}}" if kind == "text" else s)
        return "$$\\begin{array}{l}" + r" \\ ".join(parts) + "\\end{array}$$"

    # html
    def html(self) -> str:
        """An HTML fragment; math is ``$$...$$`` for MathJax (Jupyter, the docs site)."""
        esc = _html.escape
        out = ['<div class="implicit-compiler-report">', f"<h3>{esc(self.title)}</h3>", f"<p>{esc(self.summary)}</p>"]
        for sec in self.sections:
            out.append(f"<h4>{esc(sec.title)}</h4>")
            for it in sec.items:
                if it.kind == "text":
                    out.append(f"<p>{esc(it.value)}</p>")
                elif it.kind == "pattern":
                    out.append(f"<pre>{esc(_pattern_text(it.value, it.rows, it.cols, True))}</pre>")
                else:
                    out.append(f"<p>$$ {esc(it.latex_label)} = {esc(sp.latex(it.value))} $$</p>")
        out.append("</div>")
        return "\n".join(out)

    def _repr_html_(self) -> str:
        return self.html()

    # picture
    def sparsity_png(self, path=None, *, dpi: int = 100) -> bytes:
        """Draw the sparsity patterns of dF/dy and dF/dtheta; returns PNG bytes (and writes
        ``path`` if given). Needs matplotlib: ``pip install matplotlib``."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError(
                "Report.sparsity_png needs matplotlib, which is not installed; "
                "install it with `pip install matplotlib` (or `pip install implicit_compiler[plot]`)"
            ) from None
        d = self._ctx.derivation
        pats = [(d.pattern_unknowns, "∂F/∂y", "unknown")]
        if d.m:
            pats.append((d.pattern_params, "∂F/∂θ", "parameter"))
        widths = [max(P.shape[1], 1) for P, _, _ in pats]
        fig = Figure(figsize=(3 + 4 * len(pats), 4.5), dpi=dpi)
        axes = fig.subplots(1, len(pats), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
        for ax, (P, name, what) in zip(axes, pats):
            ax.spy(P, marker="s", markersize=max(1.0, min(12.0, 240.0 / max(P.shape))), color="#3f51b5")
            ax.set_title(f"{name}: {int(P.sum())} non-zeros of {P.size}")
            ax.set_xlabel(what)
            ax.set_ylabel("residual")
        fig.suptitle(self.title)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        data = buf.getvalue()
        if path is not None:
            with open(path, "wb") as fh:
                fh.write(data)
        return data


_ASCII = {"∂": "d", "θ": "theta", "⁻¹": "^-1", "●": "x", "·": "."}


def _ascii(s: str) -> str:
    for k, v in _ASCII.items():
        s = s.replace(k, v)
    return s


_LATEX_TEXT = {"∂": r"$\partial$", "θ": r"$\theta$", "⁻¹": r"$^{-1}$", "_": r"\_", "%": r"\%", "&": r"\&",
               "#": r"\#"}


def _latex_text(s: str) -> str:
    for k, v in _LATEX_TEXT.items():
        s = s.replace(k, v)
    return s


# ---------------------------------------------------------------------- entry point
def report(obj, *, implicit_max_unknowns: int = 4, simplify: bool = True,
           max_matrix_side: int = MAX_MATRIX_SIDE, sections=None, progress=None) -> Report:
    """Build the :class:`Report` of what is derived from ``obj``.

    Parameters
    ----------
    obj
        A ``ResidualSystem`` / ``FixedPoint``, a compiled layer (its ``.system``), or an
        optimisation problem (``.lagrangian``, ``.kkt`` and a ``.system``).
    implicit_max_unknowns
        The closed-form implicit Jacobian is shown only up to this many unknowns
        (0 turns it off): its size grows quickly with the system.
    simplify
        Simplify the implicit Jacobian (slower, usually much shorter).
    max_matrix_side
        Jacobians with more rows or columns are listed entry by entry.
    sections
        Keys of the sections to include (default: all that apply).
    progress
        Called with a short message before each section (the command line prints them on stderr).
    """
    system = residual_system_of(obj)
    ctx = Context(obj, system, {"implicit_max_unknowns": int(implicit_max_unknowns), "simplify": simplify,
                                "max_matrix_side": int(max_matrix_side)})
    known = [k for k, _ in _BUILDERS]
    if sections is not None:
        bad = [k for k in sections if k not in known]
        if bad:
            raise ValueError(f"unknown report section(s) {bad}; available: {known}")
    if progress is not None:
        progress(f"deriving Jacobians of {system!r}")
    d = system.derivation
    out = []
    for key, build in _BUILDERS:
        if sections is not None and key not in sections:
            continue
        if progress is not None and key in ("cse", "implicit_jacobian"):
            progress(f"computing {'common subexpressions' if key == 'cse' else 'the closed-form implicit Jacobian'}")
        sec = build(ctx)
        if sec is not None:
            out.append(sec)
    kind = type(obj).__name__ if obj is system else f"{type(obj).__name__} (residual system {type(system).__name__})"
    ys = ", ".join(str(s) for s in d.unknowns[:8]) + (", ..." if d.n > 8 else "")
    ps = ", ".join(str(s) for s in d.params[:8]) + (", ..." if d.m > 8 else "")
    summary = (f"{kind}: {_plural(d.n, 'unknown')} ({ys}), {_plural(d.m, 'parameter')} ({ps}); "
               f"dF/dy has {len(d.jac_y)} of {d.n * d.n} entries non-zero, dF/dθ {len(d.jac_p)} of {d.n * d.m}")
    return Report(f"Report: {system.name}", summary, out, ctx)
