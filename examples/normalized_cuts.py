"""A normalised-cuts segmentation layer with learned features (the paper's section 4.3).

A 6x6 image is a 4-neighbour grid graph whose 60 edge weights ``w_ij = exp(-Σ_k a_k (f_ik - f_jk)²)``
come from per-pixel features ``f`` and learned channel weights ``a``. The layer outputs the generalised
eigenvector of the second smallest generalised eigenvalue of ``(L, D)`` (L = D - W the graph Laplacian,
D the degrees), defined implicitly by the residual system

    (L - λ D) v = 0,      vᵀ D v - 1 = 0,         unknowns (v, λ) ∈ R^37, parameters w ∈ R^60.

The forward pass is ``scipy.linalg.eigh(L, D)``: its eigenpair is handed to the compiled layer as the
initial guess, so Newton stops at once and only certifies it (``info.iterations`` is 0). The backward
pass is the implicit function theorem on the residuals above.

The images are generated: a random rectangle (the foreground) on a background, with three feature
channels per pixel: channel 0 is the (noisy) intensity, channels 1 and 2 are strong noise ("texture").
With equal channel weights (plain normalised cuts on handcrafted features) the noise channels dominate;
training ``a`` so that the Fiedler vector aligns with the foreground mask (a sign-invariant cosine loss)
learns to rely on the intensity channel. The segmentation is ``v > 0``; its IoU with the foreground is
taken up to swapping the two labels (an eigenvector's sign is arbitrary).

Run: ``python examples/normalized_cuts.py`` (``--quick`` for a short run). Prints the loss and the mean
IoU on training and held-out images before and after training; saves ``normalized_cuts.png`` (a test
image, its mask and both segmentations) when matplotlib is installed.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import scipy.linalg
import sympy as sp
import torch

import implicit_compiler as ic

H = W = 6
NPIX = H * W
CHANNELS = 3


def grid_edges() -> np.ndarray:
    idx = np.arange(NPIX).reshape(H, W)
    right = np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()], axis=1)
    down = np.stack([idx[:-1, :].ravel(), idx[1:, :].ravel()], axis=1)
    return np.concatenate([right, down])  # (60, 2)


EDGES = grid_edges()


def build_layer() -> ic.ImplicitLayer:
    """(L - λ D) v = 0 and vᵀ D v = 1, with L and D written in terms of the edge weights."""
    v = sp.symbols(f"v0:{NPIX}")
    lam = sp.Symbol("lam")
    w = sp.symbols(f"w0:{len(EDGES)}")
    deg = [sp.Integer(0)] * NPIX
    Lv = [sp.Integer(0)] * NPIX
    for e, (i, j) in enumerate(EDGES):
        deg[i] += w[e]
        deg[j] += w[e]
        Lv[i] += w[e] * (v[i] - v[j])
        Lv[j] += w[e] * (v[j] - v[i])
    residuals = [Lv[i] - lam * deg[i] * v[i] for i in range(NPIX)]
    residuals.append(sum(deg[i] * v[i] ** 2 for i in range(NPIX)) - 1)
    system = ic.ResidualSystem(residuals, unknowns={"v": list(v), "lam": lam}, params={"w": list(w)},
                               name="ncut_grid_6x6")
    # "keep": a sample whose eigenvalue is (numerically) repeated has no implicit gradient; it keeps the
    # eigensolver's vector and gets a zero gradient instead of failing the whole batch.
    return ic.compile(system, on_failure="keep")


def eigh_forward(w: np.ndarray) -> np.ndarray:
    """The forward pass: second smallest generalised eigenpair of (L, D) for each sample, as a flat y0."""
    y0 = np.empty((len(w), NPIX + 1))
    for b, wb in enumerate(w):
        Wm = np.zeros((NPIX, NPIX))
        Wm[EDGES[:, 0], EDGES[:, 1]] = wb
        Wm[EDGES[:, 1], EDGES[:, 0]] = wb
        D = np.diag(Wm.sum(axis=1))
        vals, vecs = scipy.linalg.eigh(D - Wm, D, subset_by_index=[1, 1])  # vᵀ D v = 1
        y0[b, :NPIX] = vecs[:, 0]
        y0[b, NPIX] = vals[0]
    return y0


def make_images(count: int, rng: np.random.Generator):
    masks = np.zeros((count, H, W))
    for b in range(count):
        h, w = rng.integers(2, 5, size=2)
        r, c = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
        masks[b, r:r + h, c:c + w] = 1.0
    feats = np.empty((count, NPIX, CHANNELS))
    feats[:, :, 0] = masks.reshape(count, NPIX) + rng.normal(0, 0.15, (count, NPIX))
    feats[:, :, 1:] = rng.normal(0, 0.6, (count, NPIX, CHANNELS - 1))
    return torch.tensor(feats), masks.reshape(count, NPIX).astype(bool)


def edge_weights(feats: torch.Tensor, log_a: torch.Tensor) -> torch.Tensor:
    diff = feats[:, EDGES[:, 0], :] - feats[:, EDGES[:, 1], :]
    return torch.exp(-(diff**2 * torch.exp(log_a)).sum(-1)) + 1e-3


def segment(layer, feats, log_a):
    w = edge_weights(feats, log_a)
    (v, _lam), info = layer(w, y0=eigh_forward(w.detach().numpy()), return_info=True)
    return v, info


def iou(v: torch.Tensor, masks: np.ndarray) -> np.ndarray:
    seg = v.detach().numpy() > 0
    out = []
    for s, m in zip(seg, masks):
        scores = [(a & m).sum() / max((a | m).sum(), 1) for a in (s, ~s)]
        out.append(max(scores))
    return np.array(out)


def cosine_loss(v: torch.Tensor, masks: np.ndarray) -> torch.Tensor:
    t = torch.tensor(masks, dtype=v.dtype)
    t = t - t.mean(dim=1, keepdim=True)
    cos2 = (v * t).sum(1) ** 2 / ((v * v).sum(1) * (t * t).sum(1))
    return (1 - cos2).mean()


def main(quick: bool = False, out: str | None = None) -> dict:
    t0 = time.perf_counter()
    layer = build_layer()
    print(f"layer ready in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(0)
    n_train, n_test, steps = (16, 32, 20) if quick else (48, 200, 60)
    Ftr, Mtr = make_images(n_train, rng)
    Fte, Mte = make_images(n_test, rng)
    log_a = torch.zeros(CHANNELS, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_a], lr=0.15)
    with torch.no_grad():
        v, info = segment(layer, Ftr, log_a)
        loss0, iou_tr0 = cosine_loss(v, Mtr).item(), iou(v, Mtr).mean()
        v_te0, _ = segment(layer, Fte, log_a)
        iou_te0 = iou(v_te0, Mte).mean()
    print(f"Newton iterations after the eigensolver: max {int(info.iterations.max())}")
    print(f"before training (equal channel weights): loss {loss0:.4f}  IoU train {iou_tr0:.3f}  test {iou_te0:.3f}")
    losses, failed = [], 0
    for step in range(steps):
        opt.zero_grad()
        v, info = segment(layer, Ftr, log_a)
        failed += int((~info.converged).sum())
        loss = cosine_loss(v, Mtr)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}  IoU train {iou(v, Mtr).mean():.3f}")
    with torch.no_grad():
        v, _ = segment(layer, Ftr, log_a)
        loss1, iou_tr1 = cosine_loss(v, Mtr).item(), iou(v, Mtr).mean()
        v_te1, _ = segment(layer, Fte, log_a)
        iou_te1 = iou(v_te1, Mte).mean()
    a = torch.exp(log_a).detach().numpy()
    print(f"after training: loss {loss1:.4f}  IoU train {iou_tr1:.3f}  test {iou_te1:.3f}")
    print("channel weights a:", np.array2string(a, precision=3), "(channel 0 is the intensity)",
          f"; {failed} sample-solve(s) without a gradient (repeated eigenvalue)")
    out = "." if out is None and not quick else out
    if out is not None:
        _plot(Fte[0, :, 0].numpy(), Mte[0], v_te0[0].numpy(), v_te1[0].numpy(), f"{out}/normalized_cuts.png")
    return {"loss_before": loss0, "loss_after": loss1, "iou_train_before": float(iou_tr0),
            "iou_train_after": float(iou_tr1), "iou_test_before": float(iou_te0), "iou_test_after": float(iou_te1),
            "intensity_weight": float(a[0]), "noise_weight": float(a[1:].mean())}


def _plot(intensity, mask, v_before, v_after, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    def oriented(v):  # show the label that overlaps the foreground more as white (the sign of v is arbitrary)
        s = v > 0
        return s if (s & mask).sum() / max((s | mask).sum(), 1) >= (~s & mask).sum() / max((~s | mask).sum(), 1) else ~s

    fig, axes = plt.subplots(1, 4, figsize=(11, 3))
    panels = [(intensity, "intensity channel"), (mask, "foreground"), (oriented(v_before), "NCut, equal weights"),
              (oriented(v_after), "NCut, learned weights")]
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(np.asarray(img, dtype=float).reshape(H, W), cmap="gray", vmin=0 if img.dtype == bool else None,
                  vmax=1 if img.dtype == bool else None)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved {path}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
