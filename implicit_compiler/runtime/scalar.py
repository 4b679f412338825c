"""Helpers called by the per-system scalar kernels (small dense systems, codegen/emit.py).

The same functions as in :mod:`.newton`, where they are inlined at Numba-IR level into the
drivers (compiled once per installation). A scalar kernel calls them dozens of times, and
every IR-level inline copies the callee's IR (measured: ~2 s of the appendix system's
cold compile); called as plain functions they are still inlined, by LLVM, at no
compile-time cost.
"""

from numba import njit

from .newton import ARMIJO_C, MIN_STEP, converged_linearly, linear_run, nan_max

__all__ = ["ARMIJO_C", "MIN_STEP", "converged_linearly_s", "linear_run_s", "nan_max_s"]

nan_max_s = njit(error_model="numpy")(nan_max.py_func)
converged_linearly_s = njit(error_model="numpy")(converged_linearly.py_func)
linear_run_s = njit(error_model="numpy")(linear_run.py_func)
