"""Exception types users catch.

Every message names the thing at fault (the symbol, the residual, the argument,
the sample) and says how to fix it.
"""

from __future__ import annotations

import numpy as np


class ImplicitCompilerError(Exception):
    """Base class of every error this package raises on purpose."""


class SystemDefinitionError(ImplicitCompilerError, ValueError):
    """The symbolic system or problem is malformed (caught before code generation)."""


class StructuralSingularityError(SystemDefinitionError):
    """dF/dy is singular for every value of the symbols (its sparsity pattern has no
    perfect matching between residuals and unknowns)."""


class InconsistentConstraintsError(SystemDefinitionError):
    """The equality constraints of a problem contradict each other for every parameter value
    (a constraint's variable part is a combination of others', its constant part is not)."""


class InputError(ImplicitCompilerError, ValueError):
    """A tensor or array passed to a compiled layer has the wrong shape, dtype or name."""


class ConvergenceError(ImplicitCompilerError, RuntimeError):
    """One or more samples of a batch were not solved.

    ``status`` holds the per-sample status codes (see :class:`implicit_compiler.Status`),
    ``failed`` the indices of the failed samples.
    """

    def __init__(self, message: str, status: np.ndarray):
        super().__init__(message)
        self.status = np.asarray(status)
        self.failed = np.flatnonzero(self.status != 0)
