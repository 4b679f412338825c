from collections import namedtuple

import numpy as np
import pytest
import sympy as sp

import implicit_compiler as ic
from implicit_compiler.inspect import Section, register_section, report
from implicit_compiler.inspect.report import _BUILDERS, Item
from tests.conftest import appendix_system

x = sp.Symbol("x")
y1, y2 = sp.symbols("y1 y2")


@pytest.fixture(scope="module")
def appendix_report():
    return report(appendix_system())


def test_sections_and_exact_values(appendix_report):
    r = appendix_report
    assert r.keys == ["residuals", "jacobian_unknowns", "jacobian_params", "sparsity", "cse", "implicit_jacobian"]
    assert [it.value for it in r.section("residuals").items] == [x**2 + y1**2 + y2**2 - 4, x * y1 - 1]
    assert r.section("jacobian_unknowns").items[1].value == sp.Matrix([[2 * y1, 2 * y2], [x, 0]])
    assert r.section("jacobian_params").items[1].value == sp.Matrix([[2 * x], [y1]])
    J = r.section("implicit_jacobian").items[0].value
    expected = sp.Matrix([[-y1 / x], [(y1**2 - x**2) / (x * y2)]])
    assert sp.simplify(J - expected) == sp.zeros(2, 1)
    pats = [it.value for it in r.section("sparsity").items if it.kind == "pattern"]
    np.testing.assert_array_equal(pats[0], [[True, True], [True, False]])
    np.testing.assert_array_equal(pats[1], [[True], [True]])
    with pytest.raises(KeyError, match="no section 'kkt'"):
        r.section("kkt")


def test_text_latex_html(appendix_report):
    r = appendix_report
    text = str(r)
    assert text.startswith("Report: appendix\nResidualSystem: 2 unknowns (y1, y2), 1 parameter (x)")
    assert "dF/dy = " in text and "●" in text and "dy/dθ = " in text
    plain = r.text(unicode=False)
    assert plain.isascii() and "dF/dtheta" in plain
    tex = r.latex()
    assert r"\frac{\partial F}{\partial y} = \left[\begin{matrix}2 y_{1} & 2 y_{2}\\x & 0\end{matrix}\right]" in tex
    assert r"\bullet" in tex and tex.count(r"\subsection*") == len(r.sections)
    rl = r._repr_latex_()
    assert rl.startswith("$$") and rl.endswith("$$")
    html = r._repr_html_()
    assert html.count("<h4>") == len(r.sections) and "$$ F_{0} = " in html and "<script" not in html


def test_size_guards():
    r = report(appendix_system(), implicit_max_unknowns=1, max_matrix_side=1)
    assert "not shown: 2 unknowns > implicit_max_unknowns=1" in r.section("implicit_jacobian").items[0].value
    entries = r.section("jacobian_unknowns").items[1:]
    assert [it.value for it in entries] == [2 * y1, 2 * y2, x]
    assert entries[2].label.startswith("dF/dy[1,0]  (F[1], y1)")
    big = [sp.Symbol(f"u{i}") for i in range(5)]
    chain = ic.ResidualSystem([big[i] - (big[i - 1] if i else x) for i in range(5)], unknowns=big, params=[x])
    assert "not shown" in report(chain).section("implicit_jacobian").items[0].value


def test_common_subexpressions_are_listed():
    s = ic.ResidualSystem([sp.sin(x * y1) + y1, sp.sin(x * y1) * y2 - 1], unknowns=[y1, y2], params=[x])
    items = report(s, implicit_max_unknowns=0).section("cse").items
    temps = {it.label: it.value for it in items if it.kind == "expr"}
    assert temps and any(v.has(sp.sin) or v == x * y1 for v in temps.values())
    assert "no common subexpressions" not in items[0].value


def test_problem_sections_by_duck_typing():
    KKT = namedtuple("KKT", "stationarity primal_feasibility complementarity")
    lam = sp.Symbol("lam")

    class FakeProblem:
        lagrangian = y1**2 + lam * (y1 - x)
        kkt = KKT([2 * y1 + lam], [y1 - x], [])
        system = appendix_system()

    r = report(FakeProblem(), implicit_max_unknowns=0)
    assert r.keys[:3] == ["residuals", "lagrangian", "kkt"]
    assert r.section("lagrangian").items[0].value == y1**2 + lam * (y1 - x)
    kkt_text = [it.value for it in r.section("kkt").items if it.kind == "text"]
    assert kkt_text == ["stationarity (1):", "primal feasibility (1):", "complementarity (0):"]
    assert "FakeProblem (residual system ResidualSystem)" in r.summary


def test_register_section_plugs_in():
    before = list(_BUILDERS)
    try:
        register_section("extra", lambda ctx: Section("extra", "Extra", [Item("text", f"n={ctx.system.n_unknowns}")]),
                         after="residuals")
        r = report(appendix_system(), implicit_max_unknowns=0)
        assert r.keys[1] == "extra" and r.section("extra").items[0].value == "n=2"
        with pytest.raises(ValueError, match="no report section 'nope'"):
            register_section("x", lambda ctx: None, after="nope")
    finally:
        _BUILDERS[:] = before


def test_bad_inputs():
    with pytest.raises(ic.SystemDefinitionError, match="cannot report on a int"):
        report(3)
    with pytest.raises(ValueError, match="unknown report section"):
        report(appendix_system(), sections=["nope"])


def test_layer_without_system_is_a_clear_error(appendix_layer):
    class Bare:
        kernels = appendix_layer.kernels
        system = None

    with pytest.raises(ic.SystemDefinitionError, match="no symbolic system attached"):
        report(Bare())
    assert report(appendix_layer, implicit_max_unknowns=0).keys[0] == "residuals"


def test_sparsity_png(appendix_report, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "s.png"
    data = appendix_report.sparsity_png(out)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and out.read_bytes() == data


def test_sparsity_png_without_matplotlib(appendix_report, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="needs matplotlib.*pip install matplotlib"):
        appendix_report.sparsity_png()
