"""Fitting mu and x0 of van der Pol to noisy observations through the ODE layer."""

import torch

import implicit_compiler as ic

f64 = torch.float64


def test_fit_van_der_pol_mu_and_x0(vdp):
    layer = ic.compile(vdp, method="radau5", rtol=1e-8, atol=1e-10)
    te = torch.linspace(0.0, 6.0, 31, dtype=f64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        clean = layer(torch.tensor([2.0, 0.0], dtype=f64), torch.tensor([2.5], dtype=f64), t_eval=te)
        data = clean + 0.01 * torch.randn(clean.shape, dtype=f64, generator=gen)
    mu = torch.tensor([1.5], dtype=f64, requires_grad=True)
    x0 = torch.tensor([1.6, 0.4], dtype=f64, requires_grad=True)
    opt = torch.optim.LBFGS([mu, x0], lr=1.0, max_iter=20, line_search_fn="strong_wolfe")
    losses = []

    def closure():
        opt.zero_grad()
        loss = ((layer(x0, mu, t_eval=te) - data) ** 2).mean()
        loss.backward()
        losses.append(loss.item())
        return loss

    for _ in range(3):
        opt.step(closure)
    # the loss falls to the noise level (variance 1e-4), from above 0.1
    assert losses[0] > 0.1 and losses[-1] < 1.5e-4, (losses[0], losses[-1])
    assert abs(mu.item() - 2.5) < 0.05
    assert (x0.detach() - torch.tensor([2.0, 0.0], dtype=f64)).abs().max() < 0.05
