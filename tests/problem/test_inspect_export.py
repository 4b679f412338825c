"""Problems through the inspection tools: report sections, derivative certificate, standalone export."""

import numpy as np
import pytest
import sympy as sp
import torch

import implicit_compiler as ic
from tests.helpers import run_without_sympy


@pytest.fixture(scope="module")
def clipped():
    y, t = sp.symbols("y t")
    problem = ic.Problem((y - t) ** 2, variables=[y], params=[t], inequalities=[y <= 1])
    return problem, ic.compile(problem, return_multipliers=True)


def test_report_shows_lagrangian_and_kkt(clipped):
    problem, _ = clipped
    text = ic.report(problem).text(unicode=False)
    assert "Lagrangian" in text and "nu0" in text
    assert "KKT" in text or "Stationarity" in text or "stationarity" in text
    assert "\\nu_{0}" in ic.report(problem).latex()


def test_certificate_passes_on_a_problem_layer(clipped):
    _, layer = clipped
    cert = ic.check(layer, np.array([[3.0], [0.0]]))
    assert cert.ok, str(cert)


def test_problem_layer_exports_and_runs_without_sympy(clipped, tmp_path):
    _, layer = clipped
    path = ic.export_layer(layer, tmp_path / "clipped_layer.py")
    ts = torch.tensor([[3.0], [0.0]], dtype=torch.float64, requires_grad=True)
    y, nu = layer(ts)
    (y.sum() + nu.sum()).backward()
    out = run_without_sympy(path, """
        import torch
        t = torch.tensor([[3.0], [0.0]], dtype=torch.float64, requires_grad=True)
        y, nu = mod.layer(t)
        (y.sum() + nu.sum()).backward()
        print(repr([y.tolist(), nu.tolist(), t.grad.tolist()]))
    """)
    y2, nu2, g2 = eval(out)
    np.testing.assert_allclose(y2, y.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(nu2, nu.detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(g2, ts.grad.numpy(), atol=1e-10)


def test_custom_forward_layer_cannot_be_exported(clipped, tmp_path):
    problem, _ = clipped
    layer = ic.compile(problem, forward=lambda t: np.minimum(t, 1.0))
    with pytest.raises(ValueError, match="Python callable, which cannot be written"):
        ic.export_layer(layer, tmp_path / "x.py")
