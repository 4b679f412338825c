r"""Forward mode and double backward of a solved batch, at NumPy level.

With ``J = ∂F/∂y`` factored by the forward at ``y*`` (``SolveResult.lu`` / ``.piv``)::

    JVP(w)            ẏ = -J⁻¹ (F_θ w)
    VJP(ȳ)            θ̄ = -F_θᵀ J⁻ᵀ ȳ                        (Kernels.vjp)
    hvp(v, ẏ, w)      H ż,  H = ∇²_{(y,θ)} (vᵀF),  ż = (ẏ, w)
    double backward   of L = ⟨w, θ̄(θ, ȳ)⟩ with v = J⁻ᵀ ȳ:
                      ∂L/∂ȳ = ẏ,   ∂L/∂θ = -(H ż)_θ - VJP((H ż)_y)

(derivation in :mod:`implicit_compiler.derive.second`). Every product is per sample;
samples that did not converge get zeros and their status is left as it is.

The second-order module (``jvp_params``, ``hvp``) is generated and compiled on first use
(:class:`LazySecondOrder`); first-order users never build it.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from ..errors import InputError
from . import status as st

_EMPTY_TAB = np.zeros(0, dtype=np.int64)


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


def batched_solve(kernels, res, R: np.ndarray, transpose: bool = False) -> np.ndarray:
    """``J⁻¹ R[b]`` (or ``J⁻ᵀ R[b]``) with the forward's factorisation, for the converged
    samples of ``res``; zero rows elsewhere (:meth:`Kernels.solve_linear`, one compiled loop)."""
    out = kernels.solve_linear(res, R, transpose)
    out[res.status != st.CONVERGED] = 0.0
    return out


class SecondOrder:
    """Batched forward-mode and second-order products of one compiled system.

    ``kernels``: the layer's :class:`~implicit_compiler.runtime.kernels.Kernels` (first-order
    module: solves, VJP); ``module2``: the generated second-order module."""

    def __init__(self, kernels, module2):
        if (module2.N, module2.M) != (kernels.n, kernels.m):
            raise ValueError(f"the second-order module is for {module2.N} unknowns and {module2.M} parameters, "
                             f"the layer has {kernels.n} and {kernels.m}")
        self.kernels = kernels
        self.module2 = module2
        self.n, self.m = kernels.n, kernels.m
        self._need = np.ones(len(kernels.layout["param_groups"]), dtype=np.bool_)

    def _converged(self, res) -> np.ndarray:
        return np.flatnonzero(res.status == st.CONVERGED)

    def jvp(self, res, W) -> np.ndarray:
        """``ẏ = -J⁻¹ F_θ W[b]`` per converged sample, ``(B, n)``; zero elsewhere."""
        B = res.y.shape[0]
        W = _batch("W (the parameter tangent)", W, B, self.m)
        R = np.zeros((B, self.n))
        kernel = self.module2.jvp_params
        for b in self._converged(res):
            kernel(res.y[b], res.p[b], W[b], R[b], _EMPTY_TAB)
        Ydot = batched_solve(self.kernels, res, R)
        np.negative(Ydot, out=Ydot)
        Ydot[res.status != st.CONVERGED] = 0.0  # +0.0, not -0.0
        return Ydot

    def hvp(self, res, V, Ydot, W) -> tuple[np.ndarray, np.ndarray]:
        """``H ż`` per converged sample, split as ``(Hy (B, n), Hp (B, m))``; zero elsewhere.
        ``H = ∇²_{(y,θ)} (V[b]ᵀ F)`` at the solution, ``ż = (Ydot[b], W[b])``."""
        B = res.y.shape[0]
        V = _batch("V (the residual weights)", V, B, self.n)
        Ydot = _batch("Ydot (the solution tangent)", Ydot, B, self.n)
        W = _batch("W (the parameter tangent)", W, B, self.m)
        Hy = np.zeros((B, self.n))
        Hp = np.zeros((B, self.m))
        kernel = self.module2.hvp
        for b in self._converged(res):
            kernel(res.y[b], res.p[b], V[b], Ydot[b], W[b], Hy[b], Hp[b], _EMPTY_TAB)
        return Hy, Hp

    def vjp(self, res, U) -> np.ndarray:
        """``-F_θᵀ J⁻ᵀ U[b]`` per converged sample (the first-order backward), ``(B, m)``."""
        B = res.y.shape[0]
        U = _batch("U", U, B, self.n)
        out = self.kernels.vjp(res, U, self._need, 2**62)
        return np.array(out)  # the kernels' pool may hand its array out again

    def double_backward(self, res, Ybar, W) -> tuple[np.ndarray, np.ndarray]:
        """The derivatives of ``L = ⟨W[b], θ̄_b⟩``, ``θ̄_b = VJP(Ybar[b])``, per converged sample:
        ``(dYbar, dP) = (ẏ, -(H ż)_θ - VJP((H ż)_y))``, ``(B, n)`` and ``(B, m)``; zero elsewhere."""
        B = res.y.shape[0]
        Ybar = _batch("Ybar (the solution cotangent)", Ybar, B, self.n)
        W = _batch("W (the cotangent of the parameter gradient)", W, B, self.m)
        V = batched_solve(self.kernels, res, Ybar, transpose=True)
        Ydot = self.jvp(res, W)
        Hy, Hp = self.hvp(res, V, Ydot, W)
        dP = self.vjp(res, Hy)
        dP += Hp
        np.negative(dP, out=dP)
        bad = res.status != st.CONVERGED
        dP[bad] = 0.0
        return Ydot, dP


def _warm(so: SecondOrder) -> None:
    """Compile (or load from Numba's cache) everything a call reaches, now: the kernels have
    their signatures already; the first-order module's ``solve`` / ``solve_transpose`` are
    compiled on their first call from Python. One sample with the identity as its factored
    Jacobian; arithmetic faults at the zero point are harmless (NumPy error model)."""
    from types import SimpleNamespace

    n, m = so.n, so.m
    piv = np.arange(n + 1, dtype=np.int64)
    piv[n] = 1  # the dense factors (see the first-order module's factor_dense)
    res = SimpleNamespace(y=np.zeros((1, n)), p=np.zeros((1, m)), lu=np.eye(n)[None].copy(), piv=piv[None].copy(),
                          status=np.zeros(1, dtype=np.int8))
    so.double_backward(res, np.zeros((1, n)), np.zeros((1, m)))


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
