"""The command line: --help everywhere, inspect, compile, errors with file and line."""

import subprocess
import sys
import textwrap

import pytest

from implicit_compiler.cli import main
from implicit_compiler.codegen.export import standalone_source

APPENDIX = textwrap.dedent('''
    import sympy as sp
    import implicit_compiler as ic

    x = sp.Symbol("x")
    y1, y2 = sp.symbols("y1 y2")
    system = ic.ResidualSystem(
        residuals=[x**2 + y1**2 + y2**2 - 4, x * y1 - 1], unknowns=[y1, y2], params=[x], name="appendix"
    )


    def make():
        return system


    not_a_system = 3
''')


@pytest.fixture
def user_file(tmp_path):
    p = tmp_path / "model.py"
    p.write_text(APPENDIX)
    return p


@pytest.mark.parametrize("cmd", [[], ["inspect"], ["compile"], ["cache"], ["demo"]])
def test_help_for_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: implicit-compiler" in capsys.readouterr().out


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "implicit_compiler", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "inspect FILE.py:NAME" in proc.stdout


def test_inspect_prints_the_report(user_file, capsys):
    assert main(["inspect", f"{user_file}:system"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Report: appendix") and "dy/dθ = " in out
    assert "[implicit_compiler] deriving Jacobians" in err
    assert main(["inspect", f"{user_file}:make", "--ascii", "-q"]) == 0  # a function returning a system
    out, err = capsys.readouterr()
    assert out.isascii() and "dF/dtheta" in out and err == ""
    assert main(["inspect", str(user_file), "--format", "latex", "-q"]) == 0  # the only system in the file
    assert r"\frac{\partial F}{\partial y}" in capsys.readouterr().out


def test_inspect_writes_files(user_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    html, png = tmp_path / "r.html", tmp_path / "r.png"
    assert main(["inspect", f"{user_file}:system", "--format", "html", "-o", str(html), "--png", str(png)]) == 0
    assert html.read_text().startswith('<div class="implicit-compiler-report">')
    assert png.read_bytes()[:4] == b"\x89PNG"


def _error(capsys, argv, code=2):
    assert main(argv) == code
    out, err = capsys.readouterr()
    return err


def test_errors_name_the_file_and_line(tmp_path, user_file, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("import sympy as sp\nimport implicit_compiler as ic\nx, y, z = sp.symbols('x y z')\n"
                   "system = ic.ResidualSystem([x*y + z - 1], unknowns=[y], params=[x])\n")
    err = _error(capsys, ["inspect", f"{bad}:system"])
    assert f"{bad}:4: error while running the file: SystemDefinitionError: residual 0" in err
    assert "uses symbol(s) z" in err and "system = ic.ResidualSystem(" in err and "Traceback" not in err

    syn = tmp_path / "syn.py"
    syn.write_text("a = 1\nb = (\n")
    assert f"{syn}:2: syntax error" in _error(capsys, ["inspect", str(syn)])

    fn = tmp_path / "fn.py"
    fn.write_text("def build():\n    return 1 / 0\n")
    assert f"{fn}:2: error while calling build(): ZeroDivisionError" in _error(capsys, ["inspect", f"{fn}:build"])

    assert "no such file" in _error(capsys, ["inspect", str(tmp_path / "missing.py")])
    assert "defines no 'nope' (systems defined there: system)" in _error(capsys, ["inspect", f"{user_file}:nope"])
    assert "not_a_system is a int" in _error(capsys, ["inspect", f"{user_file}:not_a_system"])
    two = tmp_path / "two.py"
    two.write_text(APPENDIX + "\nother = system\n")
    assert "say which system to use with FILE.py:NAME (systems defined: other, system)" in _error(
        capsys, ["inspect", str(two)])


def test_traceback_flag_reraises(tmp_path):
    fn = tmp_path / "fn.py"
    fn.write_text("def build():\n    return 1 / 0\n")
    with pytest.raises(Exception, match="fn.py:2"):
        main(["--traceback", "inspect", f"{fn}:build"])


def test_compile_writes_the_standalone_module(user_file, tmp_path, appendix_layer, capsys):
    out = tmp_path / "appendix_standalone.py"
    assert main(["compile", f"{user_file}:system", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "generating code" in err or "deriving" in err or "ready in" in err
    assert f"writing standalone module {out}" in err
    # Same system, same kernels: byte-identical to the Python API's export of the session layer.
    assert out.read_text() == standalone_source(appendix_layer.source, options=appendix_layer.options,
                                                name="appendix")
    assert "bad solver option" in _error(capsys, ["compile", f"{user_file}:system", "-o", str(out), "--set",
                                                  "tolerance=1"])
    assert "KEY=VALUE" in _error(capsys, ["compile", f"{user_file}:system", "-o", str(out), "--set", "tol"])
    assert "must be a .py file" in _error(capsys, ["compile", f"{user_file}:system", "-o", str(tmp_path / "x.txt")])


def test_compile_bakes_solver_options(user_file, tmp_path, capsys):
    out = tmp_path / "opts.py"
    assert main(["compile", f"{user_file}:system", "-o", str(out), "-q", "--set", "tol=1e-12",
                 "--set", "on_failure=nan"]) == 0
    text = out.read_text()
    assert "'tol': 1e-12" in text and "'on_failure': 'nan'" in text
    assert capsys.readouterr().err == ""
