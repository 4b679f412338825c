"""Scale benchmark: compile time and memory against system size (run by hand, not in CI).

    python benchmarks/bench_scale.py                 # every case, each in a fresh process
    python benchmarks/bench_scale.py --cases bratu-1000 dense-100 --timeout 900

For each case a fresh subprocess with an empty cache directory builds the SymPy system
(timed on its own: "build", the user's SymPy, e.g. the matrix product ``yᵀ Q y``), compiles
it (derivation + code generation + Numba: "cold compile", timed from the built system to a
warmed-up layer) and runs forward + backward through torch at the stated
batch; the parent prints one table. Columns: unknowns, parameters, families found,
generated lines, cold compile seconds, peak resident memory of the subprocess, forward +
backward milliseconds (min of 5 after a warm-up) and, where a reference exists, the
same for the reference measured in the same subprocess and the ratio ours / reference.

The runtime drivers are compiled once per installation and cached with the package;
run once before measuring (``--prime``) so that cost is not charged to the first case.

References: Bratu's is a hand-written Numba damped Newton with the Thomas algorithm
(``prange`` over the batch) and the same backward (one tridiagonal transpose solve).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    # name: (builder, batch)
    "appendix": ("appendix", 1000),
    "qp-10-10": ("qp:10:10", 128),
    "qp-100-50": ("qp:100:50", 16),
    "bratu-50": ("bratu:50", 1000),
    "bratu-1000": ("bratu:1000", 100),
    "bratu-10000": ("bratu:10000", 1),  # (condition number ~1e8: solved with singular_tol=1e-12)
    "dense-100": ("dense:100", 100),
    "ncut-32": ("ncut:32", 8),
    "ncut-48": ("ncut:48", 8),
    "ncut-64": ("ncut:64", 8),
}


# ---------------------------------------------------------------- systems (built in the subprocess)

def build(spec):
    import sympy as sp

    import implicit_compiler as ic

    kind, *args = spec.split(":")
    if kind == "appendix":
        x = sp.Symbol("x")
        y1, y2 = sp.symbols("y1 y2")
        return ic.ResidualSystem([x**2 + y1**2 + y2**2 - 4, x * y1 - 1], unknowns=[y1, y2], params={"x": x})
    if kind == "bratu":
        n = int(args[0])
        u = sp.symbols(f"u0:{n}")
        lam = sp.Symbol("lam")
        h2 = sp.Integer(n + 1) ** 2
        res = [((u[i - 1] if i else 0) - 2 * u[i] + (u[i + 1] if i < n - 1 else 0)) * h2 + lam * sp.exp(u[i])
               for i in range(n)]
        return ic.ResidualSystem(res, unknowns=list(u), params={"lam": lam})
    if kind == "dense":
        n = int(args[0])
        y = sp.symbols(f"y0:{n}")
        A = sp.Matrix(n, n, sp.symbols(f"a0:{n * n}"))
        b = sp.symbols(f"b0:{n}")
        t = [sp.tanh(v) for v in y]
        res = [y[i] + sum(A[i, j] * t[j] for j in range(n)) - b[i] for i in range(n)]
        return ic.ResidualSystem(res, unknowns={"y": list(y)}, params={"A": A, "b": list(b)})
    if kind == "qp":
        n, m = int(args[0]), int(args[1])
        y = sp.Matrix(sp.symbols(f"y0:{n}"))
        L = sp.Matrix(n, n, sp.symbols(f"Q0:{n * n}"))
        q = sp.Matrix(sp.symbols(f"q0:{n}"))
        G = sp.Matrix(m, n, sp.symbols(f"G0:{m * n}"))
        h = sp.Matrix(sp.symbols(f"h0:{m}"))
        return ic.Problem((y.T * L * y)[0] / 2 + (q.T * y)[0], variables={"y": y},
                          params={"Q": L, "q": q, "G": G, "h": h}, inequalities=list(G * y - h))
    if kind == "ncut":
        k = int(args[0])
        v = [[sp.Symbol(f"v_{r}_{c}") for c in range(k)] for r in range(k)]
        lam = sp.Symbol("lam")
        w = {}
        for r in range(k):
            for c in range(k):
                if c + 1 < k:
                    w[(r, c), (r, c + 1)] = sp.Symbol(f"wh_{r}_{c}")
                if r + 1 < k:
                    w[(r, c), (r + 1, c)] = sp.Symbol(f"wv_{r}_{c}")
        nb = {}
        for (a, b), s in w.items():
            nb.setdefault(a, []).append((b, s))
            nb.setdefault(b, []).append((a, s))
        res, norm = [], []
        for r in range(k):
            for c in range(k):
                d = sum(s for _, s in nb[(r, c)])
                res.append(sum(s * (v[r][c] - v[b[0]][b[1]]) for b, s in nb[(r, c)]) - lam * d * v[r][c])
                norm.append(d * v[r][c] ** 2)
        # (one Add of all terms: ``norm += term`` rebuilds the growing sum, quadratic in k²)
        res.append(sp.Add(*norm) - 1)
        params = {"wh": [w[(r, c), (r, c + 1)] for r in range(k) for c in range(k - 1)],
                  "wv": [w[(r, c), (r + 1, c)] for r in range(k - 1) for c in range(k)]}
        return ic.ResidualSystem(res, unknowns={"v": [s for row in v for s in row], "lam": lam}, params=params)
    raise ValueError(spec)


def thomas_reference(n):
    """Hand-written batched Newton + Thomas algorithm for Bratu, forward and backward."""
    import numpy as np
    from numba import njit, prange

    h2 = float((n + 1) ** 2)

    @njit(cache=False, parallel=True)
    def solve(lam, Y, D):
        for b in prange(lam.shape[0]):
            y = np.zeros(n)
            F = np.empty(n)
            c = np.empty(n)
            d = np.empty(n)
            for _ in range(50):
                for i in range(n):
                    left = y[i - 1] if i > 0 else 0.0
                    right = y[i + 1] if i < n - 1 else 0.0
                    F[i] = (left - 2 * y[i] + right) * h2 + lam[b] * np.exp(y[i])
                    D[b, i] = -2 * h2 + lam[b] * np.exp(y[i])
                # Thomas: sub/super diagonal h2
                c[0] = h2 / D[b, 0]
                d[0] = -F[0] / D[b, 0]
                for i in range(1, n):
                    m = D[b, i] - h2 * c[i - 1]
                    c[i] = h2 / m
                    d[i] = (-F[i] - h2 * d[i - 1]) / m
                step = d[n - 1]
                y[n - 1] += d[n - 1]
                mx = abs(step)
                for i in range(n - 2, -1, -1):
                    d[i] -= c[i] * d[i + 1]
                    y[i] += d[i]
                    mx = max(mx, abs(d[i]))
                if mx < 1e-12:
                    break
            for i in range(n):
                Y[b, i] = y[i]
                D[b, i] = -2 * h2 + lam[b] * np.exp(y[i])

    @njit(cache=False, parallel=True)
    def vjp(lam, Y, D, G, out):
        for b in prange(lam.shape[0]):
            c = np.empty(n)
            d = np.empty(n)
            c[0] = h2 / D[b, 0]
            d[0] = G[b, 0] / D[b, 0]
            for i in range(1, n):
                m = D[b, i] - h2 * c[i - 1]
                c[i] = h2 / m
                d[i] = (G[b, i] - h2 * d[i - 1]) / m
            s = 0.0
            v = d[n - 1]
            s += v * np.exp(Y[b, n - 1])
            for i in range(n - 2, -1, -1):
                v = d[i] - c[i] * v
                s += v * np.exp(Y[b, i])
            out[b] = -s

    return solve, vjp


# ---------------------------------------------------------------- one case, in this process

def ncut_start(k, wh, wv):
    """Per sample, the second-smallest generalised eigenpair of ``(L, D)`` on the k x k grid with
    horizontal weights ``wh`` and vertical ``wv`` (the layout of ``build("ncut:k")``), scaled to
    ``vᵀ D v = 1``: the initial guess of the ncut cases."""
    import numpy as np
    import scipy.sparse as sps
    from scipy.sparse.linalg import eigsh

    idx = np.arange(k * k).reshape(k, k)
    rows = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
    cols = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
    V, LAM = [], []
    for b in range(wh.shape[0]):
        w = np.concatenate([wh[b], wv[b]])
        W = sps.coo_matrix((w, (rows, cols)), shape=(k * k, k * k))
        W = (W + W.T).tocsc()
        d = np.asarray(W.sum(axis=1)).ravel()
        L = sps.diags(d) - W
        vals, vecs = eigsh(L.tocsc(), k=2, M=sps.diags(d).tocsc(), sigma=-1e-6, which="LM")
        j = int(np.argsort(vals)[1])
        v = vecs[:, j] / np.sqrt(vecs[:, j] @ (d * vecs[:, j]))
        V.append(v * (1.0 if v[0] >= 0 else -1.0))
        LAM.append(vals[j])
    import torch

    return {"v": torch.tensor(np.array(V)), "lam": torch.tensor(np.array(LAM))}


def run_case(name, spec, batch):
    import numpy as np
    import torch

    import implicit_compiler as ic

    t0 = time.perf_counter()
    system = build(spec)
    built = time.perf_counter()
    # Bratu-10000's Jacobian has condition number ~1e8 (the discrete Laplacian's ~n^2): the
    # default singular_tol (1e-8) classifies it SINGULAR_AT_SOLUTION, so it is solved with 1e-12.
    layer = ic.compile(system, **({"singular_tol": 1e-12} if spec == "bratu:10000" else {}))
    cold = time.perf_counter() - built
    src = Path(layer.kernels.module.__file__).read_text()
    kkt = getattr(system, "system", system)
    d = kkt.derivation
    out = {"case": name, "unknowns": kkt.n_unknowns, "params": kkt.n_params, "families": len(d.families),
           "lines": src.count("\n"), "build_s": built - t0, "cold_s": cold, "batch": batch}
    gen = torch.Generator().manual_seed(0)
    if spec.startswith("qp"):
        n, m = (int(a) for a in spec.split(":")[1:])
        Lm = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
        args = [Lm @ Lm.transpose(1, 2) + torch.eye(n, dtype=torch.float64),
                torch.randn(batch, n, generator=gen, dtype=torch.float64),
                torch.randn(batch, m, n, generator=gen, dtype=torch.float64),
                torch.rand(batch, m, generator=gen, dtype=torch.float64)]
    elif spec.startswith("bratu"):
        args = [1.0 + 2.0 * torch.rand(batch, generator=gen, dtype=torch.float64)]
    elif spec.startswith("dense"):
        n = int(spec.split(":")[1])
        args = [0.5 / n * torch.randn(batch, n, n, generator=gen, dtype=torch.float64),
                torch.randn(batch, n, generator=gen, dtype=torch.float64)]
    elif spec.startswith("ncut"):
        k = int(spec.split(":")[1])
        args = [0.5 + torch.rand(batch, k * (k - 1), generator=gen, dtype=torch.float64),
                0.5 + torch.rand(batch, k * (k - 1), generator=gen, dtype=torch.float64)]
    else:
        args = [0.75 + 0.5 * torch.rand(batch, generator=gen, dtype=torch.float64)]
    params = [a.clone().requires_grad_(True) for a in args]

    kw = {"y0": torch.tensor([1.0, 1.0], dtype=torch.float64)} if spec == "appendix" else {}
    if spec.startswith("ncut"):
        # Newton from zero finds no eigenpair: start from the Fiedler pair of each sample's (L, D)
        kw = {"y0": ncut_start(int(spec.split(":")[1]), args[0].numpy(), args[1].numpy())}

    def ours():
        y = layer(*params, **kw)
        y.sum().backward()
        return y

    def timed(fn, reps=5):
        fn()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    if spec.startswith("ncut"):
        # the bordered eigen-system factors by sparse elimination unless a pivot check fails
        # (then that sample is factored by dense LU): how many samples needed that, and did all converge
        _, info = layer(*args, **kw, return_info=True)
        out["note"] = (f"{int(info.converged.sum())}/{batch} converged, {int(info.dense_fallback.sum())} by dense LU, "
                       f"order {layer.kernels.module.ELIMINATION_ORDER}")
    try:
        out["fwd_bwd_ms"] = 1e3 * timed(ours)
    except ic.ConvergenceError as exc:
        out["fwd_bwd_ms"] = None
        out["note"] = str(exc).splitlines()[0]
    if spec.startswith("bratu"):
        n = int(spec.split(":")[1])
        solve, vjp = thomas_reference(n)
        lam = args[0].numpy()
        Y, D = np.empty((batch, n)), np.empty((batch, n))
        G, g = np.ones((batch, n)), np.empty(batch)

        def ref():
            solve(lam, Y, D)
            vjp(lam, Y, D, G, g)

        out["ref_ms"] = 1e3 * timed(ref)
        y = layer(params[0].detach())
        out["ref_max_diff"] = float(np.abs(y.numpy() - Y).max())
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ---------------------------------------------------------------- driver

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--prime", action="store_true", help="compile the runtime drivers first")
    a = ap.parse_args(argv)
    if a.one:
        spec, batch = CASES[a.one]
        print("RESULT " + json.dumps(run_case(a.one, spec, batch)))
        return
    if a.prime:
        subprocess.run([sys.executable, __file__, "--one", "appendix"], cwd=ROOT, check=True,
                       env=dict(os.environ, IMPLICIT_COMPILER_CACHE=tempfile.mkdtemp()))
    rows = []
    for name in a.cases:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, IMPLICIT_COMPILER_CACHE=cache, PYTHONPATH=str(ROOT))
            t = time.perf_counter()
            try:
                p = subprocess.run([sys.executable, __file__, "--one", name], cwd=ROOT, env=env, capture_output=True,
                                   text=True, timeout=a.timeout)
                got = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
                if got:
                    rows.append(json.loads(got[-1][7:]))
                else:
                    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
                    rows.append({"case": name, "note": f"failed: {tail[:100]}"})
            except subprocess.TimeoutExpired:
                rows.append({"case": name, "note": f"did not finish in {time.perf_counter() - t:.0f} s"})
        print(json.dumps(rows[-1]), flush=True)
    cols = ["case", "unknowns", "params", "families", "lines", "build_s", "cold_s", "peak_mb", "batch", "fwd_bwd_ms",
            "ref_ms"]
    print()
    print(" | ".join(f"{c:>11}" for c in cols) + " | ratio | note")
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:>11.3g}" if isinstance(v, float) else f"{'' if v is None else v:>11}")
        ratio = r["fwd_bwd_ms"] / r["ref_ms"] if r.get("ref_ms") and r.get("fwd_bwd_ms") else None
        print(" | ".join(cells) + f" | {'' if ratio is None else f'{ratio:.2f}':>5} | {r.get('note', '')}")


if __name__ == "__main__":
    main()
