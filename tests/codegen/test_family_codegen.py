"""Code generation from index families: one loop per family, agreeing with straight-line code.

Every system here is compiled twice, once with its families (the default) and once with
family detection switched off (every residual and derivative on its own, the straight-line
reference), into separate caches; solutions and gradients must agree to 1e-12.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import sympy as sp
import torch

import implicit_compiler as ic
from implicit_compiler.derive import jacobians
from implicit_compiler.runtime.signatures import decode_tables
from tests.derive.test_families import bratu

ROOT = Path(__file__).resolve().parents[2]


def dense_tanh(n):
    """``y_i + sum_j a_ij tanh(y_j) / n - b_i = 0``: one family over rows, two parameter groups."""
    y = sp.symbols(f"y0:{n}")
    A = sp.Matrix(n, n, sp.symbols(f"a0:{n * n}"))
    b = sp.symbols(f"b0:{n}")
    res = [y[i] + sum(A[i, j] * sp.tanh(y[j]) for j in range(n)) / n - b[i] for i in range(n)]
    return ic.ResidualSystem(residuals=res, unknowns={"y": list(y)}, params={"A": A, "b": list(b)})


def grid(rows, cols):
    """``Δu + c u³ = f`` on a grid (4-neighbour stencil, zero boundary): families by node degree;
    elimination in the natural order fills the band, so the fill zeroing is a table loop."""
    u = [[sp.Symbol(f"u_{r}_{c}") for c in range(cols)] for r in range(rows)]
    f = sp.Symbol("f")
    k = sp.Symbol("k")
    res = []
    for r in range(rows):
        for c in range(cols):
            nb = [u[r + dr][c + dc] for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
                  if 0 <= r + dr < rows and 0 <= c + dc < cols]
            res.append(sum(nb) - 4 * u[r][c] - k * u[r][c] ** 3 - f)
    return ic.ResidualSystem(residuals=res, unknowns=[s for row in u for s in row], params={"f": f, "k": k})


def compile_both(make, tmp_path_factory, **options):
    with_families = ic.compile(make(), cache_dir=tmp_path_factory.mktemp("families"), **options)
    old = jacobians.FAMILY_MIN_SIZE
    jacobians.FAMILY_MIN_SIZE = 10**9
    try:
        straight = ic.compile(make(), cache_dir=tmp_path_factory.mktemp("straight"), **options)
    finally:
        jacobians.FAMILY_MIN_SIZE = old
    return with_families, straight


def _source(layer):
    return Path(layer.kernels.module.__file__).read_text()


def _kernel_lines(src):
    """The kernel part of a module: from its first kernel to its tables."""
    lines = src.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("@njit"))
    end = next(i for i, line in enumerate(lines) if line.startswith("# ----") and "tables" in line)
    return lines[start:end]


@pytest.fixture(scope="module")
def bratu_pair(tmp_path_factory):
    return compile_both(lambda: bratu(40), tmp_path_factory)


def test_bratu_module_has_one_loop_and_straight_line_boundary_rows(bratu_pair):
    fam, straight = bratu_pair
    src = _source(fam)
    assert src.count("for r in range(38):") == 4  # residual, Jacobian, scale, VJP: one loop each
    assert "F[0] = " in src and "F[39] = " in src and "F[5] = " not in src
    assert "for r in range(" not in _source(straight)
    d = fam.system.derivation
    assert len(d.families) == 1 and d.single_rows == (0, 39)
    assert d.count("unknowns") == 3 * 40 - 2 and d.count("params") == 40


def test_bratu_families_agree_with_straight_line_and_with_scipy(bratu_pair):
    fam, straight = bratu_pair
    lam = torch.tensor([0.3, 1.0, 2.5, 3.4], dtype=torch.float64, requires_grad=True)
    y1 = fam(lam)
    (g1,) = torch.autograd.grad((y1 * torch.linspace(-1, 2, 40, dtype=torch.float64)).sum(), lam)
    lam2 = lam.detach().clone().requires_grad_(True)
    y2 = straight(lam2)
    (g2,) = torch.autograd.grad((y2 * torch.linspace(-1, 2, 40, dtype=torch.float64)).sum(), lam2)
    np.testing.assert_allclose(y1.detach().numpy(), y2.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g1.numpy(), g2.numpy(), rtol=1e-11, atol=1e-13)
    system = bratu(40)
    F = sp.lambdify([system.unknowns, system.params], system.residuals)
    J = sp.lambdify([system.unknowns, system.params], system.jacobian_unknowns)
    for b in range(4):
        p = [float(lam[b].detach())]
        ref = scipy.optimize.root(lambda v, p=p: F(v, p), np.zeros(40), jac=lambda v, p=p: J(v, p), tol=1e-13).x
        np.testing.assert_allclose(y1[b].detach().numpy(), ref, rtol=1e-10, atol=1e-12)
        assert np.abs(F(y1[b].detach().numpy(), p)).max() <= 1e-9


def test_generated_kernels_do_not_grow_with_the_number_of_unknowns(tmp_path):
    from implicit_compiler.codegen.emit import module_source

    sizes = {}
    for n in (20, 400):
        system = bratu(n)
        src = module_source(system.derivation, system.layout(), "key")
        sizes[n] = _kernel_lines(src)
        assert max(len(line) for line in src.splitlines()) <= 160  # no table printed as one line
    assert len(sizes[20]) == len(sizes[400])


def test_generated_source_is_identical_across_hash_seeds():
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from tests.codegen.test_family_codegen import grid\n"
        "from implicit_compiler.codegen.emit import module_source\n"
        "s = grid(6, 5); print(module_source(s.derivation, s.layout(), 'key'))\n"
    )
    outs = []
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True, timeout=300).stdout)
    assert outs[0] == outs[1] == outs[2]
    assert outs[0].count("for r in range(") >= 3


def test_a_perturbed_row_is_straight_line_and_the_layer_agrees(tmp_path_factory):
    fam, straight = compile_both(lambda: bratu(24, perturb=7), tmp_path_factory)
    d = fam.system.derivation
    assert 7 in d.single_rows and all(7 not in fd.family.members for fd in d.families)
    lam = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    y1 = fam(lam)
    (g1,) = torch.autograd.grad(y1.sum(), lam)
    lam2 = lam.detach().clone().requires_grad_(True)
    y2 = straight(lam2)
    (g2,) = torch.autograd.grad(y2.sum(), lam2)
    np.testing.assert_allclose(y1.detach().numpy(), y2.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g1.numpy(), g2.numpy(), rtol=1e-11, atol=1e-13)


@pytest.fixture(scope="module")
def tanh_pair(tmp_path_factory):
    return compile_both(lambda: dense_tanh(10), tmp_path_factory)


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_dense_family_gradients_per_parameter_group(tanh_pair, need):
    fam, straight = tanh_pair
    assert len(fam.system.derivation.families) == 1
    g = torch.Generator().manual_seed(3)
    A = torch.randn(5, 10, 10, generator=g, dtype=torch.float64)
    b = torch.randn(5, 10, generator=g, dtype=torch.float64)
    grads = []
    for layer in (fam, straight):
        A_ = A.clone().requires_grad_(need[0])
        b_ = b.clone().requires_grad_(need[1])
        y = layer(A_, b_)
        wanted = [t for t, n_ in zip((A_, b_), need) if n_]
        grads.append((y.detach(), torch.autograd.grad((y ** 2).sum(), wanted)))
    np.testing.assert_allclose(grads[0][0].numpy(), grads[1][0].numpy(), rtol=1e-12, atol=1e-14)
    for a, c in zip(grads[0][1], grads[1][1]):
        np.testing.assert_allclose(a.numpy(), c.numpy(), rtol=1e-11, atol=1e-13)


def test_dense_family_gradcheck(tanh_pair):
    fam, _ = tanh_pair
    g = torch.Generator().manual_seed(5)
    A = torch.randn(2, 10, 10, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(2, 10, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda A_, b_: fam(A_, b_), (A, b), eps=1e-6, atol=1e-8)


def test_grid_families_with_table_driven_fill_zeroing(tmp_path_factory):
    fam, straight = compile_both(lambda: grid(8, 9), tmp_path_factory)
    d = fam.system.derivation
    assert d.factorization == "sparse"
    assert sorted(fd.family.size for fd in d.families) == sorted([2 * 6 + 2 * 7, 6 * 7])  # edges, interior
    assert len(d.single_rows) == 4  # corners (a family of 4 is below the family threshold)
    assert "J[0, tab[q]] = 0.0" in _source(fam)  # pattern storage: the fill-in positions from a table
    f = torch.tensor([[0.5, 1.0], [-2.0, 0.3], [4.0, 2.0]], dtype=torch.float64, requires_grad=True)
    y1 = fam(f[:, 0], f[:, 1])
    (g1,) = torch.autograd.grad((y1 ** 3).sum(), f)
    f2 = f.detach().clone().requires_grad_(True)
    y2 = straight(f2[:, 0], f2[:, 1])
    (g2,) = torch.autograd.grad((y2 ** 3).sum(), f2)
    np.testing.assert_allclose(y1.detach().numpy(), y2.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g1.numpy(), g2.numpy(), rtol=1e-11, atol=1e-13)


def test_tables_round_trip_and_a_wrong_size_is_refused():
    from implicit_compiler.codegen.emit import Tables

    t = Tables()
    t.add("a", np.arange(1000) * 7)
    t.add("b", [[1, 2], [3, 4]])
    ns = {"np": np, "_tables": decode_tables}
    exec(t.source(), ns)
    np.testing.assert_array_equal(ns["TABLES"], np.concatenate([np.arange(1000) * 7, [1, 2, 3, 4]]))
    text = t.source().replace(f", {t.size})", f", {t.size + 1})")
    with pytest.raises(ValueError, match="tables hold 1004 entries"):
        exec(text, dict(ns))
