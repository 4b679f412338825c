"""``compile``: symbolic system -> generated module on disk -> torch layer."""

from __future__ import annotations

import sys
import time

from .codegen import cache
from .codegen.emit import module_source
from .errors import ImplicitCompilerError
from .runtime.options import SolverOptions
from .torch.module import ImplicitLayer, set_module_loader
from .torch.ode_layer import set_ode_compiler


def _progress(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"[implicit_compiler] {msg}", file=sys.stderr, flush=True)


def _cached_module(content_hash: str, cache_dir, make_source, report: dict):
    """Import the generated module for ``content_hash``, writing it with ``make_source(key)``
    first when the cache does not have it; records path and hit/written in ``report``."""
    key = cache.module_key(content_hash)
    path, found, written = cache.ensure_module(key, cache_dir, lambda: make_source(key))
    report["path"] = str(path)
    report["cache_hit"] = found
    report["written"] = written
    return path, cache.load_module(path)


def compile(system, *, cache_dir=None, verbose: bool = False, warmup: bool = True, **options) -> ImplicitLayer:
    """Compile a :class:`ResidualSystem` (or :class:`FixedPoint`) into an :class:`ImplicitLayer`.

    The generated module is stored in the kernel cache (``cache_dir``, else
    ``$IMPLICIT_COMPILER_CACHE``, else ``~/.cache/implicit_compiler``); a later
    compile of the same system, in this or any process, imports it without
    deriving anything, and Numba loads its machine code from disk.

    ``options`` are :class:`SolverOptions` fields (``tol``, ``max_iter``,
    ``on_failure``, ``method``, ...). ``verbose`` reports progress on stderr.
    ``warmup`` compiles (or loads) the forward and backward kernels now rather than on the first call.
    """
    if getattr(system, "kind", None) == "ode":
        return compile_ode(system, cache_dir=cache_dir, verbose=verbose, warmup=warmup, **options)
    if getattr(system, "kind", None) == "problem":
        return compile_problem(system, cache_dir=cache_dir, verbose=verbose, warmup=warmup, **options)
    opts = SolverOptions.from_kwargs(**options)
    report = {}
    t0 = time.perf_counter()

    def source(key):
        _progress(verbose, f"deriving Jacobians of {system!r}")
        t = time.perf_counter()
        deriv = system.derivation
        report["derive_seconds"] = time.perf_counter() - t
        _progress(verbose, f"generating code ({deriv.factorization} factorisation)")
        t = time.perf_counter()
        src = module_source(deriv, system.layout(), key)
        report["codegen_seconds"] = time.perf_counter() - t
        return src

    path, module = _cached_module(system.content_hash(), cache_dir, source, report)
    t = time.perf_counter()
    layer = ImplicitLayer(module, opts, system=system, compile_report=report)
    _attach_second_order(layer, system, cache_dir)
    if warmup:
        _progress(verbose, f"compiling kernels with Numba ({path.name})")
        warm(layer)
    report["load_seconds"] = time.perf_counter() - t
    report["total_seconds"] = time.perf_counter() - t0
    _progress(verbose, f"ready in {report['total_seconds']:.2f} s")
    return layer


def warm(layer: ImplicitLayer) -> None:
    """Compile (or load from Numba's cache) every kernel a call of ``layer`` can reach, with
    the signatures calls use: the serial range kernels that small batches run and the
    ``prange`` drivers that large ones run, for the forward solve (the layer's method) and
    the backward VJP. The kernels are evaluated at one point (parameters and initial guess
    zero, no iteration): arithmetic faults there (``1/s`` at ``s = 0``) are per-sample
    statuses, never an error."""
    import numpy as np

    k = layer.kernels
    P = np.zeros((1, k.m))
    Y0 = np.zeros((1, k.n))
    Ybar = np.zeros((1, k.n))
    method = layer.options.method or layer.layout.get("default_method", "newton")
    need = np.ones(len(layer.layout["param_groups"]), dtype=np.bool_)
    opts = layer.options.replace(max_iter=0, method=method)

    def run():
        res = k.solve(P, Y0, opts)
        k.vjp(res, Ybar, need, opts.parallel_threshold)

    k.warm_up(run)


def compile_problem(problem, *, cache_dir=None, verbose: bool = False, warmup: bool = True, forward=None,
                    return_multipliers: bool = False, weak_tol: float | None = None, warn_weakly_active: bool = True,
                    **options):
    """Compile an optimization :class:`Problem` into a :class:`ProblemLayer` (see :func:`compile`).

    ``forward``: a callable computing the solution instead of the generated interior point
    (it gets one NumPy array per parameter group, batch first, and returns ``y`` or
    ``(y, lam, nu)``); ``return_multipliers``: also output ``lam`` and ``nu``;
    ``weak_tol``: the "≈ 0" of weakly active constraints (default ``10 sqrt(tol)``);
    ``warn_weakly_active``: warn when a call meets one (``layer.solve`` reports them always).
    """
    from .codegen.emit_problem import emit_problem_module
    from .torch.problem_layer import ProblemLayer, check_problem_options

    check_problem_options(options)
    opts = SolverOptions.from_kwargs(**options)
    report = {}
    t0 = time.perf_counter()

    def source(key):
        _progress(verbose, f"deriving the KKT system of {problem!r}")
        return emit_problem_module(problem, problem.layout(), key)

    _, module = _cached_module(problem.content_hash(), cache_dir, source, report)
    layer = ProblemLayer(module, opts, system=problem, compile_report=report, forward=forward,
                         return_multipliers=return_multipliers, weak_tol=weak_tol,
                         warn_weakly_active=warn_weakly_active)
    _attach_second_order(layer, problem, cache_dir)
    if warmup:
        import numpy as np

        k = layer.kernels
        need = np.ones(len(layer.layout["param_groups"]), dtype=np.bool_)
        P = np.zeros((1, k.m))
        serial = opts.replace(max_iter=0, parallel_threshold=2)

        def run():
            if forward is None:
                res = k.solve(P, np.zeros((1, k.nv)), serial)
            else:
                # compile the KKT check/factorisation the custom forward's results go through
                res = k.finalize(np.zeros((1, k.n)), P, serial)
            k.vjp(res, np.zeros((1, k.n)), need, 2)

        # the serial range kernels and the prange drivers large batches run (as warm())
        k.warm_up(run)
    report["total_seconds"] = time.perf_counter() - t0
    return layer


def compile_ode(ode, *, cache_dir=None, verbose: bool = False, warmup: bool = True, **options):
    """Compile an :class:`~implicit_compiler.ODE` into an :class:`~implicit_compiler.ODELayer`.

    ``options``: ``method`` (``"radau5"`` default, ``"esdirk"``, ``"dopri5"``, ``"backward_euler"``,
    ``"trapezoid"``), ``rtol``, ``atol``, ``max_steps``, ``h0`` (first step, adaptive methods),
    ``dt`` (step, fixed-step methods), ``hmax``, ``on_failure``, ``parallel_threshold``
    (see docs/ode.md). The generated module depends on the right-hand side only: every method
    runs on the same kernels.
    """
    from .torch.ode_layer import ODELayer, ODEOptions

    opts = ODEOptions.from_kwargs(**options)
    report = {}
    t0 = time.perf_counter()
    system = ode.system

    def source(key):
        _progress(verbose, f"deriving df/dx and df/dtheta of {ode!r}")
        return module_source(system.derivation, ode.layout(), key)

    _, module = _cached_module(ode.content_hash(), cache_dir, source, report)
    layer = ODELayer(module, opts, ode=ode, compile_report=report)
    if warmup:
        _progress(verbose, "compiling the integrator drivers with Numba (once per installation)")
        layer.kernels.warm_up(opts.method)
    report["total_seconds"] = time.perf_counter() - t0
    return layer


class _PickledModules:
    """How a pickled layer (``torch.save``, ``copy``-free ``pickle``) gets its generated module back.

    The pickle carries the module's file name, its source (with the checksum line) and the
    toolchain hash it was generated under. Loading, in any process: the kernel cache's own copy
    when it has one, else the carried source written into the cache (``$IMPLICIT_COMPILER_CACHE``
    or the default location, created if missing); when the toolchain differs (another package,
    SymPy or Numba version), the module is generated again from the carried symbolic system.
    A layer that carries its system also gets its lazy second-order module back (forward mode,
    double backward), as :func:`compile` attaches it.
    """

    @staticmethod
    def toolchain() -> str:
        return cache.toolchain_hash()

    @staticmethod
    def load(spec: dict, system):
        name = spec["file"]
        if spec.get("toolchain") == cache.toolchain_hash():
            text = spec["source"]
            body = cache.without_checksum(text)
            if cache.with_checksum(body) != text or not (name.startswith(cache.MODULE_PREFIX)
                                                         and name.endswith(".py")):
                raise ImplicitCompilerError(
                    f"the saved kernel module {name} is corrupt (its checksum does not match its source); "
                    f"compile the system again and save the model anew"
                )
            key = name[len(cache.MODULE_PREFIX):-len(".py")]
            path, _, _ = cache.ensure_module(key, None, lambda: body)
            return cache.load_module(path)
        if system is None:
            raise ImplicitCompilerError(
                f"the saved layer's kernel module {name} was generated by another version of implicit_compiler "
                f"(or of SymPy/Numba), and the pickle does not carry its symbolic system to generate it again; "
                f"compile the system with this version and load the model's state_dict into it"
            )
        if getattr(system, "kind", None) == "problem":
            from .codegen.emit_problem import emit_problem_module

            def source(key):
                return emit_problem_module(system, system.layout(), key)
        else:
            def source(key):
                return module_source(system.derivation, system.layout(), key)
        return _cached_module(system.content_hash(), None, source, {})[1]

    @staticmethod
    def attach_second_order(layer, system) -> None:
        """Give a loaded layer its lazy second-order module (beside its first-order module in
        the kernel cache; generated from ``system`` on first use when the cache lacks it)."""
        _attach_second_order(layer, system, None)


set_module_loader(_PickledModules)
set_ode_compiler(compile_ode)


# ---------------------------------------------------------------- second order
def _second_order_module(system, cache_dir, first_module):
    """Generate (or find in the cache) and import the second-order module of ``system`` (a
    ResidualSystem, FixedPoint or Problem): key = the first-order content hash + ``second``.
    ``cache_dir=None`` puts it beside the first-order module ``first_module``."""
    from pathlib import Path

    from .codegen.emit_second import emit_second_module
    from .derive.second import second_derivation
    from .symbolic.system import _back, _for_diff

    residual_system = system.system if getattr(system, "kind", None) == "problem" else system
    content_hash = system.content_hash()
    if cache_dir is None:
        cache_dir = Path(first_module.__file__).parent
    report = {}

    def source(key):
        from .codegen.emit import use_scalar_kernels

        d = residual_system.derivation
        sd = second_derivation(d, for_diff=_for_diff, back=_back)
        return emit_second_module(sd, residual_system.layout(), key, cache.module_key(content_hash),
                                  fused=use_scalar_kernels(d))

    _, module2 = _cached_module(content_hash + "second", cache_dir, source, report)
    return module2


def _attach_second_order(layer, system, cache_dir) -> None:
    """``layer.kernels.second_order()``: the layer's :class:`SecondOrder`, built on first call."""
    from functools import partial

    from .runtime.second_order import LazySecondOrder

    k = layer.kernels
    k.second_order = LazySecondOrder(k, partial(_second_order_module, system, cache_dir, k.module))


def compile_second_order(layer):
    """The :class:`~implicit_compiler.runtime.second_order.SecondOrder` of a compiled layer:
    forward-mode products (``jvp``) and the double backward (``double_backward``), NumPy level.

    The second-order module is generated and compiled on the first call for a layer (kept in
    the kernel cache the layer was compiled with) and reused after;
    ``layer.kernels.second_order()`` is the same object, for callers that must not import the
    compiler (the torch side)."""
    k = layer.kernels
    if getattr(k, "second_order", None) is None:
        system = getattr(layer, "system", None)
        if system is None:
            from .errors import SystemDefinitionError

            raise SystemDefinitionError(
                "this layer was loaded without its symbolic system (a standalone export), so its second "
                "derivatives cannot be generated; compile it from the system with implicit_compiler.compile"
            )
        _attach_second_order(layer, system, None)
    return k.second_order()
