"""Standalone export: one Python file that needs only numpy, numba and torch.

The file is the generated kernel module of a layer with the run-time sources it
calls into inlined in front of it: the modules of ``implicit_compiler.runtime``
and ``implicit_compiler.torch`` (and ``errors``) reachable by imports from the
kernel module and from ``implicit_compiler.torch.module``, in dependency order.

Imports are rewritten deterministically, statement by statement (found with
``ast``, replaced by line range; nothing else in the sources is touched):

* ``from .x import a, b`` of an inlined module: removed (``a`` and ``b`` are
  already globals of the one file); ``from .x import a as b`` becomes ``b = a``;
* ``from . import status as st`` (a whole inlined module): ``st`` becomes a module
  object holding that module's top-level names, so ``st.CONVERGED`` keeps working,
  also inside Numba functions;
* ``from __future__ import annotations``: hoisted to the top of the file once;
* an import of a package module that is not inlined, inside a function: replaced by
  ``raise ImportError(...)`` (the feature needs the full package);
* any other import must be of numpy, numba, torch or the standard library, else
  :class:`ExportError`.

Top-level names must not be defined by two inlined sources (checked; a clash is an
:class:`ExportError` naming both files). Same inputs give the same bytes.
"""

from __future__ import annotations

import ast
import pprint
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path

from .._version import __version__
from ..errors import ImplicitCompilerError
from .cache import without_checksum, write_atomic

PACKAGE = "implicit_compiler"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_LAYER_CLASS = "implicit_compiler.torch.module.ImplicitLayer"
DEFAULT_OPTIONS_CLASS = "implicit_compiler.runtime.options.SolverOptions"
ALLOWED_THIRD_PARTY = {"numpy", "numba", "torch"}
KERNEL_SECTION = "<kernels>"


class ExportError(ImplicitCompilerError):
    """The layer's sources cannot be inlined into one standalone file."""


def _module_path(modname: str) -> Path | None:
    rel = modname.split(".")[1:]
    base = PACKAGE_DIR.joinpath(*rel)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _is_package(modname: str) -> bool:
    p = _module_path(modname)
    return p is not None and p.name == "__init__.py"


def _absolute(modname: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = modname.split(".")
    if not _is_package(modname):
        parts = parts[:-1]
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _internal(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _stdlib(name: str) -> bool:
    top = name.split(".")[0]
    return top in sys.stdlib_module_names or top == "__future__"


class _Source:
    """One inlined source: its text, its imports resolved, its top-level names."""

    def __init__(self, modname: str, text: str, filename: str):
        self.modname = modname
        self.text = text
        self.filename = filename
        self.tree = ast.parse(text, filename=filename)
        self.deps: list[str] = []  # inlined modules this one needs, in first-use order
        self.defined: list[str] = []
        self.external: dict[str, str] = {}  # name -> "import ..." it comes from
        self._scan()

    def _scan(self) -> None:
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.defined.append(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for sub in ast.walk(t):
                        if isinstance(sub, ast.Name):
                            self.defined.append(sub.id)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _internal(a.name):
                        raise ExportError(f"{self.filename}:{node.lineno}: `import {a.name}` cannot be inlined; "
                                          f"use `from ... import name`")
                    self._external(node, a.name, a.asname or a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(self.modname, node)
                if not _internal(base):
                    for a in node.names:
                        self._external(node, base, a.asname or a.name)
                    continue
                for a in node.names:
                    target = f"{base}.{a.name}" if _module_path(f"{base}.{a.name}") else base
                    if _module_path(target) is None:
                        raise ExportError(f"{self.filename}:{node.lineno}: cannot find module {target}")
                    if target not in self.deps and node in self.tree.body:
                        self.deps.append(target)

    def _external(self, node, module: str, bound: str) -> None:
        top = module.split(".")[0]
        if top not in ALLOWED_THIRD_PARTY and not _stdlib(module):
            raise ExportError(
                f"{self.filename}:{node.lineno}: imports {module}, which a standalone module cannot use "
                f"(allowed: {', '.join(sorted(ALLOWED_THIRD_PARTY))} and the standard library)"
            )
        if node in self.tree.body and module != "__future__":
            self.external[bound] = f"{module}:{bound}"

    def rewritten(self, inlined: set[str]) -> str:
        """The source with its import statements rewritten (see the module docstring)."""
        lines = self.text.splitlines()
        edits = []
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = _absolute(self.modname, node)
            indent = " " * node.col_offset
            if base == "__future__":
                edits.append((node, []))
            elif _internal(base):
                new = []
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if _module_path(sub):  # a whole module
                        if sub not in inlined:
                            new = [f'{indent}raise ImportError("{sub} is not part of this standalone export; '
                                   f'install implicit_compiler to use this feature")']
                            break
                        new.append(f"{indent}{a.asname or a.name} = _IC_MODULES[{sub!r}]")
                    elif base not in inlined:
                        new = [f'{indent}raise ImportError("{base} is not part of this standalone export; '
                               f'install implicit_compiler to use this feature")']
                        break
                    elif a.asname and a.asname != a.name:
                        new.append(f"{indent}{a.asname} = {a.name}")
                if not new and node not in self.tree.body:
                    new = [f"{indent}pass  # inlined: {ast.unparse(node)}"]
                edits.append((node, new))
        for node, new in sorted(edits, key=lambda e: e[0].lineno, reverse=True):
            lines[node.lineno - 1:node.end_lineno] = new
        return "\n".join(lines).strip("\n")


def _sources(kernel_source: str, roots) -> list[_Source]:
    """The kernel module and everything it and the ``roots`` import, dependencies first."""
    kernels = _Source(KERNEL_SECTION, kernel_source, "<generated kernel module>")
    found: dict[str, _Source] = {}
    order: list[str] = []

    def visit(modname: str, stack: tuple) -> None:
        if modname in order:
            return
        if modname in stack:
            raise ExportError(f"import cycle between inlined modules: {' -> '.join(stack + (modname,))}")
        if modname not in found:
            path = _module_path(modname)
            found[modname] = _Source(modname, path.read_text(), str(path.relative_to(PACKAGE_DIR.parent)))
        for dep in found[modname].deps:
            visit(dep, stack + (modname,))
        order.append(modname)

    for root in list(kernels.deps) + list(roots):
        visit(root, ())
    return [found[m] for m in order] + [kernels]


def _check_names(sources: list[_Source]) -> None:
    owner: dict[str, str] = {}
    bound: dict[str, tuple[str, str]] = {}
    for src in sources:
        for name in src.defined:
            if name.startswith("__") and name.endswith("__"):
                continue
            if name in owner and owner[name] != src.filename:
                raise ExportError(f"cannot inline: {name!r} is defined in both {owner[name]} and {src.filename}")
            owner[name] = src.filename
        for name, what in src.external.items():
            if name in bound and bound[name][0] != what:
                raise ExportError(f"cannot inline: {name!r} is imported differently in {bound[name][1]} "
                                  f"and {src.filename}")
            bound.setdefault(name, (what, src.filename))
    clash = set(owner) & set(bound)
    if clash:
        name = sorted(clash)[0]
        raise ExportError(f"cannot inline: {name!r} is defined in {owner[name]} and imported in {bound[name][1]}")


def _options_dict(options) -> dict:
    if options is None:
        return {}
    if is_dataclass(options):
        return asdict(options)
    return dict(options)


def _split_class(path: str) -> tuple[str, str]:
    module, _, cls = path.rpartition(".")
    if not _internal(module) or _module_path(module) is None:
        raise ExportError(f"{path} is not a class of the {PACKAGE} package; cannot inline it")
    return module, cls


def standalone_source(kernel_source: str, *, options=None, name: str = "layer",
                      layer_class: str = DEFAULT_LAYER_CLASS, options_class: str = DEFAULT_OPTIONS_CLASS,
                      layer_kwargs: dict | None = None) -> str:
    """The text of a standalone module for a generated ``kernel_source``.

    ``options`` (a :class:`SolverOptions` or a dict) become the defaults of
    ``make_layer()`` in the file; ``layer_class`` and ``options_class`` (dotted paths in
    the package) are the classes ``make_layer`` builds, inlined with their imports;
    ``layer_kwargs`` (plain data) are further keyword arguments of the layer class.
    """
    kernel_source = without_checksum(kernel_source)  # the cache's checksum covers the cached file only
    layer_mod, layer_cls = _split_class(layer_class)
    options_mod, options_cls = _split_class(options_class)
    sources = _sources(kernel_source, (layer_mod, options_mod))
    _check_names(sources)
    inlined = {s.modname for s in sources}
    module_aliases = set()
    for s in sources:
        for node in ast.walk(s.tree):
            if isinstance(node, ast.ImportFrom) and _internal(_absolute(s.modname, node)):
                base = _absolute(s.modname, node)
                module_aliases.update(f"{base}.{a.name}" for a in node.names if _module_path(f"{base}.{a.name}"))
    header_hash = next((ln.split(":", 1)[1].strip() for ln in kernel_source.splitlines()
                        if ln.startswith("# Content hash:")), "unknown")
    opts = pprint.pformat(_options_dict(options), width=100, sort_dicts=True)
    out = [
        f'"""Standalone implicit layer {name!r}, exported by implicit_compiler {__version__}.',
        "",
        "Needs only numpy, numba and torch: the generated kernels and the run-time sources they",
        "call are inlined below (SymPy and implicit_compiler are not imported).",
        "",
        "    from this_module import layer       # an ImplicitLayer (torch.nn.Module)",
        "    y = layer(theta)                    # forward: Newton / fixed point; backward: implicit",
        "    other = make_layer(tol=1e-12)       # a fresh layer with other solver options",
        "",
        f"Kernel module content hash: {header_hash}.",
        "Numba caches compiled code in __pycache__ beside this file (cache=True).",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "import types as _ic_types",
        "",
        "_IC_MODULES = {}",
        "",
        "",
        "def _ic_module(name, namespace, names):",
        '    """A module object holding ``names`` from ``namespace`` (for ``from . import mod as alias``)."""',
        "    mod = _ic_types.ModuleType(name)",
        "    for key in names:",
        "        setattr(mod, key, namespace[key])",
        "    return mod",
        "",
    ]
    for src in sources:
        title = "generated kernel module" if src.modname == KERNEL_SECTION else src.filename
        out += ["", f"# {'=' * 20} {title} {'=' * max(0, 70 - len(title))}", "", src.rewritten(inlined), ""]
        if src.modname in module_aliases or src.modname == KERNEL_SECTION:
            names = sorted({n for n in src.defined if not (n.startswith("__") and n.endswith("__"))})
            out.append(f"_IC_MODULES[{src.modname!r}] = _ic_module({src.modname!r}, globals(), {names!r})")
    out += [
        "",
        f"# {'=' * 20} the layer {'=' * 61}",
        "",
        "_IC_KERNELS = _IC_MODULES[" + repr(KERNEL_SECTION) + "]",
        "_IC_KERNELS.__file__ = __file__",
        f"DEFAULT_OPTIONS = {opts}",
        f"LAYER_KWARGS = {pprint.pformat(dict(layer_kwargs or {}), width=100, sort_dicts=True)}",
        "",
        "",
        "def make_layer(**options):",
        '    """A new ImplicitLayer over the kernels of this file; ``options`` (SolverOptions fields)',
        '    override DEFAULT_OPTIONS, the options of the exported layer."""',
        f"    return {layer_cls}(_IC_KERNELS, {options_cls}(**{{**DEFAULT_OPTIONS, **options}}), **LAYER_KWARGS)",
        "",
        "",
        "layer = make_layer()",
        "",
    ]
    return "\n".join(out)


def export_layer(layer, path) -> Path:
    """Write the standalone module of a compiled ``layer`` to ``path`` (atomically); returns the path."""
    path = Path(path)
    if path.suffix != ".py":
        raise ExportError(f"the output file must end in .py to be importable, got {path}")
    cls, opts = type(layer), type(layer.options)
    export_kwargs = getattr(layer, "export_kwargs", None)
    text = standalone_source(layer.source, options=layer.options, name=layer.layout.get("name", "layer"),
                             layer_class=f"{cls.__module__}.{cls.__qualname__}",
                             options_class=f"{opts.__module__}.{opts.__qualname__}",
                             layer_kwargs=export_kwargs() if export_kwargs else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)  # permissions of a new file under the umask, like any other output
    return path
