"""Redundant equality constraints: the assignment constraints of SMAC (row and column sums of a k x k
matrix have rank 2k - 1) are reduced exactly at compile time, so the KKT system is regular and
dy*/dθ exists although the original multipliers are not unique."""

import numpy as np
import pytest
import sympy as sp
import torch

import implicit_compiler as ic
from implicit_compiler import Status
from implicit_compiler.errors import InconsistentConstraintsError, SystemDefinitionError


def assignment(k: int, prefix: str = "y"):
    """Variables of a k x k assignment matrix (row-major) and its row and column sums (as given:
    rows first, then columns)."""
    y = sp.Matrix(sp.symbols(f"{prefix}0:{k * k}"))
    Y = y.reshape(k, k)
    return y, [sum(Y[i, :]) for i in range(k)], [sum(Y[:, j]) for j in range(k)]


def smac_problem(k: int) -> ic.Problem:
    """The paper's eq. 21: argmax yᵀMy / yᵀy s.t. C y = 1, y >= 0 (M symmetric: its upper triangle)."""
    y, rows, cols = assignment(k)
    N = k * k
    iu = np.triu_indices(N)
    m = sp.symbols(f"m0:{len(iu[0])}")
    M = sp.zeros(N, N)
    for t, (i, j) in enumerate(zip(*iu)):
        M[i, j] = M[j, i] = m[t]
    return ic.Problem((y.T * M * y)[0] / (y.T * y)[0], variables={"y": y}, params={"m": list(m)},
                      equalities=[s - 1 for s in rows + cols], inequalities=[-v for v in y],
                      maximize=True, name=f"smac_{k * k}")  # the name examples/spectral_matching.py uses: one module


# ---------------------------------------------------------------------- symbolic reduction
@pytest.mark.parametrize("k", [2, 3, 4])
def test_assignment_constraints_lose_exactly_one_row(k):
    p = smac_problem(k)
    assert len(p.equalities_as_given) == 2 * k
    assert p.equality_rows == tuple(range(2 * k - 1))  # the first independent rows are kept
    (red,) = p.redundant_equalities
    assert red.index == 2 * k - 1 and red.check is None and red.mismatch == 0
    # the dropped column sum is (sum of row sums) - (the other column sums), exactly
    comb = dict(red.combination)
    assert comb == {**{i: 1 for i in range(k)}, **{k + j: -1 for j in range(k - 1)}}
    combined = sum((c * p.equalities_as_given[j] for j, c in red.combination), sp.S.Zero)
    assert sp.expand(combined - red.constraint) == 0
    assert [str(s) for s in p.lam] == [f"lam{i}" for i in range(2 * k - 1)]
    assert len(p.system.unknowns) == k * k + (2 * k - 1) + k * k
    assert p.layout()["equalities"]["redundant"][0]["index"] == 2 * k - 1


def test_inconsistent_constant_parts_raise():
    y, rows, cols = assignment(2)
    with pytest.raises(InconsistentConstraintsError, match=r"inconsistent.*h\[3\] = h\[0\] \+ h\[1\] - h\[2\]"):
        ic.Problem((y.T * y)[0], variables={"y": y}, equalities=[rows[0] - 1, rows[1] - 1, cols[0] - 1, cols[1] - 2])
    # a constraint without variables is a zero row: 0 = 1 cannot hold
    with pytest.raises(InconsistentConstraintsError, match="does not depend on the variables"):
        ic.Problem((y.T * y)[0], variables={"y": y}, equalities=[rows[0] - 1, y[0] - y[0] + 1])


def test_float_constants_agree_to_rounding():
    # 0.1 + 0.2 and 0.15 + 0.15 differ in their last bits: consistent data, not an error
    y, rows, cols = assignment(2)
    p = ic.Problem((y.T * y)[0], variables={"y": y},
                   equalities=[rows[0] - 0.1, rows[1] - 0.2, cols[0] - 0.15, cols[1] - 0.15])
    assert [r.index for r in p.redundant_equalities] == [3]
    with pytest.raises(InconsistentConstraintsError):
        ic.Problem((y.T * y)[0], variables={"y": y},
                   equalities=[rows[0] - 0.1, rows[1] - 0.2, cols[0] - 0.15, cols[1] - 0.1500001])


def test_parameter_dependent_constants():
    y, rows, cols = assignment(2)
    r, c = sp.symbols("r0:2"), sp.symbols("c0:2")
    p = ic.Problem((y.T * y)[0], variables={"y": y}, params={"r": list(r), "c": list(c)},
                   equalities=[rows[0] - r[0], rows[1] - r[1], cols[0] - c[0], cols[1] - c[1]])
    (red,) = p.redundant_equalities
    # consistent only where r0 + r1 = c0 + c1: an affine test on the flat parameters (r0, r1, c0, c1)
    assert sp.expand(red.mismatch - (r[0] + r[1] - c[0] - c[1])) == 0
    assert red.check == (((0, 1.0), (1, 1.0), (2, -1.0), (3, -1.0)), 0.0)
    # the same dependency written into the constraints holds for every value: nothing to check
    p = ic.Problem((y.T * y)[0], variables={"y": y}, params={"r": list(r), "c": [c[0]]},
                   equalities=[rows[0] - r[0], rows[1] - r[1], cols[0] - c[0], cols[1] - (r[0] + r[1] - c[0])])
    assert p.redundant_equalities[0].check is None
    # not affine: refused, naming the constraint
    with pytest.raises(SystemDefinitionError, match=r"equality constraint 3 .*not affine in the parameters"):
        ic.Problem((y.T * y)[0], variables={"y": y}, params={"r": list(r), "c": list(c)},
                   equalities=[rows[0] - r[0], rows[1] - r[1], cols[0] - c[0], cols[1] - sp.exp(c[1])])


def test_independent_and_nonlinear_constraints_are_unchanged():
    y = sp.Matrix(sp.symbols("y0:3"))
    t = sp.Symbol("t")
    eqs = [y[0] + y[1] - 1, y[1] - y[2] - t, (y.T * y)[0] - 2]
    p = ic.Problem((y.T * y)[0] + t * y[0], variables={"y": y}, params=[t], equalities=eqs)
    assert p.equalities == eqs and p.equalities_as_given == eqs
    assert p.redundant_equalities == () and p.equality_rows == (0, 1, 2)
    assert [str(s) for s in p.lam] == ["lam0", "lam1", "lam2"]
    assert p.layout() == p.system.layout()  # no "equalities" entry: the module is what it was
    # a coefficient that involves a parameter is not constant-linear: never examined
    y2, rows, cols = assignment(2)
    a = sp.Symbol("a")
    p = ic.Problem((y2.T * y2)[0], variables={"y": y2}, params=[a],
                   equalities=[rows[0] - 1, rows[1] - 1, cols[0] - 1, a * cols[1] - 1])
    assert p.redundant_equalities == () and len(p.equalities) == 4


# ---------------------------------------------------------------------- SMAC layers
def _smac_data(k, B, seed):
    """Non-negative symmetric affinities (as graph matching builds them), upper triangles."""
    rng = np.random.default_rng(seed)
    N = k * k
    A = rng.uniform(0, 1, (B, N, N))
    A = A + A.transpose(0, 2, 1)
    iu = np.triu_indices(N)
    return A[:, iu[0], iu[1]], rng


@pytest.mark.parametrize("k", [2, 3])
def test_smac_solution_and_gradient_against_finite_differences(k):
    p = smac_problem(k)
    layer = ic.compile(p)  # warm-up at the zero start, where yᵀMy / yᵀy is 0/0, succeeds
    N, B = k * k, 4
    P, rng = _smac_data(k, B, seed=k)
    y0 = np.full(N, 1.0 / k)
    res = layer.solve(P, y0=y0)
    assert (res.status == Status.CONVERGED).all(), res.summary()
    Y = res.y[:, :N]
    # every constraint as given holds, the dropped column sum included
    C = np.array([[float(sp.diff(h, s)) for s in p.variables] for h in p.equalities_as_given])
    np.testing.assert_allclose(Y @ C.T, 1.0, rtol=0, atol=1e-13)
    assert (Y >= -1e-14).all()
    # a local maximum: no feasible direction of the face increases the Rayleigh quotient
    iu = np.triu_indices(N)
    M = np.zeros((B, N, N))
    M[:, iu[0], iu[1]] = P
    M[:, iu[1], iu[0]] = P
    R = np.einsum("bi,bij,bj->b", Y, M, Y) / (Y * Y).sum(1)
    _, _, Vt = np.linalg.svd(C)
    Z = Vt[len(p.equalities):].T  # null space of C (the 2k - 1 independent rows)
    for b in range(B):
        for d in Z.T:
            for eps in (1e-4, -1e-4):
                yb = Y[b] + eps * d
                if (yb >= 0).all():
                    assert yb @ M[b] @ yb / (yb @ yb) <= R[b] + 1e-12
    # the starting value for the default (zero) start: NONFINITE per sample, not an exception
    assert (layer.solve(P).status == Status.NONFINITE).all()

    def forward(Pv):
        r = layer.solve(Pv, y0=y0)
        assert (r.status == Status.CONVERGED).all(), r.summary()
        return r.y[:, :N]

    m = torch.tensor(P, requires_grad=True)
    y = layer(m, y0=torch.tensor(y0))
    w = rng.normal(size=(B, N))
    (y * torch.tensor(w)).sum().backward()
    h = 1e-5
    fd = np.zeros_like(P)
    for j in range(P.shape[1]):
        Pp, Pm = P.copy(), P.copy()
        Pp[:, j] += h
        Pm[:, j] -= h
        fd[:, j] = ((forward(Pp) - forward(Pm)) * w).sum(1) / (2 * h)
    np.testing.assert_allclose(m.grad.numpy(), fd, rtol=0, atol=2e-9 * max(1.0, np.abs(fd).max()))


def test_report_names_the_dropped_constraint():
    p = smac_problem(2)
    text = ic.report(p, sections=["redundant_equalities"]).text()
    assert "1 of 4 equality constraints dropped" in text
    assert "h[3] = h[0] + h[1] - h[2] in the variables" in text
    assert "agree exactly" in text
    layer = ic.compile(p)
    assert "Redundant equality constraints" in ic.report(layer, sections=["redundant_equalities"]).text()
    assert "dropped (redundant): y1 + y3 - 1 = 0" in layer.source
    assert "1 redundant dropped" in repr(layer)


# ---------------------------------------------------------------------- parameter-dependent right-hand sides
K = 3


@pytest.fixture(scope="module")
def projection():
    """Projection of a target t onto the matrices with row sums r and column sums c: a QP with a
    closed form, y = t - Cᵀ (C Cᵀ)⁺ (C t - b), whose constraints are consistent only where
    Σ r = Σ c (checked per sample)."""
    y, rows, cols = assignment(K)
    t, r, c = sp.symbols(f"t0:{K * K}"), sp.symbols(f"r0:{K}"), sp.symbols(f"c0:{K}")
    f = sum(((yi - ti) ** 2 for yi, ti in zip(y, t)), sp.S.Zero) / 2
    p = ic.Problem(f, variables={"y": y}, params={"t": list(t), "r": list(r), "c": list(c)},
                   equalities=[s - v for s, v in zip(rows + cols, list(r) + list(c))], name="projection")
    C = np.array([[float(sp.diff(h, s)) for s in y] for h in p.equalities_as_given])
    return p, C


def _closed_form(C, T, b):
    G = np.linalg.pinv(C @ C.T)
    return T - (C.T @ G @ (C @ T.T - b.T)).T, np.eye(C.shape[1]) - C.T @ G @ C, C.T @ G


def test_projection_matches_closed_form_and_flags_inconsistent_samples(projection):
    p, C = projection
    (red,) = p.redundant_equalities
    assert red.check is not None
    layer = ic.compile(p, on_failure="nan", return_multipliers=True)
    rng = np.random.default_rng(5)
    B = 5
    T = rng.normal(size=(B, K * K))
    r = rng.uniform(0.5, 2, (B, K))
    c = rng.uniform(0.5, 2, (B, K))
    c *= (r.sum(1) / c.sum(1))[:, None]  # consistent marginals ...
    c[3, 0] += 1e-3  # ... except in sample 3
    tt, rt, ct = (torch.tensor(a, requires_grad=True) for a in (T, r, c))
    (y, lam), info = layer(tt, rt, ct, return_info=True)
    status = info.status.numpy()
    assert status[3] == Status.INFEASIBLE and (np.delete(status, 3) == Status.CONVERGED).all()
    assert torch.isnan(y[3]).all()
    b = np.concatenate([r, c], axis=1)
    Y, dY_dt, dY_db = _closed_form(C, T, b)
    ok = [0, 1, 2, 4]
    np.testing.assert_allclose(y.detach().numpy()[ok], Y[ok], rtol=0, atol=1e-12)
    # multipliers: those of the kept constraints; spread over the given ones, the dropped one is zero
    assert lam.shape == (B, 2 * K - 1)
    full = layer.equality_multipliers(lam)
    assert full.shape == (B, 2 * K) and (full[:, 2 * K - 1] == 0).all()
    # stationarity with the multipliers as given: y - t + Cᵀ λ = 0
    np.testing.assert_allclose((Y - T + full.detach().numpy() @ C)[ok], 0, atol=1e-12)
    # gradients against the closed form (dy/dt = I - Cᵀ(CCᵀ)⁺C, dy/db = Cᵀ(CCᵀ)⁺), sample 3 left out
    w = rng.normal(size=(B, K * K))
    (y[ok] * torch.tensor(w[ok])).sum().backward()
    np.testing.assert_allclose(tt.grad.numpy()[ok], w[ok] @ dY_dt, atol=1e-12)
    # b = (r, c) may only move along Σ r = Σ c (else there is no solution): the gradient is the reduced
    # problem's, in which the dropped constraint's c2 does not appear, and it is exact along those moves
    gb = w[ok] @ dY_db
    g = np.concatenate([rt.grad.numpy(), ct.grad.numpy()], axis=1)[ok]
    assert (g[:, -1] == 0).all()
    normal = np.concatenate([np.ones(K), -np.ones(K)])
    along = np.eye(2 * K) - np.outer(normal, normal) / (normal @ normal)
    np.testing.assert_allclose(g @ along, gb @ along, atol=1e-12)
    assert np.abs(g - gb).max() > 1e-3  # (the closed form's pinv is another choice off those moves)
    assert torch.isnan(tt.grad[3]).all()  # on_failure="nan": NaN values, NaN gradients


def test_custom_forward_may_return_multipliers_as_given(projection):
    p, C = projection
    nq = C.shape[0]

    def forward(T, r, c):
        # the closed form with the minimum-norm multipliers (all 2k of them, none zero)
        b = np.concatenate([r, c], axis=1)
        Y, _, _ = _closed_form(C, T, b)
        lam = np.linalg.lstsq(C.T, (T - Y).T, rcond=None)[0].T
        return Y, lam, np.zeros((len(T), 0))

    layer = ic.compile(p, forward=forward, return_multipliers=True)
    rng = np.random.default_rng(6)
    T = rng.normal(size=(3, K * K))
    r = rng.uniform(0.5, 2, (3, K))
    c = r[:, ::-1].copy()
    y, lam = layer(torch.tensor(T), torch.tensor(r), torch.tensor(c))
    lam_given = forward(T, r, c)[1]
    assert np.abs(lam_given[:, nq - 1]).min() > 1e-3
    # the same stationarity, the dropped multiplier folded into the kept ones
    full = layer.equality_multipliers(lam).numpy()
    np.testing.assert_allclose(full @ C, lam_given @ C, atol=1e-12)
    assert (full[:, nq - 1] == 0).all()
    with pytest.raises(ValueError, match="returned 4 equality multipliers per sample; the problem has 5 "
                                         r"\(or 6, one per equality as given\)"):
        ic.compile(p, forward=lambda T, r, c: (forward(T, r, c)[0], np.zeros((len(T), 4)), np.zeros((len(T), 0))),
                   warmup=False).solve(T, r, c)
