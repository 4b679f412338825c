"""Look at what the compiler derived, and certify it.

* :func:`report` — residuals, Jacobians, sparsity, common subexpressions and the
  closed-form implicit Jacobian, as text, LaTeX, HTML or a sparsity picture;
* :func:`check` — a derivative certificate for a compiled layer: its kernels
  against SymPy's exact derivatives and against finite differences.

This package uses SymPy; the run-time packages (``runtime``, ``torch``) never import it.
"""

from .check import Certificate, check
from .report import Report, Section, register_section, report

__all__ = ["Certificate", "Report", "Section", "check", "register_section", "report"]
