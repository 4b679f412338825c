"""A process forked after a large (threaded) batch can still call the layer.

GNU OpenMP terminates a forked child that starts threads after its parent did; such a
child must run its batches serially instead, with the same results."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import numpy as np
    import torch
    import implicit_compiler as ic
    from tests.conftest import appendix_system

    layer = ic.compile(appendix_system())
    xs = torch.linspace(0.8, 1.2, 20000, dtype=torch.float64).reshape(-1, 1)
    y_parent = layer(xs, y0=torch.tensor([1.0, 1.5]))  # 20,000 samples: the threaded driver
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            y_child = layer(xs, y0=torch.tensor([1.0, 1.5]))
            # compared in NumPy: torch's own OpenMP ops may hang in a forked child
            code = 0 if np.array_equal(y_child.numpy(), y_parent.numpy()) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print("child", os.waitstatus_to_exitcode(status))
""")


def test_forked_child_after_threaded_batch_runs_serially():
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT))], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "child 0", proc.stdout + proc.stderr
