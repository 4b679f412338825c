"""Data-parallel training: DistributedDataParallel (gloo, 2 processes on localhost) gives the
single-process gradients of a model containing an implicit layer."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.torch import ddp_worker

ROOT = Path(__file__).resolve().parents[2]


def _single_process_grads(steps=3):
    model = ddp_worker.build_model()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    X, target = ddp_worker.data()
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((ddp_worker.forward(model, X) - target) ** 2).mean()
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())
        opt.step()
    return torch.stack(grads)


@pytest.mark.slow
def test_ddp_gradients_equal_single_process(tmp_path):
    out = tmp_path / "grads.pt"
    store = tmp_path / "store"  # the ranks' FileStore
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # Fresh interpreters (not fork): each rank imports numba and loads the kernels from the cache.
    # Each rank writes its own log file (a pipe left unread while the other rank is waited for could fill).
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = []
    for r, log in enumerate(logs):
        with open(log, "w") as fh:
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.torch.ddp_worker", str(r), "2", str(store),
                                           str(out)], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    report = "\n".join(f"--- rank {r}: exit code {c}\n{log.read_text()}" for r, (c, log) in
                       enumerate(zip(codes, logs)))
    assert codes == [0, 0], report
    ddp = torch.load(out)
    ref = _single_process_grads()
    # Each rank averages its half-batch loss and DDP averages over ranks: the full-batch mean.
    torch.testing.assert_close(ddp, ref, rtol=1e-12, atol=1e-14)
