r"""Batched drivers of the second-order products: one compiled function per product, shared by every system.

The per-sample algebra is that of :mod:`implicit_compiler.runtime.second_order` (derivation in
:mod:`implicit_compiler.derive.second`), with ``J = ∂F/∂y`` factored by the forward at ``y*``
(``LU[b]``, ``PIV[b]``):

* ``jvp``:              ``YDOT[b] = -J⁻¹ (F_θ W[b])``;
* ``hvp``:              ``(HY[b], HP[b]) = H ż``, ``H = ∇²_{(y,θ)} (V[b]ᵀF)``, ``ż = (YDOT[b], W[b])``;
* ``double_backward``:  the whole double backward of one sample in one pass,
  ``v = J⁻ᵀ YBAR[b]``, ``ẏ = -J⁻¹ F_θ W[b]``, ``(h_y, h_θ) = H ż``,
  ``DYBAR[b] = ẏ``, ``DP[b] = -(h_θ + VJP(h_y))`` with ``VJP(u) = -F_θᵀ J⁻ᵀ u``.

Samples whose status is not 0 (converged) get zero rows. As the first-order drivers of
:mod:`implicit_compiler.runtime.drivers`: the kernels (the first-order module's ``solve`` /
``solve_transpose`` / ``vjp_params``, the second-order module's ``jvp_params`` / ``hvp``) are
first-class function arguments (types in :mod:`implicit_compiler.runtime.signatures`);
``drive_<kind>_range(kernels..., lo, hi, ...)`` runs samples ``lo..hi-1`` on the calling thread
(``nogil``) and ``drive_<kind>_batch_parallel`` splits the batch into chunks of ``BATCH_CHUNK``
samples with ``prange``. Each is compiled once, for its one signature, and cached with the package.

:class:`Bound` ties the drivers to one system's kernels: small uncached wrappers that hold the
kernels' addresses as constants (a call from Python passing the kernels as arguments would
convert each one on every call). A small dense system's second-order module also has a fused,
straight-line ``double_backward_range`` (:mod:`implicit_compiler.codegen.emit_second`), which
``drive_fused_double_backward_batch_parallel`` runs over ``prange`` chunks.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types

from . import signatures as sg
from .drivers import BATCH_CHUNK, Drivers

_f1, _f2, _f3, _i1, _i2, _b1, _s1 = sg.f1, sg.f2, sg.f3, sg.i1, sg.i2, sg.b1, sg.s1
_i64 = types.int64

_KERNELS = {
    "jvp": (sg.fn(sg.SOLVE), sg.fn(sg.JVP_PARAMS)),
    "hvp": (sg.fn(sg.HVP),),
    "double_backward": (sg.fn(sg.SOLVE), sg.fn(sg.SOLVE), sg.fn(sg.VJP_PARAMS), sg.fn(sg.JVP_PARAMS),
                        sg.fn(sg.HVP)),
}
# the batch arguments after the kernels (and after lo, hi for the range drivers), ending with tab
_ARGS = {
    # Y, P, LU, PIV, STATUS, W, YDOT
    "jvp": (_f2, _f2, _f3, _i2, _s1, _f2, _f2, _i1),
    # Y, P, STATUS, V, YDOT, W, HY, HP
    "hvp": (_f2, _f2, _s1, _f2, _f2, _f2, _f2, _f2, _i1),
    # Y, P, LU, PIV, STATUS, YBAR, W, need, DYBAR, DP
    "double_backward": (_f2, _f2, _f3, _i2, _s1, _f2, _f2, _b1, _f2, _f2, _i1),
}


# double_backward_range(lo, hi, Y, P, LU, PIV, STATUS, YBAR, W, DYBAR, DP, tab): the fused scalar double
# backward a second-order module emits for a small dense system (codegen/emit_second.py)
DOUBLE_BACKWARD_RANGE = types.void(_i64, _i64, _f2, _f2, _f3, _i2, _s1, _f2, _f2, _f2, _f2, _i1)


def _signatures() -> dict:
    out = {}
    for kind, kern in _KERNELS.items():
        out[kind + "_range"] = types.void(*kern, _i64, _i64, *_ARGS[kind])
        out[kind + "_batch_parallel"] = types.void(*kern, *_ARGS[kind])
    out["fused_double_backward_batch_parallel"] = types.void(sg.fn(DOUBLE_BACKWARD_RANGE),
                                                             *DOUBLE_BACKWARD_RANGE.args[2:])
    return out


# The range drivers copy each sample's rows into scratch vectors allocated once per call and pass
# those to the kernels: a row view (``Y[b]``) passed to a kernel called through a function
# argument keeps its reference-count updates (Numba cannot prune them around such a call), about
# 10 ns per view per call, more than a small kernel's own work. Only the factors are views.


@njit(cache=True, error_model="numpy", nogil=True)
def drive_jvp_range(solve, jvp_params, lo, hi, Y, P, LU, PIV, STATUS, W, YDOT, tab):
    """``YDOT[b] = -J_b⁻¹ (F_θ W[b])`` for the converged samples ``lo <= b < hi``; zero rows elsewhere."""
    n = Y.shape[1]
    m = P.shape[1]
    y = np.empty(n)
    p = np.empty(m)
    w = np.empty(m)
    r = np.empty(n)
    for b in range(lo, hi):
        if STATUS[b] != 0:
            YDOT[b, :] = 0.0
            continue
        for i in range(n):
            y[i] = Y[b, i]
        for c in range(m):
            p[c] = P[b, c]
            w[c] = W[b, c]
        jvp_params(y, p, w, r, tab)
        solve(LU[b], PIV[b], r, tab)
        for i in range(n):
            YDOT[b, i] = -r[i]


@njit(cache=True, error_model="numpy", parallel=True)
def drive_jvp_batch_parallel(solve, jvp_params, Y, P, LU, PIV, STATUS, W, YDOT, tab):
    B = Y.shape[0]
    nchunks = (B + BATCH_CHUNK - 1) // BATCH_CHUNK
    for c in prange(nchunks):
        drive_jvp_range(solve, jvp_params, c * BATCH_CHUNK, min(B, (c + 1) * BATCH_CHUNK), Y, P, LU, PIV, STATUS,
                        W, YDOT, tab)


@njit(cache=True, error_model="numpy", nogil=True)
def drive_hvp_range(hvp, lo, hi, Y, P, STATUS, V, YDOT, W, HY, HP, tab):
    """``(HY[b], HP[b]) = H_b (YDOT[b], W[b])``, ``H_b = ∇²_{(y,θ)} (V[b]ᵀF)`` at the solution, for the
    converged samples ``lo <= b < hi``; zero rows elsewhere."""
    n = Y.shape[1]
    m = P.shape[1]
    y = np.empty(n)
    p = np.empty(m)
    v = np.empty(n)
    ydot = np.empty(n)
    w = np.empty(m)
    hy = np.empty(n)
    hp = np.empty(m)
    for b in range(lo, hi):
        if STATUS[b] != 0:
            HY[b, :] = 0.0
            HP[b, :] = 0.0
            continue
        for i in range(n):
            y[i] = Y[b, i]
            v[i] = V[b, i]
            ydot[i] = YDOT[b, i]
        for c in range(m):
            p[c] = P[b, c]
            w[c] = W[b, c]
        hvp(y, p, v, ydot, w, hy, hp, tab)
        for i in range(n):
            HY[b, i] = hy[i]
        for c in range(m):
            HP[b, c] = hp[c]


@njit(cache=True, error_model="numpy", parallel=True)
def drive_hvp_batch_parallel(hvp, Y, P, STATUS, V, YDOT, W, HY, HP, tab):
    B = Y.shape[0]
    nchunks = (B + BATCH_CHUNK - 1) // BATCH_CHUNK
    for c in prange(nchunks):
        drive_hvp_range(hvp, c * BATCH_CHUNK, min(B, (c + 1) * BATCH_CHUNK), Y, P, STATUS, V, YDOT, W, HY, HP, tab)


@njit(cache=True, error_model="numpy", nogil=True)
def drive_double_backward_range(solve, solve_transpose, vjp_params, jvp_params, hvp, lo, hi, Y, P, LU, PIV, STATUS,
                                YBAR, W, need, DYBAR, DP, tab):
    """The double backward of the converged samples ``lo <= b < hi`` (zero rows elsewhere):
    ``DYBAR[b] = ẏ = -J⁻¹ F_θ W[b]``, ``DP[b] = -(h_θ + VJP(h_y))`` with ``(h_y, h_θ) = H (ẏ, W[b])``,
    ``H = ∇²_{(y,θ)} (vᵀF)``, ``v = J⁻ᵀ YBAR[b]`` (see :mod:`implicit_compiler.derive.second`)."""
    n = Y.shape[1]
    m = P.shape[1]
    y = np.empty(n)
    p = np.empty(m)
    w = np.empty(m)
    v = np.empty(n)
    ydot = np.empty(n)
    hy = np.empty(n)
    hp = np.empty(m)
    pbar = np.empty(m)
    for b in range(lo, hi):
        if STATUS[b] != 0:
            DYBAR[b, :] = 0.0
            DP[b, :] = 0.0
            continue
        lu = LU[b]
        piv = PIV[b]
        for i in range(n):
            y[i] = Y[b, i]
            v[i] = YBAR[b, i]
        for c in range(m):
            p[c] = P[b, c]
            w[c] = W[b, c]
        solve_transpose(lu, piv, v, tab)
        jvp_params(y, p, w, ydot, tab)
        solve(lu, piv, ydot, tab)
        for i in range(n):
            ydot[i] = -ydot[i]
            DYBAR[b, i] = ydot[i]
        hvp(y, p, v, ydot, w, hy, hp, tab)
        solve_transpose(lu, piv, hy, tab)
        vjp_params(y, p, hy, need, pbar, tab)
        for c in range(m):
            DP[b, c] = -(pbar[c] + hp[c])


@njit(cache=True, error_model="numpy", parallel=True)
def drive_double_backward_batch_parallel(solve, solve_transpose, vjp_params, jvp_params, hvp, Y, P, LU, PIV, STATUS,
                                         YBAR, W, need, DYBAR, DP, tab):
    B = Y.shape[0]
    nchunks = (B + BATCH_CHUNK - 1) // BATCH_CHUNK
    for c in prange(nchunks):
        drive_double_backward_range(solve, solve_transpose, vjp_params, jvp_params, hvp, c * BATCH_CHUNK,
                                    min(B, (c + 1) * BATCH_CHUNK), Y, P, LU, PIV, STATUS, YBAR, W, need, DYBAR, DP,
                                    tab)


@njit(cache=True, error_model="numpy", parallel=True)
def drive_fused_double_backward_batch_parallel(double_backward_range, Y, P, LU, PIV, STATUS, YBAR, W, DYBAR, DP,
                                               tab):
    """A module's fused ``double_backward_range`` over ``prange`` chunks of ``BATCH_CHUNK`` samples."""
    B = Y.shape[0]
    nchunks = (B + BATCH_CHUNK - 1) // BATCH_CHUNK
    for c in prange(nchunks):
        double_backward_range(c * BATCH_CHUNK, min(B, (c + 1) * BATCH_CHUNK), Y, P, LU, PIV, STATUS, YBAR, W, DYBAR,
                              DP, tab)


_SIGNATURES = _signatures()
driver = Drivers(globals(), _SIGNATURES)
"""The second-order driver ``name`` (see :class:`~implicit_compiler.runtime.drivers.Drivers`)."""


class Bound:
    """The second-order drivers bound to one system's kernels: ``jvp``, ``hvp`` and
    ``double_backward``, each ``(threaded, *batch arguments)`` (the arguments of
    ``drive_<kind>_batch_parallel`` after the kernels), running the ``prange`` driver when
    ``threaded`` and the range driver over the whole batch otherwise.

    The wrappers refer to the drivers and kernels by address, as constants (see
    :class:`~implicit_compiler.runtime.drivers._Entry`): they compile in a fraction of a second
    and are compiled once per process and system; they cannot be cached (they hold addresses).
    ``fused``: ``(first-class function, dispatcher)`` of a module's fused ``double_backward_range``
    (signature ``DOUBLE_BACKWARD_RANGE``), which then replaces the double-backward driver: called
    directly on one thread, over ``prange`` chunks by ``drive_fused_double_backward_batch_parallel``."""

    def __init__(self, solve, solve_transpose, vjp_params, jvp_params, hvp, fused=None):
        from numba import njit as _njit

        jr, jp = driver("jvp_range"), driver("jvp_batch_parallel")
        hr, hp = driver("hvp_range"), driver("hvp_batch_parallel")
        dr, dp = driver("double_backward_range"), driver("double_backward_batch_parallel")

        @_njit(error_model="numpy", nogil=True)
        def jvp(threaded, Y, P, LU, PIV, STATUS, W, YDOT, tab):
            if threaded:
                jp(solve, jvp_params, Y, P, LU, PIV, STATUS, W, YDOT, tab)
            else:
                jr(solve, jvp_params, 0, Y.shape[0], Y, P, LU, PIV, STATUS, W, YDOT, tab)

        @_njit(error_model="numpy", nogil=True)
        def hvp_(threaded, Y, P, STATUS, V, YDOT, W, HY, HP, tab):
            if threaded:
                hp(hvp, Y, P, STATUS, V, YDOT, W, HY, HP, tab)
            else:
                hr(hvp, 0, Y.shape[0], Y, P, STATUS, V, YDOT, W, HY, HP, tab)

        @_njit(error_model="numpy", nogil=True)
        def double_backward(threaded, Y, P, LU, PIV, STATUS, YBAR, W, need, DYBAR, DP, tab):
            if threaded:
                dp(solve, solve_transpose, vjp_params, jvp_params, hvp, Y, P, LU, PIV, STATUS, YBAR, W, need, DYBAR,
                   DP, tab)
            else:
                dr(solve, solve_transpose, vjp_params, jvp_params, hvp, 0, Y.shape[0], Y, P, LU, PIV, STATUS, YBAR,
                   W, need, DYBAR, DP, tab)

        if fused is not None:
            # a module's fused double_backward_range (a first-class function) and its compiled dispatcher
            fused_fn, fused_range = fused
            fp = driver("fused_double_backward_batch_parallel")

            # compiled now, for its one signature: a first large batch compiles nothing
            @_njit(types.void(*DOUBLE_BACKWARD_RANGE.args[2:]), error_model="numpy", nogil=True)
            def fused_parallel(Y, P, LU, PIV, STATUS, YBAR, W, DYBAR, DP, tab):
                fp(fused_fn, Y, P, LU, PIV, STATUS, YBAR, W, DYBAR, DP, tab)

            def double_backward(threaded, Y, P, LU, PIV, STATUS, YBAR, W, need, DYBAR, DP, tab):  # noqa: F811
                if threaded:
                    fused_parallel(Y, P, LU, PIV, STATUS, YBAR, W, DYBAR, DP, tab)
                else:
                    fused_range(0, Y.shape[0], Y, P, LU, PIV, STATUS, YBAR, W, DYBAR, DP, tab)

        self.fused = fused is not None
        self.jvp, self.hvp, self.double_backward = jvp, hvp_, double_backward
