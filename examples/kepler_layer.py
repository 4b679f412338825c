"""Kepler's equation as a trainable layer: fit the eccentricity e so that the eccentric anomaly
E(M; e), defined implicitly by E - e sin E = M, matches observations.

Run: python examples/kepler_layer.py  (prints the loss going down and the recovered e; saves
kepler_fit.png when matplotlib is installed).
"""

import numpy as np
import sympy as sp
import torch

import implicit_compiler as ic


def main():
    E, M, e = sp.symbols("E M e")
    layer = ic.compile(ic.ResidualSystem([E - e * sp.sin(E) - M], unknowns={"E": E},
                                         params={"M": M, "e": e}, name="kepler"))
    torch.manual_seed(0)
    Ms = torch.linspace(0.1, 3.0, 64, dtype=torch.float64)
    true_e = torch.tensor(0.6, dtype=torch.float64)
    with torch.no_grad():
        observed = layer(Ms, true_e, y0={"E": Ms}) + 1e-4 * torch.randn(64, dtype=torch.float64)
    logit = torch.zeros((), dtype=torch.float64, requires_grad=True)  # e = sigmoid(logit) in (0, 1)
    opt = torch.optim.Adam([logit], lr=0.1)
    for step in range(150):
        opt.zero_grad()
        pred = layer(Ms, torch.sigmoid(logit), y0={"E": Ms})
        loss = ((pred - observed) ** 2).mean()
        loss.backward()  # through the implicit function theorem: dE/de = sin E / (1 - e cos E)
        opt.step()
        if step % 30 == 0:
            print(f"step {step:3d}  loss {loss.item():.3e}  e = {torch.sigmoid(logit).item():.4f}")
    print(f"recovered e = {torch.sigmoid(logit).item():.4f} (true 0.6)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    plt.plot(Ms, observed, ".", label="observed")
    plt.plot(Ms, pred.detach(), label="fitted layer")
    plt.xlabel("mean anomaly M")
    plt.ylabel("eccentric anomaly E")
    plt.legend()
    plt.savefig("kepler_fit.png", dpi=100)
    print("saved kepler_fit.png")
    assert np.isfinite(loss.item())


if __name__ == "__main__":
    main()
