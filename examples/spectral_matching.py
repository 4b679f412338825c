"""Spectral graph matching with an eigensolver forward and a KKT backward (the paper's section 4.2.1).

Two small point sets (4 points each) are matched by the relaxed quadratic assignment problem

    y* = argmax_y  yᵀ M y   s.t.  yᵀ y = 1,          y ∈ R^16, y[4 i + a] = "source i matches target a",

whose solution is the leading eigenvector of M. The layer is an ``ic.Problem`` compiled with
``forward=`` a NumPy eigensolver (M is symmetric, so the layer's parameters are its upper triangle); its
backward pass is the implicit function theorem on the KKT conditions ``-2 M y + 2 λ y = 0, yᵀy = 1``
(no power iteration is unrolled).

The affinity matrix M is built from generated point features: a unary term
``exp(-Σ_k w_k (f_ik - g_ak)²)`` on the diagonal and a geometric pairwise term
``β exp(-(d_ij - d_ab)² / σ²)`` off it. Only two of the six feature channels carry the identity of a
point; the other four are heavily corrupted in the target set, so with equal weights the matching is
poor. Training the channel weights ``w`` and ``β`` (so that y* approaches the ground-truth assignment)
learns to ignore the corrupted channels.

Run: ``python examples/spectral_matching.py`` (``--quick`` for a short run). Prints the loss and the
matching accuracy (fraction of source points matched to the right target, by row-wise argmax of y*)
before and after training, on training and held-out pairs; saves ``spectral_matching.png`` when
matplotlib is installed.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import sympy as sp
import torch

import implicit_compiler as ic

K = 4  # points per set
N = K * K  # assignment vector length
D_INFO, D_NOISE = 2, 4  # informative and corrupted feature channels


IU = np.triu_indices(N)  # M is symmetric: the layer takes its upper triangle (136 numbers, not 256)


def leading_eigenvector(m: np.ndarray) -> np.ndarray:
    """Custom forward: the leading eigenvector of each M (from its upper triangle), signed to have a positive sum."""
    M = np.zeros((len(m), N, N))
    M[:, IU[0], IU[1]] = m
    M[:, IU[1], IU[0]] = m
    _, V = np.linalg.eigh(M)
    v = V[:, :, -1]
    return v * np.where(v.sum(axis=1) < 0, -1.0, 1.0)[:, None]


def build_layer() -> ic.ImplicitLayer:
    y = sp.Matrix(sp.symbols(f"y0:{N}"))
    m = sp.symbols(f"m0:{len(IU[0])}")
    M = sp.zeros(N, N)
    for k, (i, j) in enumerate(zip(*IU)):
        M[i, j] = M[j, i] = m[k]
    problem = ic.Problem((y.T * M * y)[0], variables={"y": y}, params={"m": list(m)},
                         equalities=[(y.T * y)[0] - 1], maximize=True, name="spectral_matching_16")
    return ic.compile(problem, forward=leading_eigenvector)


def make_pairs(count: int, rng: np.random.Generator):
    """Source/target point sets with features; target a is source perm[a]."""
    P = rng.uniform(0, 1, (count, K, 2))
    F = np.concatenate([rng.normal(0, 1, (count, K, D_INFO)), rng.normal(0, 0.3, (count, K, D_NOISE))], axis=2)
    perm = np.stack([rng.permutation(K) for _ in range(count)])
    idx = np.arange(count)[:, None]
    Pt = P[idx, perm] + rng.normal(0, 0.08, (count, K, 2))
    Ft = F[idx, perm].copy()
    Ft[:, :, :D_INFO] += rng.normal(0, 0.15, (count, K, D_INFO))
    Ft[:, :, D_INFO:] += rng.normal(0, 1.5, (count, K, D_NOISE))  # corrupted channels
    # ground truth: source i matches target a with perm[a] == i
    truth = np.argsort(perm, axis=1)  # truth[i] = a
    Y = np.zeros((count, K, K))
    Y[idx, np.arange(K)[None, :], truth] = 1.0 / np.sqrt(K)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    return t(P), t(F), t(Pt), t(Ft), truth, t(Y.reshape(count, N))


def affinity(P, F, Pt, Ft, log_w, log_beta, sigma=0.2):
    """M[(i,a),(j,b)]: unary feature similarity on the diagonal, pairwise distance consistency off it."""
    B = P.shape[0]
    w = torch.exp(log_w)
    unary = torch.exp(-(((F[:, :, None, :] - Ft[:, None, :, :]) ** 2) * w).sum(-1))  # (B, i, a)
    d_src = torch.cdist(P, P)  # (B, i, j)
    d_tgt = torch.cdist(Pt, Pt)  # (B, a, b)
    pair = torch.exp(-((d_src[:, :, None, :, None] - d_tgt[:, None, :, None, :]) / sigma) ** 2)  # (B,i,a,j,b)
    eye = torch.eye(K, dtype=P.dtype)
    conflict = eye[:, None, :, None] + eye[None, :, None, :]  # same source or same target: no pair term
    pair = pair * (conflict == 0)
    M = torch.exp(log_beta) * pair.reshape(B, N, N) + torch.diag_embed(unary.reshape(B, N))
    return M


def accuracy(y: torch.Tensor, truth: np.ndarray) -> float:
    pred = y.detach().reshape(-1, K, K).argmax(dim=2).numpy()
    return float((pred == truth).mean())


def main(quick: bool = False, out: str | None = None) -> dict:
    t0 = time.perf_counter()
    layer = build_layer()
    rng = np.random.default_rng(0)
    n_train, n_test, steps = (24, 48, 25) if quick else (64, 200, 80)
    train = make_pairs(n_train, rng)
    test = make_pairs(n_test, rng)
    log_w = torch.zeros(D_INFO + D_NOISE, dtype=torch.float64, requires_grad=True)
    log_beta = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_w, log_beta], lr=0.1)

    def evaluate(data):
        P, F, Pt, Ft, truth, Y = data
        M = affinity(P, F, Pt, Ft, log_w, log_beta)
        y = layer(M[:, IU[0], IU[1]])
        return ((y - Y) ** 2).sum(dim=1).mean(), accuracy(y, truth)

    with torch.no_grad():
        loss0, train0 = evaluate(train)
        _, test0 = evaluate(test)
    print(f"layer ready in {time.perf_counter() - t0:.1f} s")
    print(f"before training: loss {loss0.item():.4f}  train accuracy {train0:.3f}  test accuracy {test0:.3f}")
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss, acc = evaluate(train)
        loss.backward()  # eigenvector gradient from the KKT system
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}  train accuracy {acc:.3f}")
    with torch.no_grad():
        loss1, train1 = evaluate(train)
        _, test1 = evaluate(test)
    w = torch.exp(log_w).detach().numpy()
    print(f"after training:  loss {loss1.item():.4f}  train accuracy {train1:.3f}  test accuracy {test1:.3f}")
    print("channel weights:", np.array2string(w, precision=3), "(first", D_INFO, "informative)")
    out = "." if out is None and not quick else out
    if out is not None:
        _plot(losses, w, f"{out}/spectral_matching.png")
    return {"loss_before": loss0.item(), "loss_after": loss1.item(), "train_accuracy_before": train0,
            "train_accuracy_after": train1, "test_accuracy_before": test0, "test_accuracy_after": test1,
            "informative_weight": float(w[:D_INFO].mean()), "noise_weight": float(w[D_INFO:].mean())}


def _plot(losses, w, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(losses)
    a1.set_xlabel("step")
    a1.set_ylabel("‖y* - y_true‖²")
    a2.bar(range(len(w)), w, color=["tab:green"] * D_INFO + ["tab:red"] * D_NOISE)
    a2.set_xlabel("feature channel (green: informative, red: corrupted)")
    a2.set_ylabel("learned weight")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved {path}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
