"""Shared test helpers."""

import subprocess
import sys
import textwrap

# Prelude of a child interpreter in which SymPy and implicit_compiler cannot be imported.
BLOCK_SYMPY = textwrap.dedent("""
    import sys

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("sympy", "implicit_compiler"):
                raise ImportError("blocked in this test: " + name)
            return None

    sys.meta_path.insert(0, _Block())
""")


def run_without_sympy(module_path, body: str, timeout: float = 600) -> str:
    """Import the standalone module at ``module_path`` as ``mod`` in a fresh interpreter
    without SymPy or implicit_compiler, run ``body`` there, and return its last output line."""
    load = textwrap.dedent(f"""
        import importlib.util
        _spec = importlib.util.spec_from_file_location("standalone_layer", {str(module_path)!r})
        mod = importlib.util.module_from_spec(_spec)
        sys.modules["standalone_layer"] = mod
        _spec.loader.exec_module(mod)
    """)
    proc = subprocess.run([sys.executable, "-c", BLOCK_SYMPY + load + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]
