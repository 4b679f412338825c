"""The 3-D level-set layer of examples/level_set_3d.py against independent references.

The refined surface points must be zeros of the trilinear interpolant of the grid (scipy's
``RegularGridInterpolator`` as the reference interpolant), their roots must match a NumPy Newton solve of
each line's cubic polynomial, and the implicit gradient with respect to the grid values must match
central finite differences of those NumPy roots (float64, tight tolerances). On a cell edge the root and
its gradient have a closed form. The generated shapes' surface samples lie on their surfaces.
"""

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("skimage")
from scipy.interpolate import RegularGridInterpolator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import level_set_3d as ls  # noqa: E402


@pytest.fixture(scope="module")
def layer():
    return ls.build_layer()


def wavy_phi(n: int, seed: int = 0) -> np.ndarray:
    """A sphere's signed distance plus smooth bumps, so that cells are genuinely trilinear (not planar)."""
    grid = ls.Grid(n)
    x = grid.points()
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(3, 3)) * 2.5
    bumps = sum(0.04 * np.sin(x @ k[i] + i) for i in range(3))
    return (0.55 - np.linalg.norm(x, axis=1) + bumps).reshape((n,) * 3)


def line_cubic(c: np.ndarray, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(P, 4) coefficients (t⁰..t³) of the cell interpolant along o + t d, multiplied out factor by factor."""
    coef = np.zeros((len(c), 4))
    for k, off in enumerate(itertools.product((0, 1), repeat=3)):
        poly = np.zeros((len(c), 4))
        poly[:, 0] = c[:, k]
        for axis, bit in enumerate(off):
            a = o[:, axis] if bit else 1.0 - o[:, axis]
            b = d[:, axis] if bit else -d[:, axis]
            poly = poly * a[:, None] + np.concatenate([np.zeros((len(c), 1)), poly[:, :3]], axis=1) * b[:, None]
        coef += poly
    return coef


def numpy_roots(phi: np.ndarray, lines, t0: np.ndarray) -> np.ndarray:
    """Newton on each line's cubic (Horner), from the given start, to machine precision."""
    cells, o, d = lines
    corners = cells[:, None, :] + np.array(list(itertools.product((0, 1), repeat=3)))[None]
    c = phi[corners[..., 0], corners[..., 1], corners[..., 2]]
    a = line_cubic(c, o, d)
    t = t0.copy()
    for _ in range(60):
        f = ((a[:, 3] * t + a[:, 2]) * t + a[:, 1]) * t + a[:, 0]
        df = (3 * a[:, 3] * t + 2 * a[:, 2]) * t + a[:, 1]
        t = t - f / df
    return t


def points_from_t(grid, lines, t):
    cells, o, d = lines
    return grid.world(cells + o + t[:, None] * d)


def test_refined_points_are_zeros_of_the_trilinear_interpolant(layer):
    grid = ls.Grid(12)
    phi = wavy_phi(12)
    lines = ls.surface_lines(phi)
    x, ok = ls.refine(layer, torch.from_numpy(phi), lines, grid)
    assert ok.float().mean() > 0.95 and len(ok) > 200
    reference = RegularGridInterpolator((grid.nodes,) * 3, phi, method="linear")
    assert np.abs(reference(x[ok].numpy())).max() < 1e-13
    # the centroids themselves are not on the trilinear surface: the solve moved them
    start = points_from_t(grid, lines, np.zeros(len(ok)))
    assert np.abs(reference(start)).max() > 1e-4
    # and each point stayed on its line and in its cell
    t = numpy_roots(phi, lines, np.zeros(len(ok)))
    np.testing.assert_allclose(x[ok].numpy(), points_from_t(grid, lines, t)[ok.numpy()], rtol=0, atol=1e-13)


def test_implicit_gradient_matches_finite_differences(layer):
    grid = ls.Grid(10)
    phi = wavy_phi(10, seed=1)
    lines = ls.surface_lines(phi)
    rng = np.random.default_rng(2)
    p = torch.tensor(phi, requires_grad=True)
    x, ok = ls.refine(layer, p, lines, grid)
    mask = ok.numpy()
    w = rng.normal(size=(len(mask), 3))
    (x * torch.from_numpy(w))[ok].sum().backward()
    grad = p.grad.numpy()

    def objective(values):
        t = numpy_roots(values, lines, np.zeros(len(mask)))
        return float((points_from_t(grid, lines, t) * w)[mask].sum())

    touched = np.unique(np.ravel_multi_index(ls.corner_index(lines[0][mask]), phi.shape))
    untouched = np.setdiff1d(np.arange(phi.size), touched)
    assert np.all(grad.reshape(-1)[untouched] == 0.0)
    eps = 1e-6
    fd = []
    for flat in rng.choice(touched, size=40, replace=False):
        e = np.zeros(phi.size)
        e[flat] = eps
        e = e.reshape(phi.shape)
        fd.append(((objective(phi + e) - objective(phi - e)) / (2 * eps), grad.reshape(-1)[flat]))
    fd = np.array(fd)
    scale = np.abs(fd[:, 0]).max()
    assert scale > 0.1
    np.testing.assert_allclose(fd[:, 1], fd[:, 0], rtol=0, atol=1e-7 * scale)


def test_root_along_a_cell_edge_has_its_closed_form(layer):
    rng = np.random.default_rng(3)
    B = 64
    c = rng.normal(size=(B, 8))
    c[:, 0] = rng.uniform(0.1, 1.0, B)  # c000 > 0 > c100: the edge along u from corner 000 crosses zero
    c[:, 4] = -rng.uniform(0.1, 1.0, B)
    o = np.zeros((B, 3))
    d = np.tile([1.0, 0.0, 0.0], (B, 1))
    ct = torch.tensor(c, requires_grad=True)
    t = layer(ct, torch.from_numpy(o), torch.from_numpy(d), y0={"t": torch.full((B,), 0.5)}).reshape(-1)
    a, b = c[:, 0], c[:, 4]
    np.testing.assert_allclose(t.detach().numpy(), a / (a - b), rtol=1e-13)
    t.sum().backward()
    expected = np.zeros((B, 8))
    expected[:, 0] = -b / (a - b) ** 2
    expected[:, 4] = a / (a - b) ** 2
    np.testing.assert_allclose(ct.grad.numpy(), expected, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("kind", ls.CLASSES)
def test_surface_samples_lie_on_the_generated_shapes(kind):
    rng = np.random.default_rng(4)
    shape = ls.random_shape(kind, rng)
    pts = shape.sample_surface(3000, rng)
    assert pts.shape == (3000, 3) and np.abs(pts).max() < 1.0
    # on the boundary: points just off the surface along random directions are both inside and outside
    step = 1e-6 * ls._unit(rng, len(pts))
    inside_plus, inside_minus = shape.inside(pts + step), shape.inside(pts - step)
    assert np.mean(inside_plus != inside_minus) > 0.95
    u = shape.to_local(pts)
    if kind == "ellipsoid":
        np.testing.assert_allclose(((u / shape.size["axes"]) ** 2).sum(axis=1), 1.0, rtol=1e-12)
    if kind == "torus":
        R, r = shape.size["R"], shape.size["r"]
        np.testing.assert_allclose((np.hypot(u[:, 0], u[:, 1]) - R) ** 2 + u[:, 2] ** 2, r**2, rtol=1e-10)


def test_ellipsoid_samples_are_area_uniform():
    """Equal-area halves get equal shares: the caps |z| > z0 of an ellipsoid of revolution about z."""
    a, c = 0.3, 0.7
    shape = ls.Shape("ellipsoid", np.eye(3), np.zeros(3), axes=np.array([a, a, c]))
    pts = shape.sample_surface(200_000, np.random.default_rng(5))
    e = np.sqrt(1 - a**2 / c**2)

    def band_area(z):  # area of the prolate spheroid between heights -z and z (closed form)
        s = e * z / c
        return 2 * np.pi * a * (z * np.sqrt(1 - s**2) + c * np.arcsin(s) / e)

    z0 = 0.35
    np.testing.assert_allclose(np.mean(np.abs(pts[:, 2]) < z0), band_area(z0) / band_area(c), atol=0.005)


def test_voxel_and_level_set_start_from_the_labelled_points():
    grid = ls.Grid(16)
    rng = np.random.default_rng(6)
    shape = ls.random_shape("box", rng)
    _, vol, label = ls.observations(shape, grid, 100, rng)
    occ = ls.majority_occupancy(grid, vol, label)
    truth = shape.inside(grid.points()).reshape(occ.shape)
    assert np.mean(occ == truth) > 0.95
    phi0 = ls.signed_distance(grid, occ)
    assert np.array_equal(phi0 > 0, occ)
    np.testing.assert_allclose(np.abs(phi0).min(), grid.h / 2)
