"""A level-set surface as an implicit layer (the paper's section 4.4, in 2-D and in miniature).

A shape is the zero level set of ``phi``, the bilinear interpolant of values on a 9x9 grid over
``[-1, 1]²`` (positive inside). Along a fixed ray ``x(t) = o + t d`` the surface point is the root of

    phi_cell(o + t d) = c00 (1-u)(1-v) + c10 u (1-v) + c01 (1-u) v + c11 u v = 0,   (u, v) = local coords,

a one-unknown ``ResidualSystem`` in ``t`` whose parameters are the four grid values ``c`` of the cell
the ray crosses in, and the ray's origin and direction in that cell's coordinates. A NumPy march along
each ray finds the crossing cell and a starting value for ``t``; the compiled layer solves for ``t``
and differentiates it with respect to the grid values (``dt/dc = -(∂phi/∂c) / (∂phi/∂t)``).

The grid values start as a circle of radius 0.5 and are trained so that the surface passes through
target points on a generated "flower" curve ``r(θ) = 0.55 + 0.12 cos 3θ + 0.05 sin 2θ`` along rays
from the origin. The fitting error is the RMS distance between the surface point and the target along
each ray, on the training rays and on held-out rays halfway between them.

Run: ``python examples/level_set.py`` (``--quick`` for a short run). Prints the RMS fitting error before
and after training; saves ``level_set.png`` (the target curve and the initial and fitted zero level
sets) when matplotlib is installed.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import sympy as sp
import torch

import implicit_compiler as ic

G = 9  # grid nodes per side
H = 2.0 / (G - 1)  # grid spacing
NODES = np.linspace(-1.0, 1.0, G)


def build_layer() -> ic.ImplicitLayer:
    t = sp.Symbol("t")
    c00, c10, c01, c11, ou, ov, du, dv = sp.symbols("c00 c10 c01 c11 ou ov du dv")
    u, v = ou + t * du, ov + t * dv
    phi = c00 * (1 - u) * (1 - v) + c10 * u * (1 - v) + c01 * (1 - u) * v + c11 * u * v
    system = ic.ResidualSystem([phi], unknowns={"t": t},
                               params={"c": [c00, c10, c01, c11], "o": [ou, ov], "d": [du, dv]},
                               name="bilinear_ray_crossing")
    # a ray that only grazes the surface has ∂phi/∂t ≈ 0: keep it, with zero gradient, rather than fail
    return ic.compile(system, on_failure="keep")


def target_radius(theta: np.ndarray) -> np.ndarray:
    return 0.55 + 0.12 * np.cos(3 * theta) + 0.05 * np.sin(2 * theta)


def bilinear(phi: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The interpolant phi at points (x, y) (NumPy, for the march along the rays)."""
    i = np.clip(np.floor((x + 1) / H).astype(int), 0, G - 2)
    j = np.clip(np.floor((y + 1) / H).astype(int), 0, G - 2)
    u, v = (x - NODES[i]) / H, (y - NODES[j]) / H
    return (phi[i, j] * (1 - u) * (1 - v) + phi[i + 1, j] * u * (1 - v) + phi[i, j + 1] * (1 - u) * v
            + phi[i + 1, j + 1] * u * v)


def find_crossings(phi: np.ndarray, dirs: np.ndarray, t_max: float = 0.98, samples: int = 400):
    """First sign change of phi along each ray from the origin: cell indices and a starting t."""
    ts = np.linspace(0.0, t_max, samples)
    vals = bilinear(phi, dirs[:, None, 0] * ts, dirs[:, None, 1] * ts)  # (R, samples)
    outside = vals <= 0
    k = np.where(outside.any(axis=1), outside.argmax(axis=1), samples - 1)
    k = np.maximum(k, 1)
    f0, f1 = vals[np.arange(len(dirs)), k - 1], vals[np.arange(len(dirs)), k]
    t0 = ts[k - 1] + (ts[k] - ts[k - 1]) * f0 / np.where(f0 - f1 == 0, 1.0, f0 - f1)
    x, y = dirs[:, 0] * t0, dirs[:, 1] * t0
    i = np.clip(np.floor((x + 1) / H).astype(int), 0, G - 2)
    j = np.clip(np.floor((y + 1) / H).astype(int), 0, G - 2)
    return i, j, t0


def surface_distance(layer, phi: torch.Tensor, dirs: np.ndarray):
    """The ray parameter t of the surface point along each ray (differentiable in phi)."""
    i, j, t0 = find_crossings(phi.detach().numpy(), dirs)
    c = torch.stack([phi[i, j], phi[i + 1, j], phi[i, j + 1], phi[i + 1, j + 1]], dim=1)
    o = torch.tensor(np.stack([(0.0 - NODES[i]) / H, (0.0 - NODES[j]) / H], axis=1))  # rays start at 0
    d = torch.tensor(dirs / H)
    t, info = layer(c, o, d, y0={"t": torch.tensor(t0)}, return_info=True)
    return t, info


def main(quick: bool = False, out: str | None = None) -> dict:
    t_start = time.perf_counter()
    layer = build_layer()
    print(f"layer ready in {time.perf_counter() - t_start:.1f} s")
    n_rays, steps = (32, 60) if quick else (64, 300)
    theta = 2 * np.pi * np.arange(n_rays) / n_rays
    theta_test = theta + np.pi / n_rays
    dirs = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    dirs_test = np.stack([np.cos(theta_test), np.sin(theta_test)], axis=1)
    r_train = torch.tensor(target_radius(theta))
    r_test = torch.tensor(target_radius(theta_test))
    X, Y = np.meshgrid(NODES, NODES, indexing="ij")
    phi0 = 0.5 - np.sqrt(X**2 + Y**2)  # a circle of radius 0.5, positive inside
    phi = torch.tensor(phi0, requires_grad=True)
    opt = torch.optim.Adam([phi], lr=0.02)

    def rms(dirs_, r_):
        with torch.no_grad():
            t, _ = surface_distance(layer, phi, dirs_)
            return float(torch.sqrt(((t - r_) ** 2).mean()))

    err_train0, err_test0 = rms(dirs, r_train), rms(dirs_test, r_test)
    print(f"before: RMS fitting error train {err_train0:.4f}  held-out rays {err_test0:.4f}")
    losses, no_grad = [], 0
    for step in range(steps):
        opt.zero_grad()
        t, info = surface_distance(layer, phi, dirs)
        no_grad += int((~info.converged).sum())
        loss = ((t - r_train) ** 2).mean()
        loss.backward()  # dt/dphi through the implicit function theorem, into 4 grid values per ray
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0:
            print(f"step {step:3d}  loss {loss.item():.3e}")
    err_train1, err_test1 = rms(dirs, r_train), rms(dirs_test, r_test)
    print(f"after:  RMS fitting error train {err_train1:.4f}  held-out rays {err_test1:.4f}"
          f"  ({no_grad} ray-solve(s) without a gradient)")
    out = "." if out is None and not quick else out
    if out is not None:
        _plot(phi0, phi.detach().numpy(), f"{out}/level_set.png")
    return {"loss_first": losses[0], "loss_last": losses[-1], "rms_train_before": err_train0,
            "rms_train_after": err_train1, "rms_test_before": err_test0, "rms_test_after": err_test1}


def _plot(phi0, phi1, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    xs = np.linspace(-1, 1, 201)
    X, Y = np.meshgrid(xs, xs, indexing="ij")
    th = np.linspace(0, 2 * np.pi, 400)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(target_radius(th) * np.cos(th), target_radius(th) * np.sin(th), "k--", label="target")
    ax.contour(X, Y, bilinear(phi0, X, Y), levels=[0], colors="tab:blue")
    ax.contour(X, Y, bilinear(phi1, X, Y), levels=[0], colors="tab:red")
    ax.plot([], [], color="tab:blue", label="initial level set")
    ax.plot([], [], color="tab:red", label="fitted level set")
    ax.set_aspect("equal")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved {path}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
