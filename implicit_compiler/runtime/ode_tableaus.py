"""Butcher tableaus of the ODE layer's integrators (plain NumPy data, no Numba).

Every method here is *stiffly accurate*: its weights ``b`` equal the last row of ``A``, so the
step's result is its last stage value, ``x_{n+1} = X_s``. The runtime (:mod:`.ode`) and its
discrete adjoint rely on that.

``err_kind``: how the local error is estimated --
``0`` none (fixed step), ``1`` ``h sum_j e_j K_j`` with ``e = b - bhat`` (explicit methods),
``2`` ``X_s - X_r`` where the embedded solution is the stage value of row ``r`` (ESDIRK),
``3`` the Radau IIA estimate of Hairer & Wanner (``(I - h g0 J)^{-1} (h g0 f(x_n) + g0 sum_i d_i Z_i)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tableau:
    name: str
    A: np.ndarray
    c: np.ndarray
    order: int
    implicit: bool
    adaptive: bool
    err_kind: int
    err_row: int = -1
    e: np.ndarray | None = None  # b - bhat (err_kind 1) or Radau's d (err_kind 3)
    err_exponent: float = 0.0  # 1 / (order of the error estimate + 1), for the step-size controller
    description: str = ""

    @property
    def stages(self) -> int:
        return self.A.shape[0]

    @property
    def b(self) -> np.ndarray:
        return self.A[-1]


def _backward_euler() -> Tableau:
    return Tableau("backward_euler", np.array([[1.0]]), np.array([1.0]), 1, True, False, 0,
                   description="backward Euler, order 1, L-stable, fixed step")


def _trapezoid() -> Tableau:
    # the trapezoidal rule as the 2-stage Lobatto IIIA method (explicit first stage)
    return Tableau("trapezoid", np.array([[0.0, 0.0], [0.5, 0.5]]), np.array([0.0, 1.0]), 2, True, False, 0,
                   description="trapezoidal rule (Crank-Nicolson), order 2, A-stable, fixed step")


def _radau5() -> Tableau:
    s6 = np.sqrt(6.0)
    A = np.array([
        [(88 - 7 * s6) / 360, (296 - 169 * s6) / 1800, (-2 + 3 * s6) / 225],
        [(296 + 169 * s6) / 1800, (88 + 7 * s6) / 360, (-2 - 3 * s6) / 225],
        [(16 - s6) / 36, (16 + s6) / 36, 1.0 / 9],
    ])
    c = np.array([(4 - s6) / 10, (4 + s6) / 10, 1.0])
    d = np.array([-13 - 7 * s6, -13 + 7 * s6, -1.0]) / 3
    return Tableau("radau5", A, c, 5, True, True, 3, e=d, err_exponent=0.25,
                   description="Radau IIA, 3 stages, order 5, L-stable, adaptive")


def _kvaerno43() -> Tableau:
    # Kvaerno (BIT 44, 2004): ESDIRK 4(3), 5 stages, stiffly accurate, L-stable; the embedded
    # third-order solution is the fourth stage value.
    g = 0.5728160625

    def poly(*coef):
        return np.polyval(coef, g)

    q = poly(12, -6, 1)
    a21 = g
    a31 = poly(144, -180, 81, -15, 1) * g / q ** 2
    a32 = poly(-36, 39, -15, 2) * g / q ** 2
    a41 = poly(-144, 396, -330, 117, -18, 1) / (12 * g ** 2 * poly(12, -9, 2))
    a42 = poly(72, -126, 69, -15, 1) / (12 * g ** 2 * poly(3, -1))
    a43 = poly(-6, 6, -1) * q ** 2 / (12 * g ** 2 * poly(12, -9, 2) * poly(3, -1))
    a51 = poly(288, -312, 120, -18, 1) / (48 * g ** 2 * poly(12, -9, 2))
    a52 = poly(24, -12, 1) / (48 * g ** 2 * poly(3, -1))
    a53 = -q ** 3 / (48 * g ** 2 * poly(3, -1) * poly(12, -9, 2) * poly(6, -6, 1))
    a54 = poly(-24, 36, -12, 1) / poly(24, -24, 4)
    A = np.array([
        [0, 0, 0, 0, 0],
        [a21, g, 0, 0, 0],
        [a31, a32, g, 0, 0],
        [a41, a42, a43, g, 0],
        [a51, a52, a53, a54, g],
    ], dtype=float)
    c = A.sum(axis=1)
    c[3] = c[4] = 1.0
    return Tableau("esdirk", A, c, 4, True, True, 2, err_row=3, err_exponent=0.25,
                   description="ESDIRK 4(3) of Kvaerno, 5 stages, order 4, L-stable, adaptive")


def _dopri5() -> Tableau:
    A = np.array([
        [0, 0, 0, 0, 0, 0, 0],
        [1 / 5, 0, 0, 0, 0, 0, 0],
        [3 / 40, 9 / 40, 0, 0, 0, 0, 0],
        [44 / 45, -56 / 15, 32 / 9, 0, 0, 0, 0],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729, 0, 0, 0],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656, 0, 0],
        [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0],
    ])
    c = np.array([0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1])
    bhat = np.array([5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40])
    return Tableau("dopri5", A, c, 5, False, True, 1, e=A[-1] - bhat, err_exponent=0.2,
                   description="Dormand-Prince 5(4), explicit, adaptive (non-stiff problems)")


TABLEAUS = {t.name: t for t in (_backward_euler(), _trapezoid(), _radau5(), _kvaerno43(), _dopri5())}
ODE_METHODS = tuple(TABLEAUS)
