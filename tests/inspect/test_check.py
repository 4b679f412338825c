import types

import numpy as np
import pytest

import implicit_compiler as ic
from implicit_compiler.inspect import Certificate, check


def test_appendix_layer_is_certified(appendix_layer, capsys):
    cert = check(appendix_layer, params=[[1.0], [0.9]], y0=[1.0, 1.5], random_points=2)
    out = capsys.readouterr().out
    assert isinstance(cert, Certificate) and cert.ok and bool(cert)
    assert "PASS" in out and "dy/dθ (backward): layer vs exact" in out
    worst = cert.worst()
    assert worst["dy/dθ (backward): layer vs exact"].error < 1e-12
    assert worst["dF/dy: compiled vs exact"].error < 1e-14
    assert {c.point for c in cert.comparisons} == {"random 0", "random 1", "solution 0", "solution 1"}


def test_params_by_group_and_unsolved_samples(appendix_layer):
    cert = check(appendix_layer, params={"theta": np.array([[1.0], [5.0]])}, y0=[1.0, 1.5], random_points=0,
                 verbose=False)
    assert cert.ok
    assert any("params[1]: not solved" in n for n in cert.notes)
    with pytest.raises(ic.InputError, match=r"params must have shape \(1,\) or \(B, 1\)"):
        check(appendix_layer, params=np.zeros((2, 3)), verbose=False)
    with pytest.raises(ic.InputError, match="unknown group"):
        check(appendix_layer, params={"nope": 1.0}, verbose=False)


def _tampered(layer):
    """A layer whose compiled dF/dy is wrong in one entry."""
    real = layer.kernels.module

    def residual_jacobian(y, p, F, J, tab):
        real.residual_jacobian(y, p, F, J, tab)
        J[1, 0] *= 1.0 + 1e-6

    mod = types.SimpleNamespace(residual=real.residual, residual_jacobian=residual_jacobian,
                                vjp_params=real.vjp_params, TABLES=real.TABLES)
    kernels = types.SimpleNamespace(module=mod, n=layer.kernels.n, m=layer.kernels.m)
    return types.SimpleNamespace(system=layer.system, kernels=kernels, layout=layer.layout, options=layer.options)


def test_a_wrong_jacobian_fails(appendix_layer, capsys):
    cert = check(_tampered(appendix_layer), random_points=2)
    out = capsys.readouterr().out
    assert not cert.ok
    assert "FAIL: dF/dy: compiled vs exact" in out
    assert not cert.worst()["dF/dy: compiled vs exact"].ok
    assert cert.worst()["dF/dθ: compiled vs exact"].ok


def test_needs_the_symbolic_system(appendix_layer):
    bare = types.SimpleNamespace(system=None, kernels=appendix_layer.kernels, layout=appendix_layer.layout)
    with pytest.raises(ic.SystemDefinitionError, match="needs the symbolic system"):
        check(bare)
    empty = Certificate("x")
    assert not empty.ok and "NOT CERTIFIED" in str(empty)
