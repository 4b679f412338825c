"""Bad systems are rejected before any code is generated, with messages that name the culprit."""

import pytest
import sympy as sp

import implicit_compiler as ic
from implicit_compiler.errors import StructuralSingularityError, SystemDefinitionError

x, y, z, a, b = sp.symbols("x y z a b")


def test_count_mismatch_names_counts():
    with pytest.raises(SystemDefinitionError, match="2 residuals but 1 unknowns"):
        ic.ResidualSystem([y - x, y + x], unknowns=[y], params=[x])


def test_undeclared_symbol_is_named():
    with pytest.raises(SystemDefinitionError, match=r"residual 0 .* uses symbol\(s\) a .*declare them in params"):
        ic.ResidualSystem([y - a * x], unknowns=[y], params=[x])


def test_symbol_declared_twice_as_unknown_and_param():
    with pytest.raises(SystemDefinitionError, match="x declared both as unknown and as parameter"):
        ic.ResidualSystem([y - x, x - 1], unknowns=[y, x], params=[x])


def test_duplicate_symbol():
    with pytest.raises(SystemDefinitionError, match="y listed more than once in unknowns"):
        ic.ResidualSystem([y - x, y + x], unknowns=[y, y], params=[x])


def test_non_sympy_residual():
    with pytest.raises(SystemDefinitionError, match="residual 0 is a str"):
        ic.ResidualSystem(["y - x"], unknowns=[y], params=[x])


def test_matrix_residual_is_not_scalar():
    with pytest.raises(SystemDefinitionError, match="residual 0 is a 2x1 Matrix"):
        ic.ResidualSystem([sp.Matrix([y, z])], unknowns=[y], params=[x])


def test_empty_system():
    with pytest.raises(SystemDefinitionError, match="no residuals"):
        ic.ResidualSystem([], unknowns=[y], params=[x])
    with pytest.raises(SystemDefinitionError, match="group 'y': the group is empty"):
        ic.ResidualSystem([x], unknowns=[], params=[x])


def test_unknown_in_no_residual_is_structurally_singular():
    with pytest.raises(StructuralSingularityError, match="unknown\\(s\\) z appear in no residual"):
        ic.ResidualSystem([y - x, y**2 - x], unknowns=[y, z], params=[x])


def test_no_perfect_matching_names_residuals_and_unknowns():
    # F0 and F1 both involve only y, so one of z, w can never be determined.
    w = sp.Symbol("w")
    msg = r"the 2 residuals \[F0: .*; F1: .*\] together involve only the 1"
    with pytest.raises(StructuralSingularityError, match=msg):
        ic.ResidualSystem([y - x, y**2 - 2 * x, y + z + w], unknowns=[y, z, w], params=[x])


def test_relational_equality_is_accepted_as_difference():
    s = ic.ResidualSystem([sp.Eq(y**2, x)], unknowns=[y], params=[x])
    assert sp.simplify(s.residuals[0] - (y**2 - x)) == 0


def test_inequality_residual_rejected():
    with pytest.raises(SystemDefinitionError, match="inequality"):
        ic.ResidualSystem([y <= x], unknowns=[y], params=[x])


def test_undefined_function_rejected():
    f = sp.Function("f")
    with pytest.raises(SystemDefinitionError, match="undefined function f"):
        ic.ResidualSystem([f(y) - x], unknowns=[y], params=[x])


def test_non_symbol_unknown_rejected():
    with pytest.raises(SystemDefinitionError, match="plain sympy Symbol"):
        ic.ResidualSystem([y - x], unknowns=[y + 1], params=[x])


def test_bad_group_name_rejected():
    with pytest.raises(SystemDefinitionError, match="not a valid Python identifier"):
        ic.ResidualSystem([y - x], unknowns={"my y": [y]}, params=[x])


def test_jacobians_and_groups():
    Q = sp.Matrix(2, 2, sp.symbols("q0:4"))
    ys = sp.Matrix(sp.symbols("u0:2"))
    s = ic.ResidualSystem(list(Q * ys - sp.Matrix([1, 2])), unknowns={"u": ys}, params={"Q": Q})
    assert s.param_groups[0].shape == (2, 2)
    assert s.unknown_groups[0].shape == (2,)
    assert s.jacobian_unknowns == Q
    # dF/dQ: F_i = sum_j Q_ij u_j  ->  dF_i/dQ_ij = u_j, zero for other rows
    Jp = s.jacobian_params
    assert Jp.shape == (2, 4)
    assert Jp[0, 0] == ys[0] and Jp[0, 1] == ys[1] and Jp[0, 2] == 0 and Jp[1, 3] == ys[1]
    # only structural non-zeros are kept
    assert len(s.derivation.jac_p) == 4
    assert s.derivation.pattern_params.sum() == 4


def test_printer_rejects_functions_numba_cannot_run():
    from implicit_compiler.codegen.printer import NumbaPrinter

    with pytest.raises(SystemDefinitionError, match="besselj"):
        NumbaPrinter({x: "p[0]"}).doprint(sp.besselj(0, x))


def test_piecewise_without_default_prints_nan_branch():
    from implicit_compiler.codegen.printer import NumbaPrinter

    src = NumbaPrinter({x: "p[0]"}).doprint(sp.Piecewise((x, x > 0)))
    assert "math.nan" in src and "None" not in src
