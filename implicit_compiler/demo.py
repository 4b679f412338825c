"""The quickstart: the paper's appendix system, end to end.

    F1 = x^2 + y1^2 + y2^2 - 4,   F2 = x y1 - 1,   solution (1, sqrt 2) at x = 1,
    dy/dx = -[[2, 2 sqrt 2], [1, 0]]^{-1} [2, 1]^T = (-1, 0) there.
"""

from __future__ import annotations

import time

import numpy as np
import sympy as sp
import torch

from .compiler import compile
from .symbolic.system import ResidualSystem


def appendix_system() -> ResidualSystem:
    x = sp.Symbol("x")
    y1, y2 = sp.symbols("y1 y2")
    return ResidualSystem(
        residuals=[x**2 + y1**2 + y2**2 - 4, x * y1 - 1],
        unknowns=[y1, y2],
        params=[x],
        initial_guess=[1.0, 1.5],
        name="appendix",
    )


def run(cache_dir=None) -> None:
    system = appendix_system()
    print("Residuals F(y, x):")
    for i, r in enumerate(system.residuals):
        print(f"  F{i + 1} = {r}")
    print("\ndF/dy =")
    sp.pprint(system.jacobian_unknowns)
    print("dF/dx =")
    sp.pprint(system.jacobian_params)
    print("dy/dx = -(dF/dy)^-1 dF/dx =")
    sp.pprint(system.implicit_jacobian())

    t = time.perf_counter()
    layer = compile(system, cache_dir=cache_dir)
    hit = "loaded from cache" if layer.compile_report["cache_hit"] else "compiled"
    print(f"\nLayer {hit} in {time.perf_counter() - t:.2f} s: {layer.path}")

    xs = torch.tensor([[1.0], [0.9], [1.2]], dtype=torch.float64, requires_grad=True)
    y, info = layer(xs, return_info=True)
    y[:, 0].sum().backward()
    print("\n   x        y1         y2        dy1/dx    closed form  status")
    for k in range(xs.shape[0]):
        x = xs[k, 0].item()
        closed = -1.0 / x**2  # y1 = 1/x
        print(f"  {x:.2f}  {y[k, 0].item():.8f}  {y[k, 1].item():.8f}  {xs.grad[k, 0].item():+.8f}"
              f"  {closed:+.8f}  {info.status[k].item()} ({info.iterations[k].item()} it)")
    err = abs(y[0, 1].item() - np.sqrt(2.0))
    print(f"\nAt x = 1: y = (1, sqrt 2) to {err:.1e}; exact Jacobian dy/dx = (-1, 0).")
