"""The README's test command is the one CI runs, and it installs every test dependency."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(pip install[^\n]*)\n```", text)


def test_readme_has_the_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    demo, tests = commands
    assert demo.endswith("python -m implicit_compiler demo")
    assert "python -m pytest -q" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    _, tests = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, "keep .ci/run's test line identical to the README's test command"


def test_reference_solvers_are_installed_by_the_test_command():
    # The QP tests compare with qpth and cvxpylayers without skipping: the README command
    # a newcomer copies must install both.
    _, tests = _readme_commands()
    assert "qpth" in tests
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "cvxpylayers" in pyproject
