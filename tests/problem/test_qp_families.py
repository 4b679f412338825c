"""An OptNet QP's interior-point kernels through families, against the straight-line kernels
of the same problem and the exact active-set reference.

``min ½ yᵀQy + qᵀy  s.t.  Gy <= h`` with every entry of Q, q, G, h a parameter: the
gradient rows, the constraint rows (and their Jacobian rows), the objective's terms and the
Hessian rows are families, printed as loops over index tables; with family detection off
(``jacobians.FAMILY_MIN_SIZE`` huge) every entry is straight-line code.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
import torch

import implicit_compiler as ic
from implicit_compiler.codegen.emit_problem import emit_problem_module
from implicit_compiler.derive.engine import gradient, sympy_gradient
from tests.codegen.test_family_codegen import compile_both

from .qp_reference import qp_vjp, solve_qp

ROOT = Path(__file__).resolve().parents[2]
N, NI = 9, 9


NE = N  # equalities of the perturbed problem


def optnet_qp(perturb: bool = False):
    """The QP; ``perturb``: inequality 3 gets an extra ``y0/10`` (one coefficient changed), and
    ``NE`` equalities ``A_k y + y_k² / 2 = b_k`` (a family of their own, which puts ``λ_k`` into
    the Hessian's row ``k``) are added."""
    y = sp.Matrix(sp.symbols(f"y0:{N}"))
    Q = sp.Matrix(N, N, sp.symbols(f"Q0:{N * N}"))
    q = sp.Matrix(sp.symbols(f"q0:{N}"))
    G = sp.Matrix(NI, N, sp.symbols(f"G0:{NI * N}"))
    h = sp.Matrix(sp.symbols(f"h0:{NI}"))
    ineq = list(G * y - h)
    params = {"Q": Q, "q": q, "G": G, "h": h}
    eq = None
    if perturb:
        ineq[3] = ineq[3] + y[0] / 10
        A = sp.Matrix(NE, N, sp.symbols(f"A0:{NE * N}"))
        b = sp.Matrix(sp.symbols(f"b0:{NE}"))
        params.update(A=A, b=b)
        eq = [e + y[k] ** 2 / 2 for k, e in enumerate(A * y - b)]
    return ic.Problem((y.T * Q * y)[0] / 2 + (q.T * y)[0], variables={"y": y},
                      params=params, inequalities=ineq, equalities=eq)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return compile_both(optnet_qp, tmp_path_factory, tol=1e-12, return_multipliers=True)


def _kernel(src: str, name: str) -> list[str]:
    lines = src.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"def {name}("))
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" "))
    return lines[start:end]


def _loops(src: str, name: str) -> int:
    return sum(1 for line in _kernel(src, name) if line.lstrip().startswith("for r in range("))


def _source(layer) -> str:
    return Path(layer.kernels.module.__file__).read_text()


def _instance(B, seed):
    rng = np.random.default_rng(seed)
    Q = np.empty((B, N, N))
    for b in range(B):
        L = rng.standard_normal((N, N))
        Q[b] = L @ L.T + 0.5 * np.eye(N)
    q = 2 * rng.standard_normal((B, N))
    G = rng.standard_normal((B, NI, N))
    h = rng.uniform(0.1, 1.0, (B, NI))  # y = 0 strictly feasible
    return Q, q, G, h


def test_interior_point_kernels_are_loops_over_families(pair):
    fam, straight = pair
    src = _source(fam)
    # ip_eval: the gradient rows (one stationarity family) and the constraint rows with
    # their Jacobian rows; ip_obj: the q_i y_i terms and the y_j (Q y)_j / 2 terms;
    # ip_hess: the stationarity rows' derivatives in y
    assert (_loops(src, "ip_eval"), _loops(src, "ip_obj"), _loops(src, "ip_hess")) == (2, 2, 1)
    assert "Jg[i, s" in "\n".join(_kernel(src, "ip_eval"))
    assert "H[i, s" in "\n".join(_kernel(src, "ip_hess"))
    # the straight-line reference has an entry per line and no loop
    ref = _source(straight)
    for name in ("ip_eval", "ip_obj", "ip_hess"):
        assert _loops(ref, name) == 0
    assert sum(1 for line in _kernel(ref, "ip_eval") if line.lstrip().startswith("Jg[")) == NI * N
    assert len(_kernel(src, "ip_hess")) < len(_kernel(ref, "ip_hess"))


def test_family_qp_agrees_with_straight_line_and_the_exact_reference(pair):
    fam, straight = pair
    B = 5
    Q, q, G, h = _instance(B, seed=3)
    w = np.random.default_rng(4).standard_normal((B, N))
    out = {}
    for name, layer in (("fam", fam), ("straight", straight)):
        ts = [torch.tensor(a, requires_grad=True) for a in (Q, q, G, h)]
        y, nu = layer(*ts)  # (no equalities: no lam)
        (y * torch.tensor(w)).sum().backward()
        out[name] = [y.detach().numpy(), nu.detach().numpy()] + [t.grad.numpy() for t in ts]
    for a, b in zip(out["fam"], out["straight"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    y, nu, gQ, gq, gG, gh = out["fam"]
    actives = set()
    for b in range(B):
        A0, b0 = np.zeros((0, N)), np.zeros(0)
        y_ref, lam_ref, nu_ref, S = solve_qp(Q[b], q[b], G[b], h[b], A0, b0)
        _, grads = qp_vjp(Q[b], q[b], G[b], h[b], A0, b0, w[b])
        actives.add(len(S))
        assert grads["margin"] > 1e-3  # strictly complementary: the reference gradients apply
        np.testing.assert_allclose(y[b], y_ref, rtol=0, atol=1e-9)
        np.testing.assert_allclose(nu[b], nu_ref, rtol=0, atol=1e-9)
        np.testing.assert_allclose(gQ[b], grads["Q"], rtol=0, atol=1e-8)
        np.testing.assert_allclose(gq[b], grads["q"], rtol=0, atol=1e-8)
        np.testing.assert_allclose(gG[b], grads["G"], rtol=0, atol=1e-8)
        np.testing.assert_allclose(gh[b], grads["h"], rtol=0, atol=1e-8)
    assert len(actives) > 1 and max(actives) > 0  # samples with different active sets


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory):
    problem = optnet_qp(perturb=True)
    return problem, ic.compile(problem, cache_dir=tmp_path_factory.mktemp("perturbed"))


def test_perturbed_row_is_not_merged(perturbed):
    problem, layer = perturbed
    src = _source(layer)
    ev = "\n".join(_kernel(src, "ip_eval"))
    # g[3] is straight-line; the other 8 rows are the constraint family
    assert "    g[3] = " in ev
    assert f"{NI - 1} constraints g[i] =" in ev
    # nu3 * y0 / 10 changes stationarity row 0 only: 8 rows left in the family
    assert f"{N - 1} residuals gradf[i] =" in ev
    assert "    gradf[0] = " in ev
    # the equalities are one family: h[i] and Jh[i, :] in a loop
    assert f"{NE} constraints h[i] =" in ev and "Jh[i, s" in ev
    # the Hessian loop reads the multipliers of the equalities through the table
    assert "lam[s" in "\n".join(_kernel(src, "ip_hess"))


def test_perturbed_kernels_match_sympy(perturbed):
    """ip_eval, ip_obj and ip_hess of the family-compiled module against SymPy, entry by entry."""
    problem, layer = perturbed
    mod, tab = layer.kernels.module, layer.kernels.tab
    rng = np.random.default_rng(7)
    yv, p = rng.standard_normal(N), rng.standard_normal(len(problem.params))
    nuv, lamv = rng.uniform(0.1, 2.0, NI), rng.standard_normal(NE)
    sub = dict(zip(problem.variables, yv)) | dict(zip(problem.params, p)) | dict(zip(problem.nu, nuv))
    sub |= dict(zip(problem.lam, lamv))
    gradf, g, Jg = np.zeros(N), np.zeros(NI), np.full((NI, N), np.nan)
    hh, Jh = np.zeros(NE), np.full((NE, N), np.nan)
    mod.ip_eval(yv, p, gradf, hh, Jh, g, Jg, tab)
    H = np.full((N, N), np.nan)
    mod.ip_hess(yv, lamv, nuv, p, H, tab)
    f = mod.ip_obj(yv, p, tab)

    def num(e):
        return float(sp.sympify(e).xreplace(sub))

    y = problem.variables
    np.testing.assert_allclose(gradf, [num(sp.diff(problem.f, s)) for s in y], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(g, [num(c) for c in problem.inequalities], rtol=1e-13, atol=1e-13)
    Jg_ref = [[num(sp.diff(c, s)) for s in y] for c in problem.inequalities]
    np.testing.assert_allclose(Jg, Jg_ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(hh, [num(c) for c in problem.equalities], rtol=1e-13, atol=1e-13)
    Jh_ref = [[num(sp.diff(c, s)) for s in y] for c in problem.equalities]
    np.testing.assert_allclose(Jh, Jh_ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(H, np.array(problem.hessian.xreplace(sub), dtype=float), rtol=1e-13, atol=1e-13)
    assert f == pytest.approx(num(problem.f), rel=1e-13, abs=1e-13)


_GEN = """
import hashlib, sys
sys.path.insert(0, {root!r})
from tests.problem.test_qp_families import optnet_qp
from implicit_compiler.codegen.emit_problem import emit_problem_module
p = optnet_qp(perturb=True)
print(hashlib.sha256(emit_problem_module(p, p.system.layout(), "k").encode()).hexdigest(), p.content_hash())
"""


def test_source_is_deterministic_across_hash_seeds():
    outs = set()
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        p = subprocess.run([sys.executable, "-c", _GEN.format(root=str(ROOT))], env=env, capture_output=True,
                           text=True, timeout=300, cwd=ROOT)
        assert p.returncode == 0, p.stderr
        outs.add(p.stdout.strip())
    assert len(outs) == 1
    problem = optnet_qp(perturb=True)
    here = hashlib.sha256(emit_problem_module(problem, problem.system.layout(), "k").encode()).hexdigest()
    assert outs == {f"{here} {problem.content_hash()}"}


# ---------------------------------------------------------------- the differentiation engine

def test_symengine_gradient_is_sympys_with_the_users_symbols():
    y = sp.symbols("y0:6", real=True)
    a = sp.symbols("a0:6")
    L = sum(a[i] * y[i] * y[(i + 1) % 6] ** 2 for i in range(6)) + sp.exp(y[0] * a[1]) - sp.log(1 + y[2] ** 2) / 3
    fast = gradient(L, y, engine="symengine")
    slow = [sp.diff(L, s) for s in y]
    for f, s in zip(fast, slow):
        assert sp.expand(f - s) == 0
        # assumptions survive the round trip: the symbols are the user's objects
        assert f.free_symbols <= set(y) | set(a)
    assert sympy_gradient(L, y) == slow


@pytest.mark.parametrize("extra", [sp.Abs(sp.Symbol("y0")), sp.Float("0.1") * sp.Symbol("y1"),
                                   sp.Symbol("y0") ** sp.Symbol("y1"), sp.Function("u")(sp.Symbol("y1"))])
def test_unsupported_nodes_fall_back_to_sympy(extra):
    y = sp.symbols("y0:2")
    e = y[0] ** 2 * y[1] + extra
    assert gradient(e, y, engine="symengine") == [sp.diff(e, s) for s in y]
