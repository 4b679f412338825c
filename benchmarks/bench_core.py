"""Core benchmarks of implicit_compiler against references measured in the same run.

Run by hand (not part of CI), from the repository root::

    python benchmarks/bench_core.py            # full run (several minutes on a cold kernel cache)
    python benchmarks/bench_core.py --quick    # fewer repeats, smaller largest batch
    python benchmarks/bench_core.py --threading-layer workqueue   # pick the Numba threading layer

The package is imported from the repository (the script puts the repository root
on ``sys.path``). Compiled layers go to the usual kernel cache
(``$IMPLICIT_COMPILER_CACHE``, else ``~/.cache/implicit_compiler``); the compile
figures of case (c) always use fresh temporary cache directories.

Cases
-----
(a) Appendix system ``x^2 + y1^2 + y2^2 - 4 = 0, x*y1 - 1 = 0`` (unknowns y1, y2,
    parameter x in [0.75, 1.25]), forward + backward through torch
    (``y = layer(xs, y0=...); y.sum().backward()``) at batch 1, 1e3 and 1e5, against

    * torch-native: batched damped Newton with ``torch.linalg.solve`` on ``(B, n, n)``
      (same tol / xtol / iteration cap, backtracking on ||F||^2) and an implicit-gradient
      backward, in a ``torch.autograd.Function``;
    * hand-written Numba: scalar code, ``prange`` over the batch, ``cache=True``,
      forward solve + backward VJP kernel in a ``torch.autograd.Function``;
    * CasADi ``rootfinder`` and JAX + jaxopt ``custom_root``, only if importable
      (they are never installed by this script).

(b) Bratu problem ``(y_{i-1} - 2 y_i + y_{i+1}) / h^2 + lam exp(y_i) = 0``, i = 0..49,
    ``y_{-1} = y_50 = 0``, ``h = 1/51``, one ``lam`` in [1, 3] per sample, batch 1e3,
    forward + backward, against a torch-native dense Newton and a hand-written Numba
    Newton with the Thomas algorithm.

(c) Compile figures: a fresh subprocess with an empty cache directory (time from after
    the imports to the layer being ready), then a second fresh subprocess on the same
    directory (cache hit).

Times are ``min`` over ``timeit`` repeats after warming every path up. Ratios are
``reference time / implicit_compiler time`` (above 1: implicit_compiler is faster).
Every implementation's solution and gradient are compared with implicit_compiler's.
"""

from __future__ import annotations

import abc
import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import timeit
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numba  # noqa: E402
import sympy as sp  # noqa: E402
import torch  # noqa: E402
from numba import get_num_threads, njit, prange  # noqa: E402

import implicit_compiler as ic  # noqa: E402

TOL = 1e-10
XTOL = 1e-10
MAX_ITER = 50
ARMIJO_C = 1e-4
MIN_STEP = 1e-10
APPENDIX_Y0 = (1.0, 1.5)
BRATU_N = 50
# Targets, ours / hand-written (forward + backward through torch, measured in the same run):
# the appendix at B = 1 and at the largest batch, Bratu against the Thomas-algorithm Newton.
APPENDIX_B1_TARGET = 1.3
APPENDIX_LARGEST_TARGET = 1.5
BRATU_TARGET = 1.5

# status codes of the references: 0 converged, 1 iteration cap, 2 singular, 3 line search failed
CONVERGED, MAX_ITERATIONS, SINGULAR, LINE_SEARCH_FAILED = 0, 1, 2, 3


# ====================================================================== timing
def best_time(fn, repeat: int) -> float:
    """Seconds per call: min over ``repeat`` timeit runs of an auto-ranged loop."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=repeat, number=number)) / number


def fwd_bwd(apply, inp: torch.Tensor):
    """One forward + backward; returns the callable timed by the benchmark."""

    def run():
        inp.grad = None
        y = apply(inp)
        y.sum().backward()

    return run


def solution_and_grad(apply, inp: torch.Tensor):
    inp.grad = None
    y = apply(inp)
    y.sum().backward()
    return y.detach().clone(), inp.grad.detach().clone()


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


# ====================================================================== torch-native reference
class TorchProblem(abc.ABC):
    """Residual, dF/dy and dF/dtheta in torch, batch first; ``p`` is ``(B, m)``."""

    @abc.abstractmethod
    def residual(self, y, p): ...

    @abc.abstractmethod
    def jacobian(self, y, p): ...

    @abc.abstractmethod
    def jac_params(self, y, p): ...


class AppendixTorch(TorchProblem):
    def residual(self, y, p):
        x, y1, y2 = p[:, 0], y[:, 0], y[:, 1]
        return torch.stack([x * x + y1 * y1 + y2 * y2 - 4.0, x * y1 - 1.0], dim=-1)

    def jacobian(self, y, p):
        x, y1, y2 = p[:, 0], y[:, 0], y[:, 1]
        row0 = torch.stack([2.0 * y1, 2.0 * y2], dim=-1)
        row1 = torch.stack([x, torch.zeros_like(x)], dim=-1)
        return torch.stack([row0, row1], dim=-2)

    def jac_params(self, y, p):
        x, y1 = p[:, 0], y[:, 0]
        return torch.stack([2.0 * x, y1], dim=-1).unsqueeze(-1)


class BratuTorch(TorchProblem):
    def __init__(self, n: int):
        inv_h2 = float(n + 1) ** 2
        K = -2.0 * torch.eye(n, dtype=torch.float64)
        ones = torch.ones(n - 1, dtype=torch.float64)
        K += torch.diag(ones, 1) + torch.diag(ones, -1)
        self.K = K * inv_h2  # symmetric second-difference matrix

    def residual(self, y, p):
        return y @ self.K + p * torch.exp(y)

    def jacobian(self, y, p):
        return self.K + torch.diag_embed(p * torch.exp(y))

    def jac_params(self, y, p):
        return torch.exp(y).unsqueeze(-1)


def torch_newton(problem: TorchProblem, y0, p, tol, xtol, max_iter):
    """Batched damped Newton; converged samples are frozen. Returns (y, status)."""
    B = y0.shape[0]
    y = y0.clone()
    F = problem.residual(y, p)
    phi = 0.5 * (F * F).sum(-1)
    status = torch.full((B,), MAX_ITERATIONS, dtype=torch.int8)
    done = torch.zeros(B, dtype=torch.bool)
    it = 0
    while True:
        d = torch.linalg.solve(problem.jacobian(y, p), -F.unsqueeze(-1)).squeeze(-1)
        fnorm = F.abs().amax(-1)
        conv = (~done) & (fnorm <= tol) & (d.abs().amax(-1) <= xtol * (1.0 + y.abs().amax(-1)))
        status[conv] = CONVERGED
        done |= conv
        if bool(done.all()) or it >= max_iter:
            break
        t = torch.ones(B, dtype=y.dtype)
        accepted = done.clone()
        y_new, F_new, phi_new = y.clone(), F.clone(), phi.clone()
        while True:
            yt = y + t.unsqueeze(-1) * d
            Ft = problem.residual(yt, p)
            phit = 0.5 * (Ft * Ft).sum(-1)
            ok = (~accepted) & (phit <= (1.0 - 2.0 * ARMIJO_C * t) * phi)
            y_new = torch.where(ok.unsqueeze(-1), yt, y_new)
            F_new = torch.where(ok.unsqueeze(-1), Ft, F_new)
            phi_new = torch.where(ok, phit, phi_new)
            accepted |= ok
            if bool(accepted.all()):
                break
            t = torch.where(accepted, t, 0.5 * t)
            stuck = (~accepted) & (t < MIN_STEP)
            if bool(stuck.any()):
                at_floor = stuck & (fnorm <= tol)
                status[at_floor] = CONVERGED
                status[stuck & ~at_floor] = LINE_SEARCH_FAILED
                done |= stuck
                accepted |= stuck
                if bool(accepted.all()):
                    break
        y, F, phi = y_new, F_new, phi_new
        it += 1
    return y, status


class TorchNewtonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem, p, y0):
        y, status = torch_newton(problem, y0, p, TOL, XTOL, MAX_ITER)
        if bool((status != CONVERGED).any()):
            raise RuntimeError(f"torch-native Newton: {(status != CONVERGED).sum().item()} sample(s) failed")
        ctx.problem = problem
        ctx.save_for_backward(y, p)
        return y

    @staticmethod
    def backward(ctx, ybar):
        y, p = ctx.saved_tensors
        problem = ctx.problem
        J = problem.jacobian(y, p)
        v = torch.linalg.solve(J.transpose(-1, -2), ybar.unsqueeze(-1))
        pbar = -(problem.jac_params(y, p).transpose(-1, -2) @ v).squeeze(-1)
        return None, pbar, None


# ====================================================================== hand-written Numba: appendix
@njit(cache=True, parallel=True)
def appendix_solve_kernel(X, Y0, tol, xtol, max_iter, Y, STATUS):
    for b in prange(X.shape[0]):
        x = X[b]
        y1 = Y0[0]
        y2 = Y0[1]
        f1 = x * x + y1 * y1 + y2 * y2 - 4.0
        f2 = x * y1 - 1.0
        phi = 0.5 * (f1 * f1 + f2 * f2)
        status = MAX_ITERATIONS
        it = 0
        while True:
            # dF/dy = [[2 y1, 2 y2], [x, 0]]
            a = 2.0 * y1
            c = 2.0 * y2
            det = -c * x
            if det == 0.0:
                status = SINGULAR
                break
            d1 = c * f2 / det
            d2 = (x * f1 - a * f2) / det
            fnorm = max(abs(f1), abs(f2))
            if fnorm <= tol and max(abs(d1), abs(d2)) <= xtol * (1.0 + max(abs(y1), abs(y2))):
                status = CONVERGED
                break
            if it >= max_iter:
                status = MAX_ITERATIONS
                break
            t = 1.0
            accepted = False
            u1 = y1
            u2 = y2
            g1 = f1
            g2 = f2
            phit = phi
            while t >= MIN_STEP:
                u1 = y1 + t * d1
                u2 = y2 + t * d2
                g1 = x * x + u1 * u1 + u2 * u2 - 4.0
                g2 = x * u1 - 1.0
                phit = 0.5 * (g1 * g1 + g2 * g2)
                if phit <= (1.0 - 2.0 * ARMIJO_C * t) * phi:
                    accepted = True
                    break
                t *= 0.5
            if not accepted:
                status = CONVERGED if fnorm <= tol else LINE_SEARCH_FAILED
                break
            y1 = u1
            y2 = u2
            f1 = g1
            f2 = g2
            phi = phit
            it += 1
        Y[b, 0] = y1
        Y[b, 1] = y2
        STATUS[b] = status


@njit(cache=True, parallel=True)
def appendix_vjp_kernel(X, Y, YBAR, XBAR):
    for b in prange(X.shape[0]):
        x = X[b]
        y1 = Y[b, 0]
        y2 = Y[b, 1]
        # (dF/dy)^T v = ybar with (dF/dy)^T = [[2 y1, x], [2 y2, 0]]
        v1 = YBAR[b, 1] / (2.0 * y2)
        v2 = (YBAR[b, 0] - 2.0 * y1 * v1) / x
        XBAR[b] = -(2.0 * x * v1 + y1 * v2)


class AppendixNumbaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, y0):
        X = np.ascontiguousarray(xs.detach().numpy().reshape(-1))
        B = X.shape[0]
        Y = np.empty((B, 2))
        status = np.empty(B, dtype=np.int8)
        appendix_solve_kernel(X, y0, TOL, XTOL, MAX_ITER, Y, status)
        if status.any():
            raise RuntimeError(f"hand-written Numba (appendix): {(status != 0).sum()} sample(s) failed")
        ctx.X, ctx.Y, ctx.shape = X, Y, xs.shape
        return torch.from_numpy(Y)

    @staticmethod
    def backward(ctx, ybar):
        XBAR = np.empty(ctx.X.shape[0])
        appendix_vjp_kernel(ctx.X, ctx.Y, np.ascontiguousarray(ybar.detach().numpy()), XBAR)
        return torch.from_numpy(XBAR).reshape(ctx.shape), None


# ====================================================================== hand-written Numba: Bratu
@njit(cache=True, inline="always")
def bratu_residual(n, inv_h2, lam, y, ey, F):
    for i in range(n):
        ey[i] = np.exp(y[i])
    for i in range(n):
        left = y[i - 1] if i > 0 else 0.0
        right = y[i + 1] if i < n - 1 else 0.0
        F[i] = (left - 2.0 * y[i] + right) * inv_h2 + lam * ey[i]


@njit(cache=True, inline="always")
def thomas_solve(n, inv_h2, lam, ey, rhs, cp, x):
    """Solve the tridiagonal dF/dy (diagonal -2/h^2 + lam e^y, off-diagonals 1/h^2) x = rhs."""
    diag = -2.0 * inv_h2 + lam * ey[0]
    cp[0] = inv_h2 / diag
    x[0] = rhs[0] / diag
    for i in range(1, n):
        m = -2.0 * inv_h2 + lam * ey[i] - inv_h2 * cp[i - 1]
        cp[i] = inv_h2 / m
        x[i] = (rhs[i] - inv_h2 * x[i - 1]) / m
    for i in range(n - 2, -1, -1):
        x[i] -= cp[i] * x[i + 1]


@njit(cache=True, parallel=True)
def bratu_solve_kernel(LAM, tol, xtol, max_iter, Y, STATUS):
    B, n = Y.shape
    inv_h2 = float(n + 1) ** 2
    for b in prange(B):
        lam = LAM[b]
        y = np.zeros(n)
        ey = np.empty(n)
        F = np.empty(n)
        rhs = np.empty(n)
        d = np.empty(n)
        cp = np.empty(n)
        yt = np.empty(n)
        eyt = np.empty(n)
        Ft = np.empty(n)
        bratu_residual(n, inv_h2, lam, y, ey, F)
        phi = 0.0
        for i in range(n):
            phi += 0.5 * F[i] * F[i]
        status = MAX_ITERATIONS
        it = 0
        while True:
            for i in range(n):
                rhs[i] = -F[i]
            thomas_solve(n, inv_h2, lam, ey, rhs, cp, d)
            fnorm = 0.0
            step = 0.0
            ynorm = 0.0
            for i in range(n):
                fnorm = max(fnorm, abs(F[i]))
                step = max(step, abs(d[i]))
                ynorm = max(ynorm, abs(y[i]))
            if fnorm <= tol and step <= xtol * (1.0 + ynorm):
                status = CONVERGED
                break
            if it >= max_iter:
                status = MAX_ITERATIONS
                break
            t = 1.0
            accepted = False
            while t >= MIN_STEP:
                for i in range(n):
                    yt[i] = y[i] + t * d[i]
                bratu_residual(n, inv_h2, lam, yt, eyt, Ft)
                phit = 0.0
                for i in range(n):
                    phit += 0.5 * Ft[i] * Ft[i]
                if phit <= (1.0 - 2.0 * ARMIJO_C * t) * phi:
                    accepted = True
                    break
                t *= 0.5
            if not accepted:
                status = CONVERGED if fnorm <= tol else LINE_SEARCH_FAILED
                break
            for i in range(n):
                y[i] = yt[i]
                ey[i] = eyt[i]
                F[i] = Ft[i]
            phi = phit
            it += 1
        for i in range(n):
            Y[b, i] = y[i]
        STATUS[b] = status


@njit(cache=True, parallel=True)
def bratu_vjp_kernel(LAM, Y, YBAR, LAMBAR):
    B, n = Y.shape
    inv_h2 = float(n + 1) ** 2
    for b in prange(B):
        ey = np.empty(n)
        rhs = np.empty(n)
        cp = np.empty(n)
        v = np.empty(n)
        for i in range(n):
            ey[i] = np.exp(Y[b, i])
            rhs[i] = YBAR[b, i]
        thomas_solve(n, inv_h2, LAM[b], ey, rhs, cp, v)  # dF/dy is symmetric
        s = 0.0
        for i in range(n):
            s += ey[i] * v[i]
        LAMBAR[b] = -s


class BratuNumbaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lam):
        L = np.ascontiguousarray(lam.detach().numpy().reshape(-1))
        B = L.shape[0]
        Y = np.empty((B, BRATU_N))
        status = np.empty(B, dtype=np.int8)
        bratu_solve_kernel(L, TOL, XTOL, MAX_ITER, Y, status)
        if status.any():
            raise RuntimeError(f"hand-written Numba (Bratu): {(status != 0).sum()} sample(s) failed")
        ctx.L, ctx.Y, ctx.shape = L, Y, lam.shape
        return torch.from_numpy(Y)

    @staticmethod
    def backward(ctx, ybar):
        LBAR = np.empty(ctx.L.shape[0])
        bratu_vjp_kernel(ctx.L, ctx.Y, np.ascontiguousarray(ybar.detach().numpy()), LBAR)
        return torch.from_numpy(LBAR).reshape(ctx.shape)


# ====================================================================== systems
def appendix_system():
    x = sp.Symbol("x")
    y1, y2 = sp.symbols("y1 y2")
    return ic.ResidualSystem(residuals=[x**2 + y1**2 + y2**2 - 4, x * y1 - 1], unknowns=[y1, y2], params=[x])


def bratu_system(n: int = BRATU_N):
    u = sp.symbols(f"u0:{n}")
    lam = sp.Symbol("lam")
    inv_h2 = sp.Integer(n + 1) ** 2
    res = []
    for i in range(n):
        left = u[i - 1] if i > 0 else 0
        right = u[i + 1] if i < n - 1 else 0
        res.append((left - 2 * u[i] + right) * inv_h2 + lam * sp.exp(u[i]))
    return ic.ResidualSystem(residuals=res, unknowns=list(u), params={"lam": lam}, name="Bratu50")


# ====================================================================== optional references
def jax_appendix(xs_np: np.ndarray):
    """JAX + jaxopt custom_root (plain Newton, vmapped); returns a timed callable and (y, grad)."""
    import jax
    import jax.numpy as jnp
    from jaxopt.implicit_diff import custom_root

    jax.config.update("jax_enable_x64", True)

    def F(y, x):
        return jnp.array([x * x + y[0] ** 2 + y[1] ** 2 - 4.0, x * y[0] - 1.0])

    @custom_root(F)
    def solve(init, x):
        def cond(state):
            y, it = state
            return (jnp.max(jnp.abs(F(y, x))) > TOL) & (it < MAX_ITER)

        def body(state):
            y, it = state
            return y + jnp.linalg.solve(jax.jacfwd(F)(y, x), -F(y, x)), it + 1

        return jax.lax.while_loop(cond, body, (init, 0))[0]

    y0 = jnp.array(APPENDIX_Y0)
    batched = jax.vmap(lambda x: solve(y0, x))

    def loss(xs):
        y = batched(xs)
        return jnp.sum(y), y

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    xs = jnp.asarray(xs_np.reshape(-1))

    def run():
        (_, y), g = step(xs)
        g.block_until_ready()

    (_, y), g = step(xs)
    return run, np.asarray(y), np.asarray(g).reshape(-1, 1)


def casadi_appendix(xs_np: np.ndarray):
    """CasADi rootfinder (newton), forward + gradient mapped over the batch with threads."""
    import casadi as ca

    y = ca.SX.sym("y", 2)
    x = ca.SX.sym("x")
    g = ca.vertcat(x**2 + y[0] ** 2 + y[1] ** 2 - 4, x * y[0] - 1)
    rf = ca.rootfinder("rf", "newton", {"x": y, "p": x, "g": g}, {"abstol": TOL, "max_iter": MAX_ITER})
    X = ca.MX.sym("X")
    Y = rf(x0=ca.DM(list(APPENDIX_Y0)), p=X)["x"]
    fg = ca.Function("fg", [X], [Y, ca.gradient(ca.sum1(Y), X)])
    B = xs_np.size
    fgm = fg.map(B, "thread", max(1, get_num_threads()))
    row = ca.DM(xs_np.reshape(1, B))

    def run():
        fgm(row)

    Ym, Gm = fgm(row)
    return run, np.asarray(Ym).T, np.asarray(Gm).reshape(-1, 1)


# ====================================================================== cases
class Table:
    def __init__(self):
        self.rows = []

    def add(self, case, impl, seconds, ours=None, dy=None, dg=None, target=""):
        ratio = "" if ours is None or seconds is None else f"{seconds / ours:.2f}x"
        diff = "" if dy is None else f"{dy:.1e} / {dg:.1e}"
        self.rows.append((case, impl, fmt_time(seconds), ratio, diff, target))

    def note(self, case, impl, text):
        self.rows.append((case, impl, "-", "", "", text))

    def print(self):
        head = ("case", "implementation", "time", "ref/ours", "max|dy| / max|dgrad|", "target / note")
        widths = [max(len(str(r[i])) for r in [head, *self.rows]) for i in range(len(head))]
        line = "  ".join("-" * w for w in widths)
        print(line)
        print("  ".join(str(h).ljust(w) for h, w in zip(head, widths)))
        print(line)
        last = None
        for r in self.rows:
            if last is not None and r[0] != last:
                print()
            last = r[0]
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        print(line)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.reshape(b.shape) - b).abs().max())


def bench_appendix(table: Table, layer, batches, repeat: int, rng: np.random.Generator) -> None:
    problem = AppendixTorch()
    y0_t = torch.tensor(APPENDIX_Y0, dtype=torch.float64)
    y0_np = np.array(APPENDIX_Y0)
    for B in batches:
        case = f"(a) appendix B={B:g}"
        xs = torch.from_numpy(rng.random((B, 1)) * 0.5 + 0.75).requires_grad_()
        impls = {
            "implicit_compiler": lambda t: layer(t, y0=y0_t),
            "torch-native Newton": lambda t: TorchNewtonFunction.apply(problem, t, y0_t.expand(t.shape[0], 2)),
            "hand-written Numba": lambda t: AppendixNumbaFunction.apply(t, y0_np),
        }
        results = {}
        for name, apply in impls.items():
            for _ in range(3):  # warm-up
                results[name] = solution_and_grad(apply, xs)
        y_ref, g_ref = results["implicit_compiler"]
        x = xs.detach()
        exact = torch.cat([1.0 / x, torch.sqrt(4.0 - x * x - 1.0 / (x * x))], dim=1)
        times = {name: best_time(fwd_bwd(apply, xs), repeat) for name, apply in impls.items()}
        ours = times["implicit_compiler"]
        target = ""
        if B == 1:
            target = f"whole call < 50 us: {'PASS' if ours < 50e-6 else 'FAIL'}"
        table.add(case, "implicit_compiler", ours, target=target)
        table.note(case, "  (vs exact y)", f"max|y - y_exact| = {float((y_ref - exact).abs().max()):.1e}")
        for name in ("torch-native Newton", "hand-written Numba"):
            y, g = results[name]
            target = ""
            limit = {1: APPENDIX_B1_TARGET, max(batches): APPENDIX_LARGEST_TARGET}.get(B)
            if name == "hand-written Numba" and limit is not None:
                ok = ours <= limit * times[name]
                target = f"ours <= {limit:g}x hand-written ({ours / times[name]:.2f}x): {'PASS' if ok else 'FAIL'}"
            table.add(case, name, times[name], ours, max_diff(y, y_ref), max_diff(g, g_ref), target)
        for name, make in (("JAX+jaxopt custom_root", jax_appendix), ("CasADi rootfinder", casadi_appendix)):
            try:
                run, y, g = make(xs.detach().numpy())
            except ImportError:
                table.note(case, name, "skipped (not installed)")
                continue
            except Exception as e:  # an optional reference must not stop the benchmark
                table.note(case, name, f"failed: {type(e).__name__}: {e}"[:100])
                continue
            for _ in range(2):
                run()
            t = best_time(run, repeat)
            table.add(case, name + " (no torch)", t, ours, max_diff(torch.from_numpy(y), y_ref),
                      max_diff(torch.from_numpy(g), g_ref))


def bench_bratu(table: Table, layer, B: int, repeat: int, rng: np.random.Generator) -> None:
    case = f"(b) Bratu n={BRATU_N} B={B:g}"
    problem = BratuTorch(BRATU_N)
    lam = torch.from_numpy(1.0 + 2.0 * rng.random(B)).requires_grad_()
    zeros = torch.zeros(BRATU_N, dtype=torch.float64)
    impls = {
        "implicit_compiler": lambda t: layer(t),
        "torch-native dense Newton": lambda t: TorchNewtonFunction.apply(
            problem, t.unsqueeze(-1), zeros.expand(t.shape[0], BRATU_N)),
        "hand-written Numba Thomas": lambda t: BratuNumbaFunction.apply(t),
    }
    results = {}
    errors = {}
    for name, apply in impls.items():
        try:
            for _ in range(3):
                results[name] = solution_and_grad(apply, lam)
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
    if "implicit_compiler" in errors:
        table.note(case, "implicit_compiler", "FAILED: " + errors["implicit_compiler"])
        print(f"implicit_compiler failed on Bratu:\n{errors['implicit_compiler']}", file=sys.stderr)
        ours, y_ref, g_ref = None, None, None
    else:
        ours = best_time(fwd_bwd(impls["implicit_compiler"], lam), repeat)
        y_ref, g_ref = results["implicit_compiler"]
        table.add(case, "implicit_compiler", ours)
    times = {}
    for name in ("torch-native dense Newton", "hand-written Numba Thomas"):
        if name in errors:
            table.note(case, name, "FAILED: " + errors[name][:80])
            continue
        times[name] = best_time(fwd_bwd(impls[name], lam), repeat)
        y, g = results[name]
        target = ""
        if name.startswith("torch") and ours is not None:
            target = f">= 10x faster than torch-native: {'PASS' if times[name] >= 10 * ours else 'FAIL'}"
        elif ours is not None:
            ok = ours <= BRATU_TARGET * times[name]
            target = f"ours <= {BRATU_TARGET:g}x Thomas ({ours / times[name]:.2f}x): {'PASS' if ok else 'FAIL'}"
        dy = None if y_ref is None else max_diff(y, y_ref)
        dg = None if g_ref is None else max_diff(g, g_ref)
        table.add(case, name, times[name], ours, dy, dg, target)


CHILD = textwrap.dedent(
    """
    import json, sys, time
    t_start = time.perf_counter()
    import sympy as sp
    import torch
    import implicit_compiler as ic
    t0 = time.perf_counter()
    x = sp.Symbol("x")
    y1, y2 = sp.symbols("y1 y2")
    system = ic.ResidualSystem(residuals=[x**2 + y1**2 + y2**2 - 4, x * y1 - 1], unknowns=[y1, y2], params=[x])
    layer = ic.compile(system, tol=1e-10, max_iter=50)
    t1 = time.perf_counter()
    xs = torch.full((1, 1), 0.9, dtype=torch.float64, requires_grad=True)
    layer(xs, y0=torch.tensor([1.0, 1.5])).sum().backward()
    t2 = time.perf_counter()
    print(json.dumps({"imports": t0 - t_start, "ready": t1 - t0, "first_call": t2 - t1,
                      "cache_hit": layer.compile_report["cache_hit"]}))
    """
)


def run_child(cache_dir: str) -> dict:
    env = dict(os.environ)
    env["IMPLICIT_COMPILER_CACHE"] = cache_dir
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"compile subprocess failed ({out.returncode}):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_compile(table: Table) -> None:
    case = "(c) compile (appendix)"
    with tempfile.TemporaryDirectory(prefix="ic_bench_cache_") as d:
        try:
            cold = run_child(d)
            warm = run_child(d)
        except RuntimeError as e:
            table.note(case, "subprocess", str(e).splitlines()[0])
            print(e, file=sys.stderr)
            return
    for label, r, limit in (("cold (empty cache)", cold, 5.0), ("cache hit", warm, 0.5)):
        ok = r["ready"] < limit
        table.add(case, label, r["ready"], target=f"< {limit:g} s: {'PASS' if ok else 'FAIL'}")
        table.note(case, "  (details)", f"cache_hit={r['cache_hit']}, imports {fmt_time(r['imports'])}, "
                                        f"first fwd+bwd {fmt_time(r['first_call'])}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a largest appendix batch of 1e4")
    ap.add_argument("--threading-layer", choices=("omp", "tbb", "workqueue"), default=None,
                    help="Numba threading layer (default: Numba's own choice); also passed to the compile subprocesses")
    args = ap.parse_args(argv)
    if args.threading_layer:
        numba.config.THREADING_LAYER = args.threading_layer
        os.environ["NUMBA_THREADING_LAYER"] = args.threading_layer
    repeat = 3 if args.quick else 7
    batches = (1, 1_000, 10_000) if args.quick else (1, 1_000, 100_000)
    rng = np.random.default_rng(0)

    print(f"implicit_compiler {ic.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"numba {numba.__version__} ({get_num_threads()} threads, {numba.threading_layer()} layer), "
          f"python {sys.version.split()[0]}")
    print(f"tol={TOL:g}, xtol={XTOL:g}, max_iter={MAX_ITER}; times: min over {repeat} timeit repeats, fwd+bwd")

    t = time.perf_counter()
    app_layer = ic.compile(appendix_system(), tol=TOL, xtol=XTOL, max_iter=MAX_ITER)
    print(f"appendix layer: {time.perf_counter() - t:.2f} s (cache_hit={app_layer.compile_report['cache_hit']})")
    bratu_layer = None
    t = time.perf_counter()
    try:
        bratu_layer = ic.compile(bratu_system(), tol=TOL, xtol=XTOL, max_iter=MAX_ITER)
        print(f"Bratu layer: {time.perf_counter() - t:.2f} s (cache_hit={bratu_layer.compile_report['cache_hit']})")
    except Exception as e:
        print(f"Bratu layer failed to compile after {time.perf_counter() - t:.2f} s: {type(e).__name__}: {e}")
    sys.stdout.flush()

    table = Table()
    bench_appendix(table, app_layer, batches, repeat, rng)
    if bratu_layer is not None:
        bench_bratu(table, bratu_layer, 1_000, repeat, rng)
    else:
        table.note(f"(b) Bratu n={BRATU_N} B=1000", "implicit_compiler", "FAILED to compile (see above)")
    bench_compile(table)
    print()
    table.print()
    print("ref/ours > 1: implicit_compiler is faster. max|dy| / max|dgrad|: difference from implicit_compiler.")


if __name__ == "__main__":
    main()
