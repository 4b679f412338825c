"""Derivative certificate: can the generated code be trusted for this system?

``check(layer)`` evaluates the compiled kernels of a layer and compares them with

* SymPy's exact derivatives, evaluated in 40-digit arithmetic (mpmath) at the same
  points: the residual ``F``, ``dF/dy`` (from ``residual_jacobian``) and
  ``dF/dtheta`` (read through ``vjp_params`` with unit vectors);
* central finite differences of the compiled residual;

at random points ``(y, theta)`` (uniform in ``[low, high]``) and at the solutions
for the given parameters. At those solutions it also compares the layer's implicit
Jacobian ``dy/dtheta`` (the backward pass, one VJP per output) with the exact
``-(dF/dy)^{-1} dF/dtheta`` and with finite differences of the forward solve.

Errors are relative to the largest exact entry of the compared quantity; the
verdict lists the worst error of each comparison against its tolerance.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from ..errors import InputError, SystemDefinitionError
from ..runtime.status import Status
from .report import residual_system_of

EPS = np.finfo(float).eps


@dataclass
class Comparison:
    """One compared quantity at one point."""

    what: str
    point: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tol)


@dataclass
class Certificate:
    """The outcome of :func:`check`: every comparison, plus the points that were skipped."""

    name: str
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when something was compared and every comparison is within tolerance."""
        return bool(self.comparisons) and all(c.ok for c in self.comparisons)

    def worst(self) -> dict[str, Comparison]:
        """The worst comparison of each kind, in the order the kinds were first checked."""
        out: dict[str, Comparison] = {}
        for c in self.comparisons:
            if c.what not in out or c.error > out[c.what].error:
                out[c.what] = c
        return out

    def __str__(self) -> str:
        worst = self.worst()
        npts = len({c.point for c in self.comparisons})
        lines = [f"Derivative certificate for {self.name!r} ({npts} points)"]
        if worst:
            w = max(len(k) for k in worst)
            lines.append(f"  {'comparison'.ljust(w)}  worst rel. error  tolerance")
            for what, c in worst.items():
                flag = "ok" if c.ok else f"FAIL (at {c.point})"
                lines.append(f"  {what.ljust(w)}  {c.error:16.1e}  {c.tol:9.0e}  {flag}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.ok:
            lines.append("PASS: the compiled derivatives agree with SymPy's exact values and with finite differences.")
        elif not self.comparisons:
            lines.append("NOT CERTIFIED: nothing could be compared (see the notes).")
        else:
            bad = sorted({c.what for c in self.comparisons if not c.ok})
            lines.append(f"FAIL: {', '.join(bad)} outside tolerance.")
        return "\n".join(lines)

    def __bool__(self) -> bool:
        return self.ok


def _rel_err(a: np.ndarray, exact: np.ndarray, scale: float = 0.0) -> float:
    scale = max(scale, float(np.max(np.abs(exact))) if exact.size else 0.0)
    diff = float(np.max(np.abs(a - exact))) if exact.size else 0.0
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0.0 else float("inf")


class _Exact:
    """SymPy's derivatives, evaluated with mpmath at ``DPS`` digits."""

    DPS = 40

    def __init__(self, system):
        import mpmath

        self.mp = mpmath.mp
        d = system.derivation
        args = [list(d.unknowns), list(d.params)]
        self.n, self.m = d.n, d.m
        self._F = sp.lambdify(args, list(d.residuals), modules="mpmath")
        self._Jy = sp.lambdify(args, d.jacobian_unknowns_matrix().tolist(), modules="mpmath")
        self._Jp = sp.lambdify(args, d.jacobian_params_matrix().tolist(), modules="mpmath") if d.m else None

    def _call(self, fn, y, p):
        mp = self.mp
        with mp.workdps(self.DPS):
            out = fn([mp.mpf(float(v)) for v in y], [mp.mpf(float(v)) for v in p])
            return np.array(out, dtype=object)

    @staticmethod
    def _real(a: np.ndarray) -> np.ndarray | None:
        flat = []
        for v in a.ravel():
            c = complex(v)
            if c.imag != 0.0 or not np.isfinite(c.real):
                return None
            flat.append(c.real)
        return np.array(flat, dtype=float).reshape(a.shape)

    def values(self, y, p):
        """(F, dF/dy, dF/dtheta) as float arrays, or None where not real and finite."""
        F = self._real(self._call(self._F, y, p))
        Jy = self._real(self._call(self._Jy, y, p).reshape(self.n, self.n))
        Jp = self._real(self._call(self._Jp, y, p).reshape(self.n, self.m)) if self._Jp else np.zeros((self.n, 0))
        return F, Jy, Jp

    def implicit(self, y, p) -> np.ndarray | None:
        """``-(dF/dy)^{-1} dF/dtheta`` solved in high precision."""
        mp = self.mp
        with mp.workdps(self.DPS):
            yy = [mp.mpf(float(v)) for v in y]
            pp = [mp.mpf(float(v)) for v in p]
            Jy = mp.matrix(self._Jy(yy, pp))
            Jp = mp.matrix(self._Jp(yy, pp))
            try:
                G = -(mp.inverse(Jy) * Jp)
            except ZeroDivisionError:
                return None
            return self._real(np.array(G.tolist(), dtype=object))


class _Compiled:
    """The generated kernels of a layer, called one point at a time."""

    NEEDED = ("residual", "residual_jacobian", "vjp_params")

    def __init__(self, layer):
        mod = layer.kernels.module
        missing = [k for k in self.NEEDED if not hasattr(mod, k)]
        if missing:
            raise SystemDefinitionError(
                f"the kernel module of this layer has no {', '.join(missing)}; check() certifies "
                f"residual-system kernels"
            )
        self.mod = mod
        self.n, self.m = layer.kernels.n, layer.kernels.m
        self.need = np.ones(len(layer.layout["param_groups"]), dtype=np.bool_)

    def F(self, y, p):
        out = np.zeros(self.n)
        self.mod.residual(y, p, out, self.mod.TABLES)
        return out

    def Jy(self, y, p):
        J = np.zeros((self.n, self.n))
        self.mod.residual_jacobian(y, p, np.zeros(self.n), J, self.mod.TABLES)
        return J

    def Jp(self, y, p):
        """Rows of dF/dtheta from ``vjp_params`` (which returns ``-(dF/dtheta)^T v``)."""
        out = np.zeros((self.n, self.m))
        if self.m == 0:
            return out
        v = np.zeros(self.n)
        row = np.zeros(self.m)
        for i in range(self.n):
            v[:] = 0.0
            v[i] = 1.0
            self.mod.vjp_params(y, p, v, self.need, row, self.mod.TABLES)
            out[i] = -row
        return out


def _central(fn, x: np.ndarray, rows: int) -> np.ndarray:
    """Central differences of ``fn`` (R^k -> R^rows) at ``x``, step ``eps^(1/3) max(1, |x_j|)``."""
    out = np.zeros((rows, x.size))
    for j in range(x.size):
        h = EPS ** (1.0 / 3.0) * max(1.0, abs(x[j]))
        xp, xm = x.copy(), x.copy()
        xp[j] += h
        xm[j] -= h
        out[:, j] = (fn(xp) - fn(xm)) / (xp[j] - xm[j])
    return out


def _as_rows(layer, params) -> np.ndarray:
    """Parameters as a float64 ``(B, m)`` array: flat array-like, or a dict by group name."""
    m = layer.kernels.m
    groups = layer.layout["param_groups"]

    def arr(v):
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        return np.asarray(v, dtype=np.float64)

    if isinstance(params, dict):
        unknown = set(params) - {g["name"] for g in groups}
        if unknown:
            raise InputError(f"params names unknown group(s) {sorted(unknown)}; groups: {[g['name'] for g in groups]}")
        missing = [g["name"] for g in groups if g["name"] not in params]
        if missing:
            raise InputError(f"params is missing parameter group(s) {missing}")
        blocks = []
        for g in groups:
            a = arr(params[g["name"]])
            size = len(g["symbols"])
            if a.size % size:
                raise InputError(f"params[{g['name']!r}] has {a.size} values; expected a multiple of {size}")
            blocks.append(a.reshape(-1, size))
        B = max(b.shape[0] for b in blocks)
        return np.ascontiguousarray(np.hstack([np.broadcast_to(b, (B, b.shape[1])) for b in blocks]))
    a = arr(params)
    if a.ndim <= 1 and a.size == m:
        return a.reshape(1, m).copy()
    if a.ndim == 2 and a.shape[1] == m:
        return np.ascontiguousarray(a)
    raise InputError(f"params must have shape ({m},) or (B, {m}) (or be a dict by group), got {a.shape}")


def check(layer, params=None, *, y0=None, random_points: int = 3, seed: int = 0, low: float = 0.5,
          high: float = 1.5, tol_exact: float = 1e-10, tol_fd: float = 1e-6, tol_implicit: float = 1e-8,
          tol_implicit_fd: float = 1e-5, verbose: bool = True, file=None) -> Certificate:
    """Certify the compiled derivatives of ``layer`` (see the module docstring).

    Parameters
    ----------
    layer
        A compiled layer with its symbolic system (``implicit_compiler.compile(system)``).
    params
        Parameter values at which to solve and check the implicit gradient: ``(m,)`` or
        ``(B, m)`` (flat, in the layer's parameter order) or a dict by parameter group.
    y0
        Initial guess for those solves (``(n,)`` or ``(B, n)``; default: the system's).
    random_points
        How many random points ``(y, theta)``, uniform in ``[low, high]``, to check the
        kernels at (no solve needed there).
    tol_exact, tol_fd, tol_implicit, tol_implicit_fd
        Tolerances on the relative errors: kernels vs exact, kernels vs finite
        differences, implicit Jacobian vs exact, implicit Jacobian vs finite differences.
    verbose, file
        Print the verdict (to ``file``, default stdout).

    Returns
    -------
    Certificate
        Every comparison and note; truthy when everything passed.
    """
    system = getattr(layer, "system", None)
    if system is not None:
        system = residual_system_of(system)  # a problem's residual system is its .system
    if system is None:
        raise SystemDefinitionError(
            "check() needs the symbolic system of the layer (layer.system is None: a standalone "
            "export or a layer built from a kernel module); compile the ResidualSystem with "
            "implicit_compiler.compile and check that layer"
        )
    exact = _Exact(system)
    comp = _Compiled(layer)
    n, m = comp.n, comp.m
    cert = Certificate(getattr(system, "name", "system"))
    rng = np.random.default_rng(seed)
    points = [(f"random {k}", rng.uniform(low, high, n), rng.uniform(low, high, m)) for k in range(random_points)]

    if params is not None:
        P = _as_rows(layer, params)
        B = P.shape[0]
        if y0 is None:
            Y0 = np.tile(np.asarray(layer.layout["initial_guess"], dtype=np.float64), (B, 1))
        else:
            Y0 = np.asarray(y0, dtype=np.float64)
            Y0 = np.ascontiguousarray(np.broadcast_to(Y0.reshape(-1, n), (B, n)))
        res = layer.kernels.solve(P, Y0, layer.options)
        for b in range(B):
            if res.status[b] != 0:
                cert.notes.append(f"params[{b}]: not solved ({Status(int(res.status[b])).name}); "
                                  f"implicit gradient not checked there (give y0=)")
                continue
            points.append((f"solution {b}", res.y[b].copy(), P[b].copy()))

    for label, y, p in points:
        _check_kernels(exact, comp, cert, label, y, p, tol_exact, tol_fd)
    for label, y, p in points:
        if label.startswith("solution"):
            _check_implicit(layer, exact, cert, label, y, p, tol_implicit, tol_implicit_fd)

    if verbose:
        print(cert, file=file or sys.stdout)
    return cert


def _check_kernels(exact, comp, cert, label, y, p, tol_exact, tol_fd):
    F_e, Jy_e, Jp_e = exact.values(y, p)
    if F_e is None or Jy_e is None or Jp_e is None:
        cert.notes.append(f"{label}: skipped (F or its derivatives are not real and finite there)")
        return
    F_c, Jy_c, Jp_c = comp.F(y, p), comp.Jy(y, p), comp.Jp(y, p)
    # F vanishes at a solution: measure its error against the size of its terms there
    # (to first order, |dF/dy| |y| + |dF/dtheta| |theta|), not against F itself.
    terms = float(np.max(np.abs(Jy_e) @ np.abs(y) + np.abs(Jp_e) @ np.abs(p))) if comp.n else 0.0
    cert.comparisons.append(Comparison("F: compiled vs exact", label, _rel_err(F_c, F_e, terms), tol_exact))
    cert.comparisons.append(Comparison("dF/dy: compiled vs exact", label, _rel_err(Jy_c, Jy_e), tol_exact))
    Jy_fd = _central(lambda yy: comp.F(yy, p), y, comp.n)
    cert.comparisons.append(Comparison("dF/dy: compiled vs finite differences", label, _rel_err(Jy_c, Jy_fd), tol_fd))
    if comp.m:
        cert.comparisons.append(Comparison("dF/dθ: compiled vs exact", label, _rel_err(Jp_c, Jp_e), tol_exact))
        Jp_fd = _central(lambda pp: comp.F(y, pp), p, comp.n)
        cert.comparisons.append(
            Comparison("dF/dθ: compiled vs finite differences", label, _rel_err(Jp_c, Jp_fd), tol_fd))


def _check_implicit(layer, exact, cert, label, y, p, tol, tol_fd):
    k = layer.kernels
    n, m = k.n, k.m
    if m == 0:
        return
    P1, Y1 = p.reshape(1, m).copy(), y.reshape(1, n).copy()
    res = k.solve(P1, Y1, layer.options)
    need = np.ones(len(layer.layout["param_groups"]), dtype=np.bool_)
    G = np.zeros((n, m))
    for i in range(n):
        ybar = np.zeros((1, n))
        ybar[0, i] = 1.0
        G[i] = k.vjp(res, ybar, need)[0]
    G_e = exact.implicit(res.y[0], p)
    if G_e is None:
        cert.notes.append(f"{label}: dF/dy is singular there; implicit Jacobian not compared")
        return
    cert.comparisons.append(Comparison("dy/dθ (backward): layer vs exact", label, _rel_err(G, G_e), tol))
    # Finite differences of the forward solve, each solve started at the solution.
    rows = []
    for j in range(m):
        h = EPS ** (1.0 / 3.0) * max(1.0, abs(p[j]))
        for s in (1.0, -1.0):
            q = p.copy()
            q[j] += s * h
            rows.append(q)
    Pfd = np.array(rows)
    rfd = k.solve(Pfd, np.tile(res.y[0], (2 * m, 1)), layer.options)
    if np.any(rfd.status != 0):
        cert.notes.append(f"{label}: a perturbed solve failed; finite-difference gradient not compared")
        return
    G_fd = np.zeros((n, m))
    for j in range(m):
        G_fd[:, j] = (rfd.y[2 * j] - rfd.y[2 * j + 1]) / (Pfd[2 * j, j] - Pfd[2 * j + 1, j])
    cert.comparisons.append(Comparison("dy/dθ (backward): layer vs finite differences", label,
                                       _rel_err(G, G_fd), tol_fd))
