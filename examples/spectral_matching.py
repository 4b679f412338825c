"""Graph matching with power iteration, spectral matching (SM) and SMAC layers (the paper's section 4.2).

Two sets of K landmarks (the paper: K = 8, y ∈ R^64, M 64x64) are matched through a relaxed
quadratic assignment problem on the affinity matrix M, y[K i + a] = "source landmark i is target a".
Four layers turn M into a matching, trained on the same data from the same start:

* **PI-5, PI-10**: power iteration ``y <- M y / ||M y||`` unrolled for 5 and 10 steps (the paper's
  baseline, autograd through the steps);
* **SM**: ``y* = argmax yᵀ M y  s.t.  yᵀ y = 1`` (eq. 19), an ``ic.Problem`` whose forward pass is a
  NumPy eigensolver (``forward=``) and whose backward pass is the implicit function theorem on the
  compiled KKT system (eq. 20);
* **SMAC**: ``y* = argmax yᵀ M y / yᵀ y  s.t.  C y = 1, y >= 0`` (eq. 21), C the row and column sums of
  the K x K assignment matrix (rank 2K - 1: the compiler drops the redundant sum, see
  docs/optimization.md), forward by the project's interior point from the uniform assignment
  ``y = 1/K`` (at ``y = 0`` the quotient is 0/0), backward by the compiled KKT system.

PI and SM give a unit vector; as in the paper's pipeline, a bi-stochastic layer (Sinkhorn row/column
normalisation of |y| as a K x K matrix) turns it into a doubly-stochastic confidence map S. SMAC's
output is doubly stochastic already (the paper's point) and is used as S directly. A voting layer
predicts each source landmark's position in the target, ``p_i = Σ_a S_ia x_a``; the loss is the mean
squared displacement error and the metric is PCK at α = 0.1: a landmark is correct when its
prediction lies within α times the diagonal of the target's bounding box of the truth.

Data (generated; the paper uses CUB-200-2011 bird images with VGG features): source landmarks
uniform in the unit square, Delaunay graph on the source (``scipy.spatial.Delaunay``), a fully
connected target obtained by a random rotation, scaling, translation, small noise and, for about one
landmark in eight, a large displacement (an outlier); each landmark has six feature channels, two
informative (shared with its match up to small noise) and four heavily corrupted in the target.
M has the node affinities ``exp(-Σ_c w_c (f_ic - g_ac)²)`` on its diagonal and the edge affinities
``β exp(-(d_ij - d_ab)² / σ²)`` (lengths relative to each graph's mean) for the source's Delaunay
edges ij and all target pairs ab. The layers learn w, β and σ.

Run: ``python examples/spectral_matching.py`` (4 landmarks, all four layers, 60 training iterations;
``--landmarks K`` for another size, ``--layers PI-5,SM`` for some of the layers; ``--quick``: 3
landmarks and a few iterations, for the tests). The paper's size, ``--landmarks 8``, runs for PI and
SM (``--layers PI-5,PI-10,SM``; SM compiles in about 2 CPU minutes) but not yet for SMAC: every
stationarity row of ``yᵀMy / yᵀy`` holds the whole quadratic form, so ``dF/dθ`` is dense (64 x 2080
entries of large expressions) and the symbolic derivation alone did not finish in 15 minutes (wall
clock, loaded 2-core machine).
Prints, per layer, the test PCK before and after training and the time per training iteration
(forward + backward of the batch); saves ``spectral_matching.png`` (test PCK against training
iterations, and the time per iteration) when matplotlib is installed.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import sympy as sp
import torch
from scipy.spatial import Delaunay

import implicit_compiler as ic

D_INFO, D_NOISE = 2, 4  # informative and corrupted feature channels
ALPHA = 0.1  # PCK threshold, relative to the target's bounding-box diagonal


# ---------------------------------------------------------------------- layers
def _symmetric(N):
    """The symmetric N x N matrix of the upper-triangle symbols m (what the compiled layers take)."""
    iu = np.triu_indices(N)
    m = sp.symbols(f"m0:{len(iu[0])}")
    M = sp.zeros(N, N)
    for k, (i, j) in enumerate(zip(*iu)):
        M[i, j] = M[j, i] = m[k]
    return m, M, iu


def build_sm(K: int):
    """SM: argmax yᵀMy s.t. yᵀy = 1, eigensolver forward, KKT backward."""
    N = K * K
    m, M, iu = _symmetric(N)
    y = sp.Matrix(sp.symbols(f"y0:{N}"))

    def leading_eigenvector(mv):
        A = np.zeros((len(mv), N, N))
        A[:, iu[0], iu[1]] = mv
        A[:, iu[1], iu[0]] = mv
        v = np.linalg.eigh(A)[1][:, :, -1]
        return v * np.where(v.sum(axis=1) < 0, -1.0, 1.0)[:, None]  # the Perron vector of M >= 0

    problem = ic.Problem((y.T * M * y)[0], variables={"y": y}, params={"m": list(m)},
                         equalities=[(y.T * y)[0] - 1], maximize=True, name=f"spectral_matching_{N}")
    return ic.compile(problem, forward=leading_eigenvector)


def smac_problem(K: int) -> ic.Problem:
    """SMAC (eq. 21): argmax yᵀMy / yᵀy s.t. C y = 1 (row and column sums), y >= 0."""
    N = K * K
    m, M, _ = _symmetric(N)
    y = sp.Matrix(sp.symbols(f"y0:{N}"))
    Y = y.reshape(K, K)
    sums = [sum(Y[i, :]) - 1 for i in range(K)] + [sum(Y[:, a]) - 1 for a in range(K)]
    return ic.Problem((y.T * M * y)[0] / (y.T * y)[0], variables={"y": y}, params={"m": list(m)},
                      equalities=sums, inequalities=[-v for v in y], maximize=True, name=f"smac_{N}")


def build_smac(K: int):
    # a sample the interior point does not solve keeps its last iterate and gets no gradient (counted);
    # entries of y that reach 0 with a vanishing multiplier are weakly active (one-sided gradient), which
    # the layer would warn about on every call: expected here, so not reported
    return ic.compile(smac_problem(K), max_iter=200, on_failure="keep", warn_weakly_active=False)


def power_iteration(M, steps: int):
    v = torch.full(M.shape[:2], 1.0 / np.sqrt(M.shape[1]), dtype=M.dtype)
    for _ in range(steps):
        v = torch.einsum("bij,bj->bi", M, v)
        v = v / v.norm(dim=1, keepdim=True)
    return v


def sinkhorn(Y, iters: int = 10, eps: float = 1e-9):
    S = Y.abs() + eps
    for _ in range(iters):
        S = S / S.sum(dim=2, keepdim=True)
        S = S / S.sum(dim=1, keepdim=True)
    return S / S.sum(dim=2, keepdim=True)


# ---------------------------------------------------------------------- data
def make_pairs(count: int, K: int, rng: np.random.Generator):
    """Source and target landmarks, features and Delaunay edges; target a is source perm[a]."""
    P = rng.uniform(0, 1, (count, K, 2))
    F = np.concatenate([rng.normal(0, 1, (count, K, D_INFO)), rng.normal(0, 0.3, (count, K, D_NOISE))], axis=2)
    perm = np.stack([rng.permutation(K) for _ in range(count)])
    idx = np.arange(count)[:, None]
    angle = rng.uniform(0, 2 * np.pi, count)
    rot = np.stack([np.stack([np.cos(angle), -np.sin(angle)], -1), np.stack([np.sin(angle), np.cos(angle)], -1)], 1)
    scale = rng.uniform(0.7, 1.4, count)[:, None, None]
    Pt = scale * np.einsum("bij,bkj->bki", rot, P[idx, perm]) + rng.uniform(-0.5, 0.5, (count, 1, 2))
    Pt += rng.normal(0, 0.02, Pt.shape)
    outlier = rng.uniform(0, 1, (count, K, 1)) < 1.0 / 8
    Pt += outlier * rng.normal(0, 0.25, Pt.shape)
    Ft = F[idx, perm].copy()
    Ft[:, :, :D_INFO] += rng.normal(0, 0.15, (count, K, D_INFO))
    Ft[:, :, D_INFO:] += rng.normal(0, 1.5, (count, K, D_NOISE))  # corrupted channels
    edges = np.zeros((count, K, K))
    for b in range(count):
        for simplex in Delaunay(P[b]).simplices:
            for u in simplex:
                for v in simplex:
                    if u != v:
                        edges[b, u, v] = 1.0
    truth = np.argsort(perm, axis=1)  # source i matches target truth[i]
    diag = np.linalg.norm(Pt.max(axis=1) - Pt.min(axis=1), axis=1)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    return {"P": t(P), "F": t(F), "Pt": t(Pt), "Ft": t(Ft), "E": t(edges), "goal": t(Pt[idx, truth]),
            "diag": t(diag)}


def affinity(d, log_w, log_beta, log_sigma):
    """M[(i,a),(j,b)]: node similarity on the diagonal, edge-length consistency for Delaunay edges ij."""
    B, K = d["P"].shape[:2]
    w = torch.exp(log_w)
    unary = torch.exp(-(((d["F"][:, :, None, :] - d["Ft"][:, None, :, :]) ** 2) * w).sum(-1))  # (B, i, a)
    ds = torch.cdist(d["P"], d["P"])
    dt = torch.cdist(d["Pt"], d["Pt"])
    ds = ds / (ds.sum((1, 2), keepdim=True) / (K * (K - 1)))
    dt = dt / (dt.sum((1, 2), keepdim=True) / (K * (K - 1)))
    sigma = torch.exp(log_sigma)
    pair = torch.exp(-((ds[:, :, None, :, None] - dt[:, None, :, None, :]) / sigma) ** 2)  # (B, i, a, j, b)
    eye = torch.eye(K, dtype=ds.dtype)
    different = 1.0 - torch.clamp(eye[:, None, :, None] + eye[None, :, None, :], max=1.0)  # i != j and a != b
    pair = pair * different * d["E"][:, :, None, :, None]
    N = K * K
    return torch.exp(log_beta) * pair.reshape(B, N, N) + torch.diag_embed(unary.reshape(B, N))


# ---------------------------------------------------------------------- one method
class Method:
    def __init__(self, name: str, K: int, layer=None, steps: int = 0):
        self.name, self.K, self.layer, self.steps = name, K, layer, steps
        self.iu = np.triu_indices(K * K)
        self.failed = self.solved = 0  # SMAC samples the interior point did not solve (kept, zero gradient)
        self.causes = {}  # their statuses

    def confidence(self, M):
        """The doubly-stochastic K x K confidence map S of each affinity matrix."""
        B, K = M.shape[0], self.K
        if self.name.startswith("PI"):
            return sinkhorn(power_iteration(M, self.steps).reshape(B, K, K))
        m = M[:, self.iu[0], self.iu[1]]
        if self.name == "SM":
            return sinkhorn(self.layer(m).reshape(B, K, K))
        y, info = self.layer(m, y0=torch.full((K * K,), 1.0 / K, dtype=torch.float64), return_info=True)
        self.failed += int((~info.converged).sum())
        self.solved += B
        for code in info.status[~info.converged].tolist():
            name = ic.Status(code).name
            self.causes[name] = self.causes.get(name, 0) + 1
        return y.reshape(B, K, K)  # doubly stochastic by its constraints


def predict(method, d, theta):
    S = method.confidence(affinity(d, *theta))
    return torch.einsum("bia,bax->bix", S, d["Pt"])  # the voting layer


def pck(pred, d) -> float:
    err = (pred.detach() - d["goal"]).norm(dim=2)
    return float((err <= ALPHA * d["diag"][:, None]).double().mean())


def train(method, train_data, test_data, iters: int, every: int):
    theta = [torch.zeros(D_INFO + D_NOISE, dtype=torch.float64, requires_grad=True),
             torch.tensor(-1.0, dtype=torch.float64, requires_grad=True),
             torch.tensor(np.log(0.5), dtype=torch.float64, requires_grad=True)]
    opt = torch.optim.Adam(theta, lr=0.08)
    curve, times = [], []
    for it in range(iters + 1):
        if it % every == 0 or it == iters:
            with torch.no_grad():
                curve.append((it, pck(predict(method, test_data, theta), test_data)))
        if it == iters:
            break
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = ((predict(method, train_data, theta) - train_data["goal"]) ** 2).sum(2).mean()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    beta, sigma = (float(torch.exp(t.detach())) for t in theta[1:])
    print(f"{method.name:6s} learned beta {beta:.3f}, sigma {sigma:.3f}")
    return curve, float(np.median(times)), torch.exp(theta[0]).detach().numpy()


LAYERS = ("PI-5", "PI-10", "SM", "SMAC")


def main(quick: bool = False, out: str | None = None, landmarks: int | None = None, layers=LAYERS) -> dict:
    K = landmarks or (3 if quick else 4)
    unknown = sorted(set(layers) - set(LAYERS))
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; the layers are {list(LAYERS)}")
    n_train, n_test, iters, every = (16, 32, 8, 4) if quick else (32, 100, 60, 5)
    rng = np.random.default_rng(0)
    train_data = make_pairs(n_train, K, rng)
    test_data = make_pairs(n_test, K, rng)
    methods = [Method(f"PI-{n}", K, steps=n) for n in (5, 10) if f"PI-{n}" in layers]
    compile_s = {}
    for name, build in (("SM", build_sm), ("SMAC", build_smac)):
        if name not in layers:
            continue
        t0 = time.perf_counter()
        methods.append(Method(name, K, build(K)))
        compile_s[name] = time.perf_counter() - t0
        print(f"{name} layer ready in {compile_s[name]:.1f} s")
    results = {}
    print(f"{K} landmarks (y in R^{K * K}), {n_train} training and {n_test} test pairs, {iters} iterations")
    for method in methods:
        curve, per_iter, w = train(method, train_data, test_data, iters, every)
        results[method.name] = {"curve": curve, "pck_before": curve[0][1], "pck_after": curve[-1][1],
                                "seconds_per_iteration": per_iter, "weights": w,
                                "failed_fraction": method.failed / max(1, method.solved)}
        print(f"{method.name:6s} test PCK@{ALPHA}: {curve[0][1]:.3f} -> {curve[-1][1]:.3f}   "
              f"{1e3 * per_iter:7.1f} ms per iteration   channel weights {np.array2string(w, precision=2)}"
              + (f"   unsolved samples {method.failed}/{method.solved} {method.causes}" if method.solved else ""))
    out = "." if out is None and not quick else out
    if out is not None:
        _plot(results, f"{out}/spectral_matching.png", K)
    return {"landmarks": K, "compile_seconds": compile_s, **results}


def _plot(results, path, K):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    for name, r in results.items():
        its, vals = zip(*r["curve"])
        a1.plot(its, vals, marker="o", ms=3, label=name)
    a1.set_xlabel("training iteration")
    a1.set_ylabel(f"test PCK (α = {ALPHA})")
    a1.set_title(f"graph matching, {K} landmarks")
    a1.legend()
    names = list(results)
    a2.bar(names, [1e3 * results[n]["seconds_per_iteration"] for n in names], color="tab:gray")
    a2.set_ylabel("ms per training iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved {path}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(quick="--quick" in args, landmarks=int(args[args.index("--landmarks") + 1]) if "--landmarks" in args else None,
         layers=args[args.index("--layers") + 1].split(",") if "--layers" in args else LAYERS)
