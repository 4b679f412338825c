r"""Forward mode and double backward of a solved batch, at NumPy level.

With ``J = ∂F/∂y`` factored by the forward at ``y*`` (``SolveResult.lu`` / ``.piv``)::

    JVP(w)            ẏ = -J⁻¹ (F_θ w)
    VJP(ȳ)            θ̄ = -F_θᵀ J⁻ᵀ ȳ                        (Kernels.vjp)
    hvp(v, ẏ, w)      H ż,  H = ∇²_{(y,θ)} (vᵀF),  ż = (ẏ, w)
    double backward   of L = ⟨w, θ̄(θ, ȳ)⟩ with v = J⁻ᵀ ȳ:
                      ∂L/∂ȳ = ẏ,   ∂L/∂θ = -(H ż)_θ - VJP((H ż)_y)

(derivation in :mod:`implicit_compiler.derive.second`). Every product is per sample;
samples that did not converge get zeros and their status is left as it is. Each product is one
compiled call over the batch (the drivers of :mod:`implicit_compiler.runtime.second_drivers`;
the double backward fuses its five steps per sample), threaded for large batches.

The second-order module (``jvp_params``, ``hvp``) is generated and compiled on first use
(:class:`LazySecondOrder`); first-order users never build it.
"""

from __future__ import annotations

import threading
import time
import weakref
from types import SimpleNamespace

import numpy as np

from ..errors import InputError
from . import signatures as sg
from . import status as st
from . import threads
from .drivers import function
from .second_drivers import DOUBLE_BACKWARD_RANGE, Bound


def _batch(name: str, a, B: int, width: int) -> np.ndarray:
    """``a`` as a C-contiguous float64 ``(B, width)`` array, else an :class:`InputError`."""
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a float array of shape ({B}, {width}), got {type(a).__name__}") from None
    if arr.shape != (B, width):
        raise InputError(f"{name} has shape {arr.shape}; expected ({B}, {width}): one row per sample of the "
                         f"solved batch, {width} values per row")
    if not (arr.flags.c_contiguous and arr.flags.writeable):
        # the kernels are compiled for writable C-contiguous float64 rows only
        arr = np.array(arr, order="C")
    return arr


def _own(a: np.ndarray, dtype) -> np.ndarray:
    """A solve result's array as the drivers take it: C-contiguous and writable, of ``dtype``."""
    if a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, dtype=dtype, order="C")


def batched_solve(kernels, res, R: np.ndarray, transpose: bool = False) -> np.ndarray:
    """``J⁻¹ R[b]`` (or ``J⁻ᵀ R[b]``) with the forward's factorisation, for the converged
    samples of ``res``; zero rows elsewhere (:meth:`Kernels.solve_linear`, one compiled loop)."""
    out = kernels.solve_linear(res, R, transpose)
    out[res.status != st.CONVERGED] = 0.0
    return out


def _kernel_entries(kernels, module2) -> tuple:
    """``(solve, solve_transpose, vjp_params, jvp_params, hvp)`` as first-class functions: the
    first-order module's (bound to its own ``_fn_<name>`` where the module defines one) and the
    second-order module's."""
    m1 = kernels.module

    def entry(module, name, sig):
        got = getattr(module, "_fn_" + name, None)
        return got if got is not None else function(getattr(module, name), sig)

    return (entry(m1, "solve", sg.SOLVE), entry(m1, "solve_transpose", sg.SOLVE),
            entry(m1, "vjp_params", sg.VJP_PARAMS), entry(module2, "jvp_params", sg.JVP_PARAMS),
            entry(module2, "hvp", sg.HVP))


class SecondOrder:
    """Batched forward-mode and second-order products of one compiled system.

    ``kernels``: the layer's :class:`~implicit_compiler.runtime.kernels.Kernels` (first-order
    module: solves, VJP); ``module2``: the generated second-order module. Each product is one
    compiled call over the batch (:mod:`implicit_compiler.runtime.second_drivers`), threaded for
    large batches as the first-order drivers are (:meth:`Kernels._run`'s rule: at least
    ``parallel_threshold`` samples and, by the cost per sample last measured, at least
    ``Kernels.MIN_PARALLEL_SECONDS`` of work)."""

    def __init__(self, kernels, module2):
        if (module2.N, module2.M) != (kernels.n, kernels.m):
            raise ValueError(f"the second-order module is for {module2.N} unknowns and {module2.M} parameters, "
                             f"the layer has {kernels.n} and {kernels.m}")
        self.kernels = kernels
        self.module2 = module2
        self.n, self.m = kernels.n, kernels.m
        self._need = np.ones(len(kernels.layout["param_groups"]), dtype=np.bool_)
        fused = getattr(module2, "double_backward_range", None)
        if fused is not None:
            fused = (function(fused, DOUBLE_BACKWARD_RANGE), fused)
        self.drivers = Bound(*_kernel_entries(kernels, module2), fused=fused)

    def _result(self, res) -> tuple:
        return (_own(res.y, np.float64), _own(res.p, np.float64), _own(res.lu, np.float64),
                _own(res.piv, np.int64), _own(res.status, np.int8))

    def _run(self, kind: str, B: int, args: tuple, parallel_threshold: int) -> None:
        """``drivers.<kind>(threaded, *args, tab)``, threaded by the rule of :meth:`Kernels._run`
        (its cost measurements are kept beside the first-order ones, as ``second_<kind>``)."""
        k = self.kernels
        key = "second_" + kind
        fn = getattr(self.drivers, kind)
        t0 = time.perf_counter()
        if k.threaded(key, B, parallel_threshold):
            fn(True, *args, k.tab)
            threads.note_started()
            k.measured(key, B, t0, threaded=True)
            return
        fn(False, *args, k.tab)
        k.measured(key, B, t0)

    def _fallback(self, res):
        """``(samples, their result with dense factors)`` for the samples of a pattern-storage
        result that were solved with dense LU (``res.dense_fallback``), or None: the pattern
        storage holds no factors for them (its solve kernels return NaN there), so the products
        that solve with J are computed for them again from their dense factors."""
        fb = self.kernels._fallback_factors(res)
        if fb is None:
            return None
        idx, LU2, PIV2 = fb
        return idx, SimpleNamespace(y=res.y[idx], p=res.p[idx], lu=LU2, piv=PIV2, status=res.status[idx])

    def jvp(self, res, W, parallel_threshold: int = 32) -> np.ndarray:
        """``ẏ = -J⁻¹ F_θ W[b]`` per converged sample, ``(B, n)``; zero elsewhere."""
        B = res.y.shape[0]
        W = _batch("W (the parameter tangent)", W, B, self.m)
        Y, P, LU, PIV, STATUS = self._result(res)
        Ydot = np.empty((B, self.n))
        self._run("jvp", B, (Y, P, LU, PIV, STATUS, W, Ydot), parallel_threshold)
        fb = self._fallback(res)
        if fb is not None:
            idx, sub = fb
            Ydot[idx] = self.jvp(sub, W[idx], parallel_threshold)
        return Ydot

    def hvp(self, res, V, Ydot, W, parallel_threshold: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """``H ż`` per converged sample, split as ``(Hy (B, n), Hp (B, m))``; zero elsewhere.
        ``H = ∇²_{(y,θ)} (V[b]ᵀ F)`` at the solution, ``ż = (Ydot[b], W[b])``."""
        B = res.y.shape[0]
        V = _batch("V (the residual weights)", V, B, self.n)
        Ydot = _batch("Ydot (the solution tangent)", Ydot, B, self.n)
        W = _batch("W (the parameter tangent)", W, B, self.m)
        Y, P, _, _, STATUS = self._result(res)
        Hy = np.empty((B, self.n))
        Hp = np.empty((B, self.m))
        self._run("hvp", B, (Y, P, STATUS, V, Ydot, W, Hy, Hp), parallel_threshold)
        return Hy, Hp

    def vjp(self, res, U) -> np.ndarray:
        """``-F_θᵀ J⁻ᵀ U[b]`` per converged sample (the first-order backward), ``(B, m)``."""
        B = res.y.shape[0]
        U = _batch("U", U, B, self.n)
        out = self.kernels.vjp(res, U, self._need, 2**62)
        return np.array(out)  # the kernels' pool may hand its array out again

    def double_backward(self, res, Ybar, W, parallel_threshold: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """The derivatives of ``L = ⟨W[b], θ̄_b⟩``, ``θ̄_b = VJP(Ybar[b])``, per converged sample:
        ``(dYbar, dP) = (ẏ, -(H ż)_θ - VJP((H ż)_y))``, ``(B, n)`` and ``(B, m)``; zero elsewhere.
        One fused pass per sample (transposed solve, ``F_θ w``, solve, ``H ż``, VJP)."""
        B = res.y.shape[0]
        Ybar = _batch("Ybar (the solution cotangent)", Ybar, B, self.n)
        W = _batch("W (the cotangent of the parameter gradient)", W, B, self.m)
        dYbar = np.empty((B, self.n))
        dP = np.empty((B, self.m))
        self._run("double_backward", B, (*self._result(res), Ybar, W, self._need, dYbar, dP), parallel_threshold)
        fb = self._fallback(res)
        if fb is not None:
            idx, sub = fb
            dYbar[idx], dP[idx] = self.double_backward(sub, Ybar[idx], W[idx], parallel_threshold)
        return dYbar, dP


def _warm(so: SecondOrder) -> None:
    """Compile everything a call reaches, now: the drivers are compiled (or loaded from Numba's
    cache) when :class:`Bound` is made, the kernels have their signatures already, and the
    per-system wrappers compile on their first call (both their serial and threaded branches).
    One sample with the identity as its factored Jacobian; arithmetic faults at the zero point
    are harmless (NumPy error model)."""
    n, m = so.n, so.m
    piv = np.arange(n + 1, dtype=np.int64)
    piv[n] = 1  # the dense factors (see the first-order module's factor_dense)
    res = SimpleNamespace(y=np.zeros((1, n)), p=np.zeros((1, m)), lu=np.eye(n)[None].copy(), piv=piv[None].copy(),
                          status=np.zeros(1, dtype=np.int8))
    forced, so.kernels._forced = so.kernels._forced, False
    try:
        so.double_backward(res, np.zeros((1, n)), np.zeros((1, m)))
        ydot = so.jvp(res, np.zeros((1, m)))
        so.hvp(res, np.zeros((1, n)), ydot, np.zeros((1, m)))
    finally:
        so.kernels._forced = forced


class LazySecondOrder:
    """``lazy()`` returns the :class:`SecondOrder` of ``kernels``, generating and compiling the
    second-order module on the first call (``build()`` returns the module) and reusing it after."""

    def __init__(self, kernels, build):
        self._kernels = weakref.ref(kernels)
        self._build = build
        self._value = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._value is not None

    def __call__(self) -> SecondOrder:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    kernels = self._kernels()
                    if kernels is None:
                        raise RuntimeError("the layer these kernels belonged to no longer exists")
                    so = SecondOrder(kernels, self._build())
                    _warm(so)
                    self._value = so
        return self._value
