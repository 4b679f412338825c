"""Numba building blocks called by generated kernel modules.

Nothing in this package imports SymPy or torch: a generated module needs only
numpy, numba and these files, which is what makes standalone export possible.
"""

from .numba_cache import install as _install_cache_locators

_install_cache_locators()
