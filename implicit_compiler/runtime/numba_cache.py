"""Numba's on-disk cache for the runtime's own compiled functions, keyed on all runtime sources.

Numba keys a cached function on the modification time and size of the one file that
defines it. The drivers in :mod:`.drivers` inline the solvers of :mod:`.newton`,
:mod:`.trust_region`, :mod:`.linalg`, ... so an edit to one of those files alone would
leave the drivers' cached machine code in use: a stale solver, silently. The locators
registered here give every cached function defined in this package a stamp that hashes
the contents of every ``*.py`` file of the package, so any change to any of them
recompiles the runtime. Functions defined elsewhere keep Numba's own locators.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

from numba.core import caching

_HERE = os.path.dirname(os.path.abspath(__file__))


@lru_cache(maxsize=1)
def runtime_stamp() -> str:
    """SHA-256 of the names and contents of the package's ``*.py`` files."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(_HERE)):
        if name.endswith(".py"):
            h.update(name.encode())
            with open(os.path.join(_HERE, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _in_runtime(py_file) -> bool:
    try:
        return os.path.dirname(os.path.abspath(py_file)) == _HERE
    except (TypeError, ValueError):
        return False


def _runtime_locator(base):
    class Locator(base):
        __doc__ = f"{base.__name__}, stamped with :func:`runtime_stamp` (runtime files only)."

        def get_source_stamp(self):
            return runtime_stamp()

        @classmethod
        def from_function(cls, py_func, py_file):
            if not _in_runtime(py_file):
                return None
            return super().from_function(py_func, py_file)

    Locator.__name__ = Locator.__qualname__ = "Runtime" + base.__name__.lstrip("_")
    return Locator


def install() -> None:
    """Put the runtime locators in front of Numba's (idempotent). Must run before the first
    ``@njit(cache=True)`` of this package is decorated: ``runtime/__init__`` calls it."""
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
    classes = impl._locator_classes
    if any(getattr(c, "_implicit_compiler_runtime", False) for c in classes):
        return
    bases = [getattr(caching, n, None) or getattr(caching, "_" + n, None)
             for n in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")]
    ours = []
    for base in bases:
        if base is not None:
            loc = _runtime_locator(base)
            loc._implicit_compiler_runtime = True
            ours.append(loc)
    classes[:0] = ours
