"""The on-disk kernel cache.

One generated module per system: ``<cache>/<key>.py``, where ``key`` hashes the
system, the package version and the runtime sources the module calls into. Numba
keeps its compiled code beside it in ``__pycache__`` (``cache=True``), so a
second process imports the module and loads machine code without deriving or
compiling anything.

Writes are atomic (temporary file + ``os.replace``) under an exclusive file lock,
and a valid file is never rewritten, so processes compiling the same system at
once all end up importing the same file. Files get the usual permissions of new
files (``0666`` minus the umask), so a cache can be shared between users.

Every module ends with a checksum line (SHA-256 of everything before it), written
with the module and verified before it is imported: a truncated, empty or edited
module is regenerated (with a :class:`CacheWarning`) instead of failing every
later compile.

Location: the ``cache_dir=`` argument, else ``$IMPLICIT_COMPILER_CACHE``, else
``$XDG_CACHE_HOME/implicit_compiler`` (``~/.cache/implicit_compiler``). A location
given by the argument or the variable that cannot be used (not creatable, not
writable, a file) is a :class:`CacheError`; when the default location cannot be
used (no writable home directory), the process falls back to a private directory
under the system's temporary directory, with a :class:`CacheWarning` naming both.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import secrets
import shutil
import stat
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

from .._version import __version__
from ..errors import ImplicitCompilerError

ENV_VAR = "IMPLICIT_COMPILER_CACHE"
MODULE_PREFIX = "ic_"
CHECKSUM_PREFIX = "# Module checksum (SHA-256 of the lines above): "


class CacheError(ImplicitCompilerError, OSError):
    """The kernel cache directory that was asked for cannot be used."""


class CacheWarning(UserWarning):
    """The kernel cache fell back to another directory, or a cached module was regenerated."""


def _origin(cache_dir) -> str:
    if cache_dir is not None:
        return "argument"
    return "env" if os.environ.get(ENV_VAR) else "default"


def _default_root() -> Path | None:
    """``$XDG_CACHE_HOME/implicit_compiler`` or ``~/.cache/implicit_compiler``; None without a home."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "implicit_compiler"
    if "HOME" in os.environ and not os.environ["HOME"].strip():
        return None  # HOME set but empty (expanduser would answer "/")
    home = os.path.expanduser("~")
    if home.startswith("~") or not home:  # no $HOME and no password entry
        return None
    return Path(home) / ".cache" / "implicit_compiler"


def _fallback_root() -> Path:
    """A directory of this user's own under the temporary directory (created ``0700``)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    root = Path(tempfile.gettempdir()) / f"implicit_compiler-{uid}"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        st_ = os.lstat(root)
        # A directory someone else created (or a symlink) could hold planted modules.
        if stat.S_ISDIR(st_.st_mode) and (not hasattr(os, "getuid") or st_.st_uid == uid) \
                and not st_.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return root.resolve()
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="implicit_compiler-")).resolve()


def cache_root(cache_dir=None) -> Path:
    """The directory modules are looked up in (see :func:`writable_root` for writing)."""
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get(ENV_VAR):
        root = Path(os.environ[ENV_VAR])
    else:
        root = _default_root()
        if root is None:
            return _fallback_root()
    return root.expanduser().resolve()


def _unusable(root: Path) -> str | None:
    """Why modules cannot be written in ``root`` (created if missing), or None."""
    if root.exists() and not root.is_dir():
        return "it exists and is not a directory"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"it cannot be created: {e.strerror or e}"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"it is not writable: {e.strerror or e}"
    return None


_WARNED: set = set()


def writable_root(cache_dir=None) -> Path:
    """The directory a new module is written to (checked now, by writing a probe file):
    :func:`cache_root` if it can be used; for
    the default location only, else a private temporary directory (with a warning once per
    process); a location given by ``cache_dir`` or ``$IMPLICIT_COMPILER_CACHE`` that cannot
    be used is a :class:`CacheError` naming it and the reason."""
    root = cache_root(cache_dir)
    origin = _origin(cache_dir)
    if origin == "default" and _default_root() is None:
        root, reason = Path("~/.cache/implicit_compiler"), "no home directory: HOME is unset or empty"
    else:
        reason = _unusable(root)
    if reason is None:
        return root
    if origin == "argument":
        raise CacheError(f"the kernel cache directory cache_dir={str(cache_dir)!r} ({root}) cannot be used: "
                         f"{reason}; pass a writable directory (or cache_dir=None for the default)")
    if origin == "env":
        raise CacheError(f"the kernel cache directory {ENV_VAR}={os.environ[ENV_VAR]!r} ({root}) cannot be used: "
                         f"{reason}; set {ENV_VAR} to a writable directory (or unset it for the default)")
    fallback = _fallback_root()
    if root not in _WARNED:
        _WARNED.add(root)
        warnings.warn(f"the default kernel cache {root} cannot be used ({reason}); compiled kernels go to "
                      f"{fallback} for now, which may not survive a reboot. Set {ENV_VAR} to a writable "
                      f"directory to keep them", CacheWarning, stacklevel=3)
    return fallback


@lru_cache(maxsize=1)
def toolchain_hash() -> str:
    """Hash of what generated code depends on besides the system itself."""
    import numba
    import sympy

    h = hashlib.sha256()
    h.update(f"{__version__}|{sympy.__version__}|{numba.__version__}|{sys.version_info[:2]}".encode())
    here = Path(__file__).resolve().parent
    # derive/ decides what is emitted too (the factorisation, the elimination order), and symbolic/
    # the system a definition stands for (a Problem's KKT system: its content hash is the definition's)
    files = (sorted((here.parent / "runtime").glob("*.py")) + sorted(here.glob("*.py"))
             + sorted((here.parent / "derive").glob("*.py")) + sorted((here.parent / "symbolic").glob("*.py")))
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


def _checksum(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def with_checksum(source: str) -> str:
    """``source`` (ending in a newline) followed by its checksum line."""
    if not source.endswith("\n"):
        source += "\n"
    return f"{source}{CHECKSUM_PREFIX}{_checksum(source.encode())}\n"


def without_checksum(text: str) -> str:
    """``text`` without its checksum line (for copies of a module elsewhere, e.g. an export)."""
    body, sep, last = text.rstrip("\n").rpartition("\n")
    return body + "\n" if sep and last.startswith(CHECKSUM_PREFIX) else text


def verify(path: Path) -> str | None:
    """Why the module at ``path`` cannot be trusted (missing, truncated, edited), or None."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "it does not exist"
    except OSError as e:
        return f"it cannot be read: {e.strerror or e}"
    if not data:
        return "it is empty"
    body, sep, last = data.rstrip(b"\n").rpartition(b"\n")
    prefix = CHECKSUM_PREFIX.encode()
    if not sep or not last.startswith(prefix):
        return "it has no checksum line (truncated or not written by this version)"
    if _checksum(body + b"\n") != last[len(prefix):].decode("ascii", "replace").strip():
        return "its checksum does not match its contents (truncated or edited)"
    return None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``, with the
    permissions of a new file under the current umask (``0644`` under umask ``022``)."""
    tmp = path.parent / f".{path.stem}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_module(path: Path, source_fn) -> bool:
    """Write ``source_fn()`` (with its checksum line) to ``path`` unless a valid module is
    there already; an invalid one is replaced. Returns True if written here."""
    if verify(path) is None:
        return False
    with file_lock(path.with_suffix(".lock")):
        if verify(path) is None:
            return False
        write_atomic(path, with_checksum(source_fn()))
        return True


def ensure_module(key: str, cache_dir, source_fn) -> tuple[Path, bool, bool]:
    """The path of a valid module for ``key``: ``(path, found, written)``. A module found in
    the cache is used as is (a read-only cache works when it has the module); a missing one
    is written with ``source_fn()``, in :func:`writable_root`; an invalid one (truncated,
    empty, edited) is regenerated with a :class:`CacheWarning`."""
    name = f"{MODULE_PREFIX}{key}.py"
    path = cache_root(cache_dir) / name
    problem = verify(path)
    if problem is None:
        return path, True, False
    if path.exists():
        warnings.warn(f"the cached module {path} is invalid ({problem}); regenerating it", CacheWarning,
                      stacklevel=3)
    path = writable_root(cache_dir) / name
    if path != cache_root(cache_dir) / name and verify(path) is None:
        return path, True, False
    return path, False, write_module(path, source_fn)


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
