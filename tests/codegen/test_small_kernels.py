"""The scalar Newton / VJP kernels of small dense systems (codegen/emit_small.py) against the
first scalar kernels (codegen.emit._kernels_scalar): bit for bit on batches that mix
converged, singular, degenerate, non-finite and iteration-capped samples."""

import numpy as np
import pytest
import sympy as sp

import implicit_compiler as ic
from implicit_compiler.codegen import emit, emit_small
from implicit_compiler.codegen.cache import load_module
from implicit_compiler.runtime import status as st

x, a, c = sp.symbols("x a c")
y1, y2, y3 = sp.symbols("y1 y2 y3")

SYSTEMS = {
    # the appendix system: singular where y2 = 0 (x^2 + 1/x^2 = 4), no root for x near 0
    "appendix": (ic.ResidualSystem(residuals=[x**2 + y1**2 + y2**2 - 4, x * y1 - 1], unknowns=[y1, y2],
                                   params=[x], name="small_appendix"),
                 [[1.0], [0.75], [1.25], [0.3], [1.9318516525781366], [np.nan], [np.inf], [1e-200], [5.0],
                  [0.9], [1.1]]),
    # three unknowns, exp and a double root at a = 0 (y3^2 = a)
    "three": (ic.ResidualSystem(residuals=[y1 + sp.exp(y2) - a - 1, y2 * y1 - c, y3**2 - a],
                                unknowns=[y1, y2, y3], params=[a, c], name="small_three"),
              [[1.0, 0.5], [2.0, 0.1], [0.0, 0.3], [1e-12, 0.0], [-1.0, 0.2], [3.0, -2.0], [np.nan, 1.0],
               [800.0, 1.0], [0.5, 1e300]]),
    # one unknown: a cubic with a triple root at a = 0
    "one": (ic.ResidualSystem(residuals=[(y1 - a) ** 3 + c * y1], unknowns=[y1], params=[a, c], name="small_one"),
            [[0.5, 1.0], [0.5, 0.0], [2.0, 1e-3], [-1.0, 3.0], [np.inf, 1.0], [1.0, -1e-9]]),
}


def _modules(system, tmp_path, monkeypatch):
    """(new module, module with the first scalar kernels) of ``system``."""
    d, layout = system.derivation, system.layout()
    assert emit.use_scalar_kernels(d)
    out = []
    for label, fn in (("new", emit_small.kernels_scalar), ("old", emit._kernels_scalar)):
        monkeypatch.setattr(emit_small, "kernels_scalar", fn)
        path = tmp_path / f"ic_small_{system.name}_{label}.py"
        path.write_text(emit.module_source(d, layout, f"small_{system.name}_{label}"))
        out.append(load_module(path))
    return out


def _run(mod, P, Y0, options):
    B, n = P.shape[0], mod.N
    Y = np.full((B, n), -7.0)
    LU = np.full((B, n, n), -7.0)
    PIV = np.full((B, n + 1), -7, dtype=np.int64)
    STATUS = np.full(B, -7, dtype=np.int8)
    INFO = np.full((B, 2), -7.0)
    mod.newton_range(0, B, Y0, P, *options, Y, LU, PIV, STATUS, INFO, mod.TABLES)
    Ybar = np.linspace(0.5, 1.5, B * n).reshape(B, n)
    need = np.ones(len(mod.LAYOUT["param_groups"]), dtype=np.bool_)
    PBAR = np.full((B, mod.M), -7.0)
    mod.vjp_range(0, B, Y, P, LU, PIV, STATUS, Ybar, need, PBAR, mod.TABLES)
    return Y, STATUS, INFO, LU, PIV, PBAR


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_small_kernels_match_the_first_scalar_kernels(name, tmp_path, monkeypatch):
    system, params = SYSTEMS[name]
    new, old = _modules(system, tmp_path, monkeypatch)
    # The first kernels' line search printed F on its own; 'three' shares exp(y2) between F and
    # dF/dy, and the joint CSE prints its F_0 in another order of operations.
    bitwise = name != "three"
    P = np.array(params, dtype=np.float64)
    B = P.shape[0]
    rng = np.random.default_rng(1)
    guesses = [np.full((1, new.N), 0.9), np.full((1, new.N), 0.0),
               np.ascontiguousarray(rng.normal(size=(B, new.N)) + 1.0)]
    guesses[2][1, 0] = np.nan  # one non-finite initial guess among good ones
    statuses = set()
    for Y0 in guesses:
        for options in ((1e-10, 1e-10, 1e-10, 50, 1e-8), (1e-12, 0.0, 1e-12, 3, 1e-8)):
            got = _run(new, P, Y0, options)
            ref = _run(old, P, Y0, options)
            statuses |= set(ref[1].tolist())
            if bitwise:
                # every output array, the entries a kernel leaves unwritten (-7) included
                for g, r in zip(got, ref):
                    np.testing.assert_array_equal(g, r)
                continue
            # The first kernels' line search evaluated F in another order of operations than
            # F at the iterate (the joint CSE with dF/dy); the new kernel uses the joint one
            # throughout, so values agree to rounding where the root is regular.
            np.testing.assert_array_equal(got[1], ref[1])  # statuses
            ok = ref[1] == st.CONVERGED
            np.testing.assert_array_equal(got[2][ok, 0], ref[2][ok, 0])  # iterations
            np.testing.assert_allclose(got[0][ok], ref[0][ok], rtol=1e-14, atol=1e-300)
            np.testing.assert_allclose(got[5][ok], ref[5][ok], rtol=1e-12)
            np.testing.assert_array_equal(got[5][~ok], 0.0)
    # the batches exercised converged, failed and non-finite samples
    assert st.CONVERGED in statuses and st.NONFINITE in statuses
    assert statuses - {st.CONVERGED, st.NONFINITE}


def test_small_kernel_appendix_values(tmp_path, monkeypatch):
    """The new kernel's solution and gradient against the closed form (y1 = 1/x, y2 = sqrt(4 - x^2 - 1/x^2))."""
    system, _ = SYSTEMS["appendix"]
    new, _ = _modules(system, tmp_path, monkeypatch)
    xs = np.linspace(0.75, 1.25, 41).reshape(-1, 1)
    Y, STATUS, INFO, LU, PIV, PBAR = _run(new, xs, np.array([[1.0, 1.5]]), (1e-10, 1e-10, 1e-10, 50, 1e-8))
    assert (STATUS == st.CONVERGED).all()
    xv = xs[:, 0]
    np.testing.assert_allclose(Y[:, 0], 1 / xv, rtol=1e-14)
    np.testing.assert_allclose(Y[:, 1], np.sqrt(4 - xv**2 - 1 / xv**2), rtol=1e-14)
    # d(y1 + y2)/dx with Ybar = (w0, w1): w0 * (-1/x^2) + w1 * (-x + 1/x^3) / y2
    Ybar = np.linspace(0.5, 1.5, xs.size * 2).reshape(-1, 2)
    exact = Ybar[:, 0] * (-1 / xv**2) + Ybar[:, 1] * (-xv + xv**-3) / Y[:, 1]
    np.testing.assert_allclose(PBAR[:, 0], exact, rtol=1e-12)
