"""Index families: expressions that are one template up to a renaming of symbols.

Real systems repeat a few expression shapes over indices: row ``i`` of a Bratu
residual is ``(u[i-1] - 2 u[i] + u[i+1]) h⁻² + λ exp(u[i])`` for every interior ``i``;
the stationarity rows of a QP are ``Σ_j Q[i,j] y[j] + q[i] + Σ_k G[k,i] ν[k]`` for every ``i``.
A *family* is such a set of expressions written once, as

* a **template** — the first member, whose own symbols serve as its *slots*, and
* an **index table** — one row per member, holding for each slot the flat position
  (in ``y`` or ``θ``) of the symbol that takes the slot's place in that member.

Two expressions are put in one family only when a renaming exists that maps one onto the
other **exactly** (checked with ``xreplace`` and structural equality, not sampled), and the
renaming keeps every symbol inside its own group (an unknown never stands in for a
parameter, ``Q[i, j]`` never for ``q[i]``). Numbers are part of the shape: a member with
one coefficient changed is not merged.

Detection runs in two passes:

1. a **shape digest** per expression, invariant under renaming within groups: a hash of
   the tree in which a symbol is replaced by its group, and the arguments of ``Add`` and
   ``Mul`` are hashed as a multiset — equal digests are candidates;
2. an **alignment** of each candidate with the template, walking both trees together to
   build the renaming (arguments of commutative nodes are paired within equal digests),
   then the exact check above; a candidate that fails is tried against the next family
   with its digest, or starts a family of its own.

Derivatives of a family are those of its template with respect to its slots, scattered by
the index table (:meth:`Family.jacobian`), so derivation cost follows the number of
families, not of expressions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import sympy as sp

Slot = tuple[str, str, int]  # (kind "unknown" / "param", group name, flat position)


@dataclass(frozen=True)
class Family:
    """One template and the members it stands for.

    ``template``: a SymPy expression over the symbols ``slots``; ``slot_kinds[k]`` and
    ``slot_groups[k]`` say which group slot ``k`` belongs to; ``table[r, k]`` is the flat
    position (in ``y`` for unknowns, ``θ`` for parameters) of the symbol standing in slot
    ``k`` in member ``r``; ``members[r]`` is that member's index in the input list.
    """

    template: sp.Expr
    slots: tuple[sp.Symbol, ...]
    slot_kinds: tuple[str, ...]
    slot_groups: tuple[str, ...]
    table: np.ndarray
    members: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.members)

    def instance(self, r: int, symbols_of: dict) -> sp.Expr:
        """Member ``r`` rebuilt from the template: ``symbols_of[(kind, position)]`` is the symbol."""
        sub = {s: symbols_of[(k, int(p))] for s, k, p in zip(self.slots, self.slot_kinds, self.table[r])}
        return self.template.xreplace(sub)

    def jacobian(self, kind: str) -> list[tuple[int, sp.Expr]]:
        """``[(slot, ∂template/∂slot)]`` for the slots of ``kind`` whose derivative is not zero.

        Entry ``(k, e)`` stands for the derivative of member ``r`` with respect to the symbol
        at position ``table[r, k]``: ``e`` with the slots renamed by row ``r``.
        """
        out = []
        for k, (s, sk) in enumerate(zip(self.slots, self.slot_kinds)):
            if sk == kind:
                d = sp.diff(self.template, s)
                if d != 0:
                    out.append((k, d))
        return out


def system_slots(system) -> dict:
    """``{symbol: (kind, group, flat position)}`` for a ResidualSystem's unknowns and parameters."""
    out = {}
    for kind, groups in (("unknown", system.unknown_groups), ("param", system.param_groups)):
        for g in groups:
            for j, s in enumerate(g.symbols):
                out[s] = (kind, g.name, g.offset + j)
    return out


def _digest(parts) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.encode())
        h.update(b"\x00")
    return h.hexdigest()


class _Shapes:
    """Shape digests of expression nodes, memoised by node (deterministic across processes)."""

    def __init__(self, slots: dict):
        self.slots = slots
        self.memo: dict = {}

    def of(self, e) -> str:
        got = self.memo.get(e)
        if got is not None:
            return got
        if isinstance(e, sp.Symbol):
            info = self.slots.get(e)
            # A symbol outside every group (a free constant) keeps its own name: never renamed.
            d = _digest(("S", info[0], info[1]) if info is not None else ("C", str(e)))
        elif not e.args:
            d = _digest(("N", type(e).__name__, sp.srepr(e)))
        else:
            kids = [self.of(a) for a in e.args]
            if isinstance(e, (sp.Add, sp.Mul)):
                kids.sort()
            d = _digest((type(e).__name__, *kids))
        self.memo[e] = d
        return d


def _align(t, m, shapes: _Shapes, ren: dict, used: set, trail: list) -> bool:
    """Extend the renaming ``ren`` (member symbol -> template symbol) so that ``m`` maps to ``t``.

    ``used`` holds the template symbols already taken (the renaming is one to one); every
    member symbol added to ``ren`` is appended to ``trail``, so a caller can undo a failed
    attempt with :func:`_undo`."""
    if isinstance(t, sp.Symbol) or isinstance(m, sp.Symbol):
        if not (isinstance(t, sp.Symbol) and isinstance(m, sp.Symbol)):
            return False
        info = shapes.slots.get(t)
        if info is None:  # a free constant must be itself
            return m == t
        prev = ren.get(m)
        if prev is not None:
            return prev == t
        minfo = shapes.slots.get(m)
        if t in used or minfo is None or minfo[:2] != info[:2]:
            return False
        ren[m] = t
        used.add(t)
        trail.append(m)
        return True
    if type(t) is not type(m) or len(t.args) != len(m.args):
        return False
    if not t.args:
        return t == m
    if not isinstance(t, (sp.Add, sp.Mul)):
        return all(_align(a, b, shapes, ren, used, trail) for a, b in zip(t.args, m.args))
    # Commutative: pair arguments with equal digests, greedily, trying the member's
    # arguments in order for each template argument (undoing a failed try); the exact
    # check the caller makes afterwards is what decides membership.
    free: dict[str, list] = {}
    for b in m.args:
        free.setdefault(shapes.of(b), []).append(b)
    for a in t.args:
        cands = free.get(shapes.of(a))
        if not cands:
            return False
        for idx, b in enumerate(cands):
            mark = len(trail)
            if _align(a, b, shapes, ren, used, trail):
                del cands[idx]
                break
            _undo(ren, used, trail, mark)
        else:
            return False
    return True


def _undo(ren: dict, used: set, trail: list, mark: int) -> None:
    while len(trail) > mark:
        used.discard(ren.pop(trail.pop()))


def find_families(exprs, slots: dict, min_size: int = 2) -> tuple[list[Family], list[int]]:
    """Group ``exprs`` into families; returns ``(families, singletons)``.

    ``slots``: ``{symbol: (kind, group, flat position)}`` (see :func:`system_slots`); symbols
    not in it are constants that must match by name. Families with fewer than ``min_size``
    members are returned as singletons (indices into ``exprs``, in order).
    """
    exprs = [sp.sympify(e) for e in exprs]
    shapes = _Shapes(slots)
    # per digest: list of [template expr, its slot symbols, members, rows]
    by_digest: dict[str, list] = {}
    order: list[tuple[str, int]] = []
    for i, e in enumerate(exprs):
        key = shapes.of(e)
        fams = by_digest.setdefault(key, [])
        placed = False
        for fam in fams:
            ren: dict = {}
            if not _align(fam[0], e, shapes, ren, set(), []):
                continue
            if len(ren) != len(fam[1]):
                continue
            inv = {t: s for s, t in ren.items()}
            if fam[0].xreplace(inv) != e:  # exact check: the template renamed IS the member
                continue
            fam[2].append(i)
            fam[3].append([slots[inv[s]][2] for s in fam[1]])
            placed = True
            break
        if not placed:
            syms = sorted((s for s in e.free_symbols if s in slots), key=lambda s: (slots[s][0], slots[s][2]))
            fams.append([e, tuple(syms), [i], [[slots[s][2] for s in syms]]])
            order.append((key, len(fams) - 1))
    families, singletons = [], []
    for key, f in order:
        template, syms, members, rows = by_digest[key][f]
        if len(members) < min_size:
            singletons.extend(members)
            continue
        families.append(Family(
            template=template,
            slots=syms,
            slot_kinds=tuple(slots[s][0] for s in syms),
            slot_groups=tuple(slots[s][1] for s in syms),
            table=np.array(rows, dtype=np.int64).reshape(len(members), len(syms)),
            members=tuple(members),
        ))
    return families, sorted(singletons)


def term_families(expr, slots: dict, min_size: int = 2, expand: bool = True) -> tuple[list[Family], list[int]]:
    """Families among the terms of a sum (e.g. the ``Q[i,j] y[i] y[j]`` of a quadratic form).

    With ``expand`` (default) the sum is multiplied out first, so ``y0*(Q0*y0 + Q3*y1)`` gives
    the terms ``Q0*y0**2`` and ``Q3*y0*y1``; indices refer to ``Add.make_args`` of that sum.
    """
    terms = sp.Add.make_args(sp.expand(expr) if expand else expr)
    return find_families(list(terms), slots, min_size=min_size)
