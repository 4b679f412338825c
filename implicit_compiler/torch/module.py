"""``ImplicitLayer``: the ``nn.Module`` returned by :func:`implicit_compiler.compile`."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import ConvergenceError, ImplicitCompilerError, InputError
from ..runtime import status as st
from ..runtime.kernels import Kernels, SolveResult, fallback_note
from ..runtime.options import SolverOptions
from .function import (
    CompilableImplicitFunction,
    EagerImplicitFunction,
    ImplicitFunction,
    _Static,
    batched_at,
    call_meta,
    eager_call,
    fold_inputs,
    pop_interpreter,
    register,
    result_names,
    result_to_tensors,
    unfold_outputs,
    unwrap_vmap_level,
)
from .shapes import _describe, as_array, batch_size, check_finite_dtype, check_tensor, pack, to_numpy

# How a pickled layer finds its generated module again: set by ``implicit_compiler.compiler``
# (which owns the kernel cache) when the package is imported. An object with ``toolchain()``
# (the hash of what generated code depends on) and ``load(spec, system)`` (the module).
_MODULE_LOADER = None


def set_module_loader(loader) -> None:
    global _MODULE_LOADER
    _MODULE_LOADER = loader


@dataclass
class SolveInfo:
    """Per-sample diagnostics of one call (tensors of shape ``(B,)``). ``dense_fallback`` marks
    the samples of a sparse-pattern layer whose fixed-order elimination met a pivot that failed its
    size check and that were solved again with dense LU with partial pivoting (all False for
    layers that factor densely)."""

    status: torch.Tensor
    iterations: torch.Tensor
    residual_norm: torch.Tensor
    dense_fallback: Optional[torch.Tensor] = None  # noqa: UP045

    @property
    def converged(self) -> torch.Tensor:
        return self.status == st.CONVERGED

    def summary(self) -> str:
        fallback = None if self.dense_fallback is None else self.dense_fallback.reshape(-1).numpy()
        return st.summarize(self.status.reshape(-1).numpy()) + fallback_note(fallback)


class _Call:
    """Everything one forward call needs; kept by autograd for the backward."""

    __slots__ = ("kernels", "options", "param_groups", "unknown_groups", "params", "batched",
                 "B", "P", "Y0", "dtype", "device", "squeeze", "layer", "result")

    def run(self) -> SolveResult:
        res = self.kernels.solve(self.P, self.Y0, self.options)
        self.result = res
        status = res.status
        if (status[0] != 0) if status.shape[0] == 1 else status.any():
            bad = status != st.CONVERGED
            policy = self.options.on_failure
            if policy == "raise":
                raise ConvergenceError(
                    st.summarize(status)
                    + "\n(on_failure='nan' or 'keep' returns the failed samples instead of raising)",
                    status,
                )
            if policy == "nan":
                res.y[bad] = np.nan
        if self.layer is not None:
            self.layer._remember(res)
        return res

    def outputs(self, Y: np.ndarray) -> tuple:
        """One tensor per unknown group, never sharing memory with ``Y``: the backward
        reads ``Y``, and a write through an output's NumPy view must not reach it."""
        B = self.B
        groups = self.unknown_groups
        dtype = self.dtype
        # Shaped in NumPy: an output that is a torch view of a tensor made here could not be
        # modified in place (autograd forbids in-place changes of views made inside a Function).
        if len(groups) == 1 and self.device.type == "cpu" and len(groups[0]["symbols"]) == Y.shape[1]:
            # fast path: one unknown group covering y, on the CPU
            shape = groups[0]["shape"]
            shape = tuple(shape) if self.squeeze else (B, *shape)
            if dtype == torch.float64:
                return (torch.from_numpy(Y.copy().reshape(shape)),)
            return (torch.from_numpy(Y.reshape(shape)).to(dtype),)
        outs = []
        for grp in groups:
            off, size = grp["offset"], len(grp["symbols"])
            shape = tuple(grp["shape"]) if self.squeeze else (B, *grp["shape"])
            blk = Y[:, off:off + size]
            # float64: an explicit copy; any other dtype: the conversion copies
            t = torch.from_numpy(np.array(blk).reshape(shape) if dtype == torch.float64 else blk.reshape(shape))
            if t.dtype != dtype:
                t = t.to(dtype)
            if self.device.type != "cpu":
                t = t.to(self.device)
            outs.append(t)
        return tuple(outs)


class ImplicitLayer(torch.nn.Module):
    """A compiled implicit layer: ``y = layer(*params)`` with ``F(y, params) = 0``.

    Call it with one tensor per parameter group, positionally (in the order the
    groups were declared) or by group name. Each group of shape ``s`` takes a
    ``(B, *s)`` tensor or an unbatched ``s`` tensor shared across the batch (its
    gradient is summed over the batch); a batch of 1 broadcasts against a batch
    of ``B``, as in torch. Parameters are real floating-point tensors (float64,
    float32, float16, bfloat16); anything else raises :class:`InputError`. It
    returns one tensor per unknown group (a single tensor when there is one
    group), in the promoted dtype of the inputs; the solve runs in float64 on the
    CPU (CUDA inputs are copied to the CPU and results copied back to the input's
    device). Outputs never share memory with what the backward reads. Forward mode
    and the double backward are exact (the second-order module, built on first use);
    a third derivative raises.

    Keyword arguments of a call: ``y0`` (initial guess: flat ``(n,)`` or ``(B, n)``,
    or a dict by unknown group), ``return_info=True`` to also get a
    :class:`SolveInfo`. Solver options (:class:`SolverOptions`) are set at
    compile time or with :meth:`configure`.
    """

    def __init__(self, module, options: SolverOptions | None = None, system=None, compile_report=None):
        super().__init__()
        self.kernels = Kernels(module)
        self.layout = module.LAYOUT
        self.options = options or SolverOptions()
        self.system = system
        self.compile_report = compile_report or {}
        self._param_groups = self.layout["param_groups"]
        self._unknown_groups = self.layout["unknown_groups"]
        self._param_names = [g["name"] for g in self._param_groups]
        self._default_y0 = np.asarray(self.layout["initial_guess"], dtype=np.float64)
        self._last = None
        self._result_names = None
        self._schema = None
        self._meta = call_meta(self.layout, self._unknown_groups, self._param_groups)
        self._token = register(self)

    # ------------------------------------------------------------------ introspection
    @property
    def function(self) -> type[torch.autograd.Function]:
        """The ``torch.autograd.Function`` this layer applies."""
        return ImplicitFunction

    @property
    def path(self) -> Path:
        """The generated kernel module on disk."""
        return Path(self.kernels.module.__file__)

    @property
    def source(self) -> str:
        """Source of the generated kernel module."""
        return self.path.read_text()

    @property
    def derivation(self):
        if self.system is None:
            raise AttributeError("this layer was loaded without its symbolic system")
        return self.system.derivation

    @property
    def param_names(self) -> list[str]:
        return list(self._param_names)

    @property
    def unknown_names(self) -> list[str]:
        return [g["name"] for g in self._unknown_groups]

    def configure(self, **options) -> ImplicitLayer:
        """Change solver options in place (see :class:`SolverOptions`); returns ``self``."""
        self.options = self.options.replace(**options)
        if not self.options.warm_start:
            self._last = None
        return self

    def extra_repr(self) -> str:
        ins = ", ".join(f"{g['name']}{tuple(g['shape'])}" for g in self._param_groups)
        outs = ", ".join(f"{g['name']}{tuple(g['shape'])}" for g in self._unknown_groups)
        return f"{self.layout['name']}: ({ins}) -> ({outs}), {self.layout['kind']}"

    # ------------------------------------------------------------------ calling
    def _bind(self, args, kwargs) -> list:
        groups = self._param_groups
        if len(args) > len(groups):
            raise InputError(
                f"{self.layout['name']} takes {len(groups)} parameter argument(s) "
                f"({', '.join(self._param_names) or 'none'}), got {len(args)}"
            )
        bound = list(args) + [None] * (len(groups) - len(args))
        for k, v in kwargs.items():
            if k not in self._param_names:
                raise InputError(f"unknown argument {k!r}; the parameter groups are {self._param_names}")
            i = self._param_names.index(k)
            if bound[i] is not None:
                raise InputError(f"parameter group {k!r} given twice (positionally and by name)")
            bound[i] = v
        missing = [g["name"] for g, b in zip(groups, bound) if b is None]
        if missing:
            raise InputError(f"missing parameter group(s) {missing}; the layer takes {self._param_names}")
        return bound

    def _initial(self, y0, B: int) -> np.ndarray:
        n = self.kernels.n
        if y0 is None:
            last = self._last
            if self.options.warm_start and last is not None and last[0].shape[0] == B:
                return last[0]
            if self.kernels.shared_y0:
                return self._default_y0.reshape(1, n)
            return np.broadcast_to(self._default_y0, (B, n)).copy()
        if isinstance(y0, dict):
            names = [g["name"] for g in self._unknown_groups]
            unknown = [k for k in y0 if k not in names]
            if unknown:
                raise InputError(f"y0 names unknown group(s) {', '.join(map(repr, unknown))}; the unknown groups "
                                 f"of this layer are {names}")
            Y0 = np.broadcast_to(self._default_y0, (B, n)).copy()
            for grp in self._unknown_groups:
                if grp["name"] not in y0:
                    continue
                what = f"y0[{grp['name']!r}]"
                a = as_array(y0[grp["name"]], what)
                size = len(grp["symbols"])
                if a.size == size:
                    rows = 1  # one guess shared by the batch
                elif a.ndim >= 1 and a.shape[0] == B and a.size == B * size:
                    rows = B
                else:
                    shape = tuple(grp["shape"])
                    raise InputError(
                        f"{what} has shape {_describe(a.shape)} ({a.size} values); the group {grp['name']!r} "
                        f"expects shape {_describe(shape)} (shared by the batch) or {_describe((B,) + shape)} "
                        f"(one per sample): {size} or {B}x{size} values"
                    )
                Y0[:, grp["offset"]:grp["offset"] + size] = a.reshape(rows, size)
            return Y0
        a = as_array(y0, "y0")
        if a.shape == (n,):
            return a.reshape(1, n) if self.kernels.shared_y0 else np.tile(a, (B, 1))
        if a.shape == (B, n):
            return np.ascontiguousarray(a)
        raise InputError(f"y0 must have shape ({n},) or ({B}, {n}) for this call, got {tuple(a.shape)} "
                         f"(or give a dict by unknown group: {[g['name'] for g in self._unknown_groups]})")

    def _remember(self, res: SolveResult) -> None:
        if self.options.warm_start:
            Y0 = self._last[0] if self._last is not None and self._last[0].shape == res.y.shape else None
            y = res.y.copy()
            bad = res.status != st.CONVERGED
            if bad.any():
                y[bad] = Y0[bad] if Y0 is not None else self._default_y0
            self._last = (y,)

    def _prepare(self, args, kwargs, y0, tensors_only: bool = True) -> _Call:
        groups = self._param_groups
        tensors = list(args) if not kwargs and len(args) == len(groups) else self._bind(args, kwargs)
        for i, (g, t) in enumerate(zip(groups, tensors)):
            if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
                continue
            what = f"parameter group {g['name']!r}"
            if tensors_only:
                check_tensor(t, what)
            elif isinstance(t, torch.Tensor):
                check_finite_dtype(t, what)
            else:  # the NumPy entry point: arrays, lists, Python numbers
                tensors[i] = as_array(t, what)
        return self._call(tensors, y0)

    def _call(self, tensors, y0) -> _Call:
        """The :class:`_Call` for checked arguments (one per parameter group)."""
        groups = self._param_groups
        B, batched = batch_size(groups, tensors, "parameter group")
        call = _Call()
        call.kernels = self.kernels
        call.options = self.options
        call.param_groups = groups
        call.unknown_groups = self._unknown_groups
        call.params = tensors
        call.batched = batched
        call.B = B
        call.squeeze = not any(batched)
        call.P = pack(groups, [to_numpy(t) for t in tensors], B, batched, self.kernels.m)
        call.Y0 = self._initial(y0, B)
        torch_ts = [t for t in tensors if isinstance(t, torch.Tensor)]
        dtype = torch.float64
        if len(torch_ts) == 1:
            dtype = torch_ts[0].dtype
        elif torch_ts:
            dtype = torch_ts[0].dtype
            for t in torch_ts[1:]:
                dtype = torch.promote_types(dtype, t.dtype)
        call.dtype = dtype
        call.device = torch_ts[0].device if torch_ts else torch.device("cpu")
        call.layer = self
        return call

    def forward(self, *args, y0=None, return_info: bool = False, **kwargs):
        if torch.jit.is_tracing():
            raise ImplicitCompilerError(
                f"torch.jit.trace cannot record the implicit layer {self.layout['name']!r}: its forward pass is "
                f"an iterative solve in generated Numba kernels, not TorchScript operations. Use "
                f"torch.compile(model) (fullgraph=True works) instead of torch.jit"
            )
        groups = self._param_groups
        tensors = list(args) if not kwargs and len(args) == len(groups) else self._bind(args, kwargs)
        for g, t in zip(groups, tensors):
            if not (isinstance(t, torch.Tensor) and t.dtype.is_floating_point):
                check_tensor(t, f"parameter group {g['name']!r}")
        B, _ = batch_size(groups, tensors, "parameter group")
        if y0 is not None and not isinstance(y0, torch.Tensor):
            y0 = torch.from_numpy(self._initial(y0, B))  # a dict by group, an array or a list
        meta = self._meta
        k = len(meta[1])
        if eager_call():
            outs = EagerImplicitFunction.apply(self._token, meta, return_info, y0, *tensors)
            info = outs[k:k + 4] if return_info else None
        else:
            top = unwrap_vmap_level((*tensors, y0))  # a vmap level only exists under torch.func
            if top is not None:
                return self._vmapped(top, return_info)
            if torch.compiler.is_compiling():
                outs = CompilableImplicitFunction.apply(self._token, meta, y0, *tensors)
            else:
                outs = ImplicitFunction.apply(self._token, _Static(meta, None), y0, *tensors)
            if return_info:
                # the result's tensors follow the outputs, the dataclass fields first (function.result_names);
                # status is copied: the backward reads the result's status (which samples get a gradient)
                res = dict(zip(self._result_schema()[0], outs[k:]))
                fallback = res.get("dense_fallback")
                info = (res["status"].clone(), res["iterations"], res["residual_norm"],
                        torch.zeros_like(res["status"], dtype=torch.bool) if fallback is None else fallback.clone())
        result = outs[0] if k == 1 else outs[:k]
        if return_info:
            return result, SolveInfo(*info)
        return result

    def _vmapped(self, top, return_info: bool):
        """The call under the innermost vmap level ``top`` (:func:`unwrap_vmap_level`): its ``V``
        calls folded into one call of this layer, made with the level popped, and the outputs
        wrapped at the level again (statuses and iterations per sample of each vmapped call)."""
        level, V, plain, dims = top
        k = len(self._unknown_groups)
        with pop_interpreter():
            params, y0, B, squeeze = fold_inputs(self, V, dims[:-1], dims[-1], plain[:-1], plain[-1])
            out = self.forward(*params, y0=y0, return_info=return_info)
            result, info = out if return_info else (out, None)
            outs = [result] if k == 1 else list(result)
            if info is not None:
                outs += [info.status, info.iterations, info.residual_norm, info.dense_fallback]
            outs = unfold_outputs(outs, k, V, B, squeeze)
        outs = [batched_at(o, level) for o in outs]
        result = outs[0] if k == 1 else tuple(outs[:k])
        if return_info:
            return result, SolveInfo(*outs[k:k + 4])
        return result

    def _solve_tensors(self, params, y0, with_result: bool = False):
        """The implementation of the ``implicit_compiler::solve`` operator: the group outputs,
        then the arrays of the :class:`SolveResult` (``result_names`` order); with
        ``with_result``, ``(the group outputs, the SolveResult)``."""
        call = self._call(list(params), y0)
        res = call.run()
        names = result_names(res)
        if names != self._result_names:
            self._result_names = names
        if with_result:
            return list(call.outputs(res.y)), res
        return [*call.outputs(res.y), *result_to_tensors(res, names)]

    def _probe(self) -> SolveResult:
        """A one-sample result (zero iterations) showing the arrays a solve returns."""
        k = self.kernels
        return k.solve(np.zeros((1, k.m)), np.zeros((1, k.n)), self.options.replace(max_iter=0))

    def _result_schema(self) -> tuple:
        """``(names, [(shape without the batch, dtype), ...])`` of the solve result's arrays."""
        if self._schema is None:
            res = self._probe()
            names = result_names(res)
            self._schema = (names, [(tuple(getattr(res, n).shape[1:]), torch.from_numpy(getattr(res, n)).dtype)
                                    for n in names])
        return self._schema

    def __prepare_scriptable__(self):
        raise ImplicitCompilerError(
            f"torch.jit.script cannot compile the implicit layer {self.layout['name']!r}: its forward pass runs "
            f"generated Numba kernels. Use torch.compile(model) (fullgraph=True works) instead of torch.jit"
        )

    # ------------------------------------------------------------------ copying and pickling
    def _kernel_kwargs(self) -> dict:
        """Constructor arguments of this layer's kernels besides the module."""
        return {}

    def _make_kernels(self, module, kwargs: dict):
        return Kernels(module)

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        skip = ("kernels", "_token", "system")
        state = {k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k not in skip}
        state["system"] = self.system  # the symbolic definition is immutable: shared
        state["kernels"] = self._make_kernels(self.kernels.module, self._kernel_kwargs())
        lazy = getattr(self.kernels, "second_order", None)
        if lazy is not None:
            # the same module: the copy builds (or loads from the cache) the same second-order module
            state["kernels"].second_order = type(lazy)(state["kernels"], lazy._build)
        new.__dict__.update(state)
        new._token = register(new)
        return new

    def __getstate__(self):
        if _MODULE_LOADER is None:
            raise ImplicitCompilerError(
                f"the layer {self.layout['name']!r} of a standalone export cannot be pickled: loading it needs the "
                f"implicit_compiler package's kernel cache. Save the model's state_dict instead (the layer has no "
                f"weights) and build the model around the export again when loading"
            )
        state = self.__dict__.copy()
        del state["_token"]
        kernels = state.pop("kernels")
        name = self.layout["name"]
        kwargs = self._kernel_kwargs()
        for key, value in kwargs.items():
            try:
                pickle.dumps(value)
            except Exception as e:
                raise ImplicitCompilerError(
                    f"the layer {name!r} cannot be pickled: its {key}= callable {value!r} cannot be pickled "
                    f"({type(e).__name__}: {e}). Define it as a module-level function (not a lambda, closure or "
                    f"local function), or pickle a model whose layer is compiled without {key}="
                ) from None
        system = self.system
        if system is not None:
            try:
                pickle.dumps(system)
            except Exception:
                system = None  # the kernels come back from the module source; .derivation is then unavailable
        state["system"] = system
        path = Path(kernels.module.__file__)
        try:
            source = path.read_text()
        except OSError as e:
            raise ImplicitCompilerError(f"the layer {name!r} cannot be pickled: its generated module {path} "
                                        f"cannot be read ({e})") from None
        state["_kernels_spec"] = {
            "file": path.name,
            "source": source,
            "toolchain": _MODULE_LOADER.toolchain(),
            "kwargs": kwargs,
        }
        return state

    def __setstate__(self, state):
        state = dict(state)
        spec = state.pop("_kernels_spec")
        loader = _MODULE_LOADER
        if loader is None:
            raise ImplicitCompilerError(
                f"loading the implicit layer {state['layout']['name']!r} needs the implicit_compiler package "
                f"(import implicit_compiler first): it writes the layer's generated module to the kernel cache"
            )
        module = loader.load(spec, state.get("system"))
        state["kernels"] = self._make_kernels(module, spec["kwargs"])
        state["layout"] = module.LAYOUT
        super().__setstate__(state)
        if self.system is not None:
            # forward mode and double backward: the second-order module, generated from the carried
            # system (or found in the kernel cache) on first use
            loader.attach_second_order(self, self.system)
        self._token = register(self)

    def solve(self, *args, y0=None, **kwargs) -> SolveResult:
        """NumPy entry point, no autograd: returns a :class:`SolveResult` and never
        raises on non-convergence (read ``.status``). Outputs are flat ``(B, n)``;
        :meth:`split` turns them into per-group arrays."""
        call = self._prepare(args, kwargs, y0, tensors_only=False)
        call.layer = None
        res = self.kernels.solve(call.P, call.Y0, self.options)
        self._remember(res)
        return res

    def split(self, Y: np.ndarray) -> dict:
        """Per-unknown-group views of a flat ``(B, n)`` solution."""
        return {
            g["name"]: Y[:, g["offset"]:g["offset"] + len(g["symbols"])].reshape(Y.shape[0], *g["shape"])
            for g in self._unknown_groups
        }
