"""implicit_compiler: SymPy implicit layers compiled to Numba kernels and PyTorch autograd.

Write ``F(y, theta) = 0`` (or ``y = g(y, theta)``) in SymPy, compile it, and use the
result as a differentiable PyTorch layer whose backward pass is the implicit
function theorem.
"""

from ._version import __version__
from .codegen.export import export_layer
from .compiler import compile
from .errors import (
    ConvergenceError,
    ImplicitCompilerError,
    InconsistentConstraintsError,
    InputError,
    StructuralSingularityError,
    SystemDefinitionError,
)
from .inspect import check, report
from .runtime.kernels import SolveResult
from .runtime.options import SolverOptions
from .runtime.status import Status
from .symbolic.ode import ODE
from .symbolic.problem import Problem
from .symbolic.system import FixedPoint, ResidualSystem
from .torch.module import ImplicitLayer, SolveInfo
from .torch.ode_layer import ODEInfo, ODELayer

__all__ = [
    "__version__",
    "compile",
    "report",
    "check",
    "export_layer",
    "ResidualSystem",
    "FixedPoint",
    "Problem",
    "ODE",
    "ODELayer",
    "ODEInfo",
    "ImplicitLayer",
    "SolveInfo",
    "SolveResult",
    "SolverOptions",
    "Status",
    "ImplicitCompilerError",
    "SystemDefinitionError",
    "StructuralSingularityError",
    "InconsistentConstraintsError",
    "InputError",
    "ConvergenceError",
]
