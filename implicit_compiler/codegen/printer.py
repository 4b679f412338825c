"""``NumbaPrinter``: SymPy expressions to Numba-compatible Python source.

Symbols print as array slots (``y[0]``, ``p[3]``) or CSE temporaries, never as
user names, so any SymPy symbol name works. Everything else follows SymPy's
``PythonCodePrinter`` (``math.*`` functions, which Numba supports).
"""

from __future__ import annotations

import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from ..errors import SystemDefinitionError


class NumbaPrinter(PythonCodePrinter):
    """Prints with a fixed ``Symbol -> source`` map; unknown symbols are an error."""

    printmethod = "_numbacode"

    def __init__(self, symbol_map: dict, settings=None):
        super().__init__(settings or {"fully_qualified_modules": True, "strict": True})
        self.symbol_map = symbol_map

    def _print_Symbol(self, expr):
        try:
            return self.symbol_map[expr]
        except KeyError:
            raise SystemDefinitionError(f"internal: symbol {expr} has no slot in the generated kernel") from None

    _print_Dummy = _print_Symbol

    def _print_Piecewise(self, expr):
        # SymPy's printer ends a Piecewise without a default branch with ``else None``,
        # which Numba cannot type; evaluate to NaN outside every branch instead.
        if expr.args[-1].cond != sp.true:
            expr = sp.Piecewise(*expr.args, (sp.nan, True))
        return super()._print_Piecewise(expr)

    def _print_NaN(self, expr):
        return "math.nan"

    def _print_Infinity(self, expr):
        return "math.inf"

    def _print_NegativeInfinity(self, expr):
        return "(-math.inf)"

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Rational(self, expr):
        return f"({expr.p}/{expr.q})"

    def _print_Half(self, expr):
        return "0.5"

    def _print_Integer(self, expr):
        return f"{int(expr)}.0" if abs(int(expr)) < 2**53 else repr(float(expr))

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        if exp.is_Integer and abs(int(exp)) <= 64:
            b = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Pow"])
            if int(exp) < 0:  # Numba's x**-k raises ZeroDivisionError at 0 whatever the error model
                return f"(1.0/{b}**{-int(exp)})"
            return f"{b}**{int(exp)}"
        if exp == sp.S.Half:
            return f"math.sqrt({self._print(base)})"
        if exp == -sp.S.Half:
            return f"(1.0/math.sqrt({self._print(base)}))"
        return super()._print_Pow(expr, rational=rational)

    def emptyPrinter(self, expr):
        raise SystemDefinitionError(
            f"cannot generate Numba code for {expr!r} ({type(expr).__name__}); "
            f"rewrite it with elementary functions"
        )

    def _print_not_supported(self, expr):
        raise SystemDefinitionError(
            f"cannot generate Numba code for {expr} ({type(expr).__name__}): Numba has no "
            f"equivalent; rewrite it with elementary functions"
        )
