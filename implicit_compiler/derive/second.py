r"""Second-order derivatives of a residual system: forward mode and double backward.

A layer returns ``y*(θ)`` with ``F(y*, θ) = 0``; ``J = ∂F/∂y`` and ``F_θ = ∂F/∂θ`` are
taken at ``(y*, θ)``, and ``J`` is factored by the forward solve. The first-order
backward is the vector-Jacobian product

    θ̄ = VJP(ȳ) = -F_θᵀ v,        Jᵀ v = ȳ.

**Forward mode.** Differentiating ``F(y*(θ), θ) = 0`` along a direction ``w`` of θ gives
``J ẏ + F_θ w = 0``, so

    ẏ = JVP(w) = -J⁻¹ (F_θ w),

one product with the structural non-zeros of ``F_θ`` and one solve with the forward's
factorisation.

**Double backward.** Let ``w`` be the cotangent of ``θ̄`` and ``L(θ, ȳ) = ⟨w, θ̄(θ, ȳ)⟩``.
Write ``z = (y, θ)``, ``ż = (ẏ, w)`` and ``H = ∇²_z (vᵀF)``, the second derivatives of
``F`` contracted with ``v`` (symmetric, blocks ``H_yy``, ``H_yθ``, ``H_θy = H_yθᵀ``, ``H_θθ``).

1. ``∂L/∂ȳ``: ``L = -wᵀ F_θᵀ J⁻ᵀ ȳ = -(J⁻¹ F_θ w)ᵀ ȳ = ẏᵀ ȳ``, linear in ``ȳ``, so
   ``∂L/∂ȳ = ẏ``.
2. ``∂L/∂θ``: ``L(θ) = -Φ(y*(θ), θ, v(θ))`` with ``Φ(y, θ, v) = vᵀ F_θ(y, θ) w``. Its partial
   derivatives are ``∂Φ/∂θ = H_θθ w``, ``∂Φ/∂y = H_yθ w`` and ``∂Φ/∂v = F_θ w = -J ẏ``.
3. ``dy*/dθ = Y_θ = -J⁻¹ F_θ``. ``v(θ)`` solves ``Jᵀ v = ȳ`` with ``Jᵀ v = ∇_y (vᵀF)``;
   differentiating at fixed ``ȳ``: ``(H_yy Y_θ + H_yθ) + Jᵀ (dv/dθ) = 0``, so
   ``dv/dθ = -J⁻ᵀ (H_yy Y_θ + H_yθ)``.
4. Chain rule: ``-dL/dθ = ∂Φ/∂θ + Y_θᵀ ∂Φ/∂y + (dv/dθ)ᵀ ∂Φ/∂v``
   ``= H_θθ w + Y_θᵀ H_yθ w + (Y_θᵀ H_yy + H_θy) J⁻¹ J ẏ``
   ``= (H_θθ w + H_θy ẏ) + Y_θᵀ (H_yθ w + H_yy ẏ) = (H ż)_θ + Y_θᵀ (H ż)_y``.
5. ``Y_θᵀ u = -F_θᵀ J⁻ᵀ u = VJP(u)``, hence

       ∂L/∂ȳ = ẏ,        ∂L/∂θ = -(H ż)_θ - VJP((H ż)_y).

So one JVP solve, one transposed solve for ``v``, the contraction ``H ż`` and one more VJP
(another transposed solve): all with the forward's factorisation.

**What is derived here.** ``H ż`` never needs ``H`` itself:
``(H ż)_k = Σ_i v_i Σ_j ∂²F_i/∂z_j∂z_k ż_j``. The second derivatives are taken of the
structural non-zeros of ``∂F/∂y`` and ``∂F/∂θ`` only, with respect to the symbols each
entry contains, and by symmetry only for ``k <= j`` in the order ``z = (y, θ)``; each
entry ``(i, j, k, e)`` then contributes ``v_i ż_j e`` to ``(H ż)_k`` and, off the diagonal,
``v_i ż_k e`` to ``(H ż)_j``. Derivation cost follows the number of structural non-zeros
(a 50-unknown Bratu system has about 100), not ``(n + m)²``.

Derivatives follow the same real-argument rules as the first-order ones (the system's
``for_diff`` / ``back`` transforms: ``d|g|/dg = sign(g)``, piecewise-constant functions have
derivative 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .jacobians import Entry

# (residual i, z-index j, z-index k, ∂²F_i/∂z_j∂z_k) with k <= j; z = (y, θ): y_j is j, θ_c is n + c
HessEntry = tuple[int, int, int, sp.Expr]


@dataclass
class SecondDerivation:
    """What :mod:`implicit_compiler.codegen.emit_second` prints: the sparse ``F_θ`` (for
    ``F_θ w``) and the sparse second derivatives of ``F`` (for ``H ż``)."""

    residuals: tuple[sp.Expr, ...]
    unknowns: tuple[sp.Symbol, ...]
    params: tuple[sp.Symbol, ...]
    jac_p: list[Entry]
    hess: list[HessEntry]

    @property
    def n(self) -> int:
        return len(self.unknowns)

    @property
    def m(self) -> int:
        return len(self.params)

    def z_symbol(self, j: int) -> sp.Symbol:
        return self.unknowns[j] if j < self.n else self.params[j - self.n]

    def hessian_matrix(self, v) -> sp.Matrix:
        """``∇²_z (vᵀF)`` as a dense SymPy Matrix for the weights ``v`` (small systems, tests)."""
        N = self.n + self.m
        H = sp.zeros(N, N)
        for i, j, k, e in self.hess:
            H[j, k] += v[i] * e
            if j != k:
                H[k, j] += v[i] * e
        return H


def _identity(e):
    return e


def second_derivation(derivation, for_diff=None, back=None) -> SecondDerivation:
    """The second derivatives of ``derivation`` (a :class:`~implicit_compiler.derive.Derivation`).

    ``for_diff`` / ``back``: the system's transforms to and from its real-argument
    differentiation rules (identity when omitted)."""
    for_diff = for_diff or _identity
    back = back or _identity
    n = len(derivation.unknowns)
    z = tuple(derivation.unknowns) + tuple(derivation.params)
    pos = {s: k for k, s in enumerate(z)}
    first = [(i, j, e) for i, j, e in derivation.jac_y]
    first += [(i, n + c, e) for i, c, e in derivation.jac_p]
    hess: list[HessEntry] = []
    for i, j, e in first:
        view = for_diff(e)
        ks = sorted(pos[s] for s in view.free_symbols if s in pos and pos[s] <= j)
        for k in ks:
            d = sp.diff(view, z[k])
            if d != 0:
                hess.append((i, j, k, back(d)))
    hess.sort(key=lambda t: (t[0], t[1], t[2]))
    return SecondDerivation(
        residuals=tuple(derivation.residuals),
        unknowns=tuple(derivation.unknowns),
        params=tuple(derivation.params),
        jac_p=list(derivation.jac_p),
        hess=hess,
    )
