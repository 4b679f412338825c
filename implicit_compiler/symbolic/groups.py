"""Named groups of symbols and their shapes.

Users give unknowns and parameters either as a flat list of symbols (one vector
group) or as a dict of named groups, each a Symbol (shape ``()``), a list or
column vector (shape ``(n,)``), or a Matrix (shape ``(r, c)``). Each group
becomes one tensor argument / output; inside, symbols live at flat positions
``offset .. offset + size`` in row-major order.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass

import numpy as np
import sympy as sp

from ..errors import SystemDefinitionError


@dataclass(frozen=True)
class Group:
    name: str
    shape: tuple[int, ...]
    symbols: tuple[sp.Symbol, ...]
    offset: int

    @property
    def size(self) -> int:
        return len(self.symbols)

    def layout(self) -> dict:
        """Plain-data description (no SymPy) stored in generated modules."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "offset": self.offset,
            "symbols": [str(s) for s in self.symbols],
        }


def _as_symbol_array(value, where: str):
    if isinstance(value, sp.Symbol):
        return (), (value,)
    if isinstance(value, sp.MatrixBase):
        r, c = value.shape
        shape = (r,) if c == 1 else (r, c)  # column vectors are vectors; other matrices keep both axes
        items = tuple(value)
    elif isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value, dtype=object)
        shape = arr.shape
        items = tuple(arr.ravel())
    else:
        raise SystemDefinitionError(
            f"{where}: expected a sympy Symbol, a list of Symbols or a sympy Matrix of "
            f"Symbols, got {type(value).__name__} {value!r}"
        )
    if len(items) == 0:
        raise SystemDefinitionError(f"{where}: the group is empty; remove it or give it symbols")
    for s in items:
        if not isinstance(s, sp.Symbol):
            raise SystemDefinitionError(
                f"{where}: every entry must be a plain sympy Symbol, got {s!r} "
                f"({type(s).__name__}); introduce a Symbol for it and use that in the residuals"
            )
    return tuple(int(d) for d in shape), items


def make_groups(spec, kind: str, default_name: str) -> tuple[Group, ...]:
    """Normalise a user's ``unknowns=`` / ``params=`` argument into groups."""
    if spec is None:
        return ()
    if isinstance(spec, dict):
        raw = list(spec.items())
    else:
        raw = [(default_name, spec)]
    groups = []
    offset = 0
    for name, value in raw:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise SystemDefinitionError(
                f"{kind} group name {name!r} is not a valid Python identifier; "
                f"group names become argument names of the layer"
            )
        shape, items = _as_symbol_array(value, f"{kind} group {name!r}")
        groups.append(Group(name, shape, items, offset))
        offset += len(items)
    return tuple(groups)


def flat_symbols(groups) -> tuple[sp.Symbol, ...]:
    return tuple(s for g in groups for s in g.symbols)
