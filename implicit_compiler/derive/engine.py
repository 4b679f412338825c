"""Heavy differentiation through SymEngine, results back in SymPy.

SymPy stays the language of the user and of everything downstream (families, printing);
SymEngine (a C++ engine with the same expression model) only takes derivatives where
SymPy is the bottleneck: the gradient of a Lagrangian with ~10⁴ terms in 100 variables
takes 140 s with ``sp.diff`` and 2 s with SymEngine (plus 3 s to bring the 100 rows back).

The fast path is taken only for expressions built from a fixed set of node types whose
derivative rules are the same in both engines (sums, products, integer and rational
powers, the elementary functions below, symbols, integers and rationals); anything else
(floats, ``Abs``, ``Piecewise``, user functions, ...) is differentiated by SymPy. Symbols
come back as the very objects that went in (SymEngine drops SymPy's assumptions, so they
are matched by name, which must be unique).
"""

from __future__ import annotations

import sympy as sp

try:  # optional at import; a dependency of the package (pyproject)
    import symengine as _se
except ImportError:  # pragma: no cover - exercised only without the wheel
    _se = None

# Below this many nodes SymPy is fast enough and the round trip is not worth it.
MIN_NODES = 100

_FUNCS = (sp.exp, sp.log, sp.sin, sp.cos, sp.tan, sp.sinh, sp.cosh, sp.tanh, sp.asin, sp.acos, sp.atan)


def _supported(expr) -> tuple[bool, int]:
    """(every node is of a supported kind, number of nodes)."""
    count = 0
    for node in sp.preorder_traversal(expr):
        count += 1
        if isinstance(node, (sp.Symbol, sp.Integer, sp.Rational, sp.Add, sp.Mul)):
            continue
        if isinstance(node, sp.Pow):
            if not isinstance(node.exp, sp.Rational):  # x**y with symbolic y: kept in SymPy
                return False, count
            continue
        if isinstance(node, _FUNCS) and len(node.args) == 1:
            continue
        return False, count
    return True, count


def available() -> bool:
    return _se is not None


def gradient(expr, symbols, engine: str = "auto") -> list:
    """``[∂expr/∂s for s in symbols]`` as SymPy expressions.

    ``engine``: ``"auto"`` (SymEngine for large expressions of supported kinds, else SymPy),
    ``"sympy"`` or ``"symengine"`` (falls back to SymPy when the expression is not supported)."""
    symbols = list(symbols)
    if engine != "sympy" and _se is not None:
        ok, nodes = _supported(expr)
        if ok and (engine == "symengine" or nodes >= MIN_NODES):
            by_name = {}
            for s in expr.free_symbols | set(symbols):
                if by_name.setdefault(s.name, s) != s:
                    break  # two symbols share a name: cannot match them back
            else:
                e = _se.sympify(expr)
                rows = [e.diff(_se.Symbol(s.name)) for s in symbols]
                # symbols with assumptions come back plain: put the user's objects back
                back = {sp.Symbol(name): s for name, s in by_name.items() if sp.Symbol(name) != s}
                out = []
                for r in rows:
                    x = sp.sympify(r)
                    if back:
                        x = x.xreplace({k: back[k] for k in x.free_symbols if k in back})
                    out.append(x)
                return out
    return sympy_gradient(expr, symbols)


def sympy_gradient(expr, symbols) -> list:
    """``[sp.diff(expr, s) for s in symbols]``, the same expressions, differentiating each term
    of a sum only by the symbols it holds: ``sp.diff`` of a sum differentiates every term (to
    zero, mostly), so a gradient of a sum of ``k`` terms in ``n`` symbols costs ``k n`` term
    derivatives instead of (terms × their own symbols)."""
    symbols = list(symbols)
    terms = sp.Add.make_args(expr)
    if len(terms) < 8:
        return [sp.diff(expr, s) for s in symbols]
    wanted = set(symbols)
    buckets: dict = {s: [] for s in symbols}
    for t in terms:
        for s in t.free_symbols & wanted:
            buckets[s].append(t)
    # Add(*[diff of each term]) is what Add._eval_derivative builds (the terms without s
    # contribute exact zeros, which Add drops)
    return [sp.Add(*[sp.diff(t, s) for t in buckets[s]]) if buckets[s] else sp.S.Zero for s in symbols]
