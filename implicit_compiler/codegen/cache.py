"""The on-disk kernel cache.

One generated module per system: ``<cache>/<key>.py``, where ``key`` hashes the
system, the package version and the runtime sources the module calls into. Numba
keeps its compiled code beside it in ``__pycache__`` (``cache=True``), so a
second process imports the module and loads machine code without deriving or
compiling anything.

Writes are atomic (temporary file + ``os.replace``) under an exclusive file lock,
and an existing file is never rewritten, so processes compiling the same system
at once all end up importing the same file.

Location: the ``cache_dir=`` argument, else ``$IMPLICIT_COMPILER_CACHE``, else
``$XDG_CACHE_HOME/implicit_compiler`` (``~/.cache/implicit_compiler``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from .._version import __version__

ENV_VAR = "IMPLICIT_COMPILER_CACHE"
MODULE_PREFIX = "ic_"


def cache_root(cache_dir=None) -> Path:
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get(ENV_VAR):
        root = Path(os.environ[ENV_VAR])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "implicit_compiler"
    return root.expanduser().resolve()


@lru_cache(maxsize=1)
def toolchain_hash() -> str:
    """Hash of what generated code depends on besides the system itself."""
    import numba
    import sympy

    h = hashlib.sha256()
    h.update(f"{__version__}|{sympy.__version__}|{numba.__version__}|{sys.version_info[:2]}".encode())
    here = Path(__file__).resolve().parent
    files = sorted((here.parent / "runtime").glob("*.py")) + sorted(here.glob("*.py"))
    files += sorted((here / "templates").glob("*.txt"))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def module_key(system_hash: str, options: str = "") -> str:
    h = hashlib.sha256()
    h.update(system_hash.encode())
    h.update(toolchain_hash().encode())
    h.update(options.encode())
    return h.hexdigest()[:32]


def module_path(key: str, cache_dir=None) -> Path:
    return cache_root(cache_dir) / f"{MODULE_PREFIX}{key}.py"


@contextlib.contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: atomic replace still protects readers
            pass
        yield


def write_module(path: Path, source_fn) -> bool:
    """Write ``source_fn()`` to ``path`` unless it exists. Returns True if written here."""
    if path.exists():
        return False
    with file_lock(path.with_suffix(".lock")):
        if path.exists():
            return False
        source = source_fn()
        fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(source)
        os.replace(tmp, path)
        return True


def load_module(path: Path):
    """Import a generated module by file path (once per process)."""
    name = path.stem
    mod = sys.modules.get(name)
    if mod is not None and getattr(mod, "__file__", None) == str(path):
        return mod
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def list_entries(cache_dir=None) -> list[dict]:
    root = cache_root(cache_dir)
    out = []
    if not root.exists():
        return out
    for f in sorted(root.glob(f"{MODULE_PREFIX}*.py")):
        first = f.read_text().splitlines()[:4]
        name = next((line for line in first if line.startswith("# System")), "")
        compiled = list((root / "__pycache__").glob(f"{f.stem}.*")) if (root / "__pycache__").exists() else []
        size = f.stat().st_size + sum(c.stat().st_size for c in compiled)
        out.append({"path": str(f), "system": name[2:], "bytes": size, "numba_files": len(compiled)})
    return out


def clear(cache_dir=None) -> int:
    """Remove every cached module and its compiled code; returns the number of modules."""
    root = cache_root(cache_dir)
    n = 0
    if not root.exists():
        return 0
    for f in root.glob(f"{MODULE_PREFIX}*"):
        f.unlink(missing_ok=True)
        n += f.suffix == ".py"
    shutil.rmtree(root / "__pycache__", ignore_errors=True)
    return n
