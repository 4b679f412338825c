"""Newton and VJP range kernels of small dense systems, with the per-sample state in scalars.

``newton_range`` solves samples ``lo..hi-1`` with the whole state of a sample in local
scalars (``y_0``, ``F_0``, ``a_0_1``, ...), step by step as
:func:`implicit_compiler.runtime.newton.newton_one`: the same convergence tests, the same
line search, the final step with F and J evaluated and factored at ``y*``, and the
singularity tests of ``solution_status`` (the inverse norm computed exactly). Compared with
the first scalar kernels (``codegen.emit._kernels_scalar``) it is what one writes by hand:

* **One function, no per-sample call.** The sample's code is the body of the loop over the
  batch. A per-sample function taking the batch arrays, even inlined by Numba, increments
  and decrements the reference count of every array argument once per sample (seven atomic
  pairs for the appendix system, most of its time); an early exit is ``continue``.
* **The accepted trial point's residual is kept.** The line search has just evaluated
  ``F(y + t d)``, its max norm and its 2-norm at the point it accepts; those are the next
  iterate's, and only ``dF/dy`` is evaluated there (the values are bit for bit the ones
  a fresh evaluation gives: the same expressions on the same numbers).

The results (solution, status, iterations, residual norm, factors, pivots) are bit for bit
those of ``codegen.emit._kernels_scalar`` (tests/codegen/test_small_kernels.py).
"""

from __future__ import annotations

import numpy as np
import sympy as sp

from . import emit as E
from .printer import NumbaPrinter

INDENT = "    "  # (emit.INDENT)


def _split_res_jac(d, umap, ymap, trial_indent, accept_indent, prefix="s"):
    """F at the trial point ``u`` (``G_i``) and, once ``u`` is accepted as ``y``, dF/dy there
    (``a_i_j``), from the one joint CSE of F and dF/dy that ``emit._scalar_res_jac`` prints:
    the trial computes the temporaries F needs, the accepted point the rest, so ``G_i`` are
    the very expressions (the same order of operations) that a joint evaluation gives."""
    n = d.n
    exprs = [sp.sympify(e) for e in list(d.residuals) + [e for _, _, e in d.jac_y]]
    free = set().union(*(e.free_symbols for e in exprs))
    gen = sp.numbered_symbols("_cse", exclude=free)
    reps, reduced = sp.cse(exprs, symbols=gen, order="canonical")
    # the temporaries the residuals need, transitively (reps are in dependency order)
    need = set().union(set(), *(e.free_symbols for e in reduced[:n]))
    in_trial = [False] * len(reps)
    for k in range(len(reps) - 1, -1, -1):
        sym, e = reps[k]
        if sym in need:
            in_trial[k] = True
            need |= e.free_symbols
    names = {sym: f"{prefix}{k}" for k, (sym, _) in enumerate(reps)}
    trial, accept = [], []
    for k, (_, e) in enumerate(reps):
        if in_trial[k]:
            trial.append(f"{trial_indent}{prefix}{k} = {NumbaPrinter({**umap, **names}).doprint(e)}")
        else:
            accept.append(f"{accept_indent}{prefix}{k} = {NumbaPrinter({**ymap, **names}).doprint(e)}")
    pu, py = NumbaPrinter({**umap, **names}), NumbaPrinter({**ymap, **names})
    trial += [f"{trial_indent}G_{i} = {pu.doprint(e)}" for i, e in enumerate(reduced[:n])]
    accept += [f"{accept_indent}a_{i}_{j} = 0.0" for i, j in np.argwhere(~d.pattern_unknowns)]
    accept += [f"{accept_indent}a_{i}_{j} = {py.doprint(e)}" for (i, j, _), e in zip(d.jac_y, reduced[n:])]
    return trial, accept


def kernels_scalar(d, param_groups):
    """``newton_range`` and ``vjp_range`` of a small dense system (``emit.use_scalar_kernels``)."""
    n, m = d.n, d.m
    I1, I2, I3, I4, I5 = (INDENT * k for k in range(1, 6))
    ys = [f"y_{i}" for i in range(n)]
    us = [f"u_{i}" for i in range(n)]
    ps = [f"p_{j}" for j in range(m)]
    pmap = {s: ps[j] for j, s in enumerate(d.params)}
    ymap = {**{s: ys[j] for j, s in enumerate(d.unknowns)}, **pmap}
    umap = {**{s: us[j] for j, s in enumerate(d.unknowns)}, **pmap}
    Fs = [f"F_{i}" for i in range(n)]
    Gs = [f"G_{i}" for i in range(n)]

    def norm2(indent, target, names, ninf):
        # runtime.newton.norm2: scaled by the largest entry, no overflow
        return [f"{indent}if {ninf} > 0.0 and {ninf} < math.inf:",
                f"{indent}{INDENT}{target} = {ninf} * math.sqrt("
                + " + ".join(f"({v} / {ninf}) * ({v} / {ninf})" for v in names) + ")",
                f"{indent}else:", f"{indent}{INDENT}{target} = {ninf}"]

    res_ok_rel = " and ".join(f"(abs(F_{i}) <= ftol or abs(F_{i}) <= rtol * S_{i})" for i in range(n))

    # The body of the loop over samples (indent I2); the Newton iteration at I3.
    f = [f"{I2}b0 = b * sy"]
    f += [f"{I2}p_{j} = P[b, {j}]" for j in range(m)]
    f += [f"{I2}y_{i} = Y0[b0, {i}]" for i in range(n)]
    f += [f"{I2}INFO[b, 0] = 0.0", f"{I2}INFO[b, 1] = math.inf"]
    f += [f"{I2}Y[b, {i}] = y_{i}" for i in range(n)]
    # Finiteness of the inputs, in a loop over P (one argument per parameter has no limit here).
    f += [f"{I2}finite = True", f"{I2}for j in range(M):", f"{I3}if not math.isfinite(P[b, j]):",
          f"{I4}finite = False"]
    f += [f"{I2}if not (finite and {' and '.join(f'math.isfinite({v})' for v in ys)}):",
          f"{I3}STATUS[b] = NONFINITE", f"{I3}continue"]
    # (local names must not start like the CSE temporaries q0.., r0.., s0.., w0..)
    f += E._nan_max_lines(I2, "yfloor", ys)
    f += [f"{I2}if not (yfloor > 0.0 and yfloor < 1.0):", f"{I3}yfloor = 1.0"]
    f += E._scalar_res_jac(d, ymap, I2)
    f += E._nan_max_lines(I2, "fnorm", Fs)
    f += [f"{I2}INFO[b, 1] = fnorm", f"{I2}if not math.isfinite(fnorm):", f"{I3}STATUS[b] = NONFINITE",
          f"{I3}continue"]
    f += norm2(I2, "fn2", Fs, "fnorm")
    f += [f"{I2}it = 0", f"{I2}prev = 0.0", f"{I2}prev_full = False", f"{I2}nlin = 0",
          f"{I2}final = False", f"{I2}linear = False",
          f"{I2}minp = 0.0", f"{I2}status = CONVERGED"]
    f += [f"{I2}piv_{k} = {k}" for k in range(n)]
    f += [f"{I2}u_{i} = y_{i}" for i in range(n)]
    f += [f"{I2}r_{i} = 1.0" for i in range(n)]
    f += [f"{I2}while True:"]
    # residual scale S_i = sum_j |dF_i/dy_j| |y_j| (runtime residual_scale) and row maxima
    for i in range(n):
        f.append(f"{I3}S_{i} = " + " + ".join(f"abs(a_{i}_{j}) * abs(y_{j})" for j in range(n)))
    for i in range(n):
        f += [f"{I3}rm_{i} = 0.0"] + [f"{I3}rm_{i} = nan_max(rm_{i}, abs(a_{i}_{j}))" for j in range(n)]
    # final pass: equilibration of J(y*) (runtime.linalg.equilibrate)
    f += [f"{I3}if final:"]
    f += [f"{I4}if not ({' and '.join(f'rm_{i} < math.inf' for i in range(n))}):",
          f"{I5}status = NONFINITE", f"{I5}break"]
    f += [f"{I4}rx_{i} = rm_{i} if rm_{i} > 0.0 else 1.0" for i in range(n)]
    for j in range(n):
        col = ", ".join(f"abs(a_{i}_{j}) / rx_{i}" for i in range(n))
        f += [f"{I4}cm_{j} = max({col}{', 0.0' if n == 1 else ''})"]
        f += [f"{I4}if not cm_{j} > 0.0:", f"{I5}cm_{j} = 1.0"]
    f += [f"{I4}anorm = max(" + ", ".join(
        "(" + " + ".join(f"abs(a_{i}_{j}) / rx_{i}" for i in range(n)) + f") / cm_{j}" for j in range(n))
        + (", 0.0)" if n == 1 else ")")]
    f += E._scalar_lu_factor(n, I3)
    f += [f"{I3}if final:", f"{I4}if not (minp > 0.0):", f"{I5}status = SINGULAR_AT_SOLUTION", f"{I5}break"]
    # exact ||Ae^{-1}||_1 = max_j ||cm * J^{-1} (rx_j e_j)||_1 (runtime.linalg.inv_norm1)
    f += [f"{I4}est = 0.0"]
    for j in range(n):
        f += [f"{I4}e_{i} = {'rx_' + str(j) if i == j else '0.0'}" for i in range(n)]
        f += E._scalar_lu_solve(n, I4, "e")
        f += [f"{I4}est = nan_max(est, " + " + ".join(f"abs(e_{i}) * cm_{i}" for i in range(n)) + ")"]
    f += [f"{I4}if linear or not (anorm * est * singular_tol <= 1.0):",
          f"{I5}status = SINGULAR_AT_SOLUTION", f"{I4}break"]
    f += [f"{I3}res_ok = fnorm <= ftol or ({res_ok_rel})"]
    f += [f"{I3}if not (minp > 0.0):",
          f"{I4}status = SINGULAR_AT_SOLUTION if res_ok else SINGULAR_JACOBIAN",
          f"{I4}break"]
    f += [f"{I3}d_{i} = -F_{i}" for i in range(n)]
    f += E._scalar_lu_solve(n, I3, "d")
    f += E._nan_max_lines(I3, "step", [f"d_{i}" for i in range(n)])
    f += E._nan_max_lines(I3, "ynorm", ys)
    f += [f"{I3}xs = xtol * (yfloor + ynorm)"]
    f += [f"{I3}if step <= xs and res_ok:",
          f"{I4}linear = converged_linearly(step, prev, nlin)"]
    # y* = y + d: F and J are evaluated there below, and factored on the final pass.
    f += [f"{I4}y_{i} = y_{i} + d_{i}" for i in range(n)]
    f += [f"{I4}final = True"]
    f += E._scalar_res_jac(d, ymap, I4)
    f += E._nan_max_lines(I4, "fnorm", Fs)
    f += [f"{I4}if not math.isfinite(fnorm):", f"{I5}status = NONFINITE", f"{I5}break", f"{I4}continue"]
    f += [f"{I3}if it >= max_iter:", f"{I4}status = MAX_ITERATIONS", f"{I4}break"]
    # (t = 1 >= MIN_STEP: the first trial always runs; its values are defined after the loop)
    f += [f"{I3}t = 1.0", f"{I3}accepted = False", f"{I3}finite_trial = False", f"{I3}while True:"]
    f += [f"{I4}u_{i} = y_{i} + t * d_{i}" for i in range(n)]
    trial_lines, accept_lines = _split_res_jac(d, umap, ymap, I4, I3)
    f += trial_lines
    f += E._nan_max_lines(I4, "gnorm", Gs)
    f += norm2(I4, "ft2", Gs, "gnorm")
    f += [f"{I4}if ft2 <= math.sqrt(1.0 - 2.0 * ARMIJO_C * t) * fn2:", f"{I5}accepted = True", f"{I5}break",
          f"{I4}if ft2 < math.inf:", f"{I5}finite_trial = True", f"{I4}t *= 0.5",
          f"{I4}if not t >= MIN_STEP:", f"{I5}break"]
    f += [f"{I3}if not accepted:",
          f"{I4}if not finite_trial:", f"{I5}status = NONFINITE",
          f"{I4}else:", f"{I5}status = SINGULAR_AT_SOLUTION if res_ok else LINE_SEARCH_FAILED", f"{I4}break"]
    f += [f"{I3}nlin = linear_run(nlin, t == 1.0 and prev_full, step, prev)", f"{I3}prev_full = t == 1.0",
          f"{I3}prev = t * step", f"{I3}it += 1"]
    # The accepted trial point is the next iterate: its F and norms are those just computed
    # (finite: the trial was accepted against a finite norm); dF/dy is evaluated there.
    f += [f"{I3}y_{i} = u_{i}" for i in range(n)]
    f += [f"{I3}F_{i} = G_{i}" for i in range(n)]
    f += [f"{I3}fnorm = gnorm", f"{I3}fn2 = ft2"]
    f += accept_lines
    f += [f"{I2}Y[b, {i}] = y_{i}" for i in range(n)]
    f += [f"{I2}INFO[b, 0] = it", f"{I2}INFO[b, 1] = fnorm"]
    f += [f"{I2}LU[b, {i}, {j}] = a_{i}_{j}" for i in range(n) for j in range(n)]
    f += [f"{I2}PIV[b, {k}] = piv_{k}" for k in range(n)] + [f"{I2}PIV[b, {n}] = 1"]
    f += [f"{I2}STATUS[b] = status"]

    r = ["@njit(cache=True, error_model='numpy', nogil=True)",
         "def newton_range(lo, hi, Y0, P, ftol, rtol, xtol, max_iter, singular_tol, Y, LU, PIV, STATUS, INFO, tab):",
         f"{I1}# Samples lo..hi-1 on the calling thread, all per-sample state in scalars (one loop body:",
         f"{I1}# a per-sample function would count references to every array argument per sample).",
         f"{I1}sy = 1 if Y0.shape[0] > 1 else 0  # Y0 is (B, n), or (1, n) shared by all samples",
         f"{I1}for b in range(lo, hi):", *f]

    v = ["@njit(cache=True, error_model='numpy', nogil=True)",
         "def vjp_range(lo, hi, Y, P, LU, PIV, STATUS, YBAR, need, PBAR, tab):",
         f"{I1}# PBAR[b] = -(dF/dtheta)^T (dF/dy)^{{-T}} YBAR[b] at the solution, for converged samples.",
         f"{I1}for b in range(lo, hi):",
         f"{I2}if STATUS[b] != 0:",
         f"{I3}for c in range(M):", f"{I4}PBAR[b, c] = 0.0",
         f"{I3}continue"]
    v += [f"{I2}y_{i} = Y[b, {i}]" for i in range(n)] + [f"{I2}p_{j} = P[b, {j}]" for j in range(m)]
    v += [f"{I2}a_{i}_{j} = LU[b, {i}, {j}]" for i in range(n) for j in range(n)]
    v += [f"{I2}piv_{k} = PIV[b, {k}]" for k in range(n - 1)]
    v += [f"{I2}v_{i} = YBAR[b, {i}]" for i in range(n)]
    v += E._scalar_lu_solve_transpose(n, I2, "v")
    v += E._vjp_body(d, ymap, param_groups, I2, lambda i: f"v_{i}", lambda c: f"PBAR[b, {c}]", prefix="w")
    return r + [""] + v
