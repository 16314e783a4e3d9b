"""Test functions of every optimization course: Rosenbrock's valley and a rotated quadratic."""

from __future__ import annotations

import math

import torch

__all__ = ["ROSENBROCK_START", "Quadratic", "rosenbrock"]

# Rosenbrock (1960)'s own starting point, the classic one of textbooks.
ROSENBROCK_START = (-1.2, 1.0)


def rosenbrock(x: torch.Tensor, a: float = 1.0, b: float = 100.0) -> torch.Tensor:
    """:math:`\\sum_i (a - x_i)^2 + b (x_{i+1} - x_i^2)^2`, minimum 0 at ``(a, a^2, ...)``.

    The coordinates run along the first dimension of ``x``: ``(n,)`` is one point, and a
    ``(2, H, W)`` grid gives the ``(H, W)`` surface of a contour plot.
    """
    x0, x1 = x[:-1], x[1:]
    return ((a - x0) ** 2 + b * (x1 - x0**2) ** 2).sum(0)


class Quadratic:
    """:math:`f(x) = \\tfrac12 x^\\top A x` with eigenvalues from ``1 / condition`` to 1.

    The eigenvalues are log-spaced; the eigenvectors are rotated away from the coordinate
    axes (by 30 degrees in 2-D, a seeded random rotation above) so that a diagonal
    preconditioner such as Adam's cannot undo the conditioning for free. Minimum 0 at 0.
    """

    def __init__(self, dim: int = 2, condition: float = 100.0):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
            raise ValueError(f"Invalid dim: {dim} (expected an integer >= 2)")
        if not condition >= 1.0:
            raise ValueError(f"Invalid condition: {condition} (expected condition >= 1)")
        self.dim, self.condition = dim, float(condition)
        eig = torch.logspace(-math.log10(condition), 0.0, dim, dtype=torch.float64)
        if dim == 2:
            c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
            q = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        else:
            g = torch.Generator().manual_seed(0)
            q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.matrix = (q * eig) @ q.T

    def start(self) -> tuple[float, ...]:
        """The default starting point: the unit diagonal ``(1, 1, ...)`` scaled to norm 2."""
        return tuple([2.0 / math.sqrt(self.dim)] * self.dim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Value at ``x`` of shape ``(dim,)`` or ``(dim, ...)`` (a grid of points)."""
        a = self.matrix.to(x.dtype)
        flat = x.reshape(self.dim, -1)
        return 0.5 * (flat * (a @ flat)).sum(0).reshape(x.shape[1:])
