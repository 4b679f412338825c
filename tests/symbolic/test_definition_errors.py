"""Constructs the real-valued kernels cannot compute, and malformed initial guesses, are a
SystemDefinitionError that names the residual, the subexpression and the fix (never a Numba,
SymPy or NumPy traceback)."""

import numpy as np
import pytest
import sympy as sp

import implicit_compiler as ic
from implicit_compiler.errors import SystemDefinitionError

x, y, z, k = sp.symbols("x y z k")


@pytest.mark.parametrize("expr, sub", [
    (y - sp.I * x, r"-I\*x"),
    (y * sp.exp(sp.I * x) - 1, r"I\*x"),
    (y - (1 + 2j) * x, r"2\.0\*I"),
    (y**2 + sp.I, r"y\*\*2 \+ I"),
])
def test_complex_residual(expr, sub):
    with pytest.raises(SystemDefinitionError, match=rf"residual 0 \(.*\) is complex-valued \({sub} contains the "
                                                    rf"imaginary unit I\).*two real residuals"):
        ic.ResidualSystem([expr], unknowns=[y], params=[x])


@pytest.mark.parametrize("expr, kind", [
    (y - sp.Integral(x * z, (z, 0, 1)), "Integral"),
    (y - sp.Integral(sp.exp(-z**2), (z, 0, x)), "Integral"),
    (y - sp.Sum(x**k, (k, 0, 3)), "Sum"),
    (y - sp.Product(x + k, (k, 1, 3)), "Product"),
    (y - sp.Derivative(sp.sin(x) * y, x), "Derivative"),
    (y - sp.Limit(sp.sin(x * z) / z, z, 0), "Limit"),
])
def test_unevaluated_constructs_name_doit(expr, kind):
    with pytest.raises(SystemDefinitionError, match=rf"residual 0 .* contains the unevaluated {kind} .*\.doit\(\)"):
        ic.ResidualSystem([expr], unknowns=[y], params=[x])


def test_sum_with_symbolic_bounds_in_second_residual():
    n = sp.Symbol("n")
    with pytest.raises(SystemDefinitionError, match=r"residual 1 .* unevaluated Sum .*symbolic bounds"):
        ic.ResidualSystem([y - x, z - sp.Sum(x**k, (k, 0, n))], unknowns=[y, z], params=[x, n])


@pytest.mark.parametrize("fn", [sp.re, sp.im, sp.conjugate, sp.arg])
def test_complex_parts(fn):
    with pytest.raises(SystemDefinitionError, match=rf"residual 0 .* uses {fn.__name__}\(\) in .*real numbers"):
        ic.ResidualSystem([y - fn(x) - 1], unknowns=[y], params=[x])


def test_distribution():
    with pytest.raises(SystemDefinitionError, match=r"residual 0 .* distribution DiracDelta\(x\).*smooth"):
        ic.ResidualSystem([y - sp.DiracDelta(x)], unknowns=[y], params=[x])


def test_non_real_symbol():
    w = sp.Symbol("w", imaginary=True)
    with pytest.raises(SystemDefinitionError, match=r"symbol w is declared non-real .*imaginary"):
        ic.ResidualSystem([y - w], unknowns=[y], params=[w])


def test_fixed_point_validates_its_map():
    with pytest.raises(SystemDefinitionError, match="complex-valued"):
        ic.FixedPoint([sp.I * y / 2 + x], unknowns=[y], params=[x])
    with pytest.raises(SystemDefinitionError, match="unevaluated Integral"):
        ic.FixedPoint([sp.Integral(y * z, (z, 0, 1)) + x], unknowns=[y], params=[x])


def test_problem_with_complex_objective():
    t = sp.Symbol("t")
    with pytest.raises(SystemDefinitionError, match="complex-valued"):
        prob = ic.Problem(y**2 + sp.I * t * y, variables=[y], params=[t])
        ic.compile(prob, warmup=False)


@pytest.mark.parametrize("expr, name, where", [
    (y - sp.zeta(x), "zeta", r"residual 0 \(y - zeta\(x\)\)"),
    (y - sp.besselj(0, x) * y**2 - 1, "besselj", r"residual 0"),
    (y - sp.LambertW(x), "LambertW", r"residual 0"),
    # factorial prints (as gamma(x + 1)); its derivative needs polygamma, which Numba lacks
    (y - sp.factorial(x), "polygamma", r"the derivative of residual 0 with respect to x"),
])
def test_functions_without_numba_code_name_residual_at_compile(expr, name, where):
    system = ic.ResidualSystem([expr], unknowns=[y], params=[x])
    with pytest.raises(SystemDefinitionError, match=rf"{where}.*: cannot generate Numba code for .*{name}.*"
                                                    rf"rewrite it with elementary functions"):
        ic.compile(system, warmup=False)


# ---------------------------------------------------------------- initial guesses
@pytest.mark.parametrize("guess, msg", [
    ("abc", r"initial_guess must be a number, a sequence of 2 numbers .* got str 'abc'"),
    (b"1", r"got bytes"),
    ([1.0, "a"], r"initial_guess must be a number.*got list"),
    ([1.0, 2.0, 3.0], r"initial_guess has 3 values for 2 unknowns"),
    (object(), r"got object"),
    ({y: "a"}, r"initial_guess\[y\] is 'a'"),
    ({y: None}, r"initial_guess\[y\] is None"),
    ({y: [1, 2]}, r"initial_guess\[y\] is list \[1, 2\], not a real number"),
    ({x: 1.0}, r"initial_guess names x, which is not an unknown \(unknowns: y, z\)"),
    ({"w": 1.0}, r"initial_guess names 'w', which is not an unknown"),
    (float("nan"), r"initial_guess is nan; an initial guess must be finite"),
    ([1.0, np.inf], r"initial_guess for z is inf"),
    ({z: sp.oo}, r"initial_guess\[z\] is inf"),
    (sp.Symbol("q"), r"got Symbol"),
])
def test_bad_initial_guess(guess, msg):
    with pytest.raises(SystemDefinitionError, match=msg):
        ic.ResidualSystem([y - x, z - x], unknowns=[y, z], params=[x], initial_guess=guess)


def test_good_initial_guesses():
    def guess(g):
        return ic.ResidualSystem([y - x, z - x], unknowns=[y, z], params=[x], initial_guess=g).initial_guess

    np.testing.assert_array_equal(guess(2), [2.0, 2.0])
    np.testing.assert_array_equal(guess(np.float32(1.5)), [1.5, 1.5])
    np.testing.assert_array_equal(guess([1, 2]), [1.0, 2.0])
    np.testing.assert_array_equal(guess(np.array([[3.0], [4.0]])), [3.0, 4.0])
    np.testing.assert_array_equal(guess({z: 5}), [0.0, 5.0])
    np.testing.assert_array_equal(guess({"z": sp.Rational(1, 4), y: sp.pi}), [float(sp.pi), 0.25])
