"""A 3-D level-set shape layer fitted to point samples, against a voxel-occupancy baseline (paper §4.4, table 1).

A shape is the zero level set of ``phi``, the trilinear interpolant of values on an ``n³`` grid over
``[-1, 1]³`` (``n = 32``, the paper's resolution; positive inside). The forward pass extracts the surface
with marching cubes (``skimage.measure.marching_cubes``); every triangle lies in one grid cell, and its
centroid ``p`` starts a line ``p + t d`` along the normal ``d`` of that cell's interpolant at ``p``. The
surface point is the root of the cell's trilinear interpolant along that line (the paper's eq. 27),

    phi_tri(o + t d; c) = sum_abc c_abc  w_a(u) w_b(v) w_c(w) = 0,   (u, v, w) = o + t d,  w_0(s) = 1 - s, w_1(s) = s,

a one-unknown ``ResidualSystem`` in ``t`` whose parameters are the cell's 8 corner values ``c``, the in-cell
offset ``o`` of the centroid and the direction ``d`` (both held fixed). It is compiled once and solved by
Newton for all surface points of a shape at once; the backward pass is the implicit function theorem,
``dt/dc = -(∂phi/∂c) / (∂phi/∂t)``, and torch's indexing scatters the 8 corner gradients of every point
into the grid. (The marching-cubes vertices themselves sit on cell edges, where the interpolant is linear,
so refining them would be a one-step solve; the centroids are not on the trilinear surface, so theirs is a
real Newton solve.)

Data. The paper fits 2,000 ShapeNet cars from single images with an image encoder; nothing can be
downloaded here, so the shapes are generated: four classes (boxes, ellipsoids, tori, and a car-like union
of boxes: body, cabin, four wheels), each with random sizes and a random pose. Each shape is fitted on its
own (no encoder and no decoder: the comparison of table 1 is one of representations, and a per-shape fit
isolates it from what a network would add; it also keeps the example within a CPU budget). The
observations of a shape, the same for both representations, are 3,000 point samples on its surface and
labelled points in the volume (inside or outside: 8 per grid node uniform in the box, 2 per node within
about ``h`` of the surface, as occupancy networks are trained); no noise.

- level set: ``phi`` on the grid, loss = squared Chamfer distance between the implicit layer's surface
  points and the observed surface samples + ``10 mean relu(-s phi_tri(x))`` at the labelled points
  (``s = ±1``: a penalty on wrong signs only) + ``0.02 mean (|∇phi| - 1)²`` (finite differences), keeping
  ``phi`` close to a signed distance;
- voxels (baseline): one occupancy logit per grid node (the voxel of side ``h`` centred on it), trained by
  binary cross-entropy of the voxel holding each labelled point, plus ``10⁻³`` total variation of the
  probabilities; the surface samples carry no label a voxel could use.

Both start from the same data-derived shape, the majority vote of the labelled points in each voxel (the
level set from its signed distance, by a Euclidean distance transform; the voxels from logits ±2), and
run the same number of Adam steps with the same geometric learning-rate decay. (From a sphere instead, the
level set keeps thin sheets and bubbles where the topology has to change, e.g. across a torus' hole: the
sign penalty sees them only through the few labelled points inside them.) Metrics against the generating
shape: IoU of the volumes sampled at ``96³`` points (level set: ``phi_tri > 0``; voxels: occupied voxels,
probability > 0.5), and the symmetric Chamfer distance ``(mean_a min_b |a - b| + mean_b min_a |a - b|) / 2``
between 100,000 area-uniform samples of each surface (level set: its marching-cubes mesh; voxels: the
marching-cubes mesh of the binary occupancy at 0.5, and, as "soft surface", of the probabilities at 0.5)
and 100,000 fresh samples of the true surface, in the units of the ``[-1, 1]³`` box. Two samples of the
same true surface are this far apart already: the table prints that floor. The figure shows the true
surface, the level set and the voxels of one torus and one car.

Run: ``python examples/level_set_3d.py`` (``--quick`` for a short run on a 16³ grid, one shape per class,
fewer samples in the metrics).
Prints the table (IoU and Chamfer per class and on average, both representations), the time per iteration
of both, and an implicit-gradient check against finite differences; saves ``level_set_3d.png``.
"""

from __future__ import annotations

import itertools
import sys
import time

import numpy as np
import sympy as sp
import torch
from scipy.ndimage import distance_transform_edt, map_coordinates
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation
from skimage.measure import marching_cubes

import implicit_compiler as ic

OFFSETS = np.array(list(itertools.product((0, 1), repeat=3)))  # corner (a, b, c) of c_abc, last index fastest
CLASSES = ("box", "ellipsoid", "torus", "car")
CELL_TOL = 1e-6  # a refined point may leave its cell by this much (local units) and still count


# --------------------------------------------------------------------------------------------------------
# The implicit layer: the root of a cell's trilinear interpolant along a line


def trilinear_system() -> ic.ResidualSystem:
    t = sp.Symbol("t")
    c = sp.symbols("c000 c001 c010 c011 c100 c101 c110 c111")
    o = sp.symbols("ou ov ow")
    d = sp.symbols("du dv dw")
    local = [o[i] + t * d[i] for i in range(3)]
    phi = sum(ck * sp.Mul(*[(s if bit else 1 - s) for s, bit in zip(local, off)]) for ck, off in zip(c, OFFSETS))
    return ic.ResidualSystem([phi], unknowns={"t": t}, params={"c": list(c), "o": list(o), "d": list(d)},
                             name="trilinear_line_crossing")


def build_layer() -> ic.ImplicitLayer:
    # a line that only grazes the cell's surface has ∂phi/∂t ≈ 0: it comes back unconverged and is left out
    return ic.compile(trilinear_system(), on_failure="keep", tol=1e-13, rtol=1e-13, xtol=1e-13)


class Grid:
    """``n³`` nodes over ``[-1, 1]³``; index coordinates ``i`` ↔ world ``-1 + h i``."""

    def __init__(self, n: int):
        self.n = n
        self.h = 2.0 / (n - 1)
        self.nodes = np.linspace(-1.0, 1.0, n)

    def world(self, idx):
        return -1.0 + self.h * idx

    def index(self, x):
        return (x + 1.0) / self.h

    def points(self):
        X = np.stack(np.meshgrid(self.nodes, self.nodes, self.nodes, indexing="ij"), axis=-1)
        return X.reshape(-1, 3)


def trilinear_weights(local: np.ndarray) -> np.ndarray:
    """(P, 8) weights of the corners OFFSETS at in-cell coordinates ``local`` (P, 3)."""
    w = np.ones((len(local), 8))
    for k, off in enumerate(OFFSETS):
        for axis in range(3):
            w[:, k] *= local[:, axis] if off[axis] else 1.0 - local[:, axis]
    return w


def trilinear_gradient(c: np.ndarray, local: np.ndarray) -> np.ndarray:
    """(P, 3) gradient of the cell interpolant (corner values c (P, 8)) in in-cell coordinates."""
    g = np.zeros((len(local), 3))
    for k, off in enumerate(OFFSETS):
        for axis in range(3):
            term = c[:, k] * (1.0 if off[axis] else -1.0)
            for other in range(3):
                if other != axis:
                    term = term * (local[:, other] if off[other] else 1.0 - local[:, other])
            g[:, axis] += term
    return g


def corner_index(cells: np.ndarray):
    """Index arrays (3 of (P, 8)) of the 8 corners of each cell."""
    corners = cells[:, None, :] + OFFSETS[None, :, :]
    return corners[..., 0], corners[..., 1], corners[..., 2]


def corner_flat(cells: np.ndarray, n: int) -> torch.Tensor:
    """(P, 8) flat indices into an ``n³`` grid of the 8 corners of each cell."""
    i, j, k = corner_index(cells)
    return torch.from_numpy((i * n + j) * n + k)


def corner_values(values: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """(P, 8) grid values at flat corner indices; the backward adds into ``values``."""
    return values.reshape(-1).index_select(0, flat.reshape(-1)).reshape(flat.shape)


def surface_lines(phi: np.ndarray):
    """Marching cubes on the grid values; one line per triangle: its cell, in-cell start and unit direction."""
    verts, faces, _, _ = marching_cubes(phi, level=0.0, allow_degenerate=False)
    centroid = verts[faces].mean(axis=1)  # index coordinates; a triangle lies in one cell
    cells = np.clip(np.floor(centroid).astype(np.int64), 0, phi.shape[0] - 2)
    o = centroid - cells
    c = phi[corner_index(cells)]
    g = trilinear_gradient(c, o)
    norm = np.linalg.norm(g, axis=1)
    keep = norm > 1e-12 * np.abs(c).max(axis=1)
    return cells[keep], o[keep], g[keep] / norm[keep, None]


def refine(layer, phi: torch.Tensor, lines, grid: Grid):
    """Surface points (P, 3), world coordinates, differentiable in ``phi``, and which of them count.

    A point counts when Newton converged and the root stays in its cell (else it is a root of the
    cell's polynomial outside the cell, not a point of the piecewise-trilinear surface)."""
    cells, o, d = lines
    c = corner_values(phi, corner_flat(cells, grid.n))  # (P, 8); its backward scatters into phi
    t, info = layer(c, torch.from_numpy(o), torch.from_numpy(d), y0={"t": torch.zeros(len(o))}, return_info=True)
    t = t.reshape(-1)
    local = torch.from_numpy(o) + t[:, None] * torch.from_numpy(d)
    inside = ((local >= -CELL_TOL) & (local <= 1 + CELL_TOL)).all(dim=1)
    ok = info.converged.reshape(-1) & inside
    x = grid.world(torch.from_numpy(cells).to(local.dtype) + local)
    return x, ok


# --------------------------------------------------------------------------------------------------------
# Generated shapes: inside tests and area-uniform surface samples


def _unit(rng, n):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Shape:
    """A solid given by an inside test in its own frame, posed by a rotation and a centre."""

    def __init__(self, kind: str, rotation: np.ndarray, centre: np.ndarray, **size):
        self.kind, self.R, self.centre, self.size = kind, rotation, centre, size

    def to_local(self, x):
        return (x - self.centre) @ self.R

    def to_world(self, u):
        return u @ self.R.T + self.centre

    def inside(self, x):
        return self._inside_local(self.to_local(x))

    def _inside_local(self, u):
        s = self.size
        if self.kind == "ellipsoid":
            return ((u / s["axes"]) ** 2).sum(axis=1) <= 1.0
        if self.kind == "torus":
            return (np.hypot(u[:, 0], u[:, 1]) - s["R"]) ** 2 + u[:, 2] ** 2 <= s["r"] ** 2
        return np.any([(np.abs(u - c) <= a).all(axis=1) for c, a in s["boxes"]], axis=0)

    def sample_surface(self, n: int, rng) -> np.ndarray:
        out, have = [], 0
        while have < n:
            u = self._propose(2 * n, rng)
            out.append(u)
            have += len(u)
        u = np.concatenate(out)[:n]
        return self.to_world(u)

    def _propose(self, m, rng):
        s = self.size
        if self.kind == "ellipsoid":  # sphere points z mapped to a z, accepted by the area element
            z = _unit(rng, m)
            a = s["axes"]
            stretch = np.sqrt(((z / a) ** 2).sum(axis=1)) * a.min()  # area ratio over its maximum, in (0, 1]
            return (z * a)[rng.random(m) < stretch]
        if self.kind == "torus":  # angles, the tube angle accepted by the area element R + r cos ψ
            R, r = s["R"], s["r"]
            th, ps = rng.uniform(0, 2 * np.pi, m), rng.uniform(0, 2 * np.pi, m)
            acc = rng.random(m) * (R + r) < R + r * np.cos(ps)
            th, ps = th[acc], ps[acc]
            rho = R + r * np.cos(ps)
            return np.stack([rho * np.cos(th), rho * np.sin(th), r * np.sin(ps)], axis=1)
        # union of boxes: area-weighted faces of every box, keeping points not inside another box
        faces = []
        for bi, (_, a) in enumerate(s["boxes"]):
            for axis in range(3):
                others = [k for k in range(3) if k != axis]
                area = 4 * a[others[0]] * a[others[1]]
                faces += [(bi, axis, sign, area) for sign in (-1.0, 1.0)]
        area = np.array([f[3] for f in faces])
        pick = rng.choice(len(faces), size=m, p=area / area.sum())
        u = np.empty((m, 3))
        for k, (bi, axis, sign, _) in enumerate(faces):
            sel = pick == k
            c, a = s["boxes"][bi]
            p = rng.uniform(-1, 1, size=(sel.sum(), 3)) * a + c
            p[:, axis] = c[axis] + sign * a[axis]
            u[sel] = p
        # a face point is on the union's surface when just outside it (along the face's normal) is outside
        # every box: this drops points inside other boxes and on faces where two boxes touch
        normal = np.zeros((m, 3))
        for k, (_, axis, sign, _) in enumerate(faces):
            normal[pick == k, axis] = sign
        return u[~self._inside_local(u + 1e-9 * normal)]


def random_shape(kind: str, rng) -> Shape:
    R = Rotation.random(random_state=rng).as_matrix()
    centre = rng.uniform(-0.08, 0.08, 3)
    if kind == "box":
        a = rng.uniform(0.22, 0.5, 3)
        a *= min(1.0, 0.72 / np.linalg.norm(a))
        return Shape(kind, R, centre, boxes=[(np.zeros(3), a)])
    if kind == "ellipsoid":
        return Shape(kind, R, centre, axes=rng.uniform(0.28, 0.72, 3))
    if kind == "torus":
        return Shape(kind, R, centre, R=rng.uniform(0.42, 0.55), r=rng.uniform(0.16, 0.24))
    # car: body, cabin, four wheels; yaw only (a car stands on its wheels)
    L, W, H = rng.uniform(0.55, 0.72), rng.uniform(0.24, 0.32), rng.uniform(0.1, 0.15)
    cl, ch, cx = L * rng.uniform(0.4, 0.6), H * rng.uniform(0.8, 1.2), L * rng.uniform(-0.25, 0.15)
    wr, ww = rng.uniform(0.09, 0.13), rng.uniform(0.04, 0.07)
    boxes = [(np.array([0.0, 0.0, 0.0]), np.array([L, W, H])),
             (np.array([cx, 0.0, H + ch]), np.array([cl, 0.9 * W, ch]))]
    for sx, sy in itertools.product((-1, 1), repeat=2):
        boxes.append((np.array([sx * 0.62 * L, sy * (W + ww), -H]), np.array([wr, ww, wr])))
    yaw = Rotation.from_euler("z", rng.uniform(0, 2 * np.pi)).as_matrix()
    return Shape(kind, yaw, centre + np.array([0.0, 0.0, -0.5 * ch]), boxes=boxes)


def observations(shape: Shape, grid: Grid, n_surface: int, rng):
    """Surface samples, and labelled volume points: 8 per grid node uniform in the box (so that almost every
    voxel holds some: e⁻⁸ of them none) and 2 per node within ~h of the surface."""
    surf = shape.sample_surface(n_surface, rng)
    n_near = 2 * grid.n ** 3
    near = shape.sample_surface(n_near, rng) + rng.normal(scale=grid.h, size=(n_near, 3))
    vol = np.concatenate([rng.uniform(-1, 1, size=(8 * grid.n ** 3, 3)), np.clip(near, -1, 1)])
    return surf, vol, np.where(shape.inside(vol), 1.0, -1.0)


# --------------------------------------------------------------------------------------------------------
# The two representations and their training


class Trilinear:
    """The interpolant of grid values at fixed world points ``x`` (cells and weights found once)."""

    def __init__(self, x: np.ndarray, grid: Grid):
        idx = grid.index(x)
        cells = np.clip(np.floor(idx).astype(np.int64), 0, grid.n - 2)
        self.flat = corner_flat(cells, grid.n)
        self.weights = torch.from_numpy(trilinear_weights(idx - cells))

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return (corner_values(values, self.flat) * self.weights).sum(dim=1)


def eikonal(phi: torch.Tensor, h: float) -> torch.Tensor:
    g = torch.stack([(phi[2:, 1:-1, 1:-1] - phi[:-2, 1:-1, 1:-1]),
                     (phi[1:-1, 2:, 1:-1] - phi[1:-1, :-2, 1:-1]),
                     (phi[1:-1, 1:-1, 2:] - phi[1:-1, 1:-1, :-2])]) / (2 * h)
    return ((g.norm(dim=0) - 1.0) ** 2).mean()


def chamfer_sq(x: torch.Tensor, y: torch.Tensor, y_tree: cKDTree) -> torch.Tensor:
    """Squared Chamfer distance ``mean_x min_y |x - y|² + mean_y min_x |x - y|²``, differentiable in x.

    The nearest pairs are found by k-d trees, outside the graph; the loss is then computed on those pairs,
    which has the gradient of the Chamfer distance wherever the nearest neighbours are unique."""
    xn = x.detach().numpy()
    to_y = torch.from_numpy(y_tree.query(xn)[1])
    to_x = torch.from_numpy(cKDTree(xn).query(y.numpy())[1])
    return ((x - y[to_y]) ** 2).sum(1).mean() + ((x[to_x] - y) ** 2).sum(1).mean()


def voxel_of(grid: Grid, x: np.ndarray) -> torch.Tensor:
    """Flat index of the voxel (the cube of side h centred on a node) holding each point."""
    idx = np.clip(np.rint(grid.index(x)).astype(np.int64), 0, grid.n - 1)
    return torch.from_numpy((idx[:, 0] * grid.n + idx[:, 1]) * grid.n + idx[:, 2])


def majority_occupancy(grid: Grid, vol: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The start of both fits: each voxel inside when most of its labelled points are (empty: outside)."""
    votes = np.bincount(voxel_of(grid, vol).numpy(), weights=label, minlength=grid.n ** 3)
    return (votes > 0).reshape((grid.n,) * 3)


def signed_distance(grid: Grid, occupied: np.ndarray) -> np.ndarray:
    """A signed distance (positive inside) whose zero level set runs halfway between inside and outside nodes."""
    return grid.h * np.where(occupied, distance_transform_edt(occupied) - 0.5, 0.5 - distance_transform_edt(~occupied))


def schedule(opt, steps: int, final: float = 0.05):
    """The learning rate decays geometrically to ``final`` times its start (Adam's steps do not shrink
    by themselves, and the surface would jitter by about the learning rate)."""
    return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=final ** (1.0 / max(steps - 1, 1)))


def fit_level_set(layer, grid: Grid, phi0: np.ndarray, surf, vol, label, steps: int, w_sign=10.0, w_eik=0.02,
                  lr=None):
    phi = torch.tensor(phi0, requires_grad=True)
    opt = torch.optim.Adam([phi], lr=lr or 0.15 * grid.h)
    decay = schedule(opt, steps)
    surf_t, label_t, at_vol, tree = torch.from_numpy(surf), torch.from_numpy(label), Trilinear(vol, grid), cKDTree(surf)
    losses, seconds, dropped, points = [], [], 0, 0
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        lines = surface_lines(phi.detach().numpy())
        x, ok = refine(layer, phi, lines, grid)
        dropped, points = dropped + int((~ok).sum()), points + len(ok)
        sign = torch.relu(-label_t * at_vol(phi))
        loss = chamfer_sq(x[ok], surf_t, tree) + w_sign * sign.mean() + w_eik * eikonal(phi, grid.h)
        loss.backward()  # the surface term's gradient: the implicit function theorem, 8 corners per point
        opt.step()
        decay.step()
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return phi.detach().numpy(), losses, seconds, dropped / max(points, 1)


def fit_voxels(grid: Grid, vol, label, steps: int, w_tv=1e-3, lr=0.3):
    logit = torch.tensor(np.where(majority_occupancy(grid, vol, label), 2.0, -2.0), requires_grad=True)
    opt = torch.optim.Adam([logit], lr=lr)
    decay = schedule(opt, steps)
    flat = voxel_of(grid, vol)
    target = torch.from_numpy((label > 0).astype(np.float64))
    losses, seconds = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        z = logit.reshape(-1).index_select(0, flat)
        p = torch.sigmoid(logit)
        tv = sum((p.diff(dim=k)).abs().mean() for k in range(3))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, target) + w_tv * tv
        loss.backward()
        opt.step()
        decay.step()
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return logit.detach().numpy(), losses, seconds


# --------------------------------------------------------------------------------------------------------
# Metrics


def sample_mesh(verts: np.ndarray, faces: np.ndarray, n: int, rng) -> np.ndarray:
    tri = verts[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    k = rng.choice(len(faces), size=n, p=area / area.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    return (1 - s)[:, None] * tri[k, 0] + (s * (1 - r2))[:, None] * tri[k, 1] + (s * r2)[:, None] * tri[k, 2]


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * (cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean())


def evaluate(shape: Shape, grid: Grid, phi: np.ndarray, logit: np.ndarray, phi0: np.ndarray, rng, m: int = 96,
             n_points: int = 100_000):
    """IoU and Chamfer distance of the fitted level set ``phi``, the voxels ``logit`` and the level set's start
    ``phi0`` (what training through the implicit layer improved on)."""
    xs = -1 + (np.arange(m) + 0.5) * 2.0 / m
    X = np.stack(np.meshgrid(xs, xs, xs, indexing="ij"), axis=-1).reshape(-1, 3)
    truth = shape.inside(X)
    idx = grid.index(X)
    level = map_coordinates(phi, idx.T, order=1, mode="nearest") > 0
    level0 = map_coordinates(phi0, idx.T, order=1, mode="nearest") > 0
    vox = np.clip(np.rint(idx).astype(np.int64), 0, grid.n - 1)
    occ = logit[vox[:, 0], vox[:, 1], vox[:, 2]] > 0

    def iou(pred):
        return (pred & truth).sum() / max((pred | truth).sum(), 1)

    gt = shape.sample_surface(n_points, rng)
    floor = chamfer(shape.sample_surface(n_points, rng), gt)  # two samples of the true surface itself
    v, f, _, _ = marching_cubes(phi, level=0.0)
    ls_pts = sample_mesh(grid.world(v), f, n_points, rng)
    v0, f0, _, _ = marching_cubes(phi0, level=0.0)
    start_pts = sample_mesh(grid.world(v0), f0, n_points, rng)
    v2, f2, _, _ = marching_cubes((logit > 0).astype(np.float64), level=0.5)
    vox_pts = sample_mesh(grid.world(v2), f2, n_points, rng)
    v3, f3, _, _ = marching_cubes(1.0 / (1.0 + np.exp(-logit)), level=0.5)
    soft_pts = sample_mesh(grid.world(v3), f3, n_points, rng)
    return {"iou_level_set": iou(level), "iou_voxels": iou(occ),
            "chamfer_level_set": chamfer(ls_pts, gt), "chamfer_voxels": chamfer(vox_pts, gt),
            "chamfer_voxels_soft": chamfer(soft_pts, gt), "chamfer_floor": floor,
            "iou_level_set_start": iou(level0), "chamfer_level_set_start": chamfer(start_pts, gt)}


def gradient_check(layer, grid: Grid, phi: np.ndarray, rng, k: int = 12, eps: float = 1e-6) -> float:
    """Largest error, relative to the largest entry, of the implicit gradient of ``sum(w · x)`` over the
    surface points against central finite differences (re-solving with the lines held fixed) at ``k`` grid
    values."""
    lines = surface_lines(phi)
    w = torch.from_numpy(rng.normal(size=(len(lines[0]), 3)))
    p = torch.tensor(phi, requires_grad=True)
    x, ok = refine(layer, p, lines, grid)
    mask = ok.detach()
    (x * w)[mask].sum().backward()
    touched = np.unique(np.ravel_multi_index(corner_index(lines[0][mask.numpy()]), phi.shape))
    picks = rng.choice(touched, size=min(k, len(touched)), replace=False)
    pairs = []
    for flat in picks:
        e = np.zeros(phi.size)
        e[flat] = eps
        e = e.reshape(phi.shape)
        with torch.no_grad():
            plus = (refine(layer, torch.from_numpy(phi + e), lines, grid)[0] * w)[mask].sum()
            minus = (refine(layer, torch.from_numpy(phi - e), lines, grid)[0] * w)[mask].sum()
        pairs.append((float(plus - minus) / (2 * eps), float(p.grad.reshape(-1)[flat])))
    fd, ad = np.array(pairs).T
    return float(np.abs(fd - ad).max() / np.abs(fd).max())


# --------------------------------------------------------------------------------------------------------


def main(quick: bool = False, out: str | None = None, seed: int = 0) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tensors of one step are small: torch's threads cost more than they save
    try:
        return _run(quick, out, seed)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, out: str | None, seed: int) -> dict:
    t_start = time.perf_counter()
    layer = build_layer()
    compile_seconds = time.perf_counter() - t_start
    print(f"layer ready in {compile_seconds:.1f} s")
    n, per_class, steps, n_surface = (16, 1, 25, 1000) if quick else (32, 3, 100, 3000)
    grid = Grid(n)
    rng = np.random.default_rng(seed)
    rows, kept, ls_seconds, vox_seconds, ls_loss, vox_loss, dropped = [], [], [], [], [], [], []
    for kind in CLASSES:
        for j in range(per_class):
            shape = random_shape(kind, rng)
            surf, vol, label = observations(shape, grid, n_surface, rng)
            phi0 = signed_distance(grid, majority_occupancy(grid, vol, label))
            phi, losses, sec, drop = fit_level_set(layer, grid, phi0, surf, vol, label, steps)
            logit, vlosses, vsec = fit_voxels(grid, vol, label, steps)
            m = evaluate(shape, grid, phi, logit, phi0, rng, m=64 if quick else 96,
                         n_points=20_000 if quick else 100_000)
            rows.append((kind, m))
            ls_seconds += sec
            vox_seconds += vsec
            ls_loss.append((losses[0], losses[-1]))
            vox_loss.append((vlosses[0], vlosses[-1]))
            dropped.append(drop)
            if j == 0 and kind in ("torus", "car"):
                kept.append((kind, shape, phi, logit))
            print(f"{kind:9s} #{j}: IoU level set {m['iou_level_set']:.3f} voxels {m['iou_voxels']:.3f}   Chamfer "
                  f"level set {m['chamfer_level_set']:.4f} voxels {m['chamfer_voxels']:.4f}   level-set loss "
                  f"{losses[0]:.2e} -> {losses[-1]:.2e}, voxel loss {vlosses[0]:.2e} -> {vlosses[-1]:.2e}")
    grad_error = gradient_check(layer, grid, kept[0][2], rng)
    keys = rows[0][1].keys()
    mean = {k: float(np.mean([m[k] for _, m in rows])) for k in keys}
    ms_ls, ms_vox = 1e3 * float(np.mean(ls_seconds)), 1e3 * float(np.mean(vox_seconds))
    print(f"\n{n}³ grid, {len(rows)} shapes ({per_class} per class), {steps} Adam steps each")
    print(_table(rows, mean))
    print(f"time per iteration: level set {ms_ls:.1f} ms, voxels {ms_vox:.1f} ms; surface points left out "
          f"(unconverged or outside their cell): {100 * np.mean(dropped):.2f}%; implicit gradient against finite "
          f"differences: max relative error {grad_error:.1e}")
    out = "." if out is None and not quick else out
    if out is not None:
        _plot(kept, grid, f"{out}/level_set_3d.png")
    return {**mean, "per_shape": rows, "grad_rel_error": grad_error, "compile_seconds": compile_seconds,
            "ms_per_iter_level_set": ms_ls, "ms_per_iter_voxels": ms_vox, "level_set_loss": ls_loss,
            "voxel_loss": vox_loss, "dropped_fraction": float(np.mean(dropped)),
            "seconds": time.perf_counter() - t_start}


def _table(rows, mean) -> str:
    """IoU and Chamfer distance by class and overall (the layout of the paper's table 1, per class)."""
    head = f"{'':28s}" + "".join(f"{k:>16s}" for k in (*CLASSES, "all"))
    lines = [head, f"{'':28s}" + "      IoU Chamfer" * (len(CLASSES) + 1)]

    def avg(kind, key):
        return mean[key] if kind == "all" else float(np.mean([m[key] for k, m in rows if k == kind]))

    for name, iou, ch in (("voxels", "iou_voxels", "chamfer_voxels"),
                          ("voxels, soft surface", None, "chamfer_voxels_soft"),
                          ("level sets, start", "iou_level_set_start", "chamfer_level_set_start"),
                          ("level sets", "iou_level_set", "chamfer_level_set"),
                          ("floor (truth vs truth)", None, "chamfer_floor")):
        cells = []
        for kind in (*CLASSES, "all"):
            left = f"{avg(kind, iou):9.3f}" if iou else " " * 9
            cells.append(f"{left}{avg(kind, ch):7.4f}")
        lines.append(f"{name:28s}" + "".join(cells))
    return "\n".join(lines)


def _plot(kept, grid: Grid, path: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from mpl_toolkits.mplot3d.art3d import Poly3DCollection
    except ImportError:
        return
    rng = np.random.default_rng(1)
    fig = plt.figure(figsize=(10, 3.4 * len(kept)))
    for r, (kind, shape, phi, logit) in enumerate(kept):
        axes = [fig.add_subplot(len(kept), 3, 3 * r + k + 1, projection="3d") for k in range(3)]
        pts = shape.sample_surface(4000, rng)
        axes[0].scatter(pts[:, 0], pts[:, 1], pts[:, 2], s=0.5, c=pts[:, 2], cmap="viridis")
        axes[0].set_title(f"{kind}: ground truth")
        v, f, _, _ = marching_cubes(phi, level=0.0)
        mesh = Poly3DCollection(grid.world(v)[f], facecolor=_shade(grid.world(v)[f], "tab:red"), edgecolor="none")
        axes[1].add_collection3d(mesh)
        axes[1].set_title("level set (marching cubes)")
        occ = logit > 0
        axes[2].voxels(*np.meshgrid(*(np.linspace(-1 - grid.h / 2, 1 + grid.h / 2, grid.n + 1),) * 3,
                                    indexing="ij"), occ, facecolor="tab:blue", edgecolor="none")
        axes[2].set_title("voxels (occupancy > 0.5)")
        for ax in axes:
            ax.set_xlim(-0.7, 0.7)
            ax.set_ylim(-0.7, 0.7)
            ax.set_zlim(-0.7, 0.7)
            ax.set_box_aspect((1, 1, 1))
            ax.set_axis_off()
    fig.subplots_adjust(left=0, right=1, bottom=0, top=0.95, wspace=0, hspace=0.05)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"saved {path}")


def _shade(tri: np.ndarray, colour: str) -> np.ndarray:
    """Face colours lit from one direction (matplotlib's Poly3DCollection does no lighting)."""
    from matplotlib.colors import to_rgb

    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    light = np.array([0.4, -0.5, 0.77])
    k = 0.35 + 0.65 * np.abs(n @ light)
    return np.clip(np.array(to_rgb(colour))[None, :] * k[:, None], 0, 1)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
