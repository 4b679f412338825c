"""Symbolic derivation: sparse Jacobians and the patterns the code generator uses."""

from .jacobians import Derivation, derive

__all__ = ["Derivation", "derive"]
