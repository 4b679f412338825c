"""The ``implicit-compiler`` command line (also ``python -m implicit_compiler``).

Commands:

  inspect FILE.py:NAME           print what is derived from a system defined in FILE.py
  compile FILE.py:NAME -o OUT.py write a standalone layer module (numpy, numba, torch only)
  cache list|clear               show or empty the kernel cache
  demo                           the paper's appendix system, end to end

NAME is a ResidualSystem / FixedPoint (or a problem with a ``.system``), a compiled
layer, or a function of no arguments returning one; without ``:NAME`` the file must
define exactly one such object. Run ``implicit-compiler COMMAND --help`` for options.
"""

from __future__ import annotations

import argparse
import ast
import runpy
import sys
import traceback
from pathlib import Path

from .errors import ImplicitCompilerError


class UsageError(Exception):
    """A user-facing error of the command line: printed as one message, exit status 2."""


def _progress(quiet: bool):
    def say(msg: str) -> None:
        if not quiet:
            print(f"[implicit_compiler] {msg}", file=sys.stderr, flush=True)

    return say


# ---------------------------------------------------------------------- loading a user's file
def _split_target(spec: str) -> tuple[Path, str | None]:
    path, sep, name = spec.rpartition(":")
    if not sep or not path or "/" in name or "\\" in name or name.endswith(".py"):
        return Path(spec), None
    if not name.isidentifier():
        raise UsageError(f"{spec}: {name!r} is not a Python name; write FILE.py:NAME")
    return Path(path), name


def _user_frame_error(exc: BaseException, path: Path, what: str) -> UsageError:
    """``FILE:LINE: Type: message`` with the offending line, from the deepest frame in ``path``."""
    if isinstance(exc, SyntaxError) and exc.filename and Path(exc.filename).resolve() == path:
        text = (exc.text or "").rstrip("\n")
        caret = " " * max(0, (exc.offset or 1) - 1 - (len(text) - len(text.lstrip()))) + "^"
        return UsageError(f"{path}:{exc.lineno}: syntax error: {exc.msg}\n    {text.strip()}\n    {caret}")
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path]
    where = f"{path}:{frames[-1].lineno}" if frames else str(path)
    line = f"\n    {frames[-1].line}" if frames and frames[-1].line else ""
    return UsageError(f"{where}: {what}: {type(exc).__name__}: {exc}{line}")


def _is_target(v) -> bool:
    return (hasattr(v, "residuals") and hasattr(v, "unknowns")) or hasattr(v, "kkt") or (
        hasattr(v, "kernels") and hasattr(v, "layout"))


def load_target(spec: str):
    """Run ``FILE.py`` and return the object ``NAME`` (calling it if it is a function)."""
    path, name = _split_target(spec)
    if not path.is_file():
        raise UsageError(f"{path}: no such file (expected FILE.py:NAME)")
    path = path.resolve()
    sys.path.insert(0, str(path.parent))
    try:
        namespace = runpy.run_path(str(path), run_name="__implicit_compiler_target__")
    except SystemExit as exc:
        raise UsageError(f"{path}: the file called sys.exit({exc.code}) while being loaded") from None
    except BaseException as exc:  # report any failure of the user's code with its file and line
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise _user_frame_error(exc, path, "error while running the file") from exc
    finally:
        if str(path.parent) in sys.path:
            sys.path.remove(str(path.parent))
    found = {k: v for k, v in namespace.items() if not k.startswith("_") and _is_target(v)}
    if name is None:
        if len(found) != 1:
            listed = ", ".join(sorted(found)) or "none"
            raise UsageError(f"{path}: say which system to use with FILE.py:NAME (systems defined: {listed})")
        name = next(iter(found))
    if name not in namespace:
        listed = ", ".join(sorted(found)) or "none"
        raise UsageError(f"{path}: defines no {name!r} (systems defined there: {listed})")
    value = namespace[name]
    if callable(value) and not _is_target(value) and not isinstance(value, type):
        try:
            value = value()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise _user_frame_error(exc, path, f"error while calling {name}()") from exc
    if not _is_target(value):
        raise UsageError(
            f"{path}: {name} is a {type(value).__name__}, not a ResidualSystem, FixedPoint, problem or "
            f"compiled layer (nor a function returning one)"
        )
    return value


# ---------------------------------------------------------------------- commands
def _cmd_demo(args) -> int:
    from .demo import run

    run(cache_dir=args.cache_dir)
    return 0


def _cmd_cache(args) -> int:
    from .codegen import cache

    if args.action == "list":
        entries = cache.list_entries(args.cache_dir)
        print(f"kernel cache: {cache.cache_root(args.cache_dir)} ({len(entries)} modules)")
        for e in entries:
            print(f"  {e['path']}  {e['bytes'] / 1024:.0f} KiB  {e['system']}")
    else:
        n = cache.clear(args.cache_dir)
        print(f"removed {n} cached modules from {cache.cache_root(args.cache_dir)}")
    return 0


def _cmd_inspect(args) -> int:
    from .inspect.report import report

    say = _progress(args.quiet)
    obj = load_target(args.target)
    rep = report(obj, implicit_max_unknowns=args.implicit_max_unknowns, simplify=not args.no_simplify,
                 progress=say)
    if args.format == "latex":
        text = rep.latex()
    elif args.format == "html":
        text = rep.html()
    else:
        text = rep.text(unicode=not args.ascii)
    if args.output:
        Path(args.output).write_text(text)
        say(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    if args.png:
        rep.sparsity_png(args.png)
        say(f"wrote {args.png}")
    return 0


def _parse_options(pairs) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--set expects KEY=VALUE (a solver option), got {pair!r}")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def _cmd_compile(args) -> int:
    from .codegen.export import export_layer
    from .compiler import compile
    from .runtime.options import SolverOptions

    say = _progress(args.quiet)
    out = Path(args.output)
    if out.suffix != ".py":
        raise UsageError(f"-o {out}: the output must be a .py file")
    options = _parse_options(args.set)
    try:
        SolverOptions.from_kwargs(**options)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad solver option: {exc}") from None
    obj = load_target(args.target)
    if hasattr(obj, "kernels") and hasattr(obj, "layout"):
        layer = obj.configure(**options) if options else obj
    else:
        layer = compile(obj, cache_dir=args.cache_dir, verbose=not args.quiet, warmup=False, **options)
    say(f"writing standalone module {out}")
    export_layer(layer, out)
    if args.warm:
        say("compiling the standalone kernels with Numba (cached beside the file)")
        _warm_standalone(out)
    say(f"done: import it with `from {out.stem} import layer` (needs numpy, numba, torch)")
    return 0


def _warm_standalone(path: Path) -> None:
    import importlib.util

    from .compiler import warm

    name = f"_ic_standalone_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        warm(mod.layer)
    finally:
        del sys.modules[name]


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="implicit-compiler", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traceback", action="store_true", help="show the full Python traceback on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cache_help = "kernel cache directory (default: $IMPLICIT_COMPILER_CACHE, else ~/.cache/implicit_compiler)"

    i = sub.add_parser("inspect", help="print what is derived from a system: residuals, Jacobians, sparsity, "
                                       "common subexpressions, implicit Jacobian",
                       description="Print the report of a system defined in a Python file.")
    i.add_argument("target", metavar="FILE.py:NAME", help="the file and the name of the system in it")
    i.add_argument("--format", choices=["text", "latex", "html"], default="text", help="output format (default text)")
    i.add_argument("--ascii", action="store_true", help="plain ASCII text (no Unicode box drawing)")
    i.add_argument("-o", "--output", help="write the report to this file instead of stdout")
    i.add_argument("--png", metavar="FILE.png", help="also draw the sparsity patterns to a PNG (needs matplotlib)")
    i.add_argument("--implicit-max-unknowns", type=int, default=4, metavar="N",
                   help="show the closed-form implicit Jacobian only up to N unknowns (default 4; 0: never)")
    i.add_argument("--no-simplify", action="store_true", help="do not simplify the implicit Jacobian (faster)")
    i.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    i.set_defaults(fn=_cmd_inspect)

    c = sub.add_parser("compile", help="compile a system and write a standalone layer module",
                       description="Compile a system and write OUT.py: the generated kernels with the run-time "
                                   "sources inlined, needing only numpy, numba and torch. OUT.py defines "
                                   "`layer` (a torch.nn.Module) and `make_layer(**solver_options)`.")
    c.add_argument("target", metavar="FILE.py:NAME", help="the file and the name of the system in it")
    c.add_argument("-o", "--output", required=True, metavar="OUT.py", help="the standalone module to write")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a solver option baked in as default (e.g. --set tol=1e-12 --set method=anderson); repeatable")
    c.add_argument("--warm", action="store_true",
                   help="also compile the standalone kernels now (Numba caches them beside OUT.py)")
    c.add_argument("--cache-dir", default=None, help=cache_help)
    c.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    c.set_defaults(fn=_cmd_compile)

    k = sub.add_parser("cache", help="list or clear the kernel cache",
                       description="List the generated kernel modules in the cache, or remove them all.")
    k.add_argument("action", choices=["list", "clear"])
    k.add_argument("--cache-dir", default=None, help=cache_help)
    k.set_defaults(fn=_cmd_cache)

    d = sub.add_parser("demo", help="solve the paper's appendix system end to end and check its gradient",
                       description="Solve the paper's appendix system end to end and check its gradient.")
    d.add_argument("--cache-dir", default=None, help=cache_help)
    d.set_defaults(fn=_cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (UsageError, ImplicitCompilerError, ImportError, OSError) as exc:
        if args.traceback:
            raise
        kind = "error" if isinstance(exc, UsageError) else type(exc).__name__
        print(f"implicit-compiler {args.command}: {kind}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
