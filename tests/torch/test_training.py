"""A compiled layer trains inside an ordinary PyTorch model (nn.Module, optimiser, shared parameter)."""

import sympy as sp
import torch

import implicit_compiler as ic


def test_kepler_eccentricity_is_learned():
    E, M, e = sp.symbols("E M e")
    layer = ic.compile(ic.ResidualSystem([E - e * sp.sin(E) - M], unknowns={"E": E}, params={"M": M, "e": e}))
    Ms = torch.linspace(0.1, 3.0, 32, dtype=torch.float64)
    with torch.no_grad():
        target = layer(Ms, torch.tensor(0.6, dtype=torch.float64), y0={"E": Ms})
    model = torch.nn.Module()
    model.logit = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    model.kepler = layer
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = ((model.kepler(Ms, torch.sigmoid(model.logit), y0={"E": Ms}) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-3 * losses[0]
    assert abs(torch.sigmoid(model.logit).item() - 0.6) < 1e-2
