"""An OptNet-style QP layer in a digit classifier (the paper's section 4.1, on scikit-learn's 8x8 digits).

The network is ``image (64) -> Linear -> ReLU -> Linear -> q (10) -> QP layer -> y* (10) -> log-softmax``
where the QP layer solves

    y* = argmin_y  1/2 yᵀ Q y + qᵀ y   s.t.  G y <= h

with ``Q = L Lᵀ + eps I``, ``G`` and ``h = G z0 + s0`` (``s0 > 0``, so ``z0`` is always feasible) learned and
shared by the batch, and ``q`` produced per sample by the linear layers. The forward pass is the generated
primal-dual interior point; the backward pass is the implicit function theorem on the KKT system.

Run: ``python examples/qp_digits.py`` (about 10 epochs; ``--quick`` for a few-second run on a subset).
Prints the loss and accuracy per epoch and the final train/test accuracy; saves ``qp_digits.png``
(learning curves) when matplotlib is installed. Needs scikit-learn (``pip install scikit-learn``) for the
digits data, which ships with it.
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import sympy as sp
import torch

import implicit_compiler as ic

N_VARS = 10  # QP variables = classes
N_INEQ = 4  # inequality constraints G y <= h


def build_qp_layer() -> ic.ImplicitLayer:
    """The QP as a symbolic problem: Q, q, G, h are all parameters of the compiled layer."""
    y = sp.Matrix(sp.symbols(f"y0:{N_VARS}"))
    Q = sp.Matrix(N_VARS, N_VARS, sp.symbols(f"Q0:{N_VARS * N_VARS}"))
    q = sp.Matrix(sp.symbols(f"q0:{N_VARS}"))
    G = sp.Matrix(N_INEQ, N_VARS, sp.symbols(f"G0:{N_INEQ * N_VARS}"))
    h = sp.Matrix(sp.symbols(f"h0:{N_INEQ}"))
    problem = ic.Problem(
        objective=(y.T * Q * y)[0] / 2 + (q.T * y)[0],
        variables={"y": y},
        params={"Q": Q, "q": q, "G": G, "h": h},
        inequalities=list(G * y - h),
        name="digits_qp",
    )
    return ic.compile(problem, tol=1e-9, max_iter=100)


class QPNet(torch.nn.Module):
    def __init__(self, qp: ic.ImplicitLayer, hidden: int = 32, eps: float = 0.1):
        super().__init__()
        self.qp = qp
        self.fc1 = torch.nn.Linear(64, hidden)
        self.fc2 = torch.nn.Linear(hidden, N_VARS)
        self.eps = eps
        self.L = torch.nn.Parameter(0.3 * torch.eye(N_VARS) + 0.05 * torch.randn(N_VARS, N_VARS))
        self.G = torch.nn.Parameter(torch.randn(N_INEQ, N_VARS) / np.sqrt(N_VARS))
        self.z0 = torch.nn.Parameter(torch.zeros(N_VARS))
        self.s0_raw = torch.nn.Parameter(torch.zeros(N_INEQ))
        self.weakly_active_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.fc2(torch.relu(self.fc1(x)))
        Q = self.L @ self.L.T + self.eps * torch.eye(N_VARS, dtype=x.dtype)
        h = self.G @ self.z0 + torch.nn.functional.softplus(self.s0_raw) + 1e-3
        with warnings.catch_warnings(record=True) as caught:
            # A weakly active constraint (g = 0 and multiplier = 0) has no unique derivative; the layer
            # warns and uses a one-sided one. Count those calls instead of printing each warning.
            warnings.simplefilter("always", RuntimeWarning)
            y = self.qp(Q, q, self.G, h)
        self.weakly_active_calls += sum("weakly active" in str(w.message) for w in caught)
        return torch.log_softmax(y, dim=1)


def load_data(quick: bool, seed: int = 0):
    from sklearn.datasets import load_digits

    X, t = load_digits(return_X_y=True)
    X = X / 16.0
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    X, t = X[order], t[order]
    n_test = 360
    Xtr, ttr, Xte, tte = X[n_test:], t[n_test:], X[:n_test], t[:n_test]
    if quick:
        Xtr, ttr, Xte, tte = Xtr[:384], ttr[:384], Xte[:200], tte[:200]
    as_t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return as_t(Xtr, torch.float64), as_t(ttr, torch.long), as_t(Xte, torch.float64), as_t(tte, torch.long)


def accuracy(net: QPNet, X: torch.Tensor, t: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(X).argmax(dim=1) == t).double().mean().item()


def main(quick: bool = False, out: str | None = None) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    qp = build_qp_layer()
    print(f"compiled the QP layer ({N_VARS} variables, {N_INEQ} inequalities) in {time.perf_counter() - t0:.1f} s")
    Xtr, ttr, Xte, tte = load_data(quick)
    net = QPNet(qp).double()
    opt = torch.optim.Adam(net.parameters(), lr=0.02 if quick else 0.01)
    epochs, batch = (3, 64) if quick else (10, 64)
    losses, train_acc, test_acc = [], [], []
    chance = 1.0 / N_VARS
    for epoch in range(epochs):
        perm = torch.randperm(len(Xtr))
        epoch_loss = []
        for i in range(0, len(Xtr), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            loss = torch.nn.functional.nll_loss(net(Xtr[idx]), ttr[idx])
            loss.backward()  # through the KKT conditions of the QP
            opt.step()
            epoch_loss.append(loss.item())
        losses.append(float(np.mean(epoch_loss)))
        train_acc.append(accuracy(net, Xtr, ttr))
        test_acc.append(accuracy(net, Xte, tte))
        print(f"epoch {epoch + 1:2d}  loss {losses[-1]:.4f}  train acc {train_acc[-1]:.3f}  "
              f"test acc {test_acc[-1]:.3f}")
    print(f"final: train accuracy {train_acc[-1]:.3f}, test accuracy {test_acc[-1]:.3f} (chance {chance:.2f}); "
          f"{net.weakly_active_calls} call(s) had weakly active constraints")
    out = "." if out is None and not quick else out
    if out is not None:
        _plot(losses, train_acc, test_acc, f"{out}/qp_digits.png")
    return {"first_loss": losses[0], "last_loss": losses[-1], "train_accuracy": train_acc[-1],
            "test_accuracy": test_acc[-1], "chance": chance}


def _plot(losses, train_acc, test_acc, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ep = np.arange(1, len(losses) + 1)
    a1.plot(ep, losses, "o-")
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss (NLL)")
    a2.plot(ep, train_acc, "o-", label="train")
    a2.plot(ep, test_acc, "s-", label="test")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved {path}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
