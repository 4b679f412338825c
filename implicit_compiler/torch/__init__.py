"""PyTorch integration: the autograd Function and the nn.Module around compiled kernels.

Nothing here imports SymPy: a layer can be built from a generated module alone.
"""

from .function import ImplicitFunction
from .module import ImplicitLayer, SolveInfo

__all__ = ["ImplicitFunction", "ImplicitLayer", "SolveInfo"]
