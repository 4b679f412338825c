"""OptNet-style QP layer: implicit_compiler against qpth and cvxpylayers, measured in one run.

    min_y  1/2 yᵀ Q y + qᵀ y   s.t.  G y <= h,     10 variables, 10 inequalities,
    Q = L Lᵀ + 0.1 I shared, q per sample, G and h shared (as in OptNet's MNIST layer).

Forward + backward (``y.sum().backward()`` w.r.t. all four parameters) at batch 1, 128, 1024.
Run by hand from the repository root::

    python benchmarks/bench_qp.py            # needs qpth and/or cvxpylayers for the references
    python benchmarks/bench_qp.py --quick    # fewer repeats, no cvxpylayers at batch 1024

``--sweep`` measures runtime against the number of QP variables (the x-axis of the paper's fig. 4) instead:
n = 10, 20, 50, 100 variables with n/2 inequalities (``--sizes``, ``--ineq``), a training-like batch of 128
(``--batch``), forward and backward timed separately for both layers, and this project's compile time per n,
cold (a fresh subprocess with an empty kernel cache: derivation, code generation and Numba) and cached (a second
fresh subprocess loading the first one's cache). The cached subprocess also runs the timings and checks our
solution and gradients against qpth's in the same run::

    python benchmarks/bench_qp.py --sweep
    python benchmarks/bench_qp.py --sweep --sizes 10 20 --batch 64 --timeout 300

qpth runs with its defaults there (eps 1e-12, at most 20 iterations: what OptNet trains with).

Two traps in comparing against qpth are avoided: qpth returns the batch *mean* gradient for
parameters passed without a batch dimension (we pass expanded tensors and sum), and its Q
gradient is not symmetrised (we compare (G + Gᵀ)/2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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


# ---------------------------------------------------------------- --sweep: runtime against the number of variables

def sweep_problem(n, m):
    y = sp.Matrix(sp.symbols(f"y0:{n}"))
    Q = sp.Matrix(n, n, sp.symbols(f"Q0:{n * n}"))
    q = sp.Matrix(sp.symbols(f"q0:{n}"))
    G = sp.Matrix(m, n, sp.symbols(f"G0:{m * n}"))
    h = sp.Matrix(sp.symbols(f"h0:{m}"))
    return ic.Problem((y.T * Q * y)[0] / 2 + (q.T * y)[0], variables={"y": y},
                      params={"Q": Q, "q": q, "G": G, "h": h}, inequalities=list(G * y - h), name=f"sweep_qp_{n}_{m}")


def sweep_instance(n, m, B, seed=0):
    """Q = L Lᵀ / n + 0.1 I (eigenvalues O(1) at every n), shared G with unit-norm rows on average, h > 0 so
    y = 0 is strictly feasible, q per sample: a mix of active and inactive constraints at the solution."""
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((n, n))
    Q = L @ L.T / n + 0.1 * np.eye(n)
    q = rng.standard_normal((B, n))
    G = rng.standard_normal((m, n)) / np.sqrt(n)
    h = rng.uniform(0.1, 0.5, m)
    return Q, q, G, h


def fwd_bwd_times(fn, args, gy, repeat):
    """Min over ``repeat`` calls of the forward and of the backward (``y.backward(gy)``), after one warm-up.
    ``fn(*leaves)`` builds the graph; leaves are fresh tensors requiring grad each time."""
    best_f = best_b = float("inf")
    for r in range(repeat + 1):
        leaves = [torch.tensor(a, requires_grad=True) for a in args]
        t0 = time.perf_counter()
        y = fn(*leaves)
        t1 = time.perf_counter()
        y.backward(gy)
        t2 = time.perf_counter()
        if r:
            best_f, best_b = min(best_f, t1 - t0), min(best_b, t2 - t1)
    return best_f, best_b, y.detach(), [t.grad for t in leaves]


def sweep_one(n, m, B, phase, repeat):
    """One subprocess's work: compile (timed) and, in the cached phase, time and compare against qpth."""
    problem = sweep_problem(n, m)
    t0 = time.perf_counter()
    layer = ic.compile(problem, tol=1e-10)
    out = {"n": n, "m": m, "phase": phase, "compile_s": time.perf_counter() - t0,
           "cache_hit": layer.compile_report["cache_hit"]}
    if phase == "cold":
        return out
    Q, q, G, h = sweep_instance(n, m, B)
    gy = torch.from_numpy(np.random.default_rng(1).standard_normal((B, n)))
    f, b, y, grads = fwd_bwd_times(layer, (Q, q, G, h), gy, repeat)
    status = layer.solve(Q, q, G, h)
    clean = torch.from_numpy(status.weakly_active == 0)
    out.update(ours_fwd=f, ours_bwd=b, weakly_active=int((~clean).sum()))
    try:
        from qpth.qp import QPFunction
    except ImportError:
        out["note"] = "qpth not installed (pip install --no-deps qpth==0.0.18): no reference"
        return out
    e = torch.empty(0, dtype=torch.float64)
    solve = QPFunction(verbose=-1)

    def theirs(Qt, qt, Gt, ht):  # shared leaves expanded: autograd sums their gradient over the batch
        return solve(Qt.expand(B, n, n), qt, Gt.expand(B, m, n), ht.expand(B, m), e, e)

    fq, bq, yq, gq = fwd_bwd_times(theirs, (Q, q, G, h), gy, repeat)
    out.update(qpth_fwd=fq, qpth_bwd=bq)
    out["max_dy"] = (y - yq).abs().max().item()
    out["max_dy_rel"] = out["max_dy"] / y.abs().max().item()
    # gradients relative to their size: q per sample on the samples with a unique gradient; Q, G, h summed over
    # the batch (a weakly active sample's share is one of its one-sided derivatives in both layers, not the
    # same one, so those are reported with the count of such samples)
    rel = lambda a, b: ((a - b).abs().max() / a.abs().max()).item()  # noqa: E731
    out["grad_q_rel"] = rel(grads[1][clean], gq[1][clean]) if clean.any() else float("nan")
    out["grad_QGh_rel"] = max(rel(grads[i], gq[i]) for i in (0, 2, 3))
    return out


def run_sweep(sizes, ineq_ratio, B, repeat, timeout, threads=None):
    rows = []
    for n in sizes:
        m = max(1, round(ineq_ratio * n))
        row = {"n": n, "m": m}
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, IMPLICIT_COMPILER_CACHE=cache)
            for phase in ("cold", "cached"):
                cmd = [sys.executable, __file__, "--sweep-one", str(n), str(m), str(B), phase, str(repeat)]
                cmd += ["--threads", str(threads)] if threads else []
                t = time.perf_counter()
                try:
                    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
                except subprocess.TimeoutExpired:
                    row["note"] = f"{phase} phase did not finish in {time.perf_counter() - t:.0f} s (--timeout)"
                    break
                got = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
                if not got:
                    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
                    row["note"] = f"{phase} phase failed: {tail[:120]}"
                    break
                r = json.loads(got[-1][7:])
                row[f"{phase}_s"] = r.pop("compile_s")
                if phase == "cold" and r["cache_hit"]:
                    row["note"] = "the cold phase hit a cache: not a cold compile"
                r.pop("phase"), r.pop("cache_hit")
                row.update(r)
        print(json.dumps(row), flush=True)
        rows.append(row)
    ms = lambda v: f"{1e3 * v:9.2f}" if isinstance(v, float) else f"{'-':>9}"  # noqa: E731
    ratio = lambda a, b: f"{a / b:6.1f}x" if isinstance(a, float) and isinstance(b, float) else f"{'-':>7}"  # noqa: E731
    sec = lambda v: f"{v:7.1f}" if isinstance(v, float) else f"{'-':>7}"  # noqa: E731
    print(f"\nbatch {B}, {threads or 'default'} thread(s), times in ms (min of {repeat}); compile in s; "
          "ratios qpth / ours measured in this run")
    print(f"{'n':>4} {'m':>4} | {'ours fwd':>9} {'qpth fwd':>9} {'ratio':>7} | {'ours bwd':>9} {'qpth bwd':>9} "
          f"{'ratio':>7} | {'cold':>7} {'cached':>7} | max|dy|/|y|  grad_q   grad_QGh  weak")
    for r in rows:
        diff = (f"{r['max_dy_rel']:.1e}   {r['grad_q_rel']:.1e}  {r['grad_QGh_rel']:.1e}  {r['weakly_active']:>4}"
                if "max_dy_rel" in r else "")
        print(f"{r['n']:>4} {r['m']:>4} | {ms(r.get('ours_fwd'))} {ms(r.get('qpth_fwd'))} "
              f"{ratio(r.get('qpth_fwd'), r.get('ours_fwd'))} | {ms(r.get('ours_bwd'))} {ms(r.get('qpth_bwd'))} "
              f"{ratio(r.get('qpth_bwd'), r.get('ours_bwd'))} | {sec(r.get('cold_s'))} {sec(r.get('cached_s'))} | "
              f"{diff} {r.get('note', '')}")
    print("(grad_q: per-sample gradient of q on samples without weakly active constraints, relative to its largest "
          "entry; grad_QGh: the batch-summed gradients of the shared Q, G, h, same measure; weak: samples with a "
          "weakly active constraint)")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="runtime and compile time against the number of variables")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 50, 100])
    ap.add_argument("--ineq", type=float, default=0.5, help="inequalities per variable in --sweep")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess in --sweep")
    ap.add_argument("--threads", type=int, help="torch and Numba threads in --sweep (default: each library's own)")
    ap.add_argument("--sweep-one", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sweep_one:
        n, m, B, phase, repeat = args.sweep_one
        if args.threads:
            import numba

            torch.set_num_threads(args.threads)
            numba.set_num_threads(args.threads)
        print("RESULT " + json.dumps(sweep_one(int(n), int(m), int(B), phase, int(repeat))))
        return
    if args.sweep:
        print(f"implicit_compiler {ic.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
        run_sweep(args.sizes, args.ineq, args.batch, 3 if args.quick else 7, args.timeout, args.threads)
        return
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
