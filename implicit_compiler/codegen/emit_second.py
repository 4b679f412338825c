"""Emit the second-order kernel module of one system (forward mode and double backward).

A separate module from the first-order one (its own content hash, the first-order hash
followed by ``second``), generated and compiled only when a forward-mode or double-backward
product is first asked for. It holds two expression kernels, compiled eagerly with the
signatures of :mod:`implicit_compiler.runtime.signatures`:

* ``jvp_params(y, p, w, out, tab)``: ``out = F_θ w`` over the structural non-zeros of
  ``∂F/∂θ`` (one joint CSE);
* ``hvp(y, p, v, ydot, w, out_y, out_p, tab)``: ``(out_y, out_p) = H ż`` with
  ``H = ∇²_{(y,θ)} (vᵀF)`` and ``ż = (ẏ, w)``, from the structural non-zeros of the second
  derivatives (see :mod:`implicit_compiler.derive.second` for the derivation);
* for small systems with a dense factorisation, ``double_backward_range``: the whole double
  backward of a range of samples in straight-line scalar code (no kernel calls; see
  :func:`fused_double_backward`). Larger systems run the runtime's batch drivers
  (:mod:`implicit_compiler.runtime.second_drivers`) over the two kernels above.

``tab`` is the family index table of the calling convention (unused here: these kernels
are straight-line code).
"""

from __future__ import annotations

import pprint

import sympy as sp

from .._version import __version__
from ..errors import SystemDefinitionError
from .emit import INDENT, cse_lines, slot_map
from .printer import NumbaPrinter

DECORATOR = "@njit({sig}, cache=True, error_model='numpy')"


def _placeholders(prefix: str, count: int) -> list[sp.Dummy]:
    # Dummies never equal a user's symbol; they are printed through the slot map only.
    return [sp.Dummy(f"{prefix}{i}") for i in range(count)]


def check_printable_second(sd, smap: dict) -> None:
    """Every second derivative prints as Numba code, else a :class:`SystemDefinitionError`
    naming the residual and the two symbols."""
    printer = NumbaPrinter(smap)
    for i, j, k, e in sd.hess:
        where = (f"the second derivative of residual {i} with respect to {sd.z_symbol(j)} and "
                 f"{sd.z_symbol(k)} ({e})")
        try:
            printer.doprint(e)
        except SystemDefinitionError as exc:
            raise SystemDefinitionError(f"{where}: {exc}") from None
        except (NotImplementedError, TypeError, ValueError) as exc:  # SymPy's printer errors
            raise SystemDefinitionError(
                f"{where}: cannot generate Numba code for it ({type(exc).__name__}: {exc}); rewrite the "
                f"residual with elementary functions"
            ) from None


def jvp_params_exprs(sd, w) -> list[sp.Expr]:
    """``(F_θ w)_i`` for every residual ``i``, from the structural non-zeros of ``F_θ``."""
    rows = [sp.S.Zero] * sd.n
    for i, c, e in sd.jac_p:
        rows[i] += e * w[c]
    return rows


def hvp_exprs(sd, v, ydot, w) -> list[sp.Expr]:
    """``(H ż)_k`` for ``k`` over ``z = (y, θ)``, from the sparse second derivatives."""
    zdot = list(ydot) + list(w)
    out = [sp.S.Zero] * (sd.n + sd.m)
    for i, j, k, e in sd.hess:
        out[k] += v[i] * zdot[j] * e
        if j != k:
            out[j] += v[i] * zdot[k] * e
    return out


def _lu_solve_lines(n: int, indent: str, b: str) -> list[str]:
    """``b <- A^{-1} b`` on scalars ``{b}_i`` with the dense factors in ``a_i_j`` / ``piv_k``, operation
    for operation as ``runtime.linalg.lu_solve`` (the first-order module's dense ``solve``)."""
    out = []
    for k in range(n - 1):
        for i in range(k + 1, n):
            out += [f"{indent}if piv_{k} == {i}:", f"{indent}{INDENT}{b}_{k}, {b}_{i} = {b}_{i}, {b}_{k}"]
    for i in range(1, n):
        out.append(f"{indent}{b}_{i} = {b}_{i}" + "".join(f" - a_{i}_{j} * {b}_{j}" for j in range(i)))
    for i in range(n - 1, -1, -1):
        terms = "".join(f" - a_{i}_{j} * {b}_{j}" for j in range(i + 1, n))
        out.append(f"{indent}{b}_{i} = ({b}_{i}{terms}) / a_{i}_{i}")
    return out


def fused_double_backward(sd) -> list[str]:
    """``double_backward_range(lo, hi, Y, P, LU, PIV, STATUS, YBAR, W, DYBAR, DP, tab)``: the whole
    double backward of samples ``lo..hi-1`` in straight-line scalar code, for a small system with a
    dense factorisation (the factors as ``runtime.linalg.lu_factor`` leaves them):
    ``v = J⁻ᵀ ȳ``, ``ẏ = -J⁻¹ F_θ w``, ``(h_y, h_θ) = H (ẏ, w)``, ``DYBAR = ẏ``,
    ``DP = -(h_θ - F_θᵀ J⁻ᵀ h_y)``; zero rows for samples whose status is not 0."""
    from .emit import _scalar_lu_solve_transpose

    n, m = sd.n, sd.m
    I1, I2, I3 = INDENT, INDENT * 2, INDENT * 3
    base = {s: f"y_{j}" for j, s in enumerate(sd.unknowns)}
    base.update({s: f"p_{c}" for c, s in enumerate(sd.params)})
    v, ydot, w, hy = (_placeholders("v", n), _placeholders("ydot", n), _placeholders("w", m),
                      _placeholders("hy", n))
    smap = dict(base)
    smap.update({s: f"v_{i}" for i, s in enumerate(v)})
    smap.update({s: f"yd_{i}" for i, s in enumerate(ydot)})
    smap.update({s: f"w_{c}" for c, s in enumerate(w)})
    smap.update({s: f"hy_{i}" for i, s in enumerate(hy)})
    body = [f"{I1}for b in range(lo, hi):",
            f"{I2}if STATUS[b] != 0:", f"{I3}DYBAR[b, :] = 0.0", f"{I3}DP[b, :] = 0.0", f"{I3}continue"]
    body += [f"{I2}y_{i} = Y[b, {i}]" for i in range(n)] + [f"{I2}p_{c} = P[b, {c}]" for c in range(m)]
    body += [f"{I2}w_{c} = W[b, {c}]" for c in range(m)] + [f"{I2}v_{i} = YBAR[b, {i}]" for i in range(n)]
    body += [f"{I2}a_{i}_{j} = LU[b, {i}, {j}]" for i in range(n) for j in range(n)]
    body += [f"{I2}piv_{k} = PIV[b, {k}]" for k in range(n - 1)]
    body += _scalar_lu_solve_transpose(n, I2, "v")
    # ẏ = -J⁻¹ (F_θ w): the expressions of the jvp_params kernel, the operations of its solve
    lines, outs = cse_lines(jvp_params_exprs(sd, w), smap, indent=I2, prefix="j")
    body += list(lines) + [f"{I2}yd_{i} = {o}" for i, o in enumerate(outs)]
    body += _lu_solve_lines(n, I2, "yd")
    body += [f"{I2}yd_{i} = -yd_{i}" for i in range(n)] + [f"{I2}DYBAR[b, {i}] = yd_{i}" for i in range(n)]
    lines, outs = cse_lines(hvp_exprs(sd, v, ydot, w), smap, indent=I2, prefix="h")
    body += list(lines) + [f"{I2}hy_{k} = {o}" for k, o in enumerate(outs[:n])]
    body += [f"{I2}hp_{c} = {o}" for c, o in enumerate(outs[n:])]
    body += _scalar_lu_solve_transpose(n, I2, "hy")
    # VJP(h_y) = -F_θᵀ (J⁻ᵀ h_y), column by column
    cols = [sp.S.Zero] * m
    for i, c, e in sd.jac_p:
        cols[c] += hy[i] * e
    lines, outs = cse_lines(cols, smap, indent=I2, prefix="q")
    body += list(lines) + [f"{I2}DP[b, {c}] = -(-({o}) + hp_{c})" for c, o in enumerate(outs)]
    return ["@njit(DOUBLE_BACKWARD_RANGE, cache=True, error_model='numpy', nogil=True)",
            "def double_backward_range(lo, hi, Y, P, LU, PIV, STATUS, YBAR, W, DYBAR, DP, tab):", *body]


def _kernel(name: str, sig: str, args: str, exprs, targets, smap) -> list[str]:
    lines, outs = cse_lines(exprs, smap)
    body = list(lines) + [f"{INDENT}{t} = {o}" for t, o in zip(targets, outs)]
    return [DECORATOR.format(sig=sig), f"def {name}({args}):", *(body or [f"{INDENT}pass"])]


def emit_second_module(sd, layout: dict, key: str, first_order_key: str = "", fused: bool = False) -> str:
    """The full source of the second-order module for ``sd`` (a :class:`SecondDerivation`); with
    ``fused`` (a small system with a dense factorisation) also :func:`fused_double_backward`."""
    n, m = sd.n, sd.m
    base = slot_map(sd.unknowns, sd.params)
    check_printable_second(sd, base)
    v, ydot, w = _placeholders("v", n), _placeholders("ydot", n), _placeholders("w", m)
    smap = dict(base)
    smap.update({s: f"v[{i}]" for i, s in enumerate(v)})
    smap.update({s: f"ydot[{i}]" for i, s in enumerate(ydot)})
    smap.update({s: f"w[{c}]" for c, s in enumerate(w)})

    jvp = _kernel("jvp_params", "JVP_PARAMS", "y, p, w, out, tab", jvp_params_exprs(sd, w),
                  [f"out[{i}]" for i in range(n)], smap)
    hz = hvp_exprs(sd, v, ydot, w)
    hvp = _kernel("hvp", "HVP", "y, p, v, ydot, w, out_y, out_p, tab", hz,
                  [f"out_y[{k}]" for k in range(n)] + [f"out_p[{c}]" for c in range(m)], smap)
    out = [_header(sd, layout, key, first_order_key),
           f"N = {n}\nM = {m}\nHESS_NNZ = {len(sd.hess)}\n",
           "LAYOUT = " + pprint.pformat(layout, width=100, sort_dicts=False) + "\n",
           "\n".join(jvp) + "\n", "\n".join(hvp) + "\n"]
    if fused:
        out.append("\n".join(fused_double_backward(sd)) + "\n")
    return "\n\n".join(out).rstrip() + "\n"


def _header(sd, layout, key, first_order_key) -> str:
    import numba

    lines = [
        f"# Generated by implicit_compiler {__version__} (sympy {sp.__version__}, numba {numba.__version__}).",
        f"# Content hash: {key}",
        f"# Second-order kernels of system {layout['name']!r} ({layout['kind']}): {sd.n} unknowns, "
        f"{sd.m} parameters;",
        f"# the first-order module of the same system has key {first_order_key or '(not given)'}.",
        f"# dF/dtheta: {len(sd.jac_p)} structural non-zeros; second derivatives (k <= j in z = (y, theta)): "
        f"{len(sd.hess)}.",
        "#",
        "# jvp_params(y, p, w, out, tab):                out = dF/dtheta w",
        "# hvp(y, p, v, ydot, w, out_y, out_p, tab):     (out_y, out_p) = H (ydot, w),  H = Hessian_(y,theta) of v.F",
        "#",
        "# Argument layout: y[j] is unknown j, p[j] is parameter j:",
    ]
    lines += [f"#   y[{j}] = {s}" for j, s in enumerate(sd.unknowns)]
    lines += [f"#   p[{j}] = {s}" for j, s in enumerate(sd.params)]
    lines.append("# Residuals:")
    for i, r in enumerate(sd.residuals):
        lines += ["#   " + line for line in f"F[{i}] = {r}".splitlines()]
    lines.append("#\n# Do not edit: this file is regenerated from the system when its hash changes.")
    lines += ["", "import math", "", "import numpy as np", "from numba import njit", "",
              "from implicit_compiler.runtime.second_drivers import DOUBLE_BACKWARD_RANGE",
              "from implicit_compiler.runtime.signatures import HVP, JVP_PARAMS"]
    return "\n".join(lines) + "\n"
