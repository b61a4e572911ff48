"""heat-1d: u_t = u_xx / 4 on [0,1]^2 (x, t), MLP 2-32-32-1 tanh, float64."""

from __future__ import annotations

from typing import ClassVar

from ...pde import HeatProblem, heat_1d
from . import register
from ._poisson import PDETask
from .base import Batch


@register
class Heat1D(PDETask):
    """400 interior + 60 initial + 80 boundary points (540 rows); relative L2 on a
    101 x 101 grid of (x, t). Exact solution ``exp(-pi^2 t / 4) sin(pi x)``.

    Goal (issue 15): relative L2 <= 1e-5 within 200 Sven steps on the factored backend.
    """

    name = "heat-1d"
    summary = "PINN u_t = u_xx/4 on [0,1]^2, MLP 2-32-32-1 tanh, 400+60+80 pts, float64"
    order = 62
    problem: ClassVar[HeatProblem] = heat_1d()
    epochs: ClassVar[dict[str, int]] = {"full": 200, "quick": 20, "tiny": 2}
    points: ClassVar[dict[str, tuple[int, ...]]] = {
        "full": (400, 60, 80),
        "quick": (400, 60, 80),
        "tiny": (30, 8, 8),
    }

    def make_points(self, seed: int) -> Batch:
        return self.problem.sample(*self.points[self.size], seed=seed, dtype=self.dtype)
