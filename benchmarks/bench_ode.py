"""Stiff ODE layers against scipy's solve_ivp and torchdiffeq (run by hand, not in CI).

Problems: Robertson to t = 1e5 (rate constants varied by up to ±10 % across the batch) and van der
Pol with mu = 1000 (varied ±10 %) to t = 3000, at rtol = 1e-6. For each: B = 1 and B = 1024, forward
and forward+backward of the ODE layer (radau5, esdirk), against a loop of scipy's Radau and BDF with the
analytic Jacobian over the batch (forward only; timed on ``--scipy-samples`` samples and scaled to the
batch, stated in the table) and torchdiffeq (batched dopri5 ``odeint`` and ``odeint_adjoint``, with no
step cap, each in a child process stopped after ``--tdq-minutes`` of wall time (default 10), with the
time it had reached). Accuracy: the largest error against a tight reference (scipy Radau, rtol 1e-11,
atol 1e-15 scaled) on the first ``--ref-samples`` samples, in units of the tolerance
``atol + rtol |x_ref|``.

Run: ``python benchmarks/bench_ode.py`` (``--quick``: B = 64 instead of 1024, fewer samples).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import sympy as sp
import torch
from scipy.integrate import solve_ivp

import implicit_compiler as ic

f64 = torch.float64
t_sym = sp.Symbol("t")


def robertson():
    y1, y2, y3, k1, k2, k3 = sp.symbols("y1 y2 y3 k1 k2 k3")
    ode = ic.ODE([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k2 * y2**2 - k3 * y2 * y3, k2 * y2**2], [y1, y2, y3],
                 {"k": [k1, k2, k3]}, time=t_sym, name="robertson")

    def f(t, y, k1, k2, k3):
        return [-k1 * y[0] + k3 * y[1] * y[2], k1 * y[0] - k2 * y[1] ** 2 - k3 * y[1] * y[2], k2 * y[1] ** 2]

    def jac(t, y, k1, k2, k3):
        return [[-k1, k3 * y[2], k3 * y[1]], [k1, -2 * k2 * y[1] - k3 * y[2], -k3 * y[1]], [0, 2 * k2 * y[1], 0]]

    def torch_f(p):
        k1, k2, k3 = p[:, 0:1], p[:, 1:2], p[:, 2:3]

        def rhs(t, y):
            a, b, c = y[:, 0:1], y[:, 1:2], y[:, 2:3]
            return torch.cat([-k1 * a + k3 * b * c, k1 * a - k2 * b**2 - k3 * b * c, k2 * b**2], 1)
        return rhs

    nominal = np.array([0.04, 3e7, 1e4])
    te = np.concatenate([[0.0], np.logspace(-5, 5, 11)])
    return dict(name="Robertson, t to 1e5", ode=ode, f=f, jac=jac, torch_f=torch_f, nominal=nominal,
                x0=np.array([1.0, 0.0, 0.0]), t_eval=te, rtol=1e-6, atol=1e-10)


def van_der_pol():
    u, v, mu = sp.symbols("u v mu")
    ode = ic.ODE([v, mu * (1 - u**2) * v - u], [u, v], [mu], time=t_sym, name="vdp")

    def f(t, y, mu):
        return [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]]

    def jac(t, y, mu):
        return [[0, 1], [-2 * mu * y[0] * y[1] - 1, mu * (1 - y[0] ** 2)]]

    def torch_f(p):
        mu = p[:, 0:1]

        def rhs(t, y):
            a, b = y[:, 0:1], y[:, 1:2]
            return torch.cat([b, mu * (1 - a**2) * b - a], 1)
        return rhs

    return dict(name="van der Pol mu=1000, t to 3000", ode=ode, f=f, jac=jac, torch_f=torch_f,
                nominal=np.array([1000.0]), x0=np.array([2.0, 0.0]), t_eval=np.linspace(0.0, 3000.0, 31),
                rtol=1e-6, atol=1e-8)


PROBLEMS = {"robertson": robertson, "vdp": van_der_pol}


def params(prob, B, seed=0):
    rng = np.random.default_rng(seed)
    p = prob["nominal"][None, :] * (1 + 0.1 * rng.uniform(-1, 1, size=(B, prob["nominal"].size)))
    p[0] = prob["nominal"]
    return p


def reference(prob, P, S):
    te = prob["t_eval"]
    out = []
    for b in range(S):
        r = solve_ivp(prob["f"], (te[0], te[-1]), prob["x0"], method="Radau", t_eval=te, rtol=1e-11,
                      atol=1e-15, jac=prob["jac"], args=tuple(P[b]))
        out.append(r.y.T)
    return np.stack(out)


def err_units(x, ref, prob):
    return float(np.max(np.abs(x - ref) / (prob["atol"] + prob["rtol"] * np.abs(ref))))


def bench_layer(prob, method, P, ref, reps):
    layer = ic.compile(prob["ode"], method=method, rtol=prob["rtol"], atol=prob["atol"])
    B = P.shape[0]
    te = torch.tensor(prob["t_eval"], dtype=f64)
    x0 = torch.tensor(prob["x0"], dtype=f64).expand(B, -1).contiguous()
    Pt = torch.tensor(P, dtype=f64)
    w = torch.randn(B, len(te), x0.shape[1], dtype=f64, generator=torch.Generator().manual_seed(0))
    fwd, both = np.inf, np.inf
    for _ in range(reps):
        with torch.no_grad():
            t0 = time.perf_counter()
            out, info = layer(x0, Pt, t_eval=te, return_info=True)
            fwd = min(fwd, time.perf_counter() - t0)
        xg, pg = x0.clone().requires_grad_(), Pt.clone().requires_grad_()
        t0 = time.perf_counter()
        o = layer(xg, pg, t_eval=te)
        (o * w).sum().backward()
        both = min(both, time.perf_counter() - t0)
    e = err_units(out[:ref.shape[0]].numpy(), ref, prob)
    return dict(fwd=fwd, both=both, err=e, steps=float(info.steps.double().mean()))


def bench_scipy(prob, method, P, ref, S):
    te = prob["t_eval"]
    outs = []
    t0 = time.perf_counter()
    for b in range(S):
        r = solve_ivp(prob["f"], (te[0], te[-1]), prob["x0"], method=method, t_eval=te, rtol=prob["rtol"],
                      atol=prob["atol"], jac=prob["jac"], args=tuple(P[b]))
        outs.append(r.y.T)
    per = (time.perf_counter() - t0) / S
    e = err_units(np.stack(outs)[:ref.shape[0]], ref, prob)
    return dict(per_sample=per, err=e)


def _torchdiffeq_child(key, P, ref, adjoint, progress, result):
    """Run in a fresh process: batched dopri5 ``odeint`` (or ``odeint_adjoint``) and backward, with no
    step cap; ``progress`` holds the furthest time the right-hand side was evaluated at and the number
    of evaluations, so the parent can say what a run it stopped had reached."""
    import torchdiffeq

    prob = PROBLEMS[key]()
    B = P.shape[0]
    te = torch.tensor(prob["t_eval"], dtype=f64)
    x0 = torch.tensor(prob["x0"], dtype=f64).expand(B, -1).contiguous().requires_grad_()

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.tensor(P, dtype=f64))

        def forward(self, t, y):
            progress[0] = max(progress[0], float(t.detach()))
            progress[1] += 1
            return prob["torch_f"](self.p)(t, y)

    fn = F()
    solve = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
    t0 = time.perf_counter()
    out = solve(fn, x0, te, method="dopri5", rtol=prob["rtol"], atol=prob["atol"],
                options=dict(max_num_steps=2**31 - 1))
    out.sum().backward()
    both = time.perf_counter() - t0
    result[0] = both
    result[1] = err_units(out.detach()[:ref.shape[0]].numpy(), ref, prob)


def bench_torchdiffeq(key, P, ref, minutes, adjoint):
    """torchdiffeq in a child process, stopped after ``minutes`` of wall time if it has not finished."""
    import importlib.util
    import multiprocessing as mp

    if importlib.util.find_spec("torchdiffeq") is None:
        return dict(note="torchdiffeq not installed")
    ctx = mp.get_context("spawn")
    progress = ctx.RawArray("d", [-np.inf, 0.0])
    result = ctx.RawArray("d", [np.nan, np.nan])  # fwd+bwd seconds, error
    proc = ctx.Process(target=_torchdiffeq_child, args=(key, P, ref, adjoint, progress, result))
    t0 = time.perf_counter()
    proc.start()
    proc.join(timeout=60.0 * minutes)
    if proc.is_alive():
        proc.terminate()
        proc.join()
        te = PROBLEMS[key]()["t_eval"]
        return dict(note=f"did not finish within {minutes:g} min: reached t = {progress[0]:.3g} of {te[-1]:g} "
                         f"after {int(progress[1])} right-hand-side evaluations")
    if proc.exitcode != 0 or np.isnan(result[0]):
        return dict(note=f"failed (exit code {proc.exitcode}) after {time.perf_counter() - t0:.1f} s")
    return dict(both=result[0], err=result[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scipy-samples", type=int, default=16)
    ap.add_argument("--ref-samples", type=int, default=4)
    ap.add_argument("--tdq-minutes", type=float, default=10.0,
                    help="wall-time limit of each torchdiffeq run (it has no step cap)")
    ap.add_argument("--no-tdq-b1", action="store_true", help="run torchdiffeq at the large batch only")
    ap.add_argument("--problems", default="robertson,vdp")
    args = ap.parse_args()
    os.environ.setdefault("IMPLICIT_COMPILER_CACHE", "/tmp/implicit_compiler_bench")
    big = 64 if args.quick else 1024
    S = min(args.scipy_samples, 4 if args.quick else args.scipy_samples)
    rows = []
    for key in args.problems.split(","):
        prob = PROBLEMS[key]()
        P_all = params(prob, big)
        ref = reference(prob, P_all, args.ref_samples)
        print(f"\n## {prob['name']} (rtol {prob['rtol']}, atol {prob['atol']})")
        print("| solver | B | forward | fwd+bwd | error (tol units) | note |")
        print("| --- | --- | --- | --- | --- | --- |")
        sc = {m: bench_scipy(prob, m, P_all, ref[:S], S) for m in ("Radau", "BDF")}
        for B in (1, big):
            P = P_all[:B]
            r_ref = ref[:min(B, ref.shape[0])]
            for method in ("radau5", "esdirk"):
                r = bench_layer(prob, method, P, r_ref, 3 if B == 1 else 1)
                row = (f"| ic {method} | {B} | {r['fwd'] * 1e3:.1f} ms | {r['both'] * 1e3:.1f} ms | {r['err']:.2g} "
                       f"| {r['steps']:.0f} steps/sample |")
                print(row, flush=True)
                rows.append((prob["name"], B, method, r))
            best = min((r for n_, b_, m_, r in rows if n_ == prob["name"] and b_ == B), key=lambda r: r["both"])
            print(f"| ratio | {B} | | scipy Radau loop (forward) / best ic fwd+bwd: "
                  f"{sc['Radau']['per_sample'] * B / best['both']:.1f}x | | |", flush=True)
            for m, s in sc.items():
                note = f"loop; timed on {S} samples, scaled" if B > 1 else "one solve"
                print(f"| scipy {m} + jac | {B} | {s['per_sample'] * B * 1e3:.1f} ms | (no gradient) | {s['err']:.2g} "
                      f"| {note} |", flush=True)
            for adj in (False, True):
                if B == 1 and args.no_tdq_b1:
                    continue
                r = bench_torchdiffeq(key, P, r_ref, args.tdq_minutes, adj)
                name = "torchdiffeq dopri5 " + ("odeint_adjoint" if adj else "odeint")
                if "note" in r:
                    print(f"| {name} | {B} | | | | {r['note']} |", flush=True)
                else:
                    print(f"| {name} | {B} | | {r['both'] * 1e3:.1f} ms | {r['err']:.2g} | |", flush=True)


if __name__ == "__main__":
    main()
