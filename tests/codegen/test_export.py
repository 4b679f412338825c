"""Standalone export: one file, numpy + numba + torch only, same outputs and gradients."""

import ast
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from implicit_compiler.codegen.export import ExportError, export_layer, standalone_source
from tests.helpers import BLOCK_SYMPY

XS = [[1.0], [0.9], [1.2]]
Y0 = [1.0, 1.5]

# Run in a fresh interpreter in which SymPy and implicit_compiler cannot be imported.
CHILD = BLOCK_SYMPY + textwrap.dedent("""
    import importlib, json
    sys.path.insert(0, sys.argv[1])
    import torch
    m = importlib.import_module(sys.argv[2])
    xs = torch.tensor(json.loads(sys.argv[3]), dtype=torch.float64, requires_grad=True)
    y, info = m.layer(xs, y0=torch.tensor(json.loads(sys.argv[4])), return_info=True)
    (y[:, 0] + 2.0 * y[:, 1]).sum().backward()
    bad = m.make_layer(on_failure="nan")(torch.tensor([[5.0]], dtype=torch.float64), y0=torch.tensor([1.0, 1.5]))
    print(json.dumps({"y": y.tolist(), "grad": xs.grad.tolist(), "status": info.status.tolist(),
                      "defaults": m.DEFAULT_OPTIONS, "nan": bool(torch.isnan(bad).all()),
                      "path": str(m.layer.path),
                      "leaked": sorted(k for k in sys.modules if k.startswith(("sympy", "implicit_compiler")))}))
""")


def _imports(source: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_source_is_deterministic_and_self_contained(appendix_layer):
    a = standalone_source(appendix_layer.source, options=appendix_layer.options, name="appendix")
    b = standalone_source(appendix_layer.source, options=appendix_layer.options, name="appendix")
    assert a == b
    mods = _imports(a)
    assert {"numpy", "numba", "torch"} <= mods
    assert not mods & {"sympy", "implicit_compiler"}
    assert not any(ln.lstrip().startswith("from .") for ln in a.splitlines())
    compile(a, "<standalone>", "exec")


@pytest.mark.slow
def test_round_trip_in_a_fresh_process_without_sympy(appendix_layer, tmp_path):
    path = export_layer(appendix_layer.configure(tol=1e-11), tmp_path / "appendix_standalone.py")
    appendix_layer.configure(tol=1e-10)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), path.stem, json.dumps(XS), json.dumps(Y0)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["leaked"] == []
    assert got["defaults"]["tol"] == 1e-11 and got["nan"] and got["status"] == [0, 0, 0]
    assert got["path"] == str(path)

    xs = torch.tensor(XS, dtype=torch.float64, requires_grad=True)
    y = appendix_layer(xs, y0=torch.tensor(Y0))
    (y[:, 0] + 2.0 * y[:, 1]).sum().backward()
    np.testing.assert_allclose(got["y"], y.detach().numpy(), rtol=1e-13, atol=0)
    np.testing.assert_allclose(got["grad"], xs.grad.numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(got["y"][0], [1.0, np.sqrt(2.0)], rtol=1e-14)


def test_bad_sources_are_refused(appendix_layer):
    with pytest.raises(ExportError, match="imports sympy, which a standalone module cannot use"):
        standalone_source(appendix_layer.source + "\nimport sympy\n")
    with pytest.raises(ExportError, match="'lu_factor' is defined in both implicit_compiler/runtime/linalg.py"):
        standalone_source(appendix_layer.source + "\ndef lu_factor():\n    pass\n")
    with pytest.raises(ExportError, match="torch.nn.Module is not a class of the implicit_compiler package"):
        standalone_source(appendix_layer.source, layer_class="torch.nn.Module")
    with pytest.raises(ExportError, match="must end in .py"):
        export_layer(appendix_layer, "layer.txt")


def test_export_leaves_out_the_cache_checksum_and_respects_the_umask(appendix_layer, tmp_path):
    import stat

    from implicit_compiler.codegen.cache import CHECKSUM_PREFIX

    assert CHECKSUM_PREFIX in appendix_layer.source  # the cached module carries it ...
    text = standalone_source(appendix_layer.source, options=appendix_layer.options, name="appendix")
    assert CHECKSUM_PREFIX not in text  # ... which would not describe the exported file
    old = os.umask(0o022)
    try:
        path = export_layer(appendix_layer, tmp_path / "exported.py")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
