"""OptNet-style QP layer: implicit_compiler against qpth and cvxpylayers, measured in one run.

    min_y  1/2 yᵀ Q y + qᵀ y   s.t.  G y <= h,     10 variables, 10 inequalities,
    Q = L Lᵀ + 0.1 I shared, q per sample, G and h shared (as in OptNet's MNIST layer).

Forward + backward (``y.sum().backward()`` w.r.t. all four parameters) at batch 1, 128, 1024.
Run by hand from the repository root::

    python benchmarks/bench_qp.py            # needs qpth and/or cvxpylayers for the references
    python benchmarks/bench_qp.py --quick    # fewer repeats, no cvxpylayers at batch 1024

Two traps in comparing against qpth are avoided: qpth returns the batch *mean* gradient for
parameters passed without a batch dimension (we pass expanded tensors and sum), and its Q
gradient is not symmetrised (we compare (G + Gᵀ)/2).
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit
import warnings
from pathlib import Path

import numpy as np
import sympy as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import implicit_compiler as ic  # noqa: E402

N = NI = 10


def build_layer():
    y = sp.Matrix(sp.symbols(f"y0:{N}"))
    Q = sp.Matrix(N, N, sp.symbols(f"Q0:{N * N}"))
    q = sp.Matrix(sp.symbols(f"q0:{N}"))
    G = sp.Matrix(NI, N, sp.symbols(f"G0:{NI * N}"))
    h = sp.Matrix(sp.symbols(f"h0:{NI}"))
    problem = ic.Problem((y.T * Q * y)[0] / 2 + (q.T * y)[0], variables={"y": y},
                         params={"Q": Q, "q": q, "G": G, "h": h}, inequalities=list(G * y - h), name="optnet_qp")
    t = time.perf_counter()
    layer = ic.compile(problem, tol=1e-10)
    return layer, time.perf_counter() - t


def instance(B, seed=0):
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((N, N))
    Q = L @ L.T + 0.1 * np.eye(N)
    q = rng.standard_normal((B, N))
    G = rng.standard_normal((NI, N))
    h = rng.uniform(0.5, 1.5, NI)
    return Q, q, G, h


def time_call(fn, repeat, number):
    fn()
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def bench_batch(layer, B, repeat, QPFunction, cp, with_cvx):
    Q, q, G, h = instance(B)
    number = max(1, 200 // B)
    rows = []

    def ours():
        ts = [torch.tensor(a, requires_grad=True) for a in (Q, q, G, h)]
        y = layer(*ts)
        y.sum().backward()
        return y, ts

    t_ours = time_call(ours, repeat, number)
    y_ours, g_ours = ours()
    res = layer.solve(Q, q, G, h)
    clean = res.weakly_active == 0  # samples whose gradient is unique
    rows.append((B, "implicit_compiler", t_ours, "", f"({(~clean).sum()} weakly active samples)"))
    if QPFunction is not None:
        def theirs():
            ts = [torch.tensor(np.broadcast_to(Q, (B, N, N)).copy(), requires_grad=True),
                  torch.tensor(q, requires_grad=True),
                  torch.tensor(np.broadcast_to(G, (B, NI, N)).copy(), requires_grad=True),
                  torch.tensor(np.broadcast_to(h, (B, NI)).copy(), requires_grad=True)]
            e = torch.empty(0, dtype=torch.float64)
            y = QPFunction(verbose=-1, eps=1e-12, maxIter=50)(ts[0], ts[1], ts[2], ts[3], e, e)
            y.sum().backward()
            return y, ts

        t_q = time_call(theirs, repeat, number)
        y_q, g_q = theirs()
        dy = (y_ours - y_q).abs().max().item()
        # per-sample gradient of q (the batched parameter) on samples with a unique gradient
        dg = (g_q[1].grad - g_ours[1].grad)[torch.from_numpy(clean)].abs().max().item()
        rows.append((B, "qpth", t_q, f"{t_q / t_ours:.1f}x", f"{dy:.1e} / {dg:.1e}"))
    if cp is not None and with_cvx:
        from cvxpylayers.torch import CvxpyLayer

        Lc = np.linalg.cholesky(Q)
        yv = cp.Variable(N)
        qp_, Gp, hp = cp.Parameter(N), cp.Parameter((NI, N)), cp.Parameter(NI)
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Lc.T @ yv) + qp_ @ yv), [Gp @ yv <= hp])
        cl = CvxpyLayer(prob, parameters=[qp_, Gp, hp], variables=[yv])

        def cvx():
            qt = torch.tensor(q, requires_grad=True)
            Gt = torch.tensor(np.broadcast_to(G, (B, NI, N)).copy(), requires_grad=True)
            ht = torch.tensor(np.broadcast_to(h, (B, NI)).copy(), requires_grad=True)
            (y,) = cl(qt, Gt, ht, solver_args={"eps": 1e-9})
            y.sum().backward()
            return y, qt

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_c = time_call(cvx, 1 if B > 1 else repeat, 1)
            y_c, q_c = cvx()
        dy = (y_ours - y_c).abs().max().item()
        dg = (q_c.grad - g_ours[1].grad)[torch.from_numpy(clean)].abs().max().item()
        rows.append((B, "cvxpylayers (eps=1e-9)", t_c, f"{t_c / t_ours:.1f}x", f"{dy:.1e} / {dg:.1e}"))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    repeat = 3 if args.quick else 7
    layer, compile_s = build_layer()
    print(f"implicit_compiler {ic.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"QP layer compile: {compile_s:.1f} s (cache hit: {layer.compile_report['cache_hit']})")
    try:
        from qpth.qp import QPFunction
    except ImportError:
        QPFunction = None
    try:
        import cvxpy as cp
    except ImportError:
        cp = None
    rows = []
    for B in (1, 128, 1024):
        rows += bench_batch(layer, B, repeat, QPFunction, cp, with_cvx=not (args.quick and B == 1024))
    head = "max|dy| / max|d grad_q| (unique-gradient samples)"
    print(f"\n{'batch':>6}  {'implementation':<24} {'fwd+bwd':>10}  {'ref/ours':>8}  {head}")
    for B, name, t, ratio, diff in rows:
        unit = f"{t * 1e3:8.2f} ms" if t >= 1e-3 else f"{t * 1e6:8.1f} us"
        print(f"{B:>6}  {name:<24} {unit:>10}  {ratio:>8}  {diff}")
    print("\ntarget: >= 5x faster than qpth at batch 128 and 1024, same solution to 1e-6")


if __name__ == "__main__":
    main()
