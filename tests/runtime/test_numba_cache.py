"""The runtime's Numba cache is keyed on every runtime source file, not only the defining one."""

import hashlib
from pathlib import Path

from numba import njit

import implicit_compiler.runtime as runtime
from implicit_compiler.runtime import drivers, linalg, newton
from implicit_compiler.runtime.numba_cache import runtime_stamp


def _locator(dispatcher):
    return dispatcher._cache._impl._locator


def test_runtime_functions_are_stamped_with_all_runtime_sources():
    # independent hash of the package's sources
    here = Path(runtime.__file__).parent
    h = hashlib.sha256()
    for f in sorted(here.glob("*.py"), key=lambda p: p.name):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    assert runtime_stamp() == h.hexdigest()
    # the drivers inline newton/linalg code: an edit to those files must invalidate them too
    for fn in (drivers.drive_newton_range, drivers.drive_trust_region_range, drivers.dense_factor,
               linalg.equilibrate, newton.inf_norm):
        loc = _locator(fn)
        assert type(loc).__name__.startswith("Runtime"), fn
        assert loc.get_source_stamp() == runtime_stamp()


def test_functions_outside_the_runtime_keep_numbas_locators():
    @njit(cache=True)
    def outside(x):
        return x + 1

    loc = _locator(outside)
    assert not type(loc).__name__.startswith("Runtime")
    assert loc.get_source_stamp() != runtime_stamp()
