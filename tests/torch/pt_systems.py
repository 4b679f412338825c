"""Systems shared by the torch-integration tests (test_func, test_compile, test_pickle), with closed forms.

Each is the same system as in another test file, so the kernel cache holds one module for both:
  appendix  x^2 + y1^2 + y2^2 = 4, x y1 = 1:   y1 = 1/x, y2 = sqrt(4 - x^2 - 1/x^2)   (tests/conftest.py)
  two       u = a b, v^3 + v = c:               du/da = b, du/db = a, dv/dc = 1/(3 v^2 + 1)  (test_reliability)
  cosfp     y = cos(t y) (Anderson)                                                  (test_reliability)
  qp        argmin |y|^2/2 + q.y  s.t.  y <= h:  y = min(-q, h)                      (tests/problem/test_training)

Module-level functions only: ``qp_projection`` is the custom forward a pickled problem layer carries
by reference, so a fresh process must be able to import it.
"""

import numpy as np
import sympy as sp
import torch

import implicit_compiler as ic
from tests.conftest import appendix_system

N_QP = 3


def appendix_ref(x):
    """(y, dy/dx) in closed form: y of shape (..., 2), dy/dx of shape (..., 2)."""
    x = np.asarray(x, dtype=np.float64)
    y1, y2 = 1 / x, np.sqrt(4 - x**2 - 1 / x**2)
    return np.stack([y1, y2], axis=-1), np.stack([-1 / x**2, (-x + x**-3) / y2], axis=-1)


def two_system():
    a, b, c = sp.symbols("a b c")
    u, v = sp.symbols("u v")
    return ic.ResidualSystem([u - a * b, v**3 + v - c], unknowns={"u": u, "v": v}, params={"a": a, "b": b, "c": c})


def two_v(c):
    c = np.asarray(c, dtype=np.float64)
    return np.cbrt(c / 2 + np.sqrt(c**2 / 4 + 1 / 27)) + np.cbrt(c / 2 - np.sqrt(c**2 / 4 + 1 / 27))


def cos_system():
    y, t = sp.symbols("y t")
    return ic.FixedPoint(map=[sp.cos(t * y)], unknowns=[y], params=[t], method="anderson")


def qp_problem():
    y = sp.Matrix(sp.symbols(f"y0:{N_QP}"))
    q = sp.Matrix(sp.symbols(f"q0:{N_QP}"))
    h = sp.Matrix(sp.symbols(f"h0:{N_QP}"))
    return ic.Problem((y.T * y)[0] / 2 + (q.T * y)[0], variables={"y": y}, params={"q": q, "h": h},
                      inequalities=list(y - h))


def qp_projection(q, h):
    """Custom forward of the QP: its exact solution min(-q, h), per sample."""
    return np.minimum(-q, h)


def qp_ref(q, h):
    """(y, dy_i/dq_i, dy_i/dh_i) for constraints strictly active or inactive."""
    q, h = np.asarray(q, dtype=np.float64), np.asarray(h, dtype=np.float64)
    active = h < -q
    return np.minimum(-q, h), np.where(active, 0.0, -1.0), np.where(active, 1.0, 0.0)


APPENDIX_Y0 = torch.tensor([1.0, 1.5], dtype=torch.float64)


class AppendixModel(torch.nn.Module):
    """x -> Linear -> appendix layer -> weighted sum: a model with learned weights around a layer."""

    def __init__(self, layer):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.fill_(0.5)
            self.lin.bias.fill_(0.5)
        self.layer = layer

    def forward(self, x):
        y = self.layer(self.lin(x), y0=APPENDIX_Y0)
        return (y * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum(-1)


__all__ = ["AppendixModel", "APPENDIX_Y0", "appendix_system", "appendix_ref", "two_system", "two_v", "cos_system",
           "qp_problem", "qp_projection", "qp_ref", "N_QP"]
