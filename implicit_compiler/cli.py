"""The ``implicit-compiler`` command line (also ``python -m implicit_compiler``)."""

from __future__ import annotations

import argparse
import sys


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="implicit-compiler", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="solve the paper's appendix system end to end and check its gradient")
    d.add_argument("--cache-dir", default=None, help="kernel cache directory (default: $IMPLICIT_COMPILER_CACHE)")
    d.set_defaults(fn=_cmd_demo)
    c = sub.add_parser("cache", help="list or clear the kernel cache")
    c.add_argument("action", choices=["list", "clear"])
    c.add_argument("--cache-dir", default=None, help="kernel cache directory (default: $IMPLICIT_COMPILER_CACHE)")
    c.set_defaults(fn=_cmd_cache)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
