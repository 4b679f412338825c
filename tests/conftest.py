import os
from pathlib import Path

import pytest
import sympy as sp

# Keep compiled kernels between test runs, but out of the user's own cache.
os.environ.setdefault(
    "IMPLICIT_COMPILER_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "kernels")
)

import implicit_compiler as ic  # noqa: E402


def appendix_system():
    x = sp.Symbol("x")
    y1, y2 = sp.symbols("y1 y2")
    return ic.ResidualSystem(
        residuals=[x**2 + y1**2 + y2**2 - 4, x * y1 - 1], unknowns=[y1, y2], params=[x], name="appendix"
    )


@pytest.fixture(scope="session")
def appendix_layer():
    return ic.compile(appendix_system())
