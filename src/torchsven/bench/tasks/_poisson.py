"""Shared Task for the physics-informed Poisson problems (:mod:`torchsven.pde`).

Full batch, float64. The training "batch" is ``(interior, boundary)`` points
drawn once per seed; the validation split is the problem's held-out grid and
the metric its relative L2 error against the exact solution. Sven's rows are
``stack({"pde", "bc"})`` (objective ``0.5 * sum_g w_g MSE_g``); the other
methods minimise exactly that scalar (:meth:`PoissonTask.loss`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ...pde import BoxSampler, PoissonProblem
from .base import Batch, Task, TaskData


class PoissonTask(Task):
    """Base of the Poisson tasks; subclasses set ``problem`` and the point counts."""

    metric = "rel_l2"
    batch_size = None
    evals_per_epoch = 1
    dtype = torch.float64
    problem: ClassVar[PoissonProblem]
    #: (interior, boundary) training points per size.
    points: ClassVar[dict[str, tuple[int, int]]]

    def make_data(self, seed: int) -> TaskData:
        n_interior, n_boundary = self.points[self.size]
        sampler = BoxSampler(self.problem.dim, n_interior, n_boundary, seed=seed, dtype=self.dtype)
        interior, boundary = sampler.sample(0)
        return TaskData((interior, boundary), (self.problem.grid(self.dtype),))

    def make_model(self, seed: int) -> nn.Module:
        return self.problem.make_model(seed=seed, dtype=self.dtype)

    def residuals(self, model: nn.Module, batch: Batch) -> Tensor:
        interior, boundary = batch
        return self.problem.rows(model, interior, boundary)

    def generic_residuals(self, model: nn.Module, batch: Batch) -> Tensor:
        """The same rows with torch.func per-point Jacobians (``rows_pointwise``): the
        generic backend's fast route (its batched autograd through the jets is far slower)."""
        interior, boundary = batch
        return self.problem.rows_pointwise(model, interior, boundary)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        interior, boundary = batch
        return self.problem.loss(model, interior, boundary)

    def samples(self, batch: Batch) -> int:
        # The rows already carry 1/n_g (mean squares): the objective is 0.5 ||r||^2.
        return 1

    def evaluate(self, model: nn.Module, split: Batch) -> dict[str, float]:
        """Relative L2 error against the exact solution at all points of the split
        (validation: the held-out grid; train: the collocation points)."""
        return {"rel_l2": self.problem.relative_l2(model, torch.cat(split))}
