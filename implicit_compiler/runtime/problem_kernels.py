"""NumPy-level access to an optimization problem's kernel module.

The forward pass is the generated interior-point driver, or a user callable
whose solution is then checked against the KKT conditions (multipliers the
callable does not supply are recovered by least squares from stationarity,
over the constraints active at its solution). Either way the KKT Jacobian is
factored at the solution for the backward pass, which is the residual-system
VJP of :class:`Kernels`.

Equality constraints the compiler found redundant (``LAYOUT["equalities"]``) are
not in the kernels. Those whose consistency with the kept constraints depends on
the parameters carry an affine test ``r(θ) = dᵀθ + c = 0``; a sample whose
parameters fail it (``|r| > tol max(1, Σ_k |d_k θ_k| + |c|)``) is ``INFEASIBLE``:
no point satisfies all the constraints as given.
"""

from __future__ import annotations

import numpy as np

from . import status as st
from .kernels import Kernels, SolveResult, _kernel_array
from .options import SolverOptions


class ProblemKernels(Kernels):
    def __init__(self, module, forward=None, weak_tol: float | None = None, kkt_tol: float = 1e-7):
        super().__init__(module)
        self.nv, self.nq, self.nr = module.NV, module.NQ, module.NR
        self.forward = forward
        self.weak_tol = weak_tol
        self.kkt_tol = kkt_tol
        eq = self.layout.get("equalities") or {"given": self.nq, "kept": list(range(self.nq)), "redundant": []}
        self.nq_given = eq["given"]
        self.equality_rows = np.asarray(eq["kept"], dtype=np.int64)
        self.redundant = eq["redundant"]
        checks = [r for r in self.redundant if r["check"] is not None]
        self._check_rows = [r["index"] for r in checks]
        self._check_D = np.zeros((len(checks), self.m))
        self._check_c = np.array([r["check_constant"] for r in checks], dtype=np.float64)
        for i, r in enumerate(checks):
            for k, a in r["check"]:
                self._check_D[i, k] = a

    def consistent(self, P: np.ndarray, tol: float) -> np.ndarray:
        """Per sample: do the parameters satisfy the dependencies of the dropped equality
        constraints (see the module docstring)? All True when no dependency involves them."""
        if not self._check_rows:
            return np.ones(P.shape[0], dtype=np.bool_)
        r = P @ self._check_D.T + self._check_c
        scale = np.abs(P) @ np.abs(self._check_D.T) + np.abs(self._check_c)
        return ~(np.abs(r) > tol * np.maximum(1.0, scale)).any(axis=1)

    def _mark_inconsistent(self, P: np.ndarray, STATUS: np.ndarray, tol: float) -> None:
        if self._check_rows:
            STATUS[~self.consistent(P, tol)] = st.INFEASIBLE

    def _alloc(self, B):
        N = self.n
        return (np.zeros((B, N)), np.zeros((B, N, N)), np.zeros((B, N + 1), dtype=np.int64),
                np.empty(B, dtype=np.int8), np.zeros((B, 3)))

    def solve(self, P: np.ndarray, Y0: np.ndarray, options: SolverOptions) -> SolveResult:
        P = _kernel_array(P)
        B = P.shape[0]
        Z, LU, PIV, STATUS, INFO = self._alloc(B)
        # An interior point ends with g_i ν_i ≈ μ ≈ tol: at a weakly active constraint both
        # are about sqrt(tol), so that sets the scale of "≈ 0" for the classification.
        weak_tol = self.weak_tol if self.weak_tol is not None else 10.0 * np.sqrt(options.tol)
        if self.forward is None:
            Y0 = _kernel_array(Y0[:, :self.nv]) if Y0.shape[1] != self.nv else _kernel_array(Y0)
            if Y0.shape[0] != B:  # one shared initial guess
                Y0 = np.ascontiguousarray(np.broadcast_to(Y0, (B, self.nv)))
            args = (self.nq, self.nr, Y0, P, float(options.tol), int(options.max_iter), float(options.singular_tol),
                    float(weak_tol), Z, LU, PIV, STATUS, INFO)
            self._run("ip", B, args, options.parallel_threshold)
        else:
            return self.finalize(self._custom_forward(P), P, options)
        self._mark_inconsistent(P, STATUS, options.tol)
        res = SolveResult(Z, STATUS, INFO[:, 0].astype(np.int64), INFO[:, 1], P, LU, PIV)
        res.weakly_active = INFO[:, 2].astype(np.int64)
        return res

    def finalize(self, Z: np.ndarray, P: np.ndarray, options: SolverOptions) -> SolveResult:
        """Check a KKT point ``Z = (y, λ, ν)`` computed elsewhere, polish it, and factor the
        KKT system there.

        The point is judged as given: ``NOT_OPTIMAL`` when its relative KKT error (measured as
        the interior point measures its own) exceeds ``kkt_tol``, or when the polishing Newton
        step would move ``y`` by more than ``sqrt(kkt_tol) (1 + |y|)`` (it may remove rounding
        errors, never replace the point by another one); ``NOT_A_MINIMUM`` when it is a KKT
        point that fails the second-order condition (a maximum or saddle point)."""
        P = _kernel_array(P)
        Z = np.array(Z, dtype=np.float64, order="C")
        given = Z[:, :self.nv].copy()
        B = P.shape[0]
        _, LU, PIV, STATUS, INFO = self._alloc(B)
        weak_tol = self.weak_tol if self.weak_tol is not None else 10.0 * np.sqrt(options.tol)
        args = (self.nq, self.nr, Z, P, float(weak_tol), float(options.singular_tol), LU, PIV, STATUS, INFO)
        self._run("kkt_finalize", B, args, options.parallel_threshold)
        moved = np.abs(Z[:, :self.nv] - given).max(axis=1, initial=0.0)
        far = ~(moved <= np.sqrt(self.kkt_tol) * (1.0 + np.abs(given).max(axis=1, initial=0.0)))
        bad = (STATUS != st.NONFINITE) & (~(INFO[:, 1] <= self.kkt_tol) | far)
        STATUS[bad] = st.NOT_OPTIMAL
        Z[bad, :self.nv] = given[bad]
        self._mark_inconsistent(P, STATUS, options.tol)
        res = SolveResult(Z, STATUS, INFO[:, 0].astype(np.int64), INFO[:, 1], P, LU, PIV)
        res.weakly_active = INFO[:, 2].astype(np.int64)
        return res

    # ------------------------------------------------------------------ custom forward
    def _param_arrays(self, P):
        B = P.shape[0]
        out = []
        for g in self.layout["param_groups"]:
            off, size = g["offset"], len(g["symbols"])
            out.append(P[:, off:off + size].reshape(B, *g["shape"]))
        return out

    def _custom_forward(self, P: np.ndarray) -> np.ndarray:
        B = P.shape[0]
        got = self.forward(*self._param_arrays(P))
        lam = nu = None
        if isinstance(got, tuple):
            if len(got) != 3:
                raise ValueError("a custom forward returns y, or the tuple (y, lam, nu)")
            got, lam, nu = got
        y = np.asarray(got, dtype=np.float64).reshape(B, -1)
        if y.shape[1] != self.nv:
            raise ValueError(f"the custom forward returned {y.shape[1]} values per sample; the problem has "
                             f"{self.nv} variables (shape (B, {self.nv}) expected)")
        Z = np.zeros((B, self.n))
        Z[:, :self.nv] = y
        if lam is not None and nu is not None:
            Z[:, self.nv:self.nv + self.nq] = self.reduce_multipliers(np.asarray(lam, dtype=np.float64).reshape(B, -1))
            Z[:, self.nv + self.nq:] = np.asarray(nu, dtype=np.float64).reshape(B, self.nr)
            return Z
        Z[:, self.nv:] = self.recover_multipliers(y, P)
        return Z

    def recover_multipliers(self, y: np.ndarray, P: np.ndarray) -> np.ndarray:
        """Least-squares multipliers from stationarity ``∇f + J_hᵀλ + J_gᵀν = 0`` with
        ``ν_i = 0`` for constraints inactive at ``y`` (``g_i < -active_tol``)."""
        B = y.shape[0]
        n, q, r = self.nv, self.nq, self.nr
        gradf, h, Jh, g, Jg = (np.empty((B, n)), np.empty((B, q)), np.zeros((B, q, n)),
                               np.empty((B, r)), np.zeros((B, r, n)))
        self.module.ip_eval_batch(_kernel_array(y), P, gradf, h, Jh, g, Jg, self.tab)
        out = np.zeros((B, q + r))
        tol = np.sqrt(self.kkt_tol)
        for b in range(B):
            active = g[b] >= -tol * (1.0 + np.abs(g[b]))
            A = np.concatenate([Jh[b], Jg[b][active]], axis=0).T  # (n, q + active)
            if A.shape[1] == 0:
                continue
            mult, *_ = np.linalg.lstsq(A, -gradf[b], rcond=None)
            out[b, :q] = mult[:q]
            nu = np.zeros(r)
            nu[active] = np.maximum(mult[q:], 0.0)
            out[b, q:] = nu
        return out

    def reduce_multipliers(self, lam: np.ndarray) -> np.ndarray:
        """Equality multipliers ``(B, q)`` of the kept constraints from ``lam``: either those already,
        or one per constraint as given, whose dropped entries are folded into the kept ones. A dropped
        constraint ``d`` has gradient ``Σ_j c_dj ∇h_j``, so ``Σ_i λ_i ∇h_i = Σ_j (λ_j + Σ_d c_dj λ_d) ∇h_j``:
        the same stationarity, with the dropped multipliers zero."""
        if lam.shape[1] == self.nq:
            return lam
        if lam.shape[1] != self.nq_given:
            extra = f" (or {self.nq_given}, one per equality as given)" if self.nq_given != self.nq else ""
            raise ValueError(f"the custom forward returned {lam.shape[1]} equality multipliers per sample; the "
                             f"problem has {self.nq}{extra}")
        out = lam[:, self.equality_rows].copy()
        for r in self.redundant:
            for k, c in r["combination"]:
                out[:, k] += c * lam[:, r["index"]]
        return out
