"""NumPy-level access to a generated kernel module: batched solve and VJP.

:class:`Kernels` wraps one generated module. It owns no SymPy and no torch: the
torch layer and the NumPy entry point both call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import status as st
from .options import SolverOptions


@dataclass
class SolveResult:
    """Result of a batched solve (NumPy arrays, batch first).

    ``y``: solutions ``(B, n)``; ``status``: per-sample :class:`Status` codes;
    ``iterations``; ``residual_norm`` (``||F||_inf`` at ``y``). ``lu``/``piv`` hold
    the factorisation of dF/dy at ``y``, reused by :meth:`Kernels.vjp`.
    """

    y: np.ndarray
    status: np.ndarray
    iterations: np.ndarray
    residual_norm: np.ndarray
    p: np.ndarray
    lu: np.ndarray
    piv: np.ndarray

    @property
    def converged(self) -> np.ndarray:
        return self.status == st.CONVERGED

    def summary(self) -> str:
        return st.summarize(self.status)


def _kernel_array(a: np.ndarray) -> np.ndarray:
    """C-contiguous, writable float64: the one array type the kernels are compiled for
    (a read-only or strided view would make Numba compile a second specialisation)."""
    if a.dtype == np.float64 and a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, dtype=np.float64, order="C")


class Kernels:
    def __init__(self, module):
        self.module = module
        self.layout = module.LAYOUT
        self.n = module.N
        self.m = module.M

    def solve(self, P: np.ndarray, Y0: np.ndarray, options: SolverOptions) -> SolveResult:
        """Solve every sample. ``P``: ``(B, m)``, ``Y0``: ``(B, n)`` (float64)."""
        P = _kernel_array(P)
        Y0 = _kernel_array(Y0)
        B = P.shape[0]
        n = self.n
        Y = np.empty((B, n))
        LU = np.zeros((B, n, n))
        PIV = np.zeros((B, n + 1), dtype=np.int64)
        STATUS = np.empty(B, dtype=np.int8)
        INFO = np.empty((B, 2))
        suffix = "parallel" if B >= options.parallel_threshold else "serial"
        method = options.method or self.layout.get("default_method", "newton")
        if method == "newton":
            fn = getattr(self.module, "newton_batch_" + suffix)
            fn(Y0, P, float(options.tol), float(options.xtol), int(options.max_iter),
               float(options.singular_tol), Y, LU, PIV, STATUS, INFO)
        else:
            memory = 0 if method == "picard" else int(options.anderson_memory)
            fn = getattr(self.module, "fixed_point_batch_" + suffix)
            fn(Y0, P, float(options.tol), int(options.max_iter), float(options.singular_tol),
               memory, Y, LU, PIV, STATUS, INFO)
        return SolveResult(Y, STATUS, INFO[:, 0].astype(np.int64), INFO[:, 1], P, LU, PIV)

    def vjp(self, res: SolveResult, Ybar: np.ndarray, need: np.ndarray, parallel_threshold: int = 32):
        """``-(dF/dtheta)^T (dF/dy)^{-T} Ybar`` per converged sample, ``(B, m)``; zero elsewhere.

        ``need[g]`` selects the parameter groups whose columns are computed; the
        columns of the other groups are left unspecified.
        """
        B = Ybar.shape[0]
        PBAR = np.empty((B, self.m))
        suffix = "parallel" if B >= parallel_threshold else "serial"
        getattr(self.module, "vjp_batch_" + suffix)(res.y, res.p, res.lu, res.piv, res.status, Ybar, need, PBAR)
        return PBAR

    def residual(self, Y: np.ndarray, P: np.ndarray) -> np.ndarray:
        out = np.empty_like(Y)
        self.module.residual_batch_serial(Y, P, out)
        return out
