"""A Problem's cache key is its definition: a cache hit does not derive the KKT system.

Deriving the KKT system (the Lagrangian's gradient, the residual system's validation) was most of
the time of a cache hit (13 of 16 s for a 100-variable QP), because the key was the hash of the
derived system. The key is now the definition's hash; ``symbolic/`` is part of the toolchain hash,
so a change of how the KKT system is derived still changes every key.
"""

import numpy as np
import sympy as sp
import torch

import implicit_compiler as ic
from implicit_compiler.codegen import cache


def small_qp(name="cache_qp", *, shift=0, initial_guess=None, ineq_scale=1):
    y = sp.Matrix(sp.symbols("y0:3"))
    q = sp.Matrix(sp.symbols("q0:3"))
    t = sp.Symbol("t")
    return ic.Problem((y.T * y)[0] / 2 + (q.T * y)[0] + shift * y[0], variables={"y": y},
                      params={"q": q, "t": t}, inequalities=[ineq_scale * (y[0] + y[1] + y[2]) - t],
                      name=name, initial_guess=initial_guess)


def test_cache_hit_does_not_derive_the_kkt_system(tmp_path):
    first = ic.compile(small_qp(), cache_dir=tmp_path)
    assert not first.compile_report["cache_hit"]
    again = small_qp()  # the same definition, built anew (new SymPy objects, nothing cached on them)
    layer = ic.compile(again, cache_dir=tmp_path)
    assert layer.compile_report["cache_hit"]
    assert not {"kkt", "system", "lagrangian", "hessian_entries"} & set(vars(again))
    # and the layer it gives is the compiled one: the projection of -q onto y0 + y1 + y2 <= t
    q = np.array([[-1.0, -2.0, -3.0], [1.0, 0.0, -0.5]])
    t = np.array([1.5, 4.0])
    got = layer(torch.from_numpy(q), torch.from_numpy(t)).numpy()
    for qi, ti, yi in zip(q, t, got):
        free = -qi
        expected = free if free.sum() <= ti else free - (free.sum() - ti) / 3
        np.testing.assert_allclose(yi, expected, atol=1e-9)


def test_key_follows_the_definition():
    base = small_qp().content_hash()
    assert small_qp().content_hash() == base
    assert small_qp(name="other").content_hash() != base
    assert small_qp(shift=1).content_hash() != base
    assert small_qp(ineq_scale=2).content_hash() != base
    assert small_qp(initial_guess=0.5).content_hash() != base
    assert small_qp(initial_guess=0.5).content_hash() == small_qp(initial_guess=[0.5] * 4).content_hash()
    y = sp.Matrix(sp.symbols("y0:3"))
    q = sp.Matrix(sp.symbols("q0:3"))
    t = sp.Symbol("t")
    f = (y.T * y)[0] / 2 + (q.T * y)[0]
    ineq = [y[0] + y[1] + y[2] - t]
    minimise = ic.Problem(f, variables={"y": y}, params={"q": q, "t": t}, inequalities=ineq, name="cache_qp")
    assert minimise.content_hash() == base
    maximise = ic.Problem(-f, variables={"y": y}, params={"q": q, "t": t}, inequalities=ineq, name="cache_qp",
                          maximize=True)
    assert maximise.content_hash() == base  # the same problem: -(-f) is minimised, the same KKT system
    renamed = ic.Problem(f, variables={"x": y}, params={"q": q, "t": t}, inequalities=ineq, name="cache_qp")
    assert renamed.content_hash() != base  # another group name: another layout
    split = ic.Problem(f, variables={"y": y}, params={"q": q[:2, 0], "q2": q[2], "t": t}, inequalities=ineq,
                       name="cache_qp")
    assert split.content_hash() != base  # other parameter groups


def test_symbolic_code_is_part_of_the_toolchain_hash(monkeypatch, tmp_path):
    import shutil
    from pathlib import Path

    import implicit_compiler.codegen.cache as cache_mod

    pkg = Path(cache_mod.__file__).resolve().parents[1]
    fake = tmp_path / "implicit_compiler"
    for sub in ("runtime", "codegen", "derive", "symbolic"):
        shutil.copytree(pkg / sub, fake / sub)
    monkeypatch.setattr(cache_mod, "__file__", str(fake / "codegen" / "cache.py"))
    before = cache.toolchain_hash.__wrapped__()  # (the cached function holds the installed package's)
    kkt = fake / "symbolic" / "kkt.py"
    kkt.write_text(kkt.read_text() + "\n# a change of the KKT derivation\n")
    assert cache.toolchain_hash.__wrapped__() != before
