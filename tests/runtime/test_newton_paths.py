"""The two Newton paths against each other: the runtime driver (runtime.newton.newton_one, which
evaluates F and dF/dy together at the full step's trial point and keeps them when the step is
accepted) and the scalar kernel a small system's module emits (codegen/emit_small.py), on one
batch mixing regular, singular, degenerate, non-finite and iteration-capped samples: the same
statuses and iterations, the same solutions and gradients to rounding."""

import numpy as np
import pytest
import sympy as sp

import implicit_compiler as ic
from implicit_compiler.codegen import emit
from implicit_compiler.runtime import status as st

x, a, c = sp.symbols("x a c")
y1, y2, y3 = sp.symbols("y1 y2 y3")

SYSTEMS = {
    "appendix": (ic.ResidualSystem(residuals=[x**2 + y1**2 + y2**2 - 4, x * y1 - 1], unknowns=[y1, y2],
                                   params=[x], name="paths_appendix"),
                 [[1.0], [0.75], [1.25], [0.3], [1.9318516525781366], [np.nan], [np.inf], [1e-200], [5.0],
                  [0.9], [1.1], [1e150]],
                 [1.0, 1.5]),
    # exp, and a double root at a = 0 (y3^2 = a): linear convergence, reported singular
    "three": (ic.ResidualSystem(residuals=[y1 + sp.exp(y2) - a - 1, y2 * y1 - c, y3**2 - a],
                                unknowns=[y1, y2, y3], params=[a, c], name="paths_three"),
              [[1.0, 0.5], [2.0, 0.1], [0.0, 0.3], [-1.0, 0.2], [3.0, -2.0], [np.nan, 1.0], [800.0, 1.0],
               [0.5, 1e300], [4.0, 1.0]],
              [0.9, 0.9, 0.9]),
}


@pytest.fixture(scope="module", params=sorted(SYSTEMS))
def case(request):
    system, params, guess = SYSTEMS[request.param]
    layer = ic.compile(system)
    mod = layer.kernels.module
    # The runtime Newton driver bound to this module's kernels (a small system's module
    # binds the trust-region driver to them, so they are all defined).
    ns = dict(mod.__dict__)
    src = "\n".join(emit.driver_bindings(emit.DRIVERS, ["newton", "vjp"], bound=emit._NEWTON_KERNELS + ("vjp_params",)))
    src = "\n".join(["_fn_vjp_params = _function(vjp_params, VJP_PARAMS)", src])
    exec(compile(src, f"<generic newton {request.param}>", "exec"), ns)
    return request.param, mod, ns, np.array(params, dtype=np.float64), np.array([guess])


def _run(newton_range, vjp_range, mod, P, Y0, options):
    B, n = P.shape[0], mod.N
    Y = np.zeros((B, n))
    LU = np.zeros((B, n, n))
    PIV = np.zeros((B, n + 1), dtype=np.int64)
    STATUS = np.full(B, -7, dtype=np.int8)
    INFO = np.zeros((B, 2))
    newton_range(0, B, Y0, P, *options, Y, LU, PIV, STATUS, INFO, mod.TABLES)
    Ybar = np.linspace(0.5, 1.5, B * n).reshape(B, n)
    PBAR = np.zeros((B, mod.M))
    vjp_range(0, B, Y, P, LU, PIV, STATUS, Ybar, np.ones(1, dtype=np.bool_), PBAR, mod.TABLES)
    return Y, STATUS, INFO, PBAR


@pytest.mark.parametrize("options", [(1e-10, 1e-10, 1e-10, 50, 1e-8), (1e-12, 0.0, 1e-12, 5, 1e-8)])
def test_runtime_newton_matches_the_scalar_kernel(case, options):
    name, mod, ns, P, Y0 = case
    for guess in (Y0, 0.5 * Y0):
        scalar = _run(mod.newton_range, mod.vjp_range, mod, P, guess, options)
        generic = _run(ns["newton_range"], ns["vjp_range"], mod, P, guess, options)
        np.testing.assert_array_equal(generic[1], scalar[1])  # statuses
        ok = scalar[1] == st.CONVERGED
        assert ok.any() and (~ok).any()
        np.testing.assert_array_equal(generic[2][ok, 0], scalar[2][ok, 0])  # iterations
        np.testing.assert_allclose(generic[0][ok], scalar[0][ok], rtol=1e-14, atol=1e-300)
        np.testing.assert_allclose(generic[3][ok], scalar[3][ok], rtol=1e-12)
        np.testing.assert_array_equal(generic[3][~ok], 0.0)
        if name == "appendix":
            xv = P[ok, 0]
            np.testing.assert_allclose(generic[0][ok, 0], 1 / xv, rtol=1e-14)
