"""Symbolic second derivatives (derive/second.py) against SymPy's dense Hessian, exactly."""

import pytest
import sympy as sp

import implicit_compiler as ic
from implicit_compiler.codegen.emit import slot_map
from implicit_compiler.codegen.emit_second import check_printable_second, hvp_exprs, jvp_params_exprs
from implicit_compiler.derive.second import SecondDerivation, second_derivation
from implicit_compiler.errors import SystemDefinitionError
from implicit_compiler.symbolic.system import _back, _for_diff


def _second(system):
    return second_derivation(system.derivation, for_diff=_for_diff, back=_back)


def _systems():
    x, y1, y2 = sp.symbols("x y1 y2")
    appendix = ic.ResidualSystem([x**2 + y1**2 + y2**2 - 4, x * y1 - 1], unknowns=[y1, y2], params=[x])
    E, e, M = sp.symbols("E e M")
    kepler = ic.ResidualSystem([E - e * sp.sin(E) - M], unknowns=[E], params=[e, M])
    a, b, c, u, w = sp.symbols("a b c u w")
    mixed = ic.ResidualSystem([u * w * a - sp.exp(b * u) + c, sp.log(1 + u**2) * b**2 + w**3 - a * c],
                              unknowns=[u, w], params=[a, b, c])
    return {"appendix": appendix, "kepler": kepler, "mixed": mixed}


@pytest.mark.parametrize("name", ["appendix", "kepler", "mixed"])
def test_contracted_hessian_equals_dense_hessian(name):
    system = _systems()[name]
    sd = _second(system)
    z = list(system.unknowns) + list(system.params)
    v = sp.symbols(f"v0:{system.n_unknowns}")
    L = sum(vi * Fi for vi, Fi in zip(v, system.residuals))
    dense = sp.hessian(L, z)
    assert (sd.hessian_matrix(v) - dense).applyfunc(sp.expand) == sp.zeros(len(z), len(z))
    # only structural non-zeros, each unordered pair once
    assert all(k <= j for _, j, k, _ in sd.hess)
    assert all(e != 0 for *_, e in sd.hess)
    n_pairs = sum(1 for i, F in enumerate(system.residuals) for j in range(len(z)) for k in range(j + 1)
                  if sp.diff(F, z[j], z[k]) != 0)
    assert len(sd.hess) == n_pairs


@pytest.mark.parametrize("name", ["appendix", "mixed"])
def test_product_expressions(name):
    system = _systems()[name]
    sd = _second(system)
    n, m = system.n_unknowns, system.n_params
    v, yd, w = sp.symbols(f"v0:{n}"), sp.symbols(f"yd0:{n}"), sp.symbols(f"w0:{m}")
    z = list(system.unknowns) + list(system.params)
    L = sum(vi * Fi for vi, Fi in zip(v, system.residuals))
    Hz = sp.hessian(L, z) * sp.Matrix(list(yd) + list(w))
    got = hvp_exprs(sd, v, yd, w)
    assert all(sp.expand(g - r) == 0 for g, r in zip(got, Hz))
    Fw = system.jacobian_params * sp.Matrix(w)
    assert all(sp.expand(g - r) == 0 for g, r in zip(jvp_params_exprs(sd, w), Fw))


def test_real_argument_rules():
    # d²|y|/dy² is 0 almost everywhere (not a DiracDelta), and sign/floor are constants
    y, t = sp.symbols("y t")
    system = ic.ResidualSystem([sp.Abs(y) * t + y**3 - t + sp.floor(t) * y], unknowns=[y], params=[t])
    sd = _second(system)
    H = {(j, k): e for _, j, k, e in sd.hess}
    assert set(H) == {(0, 0), (1, 0)}
    assert sp.simplify(H[(0, 0)] - 6 * y) == 0
    assert sp.simplify(H[(1, 0)] - sp.sign(y)) == 0  # d/dt d/dy (|y| t) = sign(y); floor(t) contributes 0
    assert not any(e.has(sp.DiracDelta) for *_, e in sd.hess)


def test_bratu_structure_scales_with_nonzeros():
    n = 50
    ys = sp.symbols(f"u0:{n}")
    lam = sp.Symbol("lam")
    h2 = sp.Rational(1, (n + 1) ** 2)
    res = []
    for i in range(n):
        left = ys[i - 1] if i > 0 else 0
        right = ys[i + 1] if i < n - 1 else 0
        res.append(left - 2 * ys[i] + right + h2 * lam * sp.exp(ys[i]))
    system = ic.ResidualSystem(res, unknowns=list(ys), params=[lam])
    sd = _second(system)
    # exactly the (u_i, u_i) and (lam, u_i) entries of each residual i
    assert len(sd.hess) == 2 * n
    assert {(i, j, k) for i, j, k, _ in sd.hess} == {(i, i, i) for i in range(n)} | {(i, n, i) for i in range(n)}
    for i, j, k, e in sd.hess:
        ref = h2 * lam * sp.exp(ys[i]) if j == k else h2 * sp.exp(ys[i])
        assert sp.simplify(e - ref) == 0


def test_unprintable_second_derivative_names_residual_and_symbols():
    y, t = sp.symbols("y t")
    sd = SecondDerivation(residuals=(y - t,), unknowns=(y,), params=(t,), jac_p=[(0, 0, sp.S(-1))],
                          hess=[(0, 1, 0, sp.Integral(sp.exp(y * t), (y, 0, 1)))])
    with pytest.raises(SystemDefinitionError, match=r"second derivative of residual 0 with respect to t and y"):
        check_printable_second(sd, slot_map(sd.unknowns, sd.params))
