"""Reductions: families of terms inside one family's template.

A family's template can itself be a long sum of like-shaped terms: the stationarity row
of a QP is ``Σ_j Q_ij y_j / 2 + Σ_j Q_ji y_j / 2 + q_i + Σ_k G_ki ν_k``, one expression
with ~400 slots. Printed as it stands, every loop body over the family's rows is hundreds
of terms, and so is each of its derivatives. Here such a sum is split into

* a **rest** expression, the template with each family of terms replaced by an
  accumulator symbol ``acc_r`` (``Q_ii y_i + q_i + acc_0 + acc_1`` for the QP row), and
* per accumulator a :class:`Reduction`: the **term** template (``Q_ij y_j / 2``, over its
  own slots) and an inner index table, one row per term, holding for each term slot the
  index of the outer family's slot that takes its place in that term.

Because the inner table refers to the outer template's *slots* (not to flat positions),
it is the same for every member of the outer family: member ``r``'s term ``e`` reads its
symbols at ``table_outer[r, table_inner[e, j]]``. Membership is exact on both levels: the
terms of a reduction are checked equal to the term template renamed by their row
(:func:`~implicit_compiler.derive.families.find_families`), the rebuilt template
(``rest`` with every accumulator replaced by the sum of its terms) is checked equal to
the template, and every member of the outer family equals the template renamed.

Derivatives follow from the chain rule, each piece taken once: ``∂F/∂slot =
∂rest/∂slot + Σ_r ∂rest/∂acc_r · Σ_e ∂term_r/∂(its slot at e)`` — the kernels accumulate
these contributions by scatter-adds (:meth:`Reduced.contributing` says which outer slots
receive one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy as sp

from .families import find_families

# A family of terms inside a template becomes a reduction (an inner loop) from this many
# terms on; shorter runs stay in the loop body as they are.
REDUCTION_MIN_SIZE = 12


@dataclass(frozen=True)
class Reduction:
    """``acc = Σ_e term(slots renamed by row e)``.

    ``term`` is over ``syms`` (symbols of the outer template); ``kinds[j]`` / ``groups[j]``
    are the kind and group of term slot ``j`` (the same in every row); ``table[e, j]`` is
    the outer slot index standing in term slot ``j`` in term ``e``; ``d_term`` are the
    non-zero ``(j, ∂term/∂syms[j])``."""

    acc: sp.Symbol
    term: sp.Expr
    syms: tuple[sp.Symbol, ...]
    kinds: tuple[str, ...]
    groups: tuple[str, ...]
    table: np.ndarray
    d_term: tuple[tuple[int, sp.Expr], ...]

    @property
    def size(self) -> int:
        return int(self.table.shape[0])


@dataclass(frozen=True)
class Reduced:
    """A template as ``rest`` over its slots and the accumulators of ``reductions``.

    ``d_rest``: non-zero ``(k, ∂rest/∂slots[k])`` over the outer slots; ``d_acc[r]``:
    ``∂rest/∂reductions[r].acc``."""

    rest: sp.Expr
    reductions: tuple[Reduction, ...]
    slots: tuple[sp.Symbol, ...]
    d_rest: tuple[tuple[int, sp.Expr], ...]
    d_acc: tuple[sp.Expr, ...]

    def contributing(self, keep) -> set[int]:
        """Outer slots ``k`` (those with ``keep(k)`` true) that receive a derivative
        contribution: from ``rest`` or from a term of a reduction."""
        out = {k for k, _ in self.d_rest if keep(k)}
        for red, g in zip(self.reductions, self.d_acc):
            if g == 0:
                continue
            for j, _ in red.d_term:
                out.update(int(k) for k in np.unique(red.table[:, j]) if keep(int(k)))
        return out

    def substitute(self, sub: dict) -> Reduced:
        """The reduced form of ``template.xreplace(sub)``, for its value only (no derivatives):
        ``sub`` maps slot symbols to numbers, the same in every member (every multiplier to
        zero: a renaming keeps a slot in its group, so the slot is a multiplier in every
        member too); reductions whose term becomes zero are dropped."""
        reds, accs = [], {}
        for red in self.reductions:
            t = red.term.xreplace(sub)
            if t == 0:
                accs[red.acc] = sp.S.Zero
                continue
            reds.append(Reduction(acc=red.acc, term=t, syms=red.syms, kinds=red.kinds, groups=red.groups,
                                  table=red.table, d_term=()))
        rest = self.rest.xreplace({**sub, **accs})
        return Reduced(rest=rest, reductions=tuple(reds), slots=self.slots, d_rest=(),
                       d_acc=tuple(sp.S.Zero for _ in reds))


def _reduction(acc, term, syms, kinds, groups, table, back) -> Reduction:
    d = []
    for j, s in enumerate(syms):
        if s in term.free_symbols:
            e = sp.diff(term, s)
            if e != 0:
                d.append((j, back(e)))
    return Reduction(acc=acc, term=back(term), syms=tuple(syms), kinds=tuple(kinds), groups=tuple(groups),
                     table=table, d_term=tuple(d))


def _reduced(rest, reds, slots, back) -> Reduced:
    from .engine import gradient

    free = rest.free_symbols
    ks = [k for k, s in enumerate(slots) if s in free]
    d_rest = tuple((k, back(e)) for k, e in zip(ks, gradient(rest, [slots[k] for k in ks])) if e != 0)
    d_acc = tuple(back(sp.diff(rest, r.acc)) for r in reds)
    return Reduced(rest=back(rest), reductions=tuple(reds), slots=tuple(slots), d_rest=d_rest, d_acc=d_acc)


def reduce_template(template, slots, kinds, groups, back=None, min_size: int | None = None) -> Reduced | None:
    """The reduced form of ``template`` (over the outer family's ``slots`` with their
    ``kinds`` and ``groups``), or None when no sum in it has ``min_size`` like-shaped terms
    (default :data:`REDUCTION_MIN_SIZE`). ``back`` maps every derived or printed piece (the
    system's real-argument view back to SymPy's functions)."""
    back = back or (lambda e: e)
    min_size = REDUCTION_MIN_SIZE if min_size is None else min_size
    info = {s: (kind, group, k) for k, (s, kind, group) in enumerate(zip(slots, kinds, groups))}
    found: list[tuple[sp.Symbol, list, object]] = []
    names = {s.name for s in template.free_symbols}

    def fresh():
        name = f"_acc{len(found)}"
        while name in names:
            name = "_" + name
        return sp.Symbol(name)

    def rec(e):
        if not e.args:
            return e
        if isinstance(e, sp.Add) and len(e.args) >= min_size:
            terms = list(e.args)
            fams, single = find_families(terms, info, min_size=min_size)
            if fams:
                parts = [rec(terms[i]) for i in single]
                for f in fams:
                    acc = fresh()
                    found.append((acc, [terms[i] for i in f.members], f))
                    parts.append(acc)
                return sp.Add(*parts)
        args = [rec(a) for a in e.args]
        if all(a is b for a, b in zip(args, e.args)):
            return e
        return e.func(*args)

    rest = rec(template)
    if not found:
        return None
    # exact: the rest with every accumulator put back as the sum of its terms is the template
    if rest.xreplace({acc: sp.Add(*terms) for acc, terms, _ in found}) != template:
        return None
    reds = [_reduction(acc, f.template, f.slots, f.slot_kinds, f.slot_groups, f.table, back)
            for acc, _, f in found]
    return _reduced(rest, reds, slots, back)
