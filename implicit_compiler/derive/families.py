"""Index families: expressions that are one template up to a renaming of symbols.

Real systems repeat a few expression shapes over indices: row ``i`` of a Bratu
residual is ``(u[i-1] - 2 u[i] + u[i+1]) h⁻² + λ exp(u[i])`` for every interior ``i``;
the stationarity rows of a QP are ``Σ_j Q[i,j] y[j] + q[i] + Σ_k G[k,i] ν[k]`` for every ``i``.
A *family* is such a set of expressions written once, as

* a **template** — the first member, whose own symbols serve as its *slots*, and
* an **index table** — one row per member, holding for each slot the flat position
  (in ``y`` or ``θ``) of the symbol that takes the slot's place in that member.

Two expressions are put in one family only when a renaming exists that maps one onto the
other **exactly** (the template with its symbols renamed is compared with the member
node by node, arguments of ``Add`` and ``Mul`` paired one to one; not sampled), and the
renaming keeps every symbol inside its own group (an unknown never stands in for a
parameter, ``Q[i, j]`` never for ``q[i]``). Numbers are part of the shape: a member with
one coefficient changed is not merged.

Detection runs in one traversal per expression (:class:`_Keys`):

1. a **structural key** per node, invariant under renaming within groups: an integer
   interned from the node's type and its arguments' keys (``Add`` / ``Mul`` arguments in
   key order), a symbol standing for its (kind, group), other atoms for themselves; with it,
   the node's slot symbols in that order. Equal keys are candidates;
2. the **positional renaming**: template and candidate symbols paired position by
   position; when that pairing is one to one, the template renamed is the candidate,
   exactly (:func:`_positional`). Ties in the key order (two arguments of one shape) can
   pair the wrong symbols; then an **alignment** walks both trees together to build the
   renaming (arguments of commutative nodes paired within equal shape digests); an
   alignment that completes is the exact check above (every node paired with one of the
   same type and arity, atoms equal, symbols renamed one to one within their groups). A
   candidate that fails both is tried against the next family with its key, or starts a
   family of its own.

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
        # keyed by id: a dict keyed by the expression compares equal-hash nodes structurally;
        # the value keeps the node alive, so its id is not reused while the memo lives
        self.memo: dict = {}
        self.index: dict = {}

    def of(self, e) -> str:
        got = self.memo.get(id(e))
        if got is not None:
            return got[1]
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
        self.memo[id(e)] = (e, d)
        return d

    def symbols_of(self, e) -> frozenset:
        """The symbols of ``e`` in any group (memoised like :meth:`of`)."""
        got = self.index.get(id(e))
        if got is None:
            got = self.index[id(e)] = (e, frozenset(s for s in e.free_symbols if s in self.slots))
        return got[1]


def _align(t, m, shapes: _Shapes, ren: dict, used: dict, trail: list) -> bool:
    """Extend the renaming ``ren`` (member symbol -> template symbol) so that ``m`` maps to ``t``.

    ``used`` is the inverse of ``ren`` (template symbol -> member symbol; the renaming is one
    to one); every member symbol added to ``ren`` is appended to ``trail``, so a caller can
    undo a failed attempt with :func:`_undo`."""
    if isinstance(t, sp.Symbol) or isinstance(m, sp.Symbol):
        if not (isinstance(t, sp.Symbol) and isinstance(m, sp.Symbol)):
            return False
        info = shapes.slots.get(t)
        if info is None:  # a free constant must be itself
            return m == t
        prev = ren.get(m)
        if prev is not None:
            return prev is t or prev == t
        minfo = shapes.slots.get(m)
        if t in used or minfo is None or minfo[:2] != info[:2]:
            return False
        ren[m] = t
        used[t] = m
        trail.append(m)
        return True
    if type(t) is not type(m) or len(t.args) != len(m.args):
        return False
    if not t.args:  # numbers (floats also by precision), constants
        return t == m and (not isinstance(t, sp.Float) or t._prec == m._prec)
    if not isinstance(t, (sp.Add, sp.Mul)):
        return all(_align(a, b, shapes, ren, used, trail) for a, b in zip(t.args, m.args))
    # Commutative: pair arguments with equal digests, greedily (undoing a failed try; a wrong
    # greedy choice can only miss a merge, never make one: every pair is aligned in full). When the template
    # argument holds a symbol already renamed, only member arguments holding that symbol's
    # preimage can pair with it: those are tried alone (looked up in an index, so a sum of
    # k like-shaped terms is paired in O(k), not O(k^2) attempts).
    free: dict[str, list] = {}
    for b in m.args:
        free.setdefault(shapes.of(b), []).append(b)
    taken: set[int] = set()  # ids of the member arguments already paired
    by_symbol: dict[str, dict] = {}
    for a in t.args:
        key = shapes.of(a)
        cands = free.get(key)
        if not cands:
            return False
        if len(cands) > 4:
            bound = next((used[s] for s in shapes.symbols_of(a) if s in used), None)
            if bound is not None:
                index = by_symbol.get(key)
                if index is None:
                    index = by_symbol[key] = {}
                    for b in cands:
                        for s in shapes.symbols_of(b):
                            index.setdefault(s, []).append(b)
                cands = index.get(bound, ())
        for b in cands:
            if id(b) in taken:
                continue
            mark = len(trail)
            if _align(a, b, shapes, ren, used, trail):
                taken.add(id(b))
                break
            _undo(ren, used, trail, mark)
        else:
            return False
    return True


_ATOM_KEYS: dict = {}


def _atom_key(e) -> str:
    """``srepr`` of an atom, memoised for symbols and exact numbers (keyed by type and value:
    ``Symbol('x')`` and ``Symbol('x', real=True)`` differ; floats are not memoised, since
    floats of different precision compare equal)."""
    if isinstance(e, (sp.Symbol, sp.Integer, sp.Rational)):
        key = (type(e), e)
        got = _ATOM_KEYS.get(key)
        if got is None:
            if len(_ATOM_KEYS) > 200_000:
                _ATOM_KEYS.clear()
            got = _ATOM_KEYS[key] = sp.srepr(e)
        return got
    return sp.srepr(e)


def _exact_key(e, ren: dict | None, memo: dict) -> str:
    """A string that is equal for two expressions exactly when they are the same tree (symbols
    by identity, renamed by ``ren`` when given; arguments of ``Add``/``Mul`` in sorted order,
    since SymPy builds those nodes from the multiset of their arguments). ``memo`` (by id,
    only when ``ren`` is None) keeps a member's subtrees' keys."""
    if ren is None:
        got = memo.get(id(e))
        if got is not None:
            return got[1]
    if not e.args:
        k = _atom_key(ren.get(e, e) if ren is not None and isinstance(e, sp.Symbol) else e)
    else:
        kids = [_exact_key(a, ren, memo) for a in e.args]
        if isinstance(e, (sp.Add, sp.Mul)):
            kids.sort()
        k = _digest((type(e).__name__, *kids))
    if ren is None:
        memo[id(e)] = (e, k)
    return k


def fingerprint(expr, memo: dict | None = None) -> str:
    """A digest of ``expr`` that two expressions share exactly when they are the same SymPy
    tree (atoms by ``srepr``, so symbols with their assumptions); deterministic across
    processes. Linear in the size of the tree, where ``sp.srepr`` sorts every sum's terms
    by SymPy's slow ordering (17 s for a 100-variable QP's KKT rows)."""
    return _exact_key(sp.sympify(expr), None, {} if memo is None else memo)


def _renamed_equal(template, member, inv: dict, memo: dict) -> bool:
    """Is ``template.xreplace(inv)`` the expression ``member``? (Compared without rebuilding:
    ``xreplace`` re-evaluates every sum and product, 60 ms for a 250-term row.)"""
    return _exact_key(template, inv, {}) == _exact_key(member, None, memo)


def _undo(ren: dict, used: dict, trail: list, mark: int) -> None:
    while len(trail) > mark:
        used.pop(ren.pop(trail.pop()), None)


class _Keys:
    """Structural keys in one traversal per expression: every node gets an interned integer,
    equal for two nodes exactly when they are the same tree up to a renaming of symbols within
    their groups (a symbol in ``slots`` is its (kind, group); other atoms are themselves:
    free constants with their assumptions, numbers by type and value, floats also by
    precision), the arguments of ``Add`` / ``Mul`` ordered by key; and the sequence of its
    slot symbols in that order. Integers are handed out in first-seen order, so they are the
    same in every process for the same input (no ``hash`` of a string decides anything)."""

    def __init__(self, slots: dict):
        self.slots = slots
        self.ids: dict = {}
        self.memo: dict = {}  # id(node) -> (node, key, symbols); the node keeps its id alive

    def of(self, e) -> tuple[int, tuple]:
        got = self.memo.get(id(e))
        if got is not None:
            return got[1], got[2]
        args = e.args
        if not args:
            info = self.slots.get(e) if isinstance(e, sp.Symbol) else None
            if info is not None:
                key, seq = ("S", info[0], info[1]), (e,)
            elif isinstance(e, sp.Float):
                key, seq = ("F", e, e._prec), ()
            else:
                key, seq = ("A", type(e), e), ()
        else:
            kids = [self.of(a) for a in args]
            if isinstance(e, (sp.Add, sp.Mul)):
                kids.sort(key=lambda kq: kq[0])  # stable: ties keep SymPy's stored order
            key = (type(e), tuple(k for k, _ in kids))
            seq = tuple(x for _, q in kids for x in q) if len(kids) > 1 else kids[0][1]
        k = self.ids.get(key)
        if k is None:
            k = self.ids[key] = len(self.ids)
        self.memo[id(e)] = (e, k, seq)
        return k, seq


def _positional(template_seq, member_seq) -> dict | None:
    """The renaming (template symbol -> member symbol) pairing the two symbol sequences of
    equal structural keys position by position, or None when it is not one to one.

    Equal keys mean the same tree with the same group at every symbol position (``Add`` /
    ``Mul`` arguments in key order); a one-to-one renaming consistent at every position then
    makes the template renamed the member itself, exactly. Ties in the key order (two
    arguments of one shape) can pair the wrong symbols: then the renaming is not consistent,
    and the caller falls back to :func:`_align`, which searches."""
    inv: dict = {}
    ren: dict = {}
    for t, m in zip(template_seq, member_seq):
        a = inv.get(t)
        if a is None:
            if m in ren:
                return None
            inv[t] = m
            ren[m] = t
        elif a is not m and a != m:
            return None
    return inv


def find_families(exprs, slots: dict, min_size: int = 2) -> tuple[list[Family], list[int]]:
    """Group ``exprs`` into families; returns ``(families, singletons)``.

    ``slots``: ``{symbol: (kind, group, flat position)}`` (see :func:`system_slots`); symbols
    not in it are constants that must match by name. Families with fewer than ``min_size``
    members are returned as singletons (indices into ``exprs``, in order).
    """
    exprs = [sp.sympify(e) for e in exprs]
    keys = _Keys(slots)
    shapes = None  # the digests of the searching alignment, built only if needed
    # per structural key: list of [template expr, its slot symbols, members, rows, symbol sequence]
    by_key: dict[int, list] = {}
    order: list[tuple[int, int]] = []
    for i, e in enumerate(exprs):
        key, seq = keys.of(e)
        fams = by_key.setdefault(key, [])
        placed = False
        for fam in fams:
            inv = _positional(fam[4], seq)
            if inv is None:
                # A completed alignment is the exact check too: every template node paired
                # with a member node of the same type and arity (the arguments of Add / Mul
                # one to one), atoms equal, symbols through the one-to-one renaming within
                # groups (tests/derive/test_families.py rebuilds every member).
                shapes = shapes or _Shapes(slots)
                ren: dict = {}
                if not _align(fam[0], e, shapes, ren, {}, []) or len(ren) != len(fam[1]):
                    continue
                inv = {t: s for s, t in ren.items()}
            fam[2].append(i)
            fam[3].append([slots[inv[s]][2] for s in fam[1]])
            placed = True
            break
        if not placed:
            syms = sorted(set(seq), key=lambda s: (slots[s][0], slots[s][2]))
            fams.append([e, tuple(syms), [i], [[slots[s][2] for s in syms]], seq])
            order.append((key, len(fams) - 1))
    families, singletons = [], []
    for key, f in order:
        template, syms, members, rows, _ = by_key[key][f]
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
