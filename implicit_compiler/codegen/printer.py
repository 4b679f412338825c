"""``NumbaPrinter``: SymPy expressions to Numba-compatible Python source.

Symbols print as array slots (``y[0]``, ``p[3]``) or CSE temporaries, never as
user names, so any SymPy symbol name works. Everything else follows SymPy's
``PythonCodePrinter`` (``math.*`` functions, which Numba supports), except where
Numba's version would be wrong for floats: ``floor``/``ceiling``/``sign``/``frac``
print as NumPy's float functions (``math.floor`` returns an int64 in Numba, garbage
for NaN or |x| >= 2^63), ``Min``/``Max`` as ``np.minimum``/``np.maximum`` (NaN wins,
whatever the argument order), ``Heaviside`` as a conditional expression, negative
integer powers as divisions. Constructs with no real-valued Numba equivalent
(``I``, unevaluated integrals, sums, derivatives) are a :class:`SystemDefinitionError`.
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
            k = int(exp)
            if k < 0:
                # Numba's float ** negative-int raises ZeroDivisionError at 0 whatever the error
                # model; a division gives inf there (error_model='numpy'), a per-sample NONFINITE.
                return f"(1.0/{b})" if k == -1 else f"(1.0/{b}**{-k})"
            return f"{b}**{k}"
        if exp == sp.S.Half:
            return f"math.sqrt({self._print(base)})"
        if exp == -sp.S.Half:
            return f"(1.0/math.sqrt({self._print(base)}))"
        return super()._print_Pow(expr, rational=rational)

    def _print_floor(self, expr):
        return f"np.floor({self._print(expr.args[0])})"

    def _print_ceiling(self, expr):
        return f"np.ceil({self._print(expr.args[0])})"

    def _print_sign(self, expr):
        return f"np.sign({self._print(expr.args[0])})"

    def _print_frac(self, expr):
        x = self._print(expr.args[0])
        return f"({x} - np.floor({x}))"

    def _nested(self, fn, args):
        args = list(args)
        out = self._print(args[-1])
        for a in reversed(args[:-1]):
            out = f"{fn}({self._print(a)}, {out})"
        return out

    def _print_Max(self, expr):
        return self._nested("np.maximum", expr.args)

    def _print_Min(self, expr):
        return self._nested("np.minimum", expr.args)

    def _print_Heaviside(self, expr):
        x = expr.args[0]
        h0 = expr.args[1] if len(expr.args) > 1 else sp.S.Half
        return self._print(sp.Piecewise((0, x < 0), (1, x > 0), (h0, sp.Eq(x, 0)), (sp.nan, True)))

    def _print_DiracDelta(self, expr):
        # Only derivatives of Heaviside / Max / Min produce it (residuals are checked to hold
        # none): their value almost everywhere, as automatic differentiation takes it.
        return "0.0"

    def _print_factorial(self, expr):
        return f"math.gamma({self._print(expr.args[0])} + 1.0)"

    def _print_ImaginaryUnit(self, expr):
        raise SystemDefinitionError(
            "the imaginary unit I has no place in real-valued kernels; write the real and "
            "imaginary parts of a complex equation as two real residuals"
        )

    def _unevaluated(self, expr):
        raise SystemDefinitionError(
            f"cannot generate code for the unevaluated {type(expr).__name__} {expr}; evaluate it "
            f"in closed form first (.doit()), or write it with elementary functions"
        )

    _print_Integral = _print_Sum = _print_Product = _print_Limit = _print_Subs = _unevaluated

    def _print_Derivative(self, expr):
        raise SystemDefinitionError(
            f"SymPy cannot differentiate {expr.expr} (it left {expr} unevaluated), so the "
            f"Jacobian has no code; write it with functions SymPy can differentiate"
        )

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
