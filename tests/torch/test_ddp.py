"""Data-parallel training: DistributedDataParallel (gloo, 2 processes on localhost) gives the
single-process gradients of a model containing an implicit layer."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.torch import ddp_worker

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


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
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # Fresh interpreters (not fork): each rank imports numba and loads the kernels from the cache.
    procs = [subprocess.Popen([sys.executable, "-m", "tests.torch.ddp_worker", str(r), "2", port, str(out)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    ddp = torch.load(out)
    ref = _single_process_grads()
    # Each rank averages its half-batch loss and DDP averages over ranks: the full-batch mean.
    torch.testing.assert_close(ddp, ref, rtol=1e-12, atol=1e-14)
