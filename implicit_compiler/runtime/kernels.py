"""NumPy-level access to a generated kernel module: batched solve and VJP.

:class:`Kernels` wraps one generated module. It owns no SymPy and no torch: the
torch layer and the NumPy entry point both call it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from . import drivers, threads
from . import status as st
from .linalg import PIV_DENSE_IN_PATTERN, PIV_NEEDS_DENSE
from .options import SolverOptions


@dataclass
class SolveResult:
    """Result of a batched solve (NumPy arrays, batch first).

    ``y``: solutions ``(B, n)``; ``status``: per-sample :class:`Status` codes;
    ``iterations``; ``residual_norm`` (``||F||_inf`` at ``y``). ``lu``/``piv`` hold
    the factorisation of dF/dy at ``y``, reused by :meth:`Kernels.vjp` (for samples that
    stopped before factoring, e.g. on a non-finite input, their contents are unspecified).
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
        return st.summarize(self.status) + fallback_note(getattr(self, "dense_fallback", None))


def fallback_note(fallback) -> str:
    """The line a summary adds for the samples solved with the dense fallback (a boolean mask), or ''."""
    if fallback is None or not fallback.any():
        return ""
    k = int(np.count_nonzero(fallback))
    return (f"\n{k} sample(s) solved with dense LU with partial pivoting: a pivot of the fixed-order "
            f"sparse elimination failed its size check (first: sample {int(np.flatnonzero(fallback)[0])})")


def _kernel_array(a: np.ndarray) -> np.ndarray:
    """C-contiguous, writable float64: the one array type the kernels are compiled for
    (a read-only or strided view would make Numba compile a second specialisation)."""
    if a.dtype == np.float64 and a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, dtype=np.float64, order="C")


class ArrayPool:
    """Hands out large arrays again once nothing else references them.

    A fresh multi-megabyte array is mapped on its first touch, page by page; on the
    development machine that cost about 1.3 us per 4 KiB page, 3 ms for the 9 MB a
    10^5-sample appendix solve writes, half the whole forward + backward. Arrays the
    caller still holds (a returned ``SolveResult``, an output tensor, autograd's saved
    state) keep their reference count up and are never handed out again. Arrays
    below ``min_bytes`` are not pooled: allocating them is cheaper than the check.
    """

    min_bytes = 1 << 16

    def __init__(self):
        self._arrays = {}
        # The reference-count test relies on the GIL (CPython's free-threaded build has no such guarantee).
        self.enabled = getattr(sys, "_is_gil_enabled", lambda: True)()

    def empty(self, key, shape, dtype=np.float64) -> np.ndarray:
        arr = self._arrays.get(key)
        # references: the dict, ``arr`` and getrefcount's argument
        if arr is not None and arr.shape == shape and arr.dtype == dtype and sys.getrefcount(arr) <= 3:
            return arr
        arr = np.empty(shape, dtype)
        if self.enabled and arr.nbytes >= self.min_bytes:
            self._arrays[key] = arr
        return arr

    def zeros(self, key, shape, dtype=np.float64) -> np.ndarray:
        arr = self.empty(key, shape, dtype)
        arr.fill(0)
        return arr


class Kernels:
    MIN_PARALLEL_SECONDS = 200e-6
    UNMEASURED_PARALLEL_BATCH = 4096
    REPROBE_EVERY = 32  # serial calls, after a slow threaded run, before the threads are tried again

    def __init__(self, module):
        self.module = module
        self.layout = module.LAYOUT
        self.n = module.N
        self.m = module.M
        self.sparse = getattr(module, "FACTORIZATION", "dense") == "sparse"
        # Per-sample storage of dF/dy and its factors: (n, n), or (1, L) pattern values (runtime.linalg)
        self.lu_shape = tuple(getattr(module, "LU_SHAPE", (self.n, self.n)))
        self.pattern = self.lu_shape != (self.n, self.n)
        self.tab = module.TABLES  # the module's integer tables, passed to every kernel
        self.pool = ArrayPool()
        # The generated drivers read Y0 as (1, n) (one guess for every sample) or (B, n);
        # a subclass with drivers of its own always gets (B, n).
        self.shared_y0 = type(self).solve is Kernels.solve
        self._options_cache = None
        self._cost = {}  # seconds per sample, last measured on a serial run, per kernel
        self._tcost = {}  # (seconds per sample, batch) of the last threaded run (thread start included), per kernel
        self._since_probe = {}  # serial calls since a threaded run was found slower than serial, per kernel
        self._forced = None  # during warm_up: True runs the prange drivers, False the range kernels

    def solve(self, P: np.ndarray, Y0: np.ndarray, options: SolverOptions) -> SolveResult:
        """Solve every sample. ``P``: ``(B, m)``, ``Y0``: ``(B, n)`` or ``(1, n)`` (float64)."""
        P = _kernel_array(P)
        Y0 = _kernel_array(Y0)
        B = P.shape[0]
        n = self.n
        if Y0.shape[0] != B and not (Y0.shape[0] == 1 and self.shared_y0):
            Y0 = np.ascontiguousarray(np.broadcast_to(Y0, (B, n)))
        shape = (B, *self.lu_shape)
        # Sparse elimination writes only the fill positions: the rest must read as zero (a
        # pattern storage holds fill positions only; its Jacobian kernel zeroes the fill-in).
        zero_lu = self.sparse and not self.pattern
        if B * (self.lu_shape[0] * self.lu_shape[1] + n) * 8 < ArrayPool.min_bytes:  # small: plain allocations
            Y = np.empty((B, n))
            LU = np.zeros(shape) if zero_lu else np.empty(shape)
            PIV = np.empty((B, n + 1), dtype=np.int64)
            STATUS = np.empty(B, dtype=np.int8)
            INFO = np.empty((B, 2))
        else:
            pool = self.pool
            Y = pool.empty("Y", (B, n))
            LU = pool.zeros("LU", shape) if zero_lu else pool.empty("LU", shape)
            PIV = pool.empty("PIV", (B, n + 1), np.int64)
            STATUS = pool.empty("STATUS", (B,), np.int8)
            INFO = pool.empty("INFO", (B, 2))
        if self.pattern:
            PIV[:, n] = 0  # (a flag PIV_NEEDS_DENSE, once set by the factor kernel, stays)
        method, scalars = self._scalar_options(options)
        kind = {"newton": "newton", "trust-region": "trust_region"}.get(method, "fixed_point")
        self._run(kind, B, (Y0, P, *scalars, Y, LU, PIV, STATUS, INFO), options.parallel_threshold)
        fallback = None
        if self.pattern:
            redo = np.flatnonzero(PIV[:, n] == PIV_NEEDS_DENSE)
            if redo.size:
                fallback = self._solve_dense_fallback(kind, redo, Y0, P, scalars, Y, LU, PIV, STATUS, INFO)
        if B < 4096:
            iterations = INFO[:, 0].astype(np.int64)
        else:
            iterations = self.pool.empty("iterations", (B,), np.int64)
            np.copyto(iterations, INFO[:, 0], casting="unsafe")
        res = SolveResult(Y, STATUS, iterations, INFO[:, 1], P, LU, PIV)
        mask = np.zeros(B, dtype=bool)
        if fallback is not None:
            mask[fallback[0]] = True
            res.dense_factors = fallback  # (samples, factors, pivots); not an array: not a result tensor
        res.dense_fallback = mask
        return res

    # ------------------------------------------------------------------ dense fallback (pattern storage)
    # A pattern storage holds the sparse factors only. A sample whose fixed-order elimination
    # meets a pivot that fails its size check (the factor kernel flags it PIV_NEEDS_DENSE and
    # reports a zero pivot) is solved again from its initial guess with a storage that has room
    # for dense factors (LU with partial pivoting, runtime.drivers.pattern_factor_dense). Its
    # pattern values at y* and the flag PIV_DENSE_IN_PATTERN are kept in the result; the dense
    # factors are kept beside it (``dense_factors``) and recomputed from the pattern values when
    # a result comes back without them (from torch's saved tensors). ``dense_fallback`` marks
    # those samples.

    def _dense_storage(self, k: int):
        L = self.lu_shape[1] + self.n * self.n
        return np.zeros((k, 1, L)), np.zeros((k, self.n + 1), dtype=np.int64)

    def _solve_dense_fallback(self, kind, idx, Y0, P, scalars, Y, LU, PIV, STATUS, INFO):
        n, k = self.n, idx.size
        LU2, PIV2 = self._dense_storage(k)
        Y2 = np.empty((k, n))
        STATUS2 = np.empty(k, dtype=np.int8)
        INFO2 = np.empty((k, 2))
        Y0s = Y0 if Y0.shape[0] == 1 else np.ascontiguousarray(Y0[idx])
        getattr(self.module, kind + "_range")(0, k, Y0s, np.ascontiguousarray(P[idx]), *scalars, Y2, LU2, PIV2,
                                              STATUS2, INFO2, self.tab)
        Y[idx] = Y2
        STATUS[idx] = STATUS2
        INFO[idx] = INFO2
        PIV[idx] = PIV2
        PIV[idx, n] = PIV_DENSE_IN_PATTERN
        LU[idx, :, :] = LU2[:, :, :self.lu_shape[1]]
        return idx, LU2, PIV2

    def _fallback_factors(self, res):
        """``(samples, factors, pivots)`` of the samples of ``res`` factored densely, or None."""
        if not self.pattern or res.piv.shape[1] != self.n + 1 or res.lu.shape[1:] != self.lu_shape:
            return None
        idx = np.flatnonzero(res.piv[:, self.n] == PIV_DENSE_IN_PATTERN)
        if idx.size == 0:
            return None
        got = getattr(res, "dense_factors", None)
        if got is not None and np.array_equal(got[0], idx):
            return got
        LU2, PIV2 = self._dense_storage(idx.size)
        LU2[:, :, :self.lu_shape[1]] = res.lu[idx]
        drivers.driver("pattern_dense_factor_batch").dispatcher(LU2, PIV2, self.tab)
        return idx, LU2, PIV2

    def _scalar_options(self, options: SolverOptions) -> tuple:
        """(method, the driver's scalar arguments), remembered for the last options object."""
        cached = self._options_cache
        if cached is not None and cached[0] is options:
            return cached[1]
        method = options.method or self.layout.get("default_method", "newton")
        if method in ("newton", "trust-region"):
            scalars = (float(options.tol), float(options.rtol), float(options.xtol), int(options.max_iter),
                       float(options.singular_tol))
        else:
            memory = 0 if method == "picard" else int(options.anderson_memory)
            scalars = (float(options.tol), float(options.rtol), int(options.max_iter), float(options.singular_tol),
                       memory)
        self._options_cache = (options, (method, scalars))
        return method, scalars

    def vjp(self, res: SolveResult, Ybar: np.ndarray, need: np.ndarray, parallel_threshold: int = 32):
        """``-(dF/dtheta)^T (dF/dy)^{-T} Ybar`` per converged sample, ``(B, m)``; zero elsewhere.

        ``need[g]`` selects the parameter groups whose columns are computed; the
        columns of the other groups are left unspecified.
        """
        B = Ybar.shape[0]
        PBAR = self.pool.empty("PBAR", (B, self.m))
        fb = self._fallback_factors(res)
        status = res.status
        if fb is not None:
            status = status.copy()
            status[fb[0]] = st.SINGULAR_JACOBIAN  # done below, with their dense factors
        args = (res.y, res.p, res.lu, res.piv, status, Ybar, need, PBAR)
        self._run("vjp", B, args, parallel_threshold)
        if fb is not None:
            idx, LU2, PIV2 = fb
            sub = np.empty((idx.size, self.m))
            self.module.vjp_range(0, idx.size, np.ascontiguousarray(res.y[idx]), np.ascontiguousarray(res.p[idx]),
                                  LU2, PIV2, np.ascontiguousarray(res.status[idx]),
                                  _kernel_array(np.ascontiguousarray(Ybar[idx])), need, sub, self.tab)
            PBAR[idx] = sub
        return PBAR

    def _run(self, kind: str, B: int, args: tuple, parallel_threshold: int) -> None:
        """``<kind>_range(0, B, *args)`` on this thread, or the ``prange`` driver
        ``<kind>_batch_parallel`` when the batch is at least ``parallel_threshold``
        samples and, by the cost per sample last measured on this thread, at least
        ``MIN_PARALLEL_SECONDS`` of work (starting Numba's threads costs tens of
        microseconds on an idle machine, much more on a loaded one). Before any
        measurement, only batches of ``UNMEASURED_PARALLEL_BATCH`` or more go threaded."""
        t0 = time.perf_counter()
        if self.threaded(kind, B, parallel_threshold):
            getattr(self.module, kind + "_batch_parallel")(*args, self.tab)
            threads.note_started()
            self.measured(kind, B, t0, threaded=True)
            return
        getattr(self.module, kind + "_range")(0, B, *args, self.tab)
        self.measured(kind, B, t0)

    def threaded(self, key: str, B: int, parallel_threshold: int) -> bool:
        """Whether a batch of ``B`` samples of the kernel ``key`` goes to the ``prange`` driver
        (the rule of :meth:`_run`; also used by the second-order products)."""
        if self._forced is not None:
            threaded = self._forced
        else:
            cost = self._cost.get(key)
            if cost is None:
                # Not measured yet: only a clearly large batch is worth the threads unmeasured.
                threaded = B >= max(parallel_threshold, self.UNMEASURED_PARALLEL_BATCH)
            else:
                threaded = B >= parallel_threshold and B * cost >= self.MIN_PARALLEL_SECONDS
                tcost, tbatch = self._tcost.get(key, (None, 0))
                if threaded and tcost is not None and tcost >= cost and B <= 4 * tbatch:
                    # The last threaded run of a batch of about this size was no faster per sample
                    # than serial (a busy machine stalls the threads): stay serial, and try the
                    # threads again after REPROBE_EVERY calls.
                    n = self._since_probe.get(key, 0) + 1
                    self._since_probe[key] = n
                    threaded = n >= self.REPROBE_EVERY
        return threaded and threads.parallel_allowed()

    def measured(self, key: str, B: int, t0: float, threaded: bool = False) -> None:
        """Record the cost per sample of a run of ``key`` that started at ``t0``: serial runs set
        the cost that decides whether a batch is worth the threads; threaded runs (whose time
        includes starting the threads, which on a busy machine can stall for milliseconds) are
        kept apart, and one no faster per sample than serial sends later batches back to the
        serial kernels (see :meth:`threaded`)."""
        if B >= 16 and self._forced is None:
            cost = (time.perf_counter() - t0) / B
            if threaded:
                self._tcost[key] = (cost, B)
                self._since_probe[key] = 0
            else:
                self._cost[key] = cost

    def warm_up(self, run) -> None:
        """Call ``run()`` (calls of :meth:`solve`, :meth:`vjp`, ... on a tiny batch) twice:
        on the serial range kernels, then on the ``prange`` drivers, whatever the batch size
        and thresholds say. Everything a later call can reach is then compiled (or loaded
        from Numba's cache), so a first large batch compiles nothing."""
        try:
            for self._forced in (False, True):
                run()
        finally:
            self._forced = None

    @staticmethod
    def _threads() -> int:
        import numba

        return numba.get_num_threads()

    def solve_linear(self, res: SolveResult, R: np.ndarray, transpose: bool = False) -> np.ndarray:
        """``J_b^{-1} R[b]`` (``J_b^{-T} R[b]`` with ``transpose``) for every sample, with the
        factorisation of ``J_b = ∂F/∂y(y*_b)`` that the forward solve left in ``res``; zero
        rows for the samples that did not converge. ``R``: ``(B, n)``; returns a new array."""
        X = np.array(R, dtype=np.float64, order="C")
        fb = self._fallback_factors(res)
        if fb is None:
            self.module.solve_batch(res.lu, res.piv, res.status, X, bool(transpose), self.tab)
            return X
        idx, LU2, PIV2 = fb
        sub = np.ascontiguousarray(X[idx])
        status = res.status.copy()
        status[idx] = st.SINGULAR_JACOBIAN  # solved below, with their dense factors
        self.module.solve_batch(res.lu, res.piv, status, X, bool(transpose), self.tab)
        self.module.solve_batch(LU2, PIV2, np.ascontiguousarray(res.status[idx]), sub, bool(transpose), self.tab)
        X[idx] = sub
        return X

    def residual(self, Y: np.ndarray, P: np.ndarray) -> np.ndarray:
        out = np.empty_like(Y)
        self.module.residual_batch_serial(Y, P, out, self.tab)
        return out
