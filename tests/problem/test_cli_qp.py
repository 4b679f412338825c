"""The command line on a QP: inspect prints the KKT system; compile writes a standalone module."""

import textwrap

from implicit_compiler.cli import main
from tests.helpers import run_without_sympy

QP = textwrap.dedent('''
    import sympy as sp
    import implicit_compiler as ic

    y = sp.Matrix(sp.symbols("y0:2"))
    q = sp.Matrix(sp.symbols("q0:2"))
    problem = ic.Problem((y.T * y)[0] / 2 + (q.T * y)[0], variables={"y": y}, params={"q": q},
                         inequalities=[y[0] + y[1] <= 1], name="tiny_qp")
''')


def test_inspect_and_compile_a_qp(tmp_path, capsys):
    src = tmp_path / "qp.py"
    src.write_text(QP)
    assert main(["inspect", f"{src}:problem", "--ascii", "-q"]) == 0
    out = capsys.readouterr().out
    assert "Lagrangian" in out and "nu0" in out
    target = tmp_path / "qp_layer.py"
    assert main(["compile", f"{src}:problem", "-o", str(target), "-q"]) == 0
    out = run_without_sympy(target, """
        import torch
        q = torch.tensor([[-2.0, -2.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
        y = mod.layer(q)
        y.sum().backward()
        print(repr([y.tolist(), q.grad.tolist()]))
    """)
    y, g = eval(out)
    # q = (-2, -2): the constraint y0 + y1 <= 1 is active, y = (0.5, 0.5); q = (1, 1): y = -q
    assert max(abs(a - b) for a, b in zip(y[0] + y[1], [0.5, 0.5, -1.0, -1.0])) < 1e-9
    # active: y = (1 - q0 + q1, 1 + q0 - q1)/2 + ... -> d(y0 + y1)/dq = 0; inactive: -1 each
    assert max(abs(a - b) for a, b in zip(g[0] + g[1], [0.0, 0.0, -1.0, -1.0])) < 1e-9
