"""Worker of tests/torch/test_ddp.py: a model with an implicit layer trained under DDP (gloo).

Run as ``python -m tests.torch.ddp_worker RANK WORLD STORE_FILE OUT``. The ranks meet through a
``FileStore`` (no TCP store server whose thread could outlive a peer), and tear down in a fixed
order: the model and optimizer are released, all ranks pass a barrier, then the process group is
destroyed. ``faulthandler`` prints every thread's Python stack if the process aborts.
"""

import faulthandler
import gc
import sys

import numpy as np
import sympy as sp
import torch
import torch.distributed as dist

import implicit_compiler as ic


def build_model():
    """A linear map to the Kepler layer's mean anomaly and a learned eccentricity."""
    E, M, e = sp.symbols("E M e")
    layer = ic.compile(ic.ResidualSystem([E - e * sp.sin(E) - M], unknowns={"E": E}, params={"M": M, "e": e}))
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(3, 1).double()
    model.logit = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    model.kepler = layer
    return model


def forward(model, X):
    M = torch.nn.functional.softplus(model.lin(X)).squeeze(-1) + 0.1
    return model.kepler(M, torch.sigmoid(model.logit), y0={"E": M.detach()})


class Wrapped(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, X):
        return forward(self.model, X)


def data():
    rng = np.random.default_rng(1)
    X = torch.tensor(rng.standard_normal((16, 3)))
    target = torch.tensor(rng.uniform(0.2, 2.5, 16))
    return X, target


def main(rank: int, world: int, store_file: str, out: str, steps: int = 3):
    faulthandler.enable()
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(Wrapped(build_model()))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        X, target = data()
        per = X.shape[0] // world
        Xr, tr = X[rank * per:(rank + 1) * per], target[rank * per:(rank + 1) * per]
        grads = []
        for _ in range(steps):
            opt.zero_grad()
            loss = ((ddp(Xr) - tr) ** 2).mean()
            loss.backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in ddp.parameters()]).clone())
            opt.step()
        if rank == 0:
            torch.save(torch.stack(grads), out)
        del ddp, opt
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    print(f"rank {rank}: done", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
