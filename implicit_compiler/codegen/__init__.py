"""Code generation: SymPy expressions to a Numba kernel module on disk."""
