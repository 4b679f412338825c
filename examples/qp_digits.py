"""An OptNet-style QP layer in a digit classifier, trained against OptNet's own layer (the paper's section 4.1).

The network is ``image (64) -> Linear -> ReLU -> Linear -> q (10) -> QP layer -> y* (10) -> log-softmax``
where the QP layer solves

    y* = argmin_y  1/2 yᵀ Q y + qᵀ y   s.t.  G y <= h          (10 variables, 10 inequalities)

with ``Q = L Lᵀ + eps I``, ``G`` and ``h = G z0 + s0`` (``s0 > 0``, so ``z0`` is always feasible) learned and
shared by the batch, and ``q`` produced per sample by the linear layers (OptNet's MNIST parametrisation).

The same network is trained twice, from the same initial weights, on the same mini-batches in the same order:
once with this project's QP layer (the generated primal-dual interior point forward, the implicit function
theorem on the KKT system backward) and once with qpth's ``QPFunction`` (OptNet's batched interior point and
its KKT backward), so the two learning curves can be laid over each other as in the paper's fig. 3 — the
forward and backward formulae are the same, so the curves should agree up to the solvers' accuracy — and the
time per epoch of both compared (the paper's fig. 4 comparison, where the paper's layer was the slower one).
qpth is a test/benchmark dependency (``pip install --no-deps qpth==0.0.18``); without it only this project's
layer is trained, and the script says so.

Before training, the loss gradients through the two layers at the same weights and batch are compared (they
agree to about 1e-7, relative). The two runs then drift apart slowly, for a reason worth knowing: at a strictly
inactive constraint this layer's multiplier, and so the gradient of that constraint's row of ``G`` and of its
slack ``s0``, is exactly zero, where qpth's interior point leaves multipliers of about 1e-9 and so gradients of
about 1e-9; Adam divides by the running RMS of each gradient component, which turns those into steps of a
sizeable fraction of the learning rate. The curves stay close (the script prints the largest difference) but are
not identical.

Data: scikit-learn's 8x8 digits (1,797 images, 360 held out for testing) instead of the paper's 28x28 MNIST,
which cannot be downloaded here; the input layer has 64 inputs instead of 784.

Run: ``python examples/qp_digits.py`` (10 epochs per layer; ``--quick`` for a run of a few seconds on a
subset). Prints loss, accuracies and the epoch time of both layers per epoch and the final comparison;
saves ``qp_digits.png`` (learning curves of both, and time per epoch) when matplotlib is installed.
Needs scikit-learn for the digits data, which ships with it.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings

import numpy as np
import sympy as sp
import torch

import implicit_compiler as ic

N_VARS = 10  # QP variables = classes
N_INEQ = 10  # inequality constraints G y <= h


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


class OursQP:
    """This project's compiled layer; shared Q, G, h broadcast over the batch inside the layer."""

    name = "implicit_compiler"

    def __init__(self, layer: ic.ImplicitLayer):
        self.layer = layer
        self.weakly_active_calls = 0

    def __call__(self, Q, q, G, h):
        with warnings.catch_warnings(record=True) as caught:
            # A weakly active constraint (g = 0 and multiplier = 0) has no unique derivative; the layer
            # warns and uses a one-sided one. Count those calls instead of printing each warning.
            warnings.simplefilter("always", RuntimeWarning)
            y = self.layer(Q, q, G, h)
        self.weakly_active_calls += sum("weakly active" in str(w.message) for w in caught)
        return y


class QpthQP:
    """qpth's QPFunction with OptNet's defaults (eps 1e-12, at most 20 iterations).

    The shared Q, G, h are expanded to the batch explicitly, as OptNet's own models do: qpth returns the
    batch *mean* of the gradient of a parameter passed without a batch dimension, where autograd (and this
    project's layer) gives the sum; through ``expand`` the two trainings see the same gradients.
    """

    name = "qpth"

    def __init__(self, QPFunction):
        self.fn = QPFunction(verbose=-1)  # -1: no "inaccurate solution" banners mid-training

    def __call__(self, Q, q, G, h):
        B = q.shape[0]
        e = torch.empty(0, dtype=q.dtype)
        return self.fn(Q.expand(B, *Q.shape), q, G.expand(B, *G.shape), h.expand(B, *h.shape), e, e)


class QPNet(torch.nn.Module):
    def __init__(self, hidden: int = 32, eps: float = 0.1):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, hidden)
        self.fc2 = torch.nn.Linear(hidden, N_VARS)
        self.eps = eps
        self.L = torch.nn.Parameter(0.3 * torch.eye(N_VARS) + 0.05 * torch.randn(N_VARS, N_VARS))
        self.G = torch.nn.Parameter(torch.randn(N_INEQ, N_VARS) / np.sqrt(N_VARS))
        self.z0 = torch.nn.Parameter(torch.zeros(N_VARS))
        self.s0_raw = torch.nn.Parameter(torch.zeros(N_INEQ))
        self.qp = None  # OursQP or QpthQP, set before use (not a module: the network's weights are the same)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.fc2(torch.relu(self.fc1(x)))
        Q = self.L @ self.L.T + self.eps * torch.eye(N_VARS, dtype=x.dtype)
        h = self.G @ self.z0 + torch.nn.functional.softplus(self.s0_raw) + 1e-3
        return torch.log_softmax(self.qp(Q, q, self.G, h), dim=1)


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


def gradient_difference(net0: QPNet, layers: list, X: torch.Tensor, t: torch.Tensor) -> float:
    """Largest relative difference, over the network's parameters, of the loss gradient at the initial weights
    on one batch computed through each layer (``max |g_a - g_b| / max |g_a|`` per parameter)."""
    grads = []
    for qp in layers:
        net = copy.deepcopy(net0)
        net.qp = qp
        torch.nn.functional.nll_loss(net(X), t).backward()
        grads.append({k: p.grad for k, p in net.named_parameters()})
    a, b = grads
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)


def train(net: QPNet, qp, data, *, epochs: int, batch: int, lr: float, seed: int = 1) -> dict:
    """Adam on the NLL; the mini-batch order comes from its own generator, so two runs see the same batches.

    The epoch time is the wall time of the epoch's training steps (forward, backward and the optimizer
    step); the accuracies after each epoch are evaluated outside it.
    """
    Xtr, ttr, Xte, tte = data
    net.qp = qp
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    hist = {"loss": [], "step_loss": [], "train_acc": [], "test_acc": [], "epoch_seconds": []}
    for epoch in range(epochs):
        perm = torch.randperm(len(Xtr), generator=order)
        step_loss = []
        t0 = time.perf_counter()
        for i in range(0, len(Xtr), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            loss = torch.nn.functional.nll_loss(net(Xtr[idx]), ttr[idx])
            loss.backward()  # through the KKT conditions of the QP
            opt.step()
            step_loss.append(loss.item())
        hist["epoch_seconds"].append(time.perf_counter() - t0)
        hist["step_loss"] += step_loss
        hist["loss"].append(float(np.mean(step_loss)))
        hist["train_acc"].append(accuracy(net, Xtr, ttr))
        hist["test_acc"].append(accuracy(net, Xte, tte))
        print(f"  {qp.name:<17} epoch {epoch + 1:2d}  loss {hist['loss'][-1]:.4f}  train acc "
              f"{hist['train_acc'][-1]:.3f}  test acc {hist['test_acc'][-1]:.3f}  "
              f"{hist['epoch_seconds'][-1]:.2f} s")
    return hist


def main(quick: bool = False, out: str | None = None) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ours = OursQP(build_qp_layer())
    print(f"compiled the QP layer ({N_VARS} variables, {N_INEQ} inequalities) in {time.perf_counter() - t0:.1f} s")
    try:
        from qpth.qp import QPFunction
    except ImportError:
        QPFunction = None
        print("qpth is not installed (pip install --no-deps qpth==0.0.18): training this project's layer only, "
              "without the OptNet comparison")
    data = load_data(quick)
    net0 = QPNet().double()  # the initial weights of both runs
    epochs, batch, lr = (3, 64, 0.02) if quick else (10, 64, 0.01)
    layers = [ours] + ([QpthQP(QPFunction)] if QPFunction is not None else [])
    if len(layers) == 2:
        grad_diff = gradient_difference(net0, layers, data[0][:batch], data[1][:batch])
        print(f"same weights, same batch: the two layers' loss gradients differ by {grad_diff:.1e} (relative)")
    runs = {}
    for qp in layers:
        runs[qp.name] = train(copy.deepcopy(net0), qp, data, epochs=epochs, batch=batch, lr=lr)
    chance = 1.0 / N_VARS
    o = runs["implicit_compiler"]
    result = {"first_loss": o["loss"][0], "last_loss": o["loss"][-1], "train_accuracy": o["train_acc"][-1],
              "test_accuracy": o["test_acc"][-1], "chance": chance, "runs": runs,
              "weakly_active_calls": ours.weakly_active_calls}
    print(f"final, implicit_compiler: train accuracy {o['train_acc'][-1]:.3f}, test accuracy "
          f"{o['test_acc'][-1]:.3f} (chance {chance:.2f}), {np.mean(o['epoch_seconds']):.2f} s per epoch; "
          f"{ours.weakly_active_calls} call(s) had weakly active constraints")
    if "qpth" in runs:
        r = runs["qpth"]
        result["initial_gradient_difference"] = grad_diff
        result["qpth_train_accuracy"], result["qpth_test_accuracy"] = r["train_acc"][-1], r["test_acc"][-1]
        result["max_step_loss_difference"] = float(np.max(np.abs(np.subtract(o["step_loss"], r["step_loss"]))))
        result["max_epoch_loss_difference"] = float(np.max(np.abs(np.subtract(o["loss"], r["loss"]))))
        # the first epoch is the one that pays for first calls (qpth's and torch's own warm-ups); the median
        # of the others is the least sensitive to other processes on the machine
        steady = slice(1, None) if epochs > 1 else slice(None)
        result["epoch_time_ratio"] = float(np.median(r["epoch_seconds"][steady])
                                           / np.median(o["epoch_seconds"][steady]))
        print(f"final, qpth:              train accuracy {r['train_acc'][-1]:.3f}, test accuracy "
              f"{r['test_acc'][-1]:.3f}, {np.mean(r['epoch_seconds']):.2f} s per epoch")
        print(f"largest difference of the two runs' losses: {result['max_step_loss_difference']:.1e} per step, "
              f"{result['max_epoch_loss_difference']:.1e} per epoch mean; qpth / ours epoch time "
              f"{result['epoch_time_ratio']:.1f}x (median of epochs 2 on)")
    out = "." if out is None and not quick else out
    if out is not None:
        _plot(runs, f"{out}/qp_digits.png")
    return result


def _plot(runs: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.8))
    style = {"implicit_compiler": ("C0", "-", "o"), "qpth": ("C3", "--", "x")}
    for name, hist in runs.items():
        color, line, mark = style[name]
        ep = np.arange(1, len(hist["loss"]) + 1)
        a1.plot(ep, hist["loss"], color=color, ls=line, marker=mark, label=name)
        a2.plot(ep, hist["train_acc"], color=color, ls=line, marker=mark, label=f"{name}, train")
        a2.plot(ep, hist["test_acc"], color=color, ls=":", marker=mark, label=f"{name}, test")
        a3.plot(ep, hist["epoch_seconds"], color=color, ls=line, marker=mark, label=name)
    a1.set(xlabel="epoch", ylabel="training loss (NLL)", title="learning curves")
    a2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    a3.set(xlabel="epoch", ylabel="seconds", title="time per epoch (training steps)")
    a3.set_ylim(bottom=0)
    for a in (a1, a2, a3):
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved {path}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
