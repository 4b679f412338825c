"""QP layers against an exact active-set reference (to 1e-10), with qpth (OptNet) and cvxpylayers
as a second opinion: solutions and gradients of every parameter group."""

import numpy as np
import pytest
import qpth.qp
import sympy as sp
import torch

import implicit_compiler as ic

from .qp_reference import qp_vjp, solve_qp

N, NI, NE = 4, 6, 1


@pytest.fixture(scope="module")
def qp_layer():
    y = sp.Matrix(sp.symbols(f"y0:{N}"))
    Q = sp.Matrix(N, N, sp.symbols(f"Q0:{N * N}"))
    q = sp.Matrix(sp.symbols(f"q0:{N}"))
    G = sp.Matrix(NI, N, sp.symbols(f"G0:{NI * N}"))
    h = sp.Matrix(sp.symbols(f"h0:{NI}"))
    A = sp.Matrix(NE, N, sp.symbols(f"A0:{NE * N}"))
    b = sp.Matrix(sp.symbols(f"b0:{NE}"))
    problem = ic.Problem(
        objective=(y.T * Q * y)[0] / 2 + (q.T * y)[0],
        variables={"y": y},
        params={"Q": Q, "q": q, "G": G, "h": h, "A": A, "b": b},
        inequalities=list(G * y - h),
        equalities=list(A * y - b),
    )
    return ic.compile(problem, tol=1e-11)


def _instance(B, seed=0):
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((N, N))
    Q = L @ L.T + 0.5 * np.eye(N)
    q = rng.standard_normal((B, N)) * 2
    G = rng.standard_normal((NI, N))
    h = rng.uniform(0.1, 1.0, NI)  # y = 0 is strictly feasible for the inequalities
    A = rng.standard_normal((NE, N))
    b = np.array([0.05])
    return Q, q, G, h, A, b


def _expand(arrs, B):
    return [torch.tensor(np.broadcast_to(a, (B,) + a.shape).copy(), requires_grad=True) for a in arrs]


def test_qp_matches_qpth_solution_and_gradients(qp_layer):
    B = 6
    Q, q, G, h, A, b = _instance(B)
    ours = _expand([Q], B) + [torch.tensor(q, requires_grad=True)] + _expand([G, h, A, b], B)
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    y, info = qp_layer(*ours, return_info=True)
    assert info.converged.all()
    y_ref = qpth.qp.QPFunction(verbose=-1, eps=1e-12, maxIter=50)(*theirs)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    # some inequalities active, some inactive
    slack = h[None] - q[:, :0].sum(1, keepdims=True) - (y.detach().numpy() @ G.T)
    assert (np.abs(slack) < 1e-6).any() and (slack > 1e-3).any()
    w = torch.randn(B, N, dtype=torch.float64)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    names = ["Q", "q", "G", "h", "A", "b"]
    for name, a, r in zip(names, ours, theirs):
        ga, gr = a.grad, r.grad
        if name == "Q":  # qpth's Q gradient is not symmetrised
            ga, gr = (ga + ga.transpose(1, 2)) / 2, (gr + gr.transpose(1, 2)) / 2
        torch.testing.assert_close(ga, gr, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside cvxpylayers/diffcp with numpy 2
def test_qp_matches_cvxpylayers(qp_layer):
    cp = pytest.importorskip("cvxpy")
    cvxpylayers = pytest.importorskip("cvxpylayers.torch")
    B = 4
    Q, q, G, h, A, b = _instance(B, seed=1)
    Lc = np.linalg.cholesky(Q)
    yv = cp.Variable(N)
    qp, hp, bp = cp.Parameter(N), cp.Parameter(NI), cp.Parameter(NE)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Lc.T @ yv) + qp @ yv), [G @ yv <= hp, A @ yv == bp])
    layer = cvxpylayers.CvxpyLayer(prob, parameters=[qp, hp, bp], variables=[yv])
    qt = torch.tensor(q, requires_grad=True)
    ht = torch.tensor(np.broadcast_to(h, (B, NI)).copy(), requires_grad=True)
    bt = torch.tensor(np.broadcast_to(b, (B, NE)).copy(), requires_grad=True)
    (y_ref,) = layer(qt, ht, bt, solver_args={"eps": 1e-10, "max_iters": 100000})
    q2, h2, b2 = (t.detach().clone().requires_grad_() for t in (qt, ht, bt))
    y = qp_layer(torch.tensor(Q), q2, torch.tensor(G), h2, torch.tensor(A), b2)
    torch.testing.assert_close(y, y_ref.to(torch.float64), rtol=0, atol=1e-5)
    w = torch.randn(B, N, dtype=torch.float64)
    (y_ref * w).sum().backward()
    (y * w).sum().backward()
    for a, r in ((q2, qt), (h2, ht), (b2, bt)):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-3, atol=1e-4)


def test_qp_gradcheck_and_shared_parameters(qp_layer):
    Q, q, G, h, A, b = _instance(3, seed=2)
    ts = [torch.tensor(a, requires_grad=True) for a in (Q, q, G, h, A, b)]
    y = qp_layer(*ts)
    assert y.shape == (3, N)
    assert torch.autograd.gradcheck(lambda *a: qp_layer(*a), ts, eps=1e-6, atol=1e-5)


def test_kkt_objects_are_inspectable(qp_layer):
    problem = qp_layer.system
    assert len(problem.kkt.stationarity) == N
    assert len(problem.kkt.primal_feasibility) == NE
    assert len(problem.kkt.complementarity) == NI
    assert str(problem.nu[0]) == "nu0" and str(problem.lam[0]) == "lam0"
    Q = sp.Matrix(N, N, sp.symbols(f"Q0:{N * N}"))
    assert problem.hessian == (Q + Q.T) / 2
    assert "ip_eval" in qp_layer.source


def test_multipliers_as_outputs():
    y = sp.Symbol("y")
    t = sp.Symbol("t")
    p = ic.Problem((y - t) ** 2, variables=[y], params=[t], inequalities=[y <= 1])
    layer = ic.compile(p, return_multipliers=True)
    ts = torch.tensor([[3.0], [0.0]], dtype=torch.float64, requires_grad=True)
    yy, nu = layer(ts)
    torch.testing.assert_close(yy[:, 0], torch.tensor([1.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-9)
    # stationarity 2 (y - t) + nu = 0  ->  nu = 2 (t - 1) when active, 0 when inactive
    torch.testing.assert_close(nu[:, 0], torch.tensor([4.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-8)
    nu.sum().backward()
    torch.testing.assert_close(ts.grad[:, 0], torch.tensor([2.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-8)


def _random_qp(rng, b_value=0.05):
    L = rng.standard_normal((N, N))
    Q = L @ L.T + 0.5 * np.eye(N) + 0.3 * rng.standard_normal((N, N))  # not symmetric: only (Q + Q^T)/2 counts
    while np.linalg.eigvalsh((Q + Q.T) / 2).min() < 0.3:
        Q = Q + 0.5 * np.eye(N)
    q = rng.standard_normal(N) * 2
    G = rng.standard_normal((NI, N))
    h = rng.uniform(0.1, 1.0, NI)
    A = rng.standard_normal((NE, N))
    b = np.array([b_value])
    return Q, q, G, h, A, b


def test_active_set_reference_agrees_with_finite_differences():
    # the reference's own derivative formulas, checked once by central differences of its solution
    rng = np.random.default_rng(11)
    Q, q, G, h, A, b = _random_qp(rng)
    ybar = rng.standard_normal(N)
    y, grads = qp_vjp(Q, q, G, h, A, b, ybar)
    assert grads["margin"] > 1e-3 and len(grads["active"]) > 0
    params = dict(Q=Q, q=q, G=G, h=h, A=A, b=b)
    for name, val in params.items():
        fd = np.zeros_like(val)
        for idx in np.ndindex(val.shape):
            hi = {k: v.copy() for k, v in params.items()}
            lo = {k: v.copy() for k, v in params.items()}
            hi[name][idx] += 1e-6
            lo[name][idx] -= 1e-6
            fd[idx] = ybar @ (solve_qp(**hi)[0] - solve_qp(**lo)[0]) / 2e-6
        np.testing.assert_allclose(grads[name], fd, rtol=1e-6, atol=1e-7, err_msg=name)


def test_qp_matches_exact_active_set_reference(qp_layer):
    """Several random QPs (one equality, six inequalities, some active): the solution and the
    gradients of all six parameter groups agree with the exact reference to 1e-10."""
    rng = np.random.default_rng(5)
    names = ["Q", "q", "G", "h", "A", "b"]
    cases = []
    while len(cases) < 6:
        inst = _random_qp(rng, b_value=rng.uniform(-0.3, 0.3))
        ybar = rng.standard_normal(N)
        y_ref, g_ref = qp_vjp(*inst, ybar)
        if g_ref["margin"] > 1e-4:  # strict complementarity: the derivative exists
            cases.append((inst, ybar, y_ref, g_ref))
    assert sum(len(c[3]["active"]) > 0 for c in cases) >= 3  # most have active inequalities
    assert any(len(c[3]["active"]) == 0 for c in cases) or any(len(c[3]["active"]) >= 2 for c in cases)
    # one batched call: every group per sample
    ts = [torch.tensor(np.stack([c[0][k] for c in cases]), requires_grad=True) for k in range(6)]
    y, info = qp_layer(*ts, return_info=True)
    assert info.converged.all()
    np.testing.assert_allclose(y.detach().numpy(), np.stack([c[2] for c in cases]), rtol=0, atol=1e-10)
    w = torch.tensor(np.stack([c[1] for c in cases]))
    (y * w).sum().backward()
    for k, name in enumerate(names):
        ref = np.stack([c[3][name] for c in cases])
        got = ts[k].grad.numpy()
        if name == "Q":  # only the symmetric part of Q enters the problem
            got = (got + got.transpose(0, 2, 1)) / 2
        scale = 1.0 + np.abs(ref).max()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10 * scale, err_msg=f"gradient of {name}")
