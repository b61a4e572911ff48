"""Shared Task for the physics-informed problems (:mod:`torchsven.pde`).

Full batch, float64. The training "batch" is the problem's point sets
(Poisson: ``(interior, boundary)``; heat: ``(interior, initial, boundary)``)
drawn once per seed; the validation split is the problem's held-out grid and
the metric its relative L2 error against the exact solution. Sven's rows are
the problem's ``rows`` (weighted groups from one forward-Laplacian jet over
all points, so ``backend="auto"`` runs the factored backend); the other
methods minimise exactly that objective as a scalar (:meth:`PDETask.loss`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...pde import BoxSampler, PoissonProblem
from .base import Batch, Task, TaskData


class PDETask(Task):
    """Base of the PDE tasks; subclasses set ``problem`` and ``points`` and ``make_points``."""

    metric = "rel_l2"
    batch_size = None
    evals_per_epoch = 1
    #: the relative L2 on the held-out grid every 5 steps (it costs about a step)
    eval_every = 5
    dtype = torch.float64
    problem: ClassVar[Any]
    #: training point counts per point set, per size
    points: ClassVar[dict[str, tuple[int, ...]]]

    def make_points(self, seed: int) -> Batch:
        """The training point sets for ``self.size`` from ``seed``."""
        raise NotImplementedError

    def make_data(self, seed: int) -> TaskData:
        return TaskData(self.make_points(seed), (self.problem.grid(self.dtype),))

    def make_model(self, seed: int) -> nn.Module:
        return self.problem.make_model(seed=seed, dtype=self.dtype)

    def residuals(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.problem.rows(model, *batch)

    def sven_residuals(self, model: nn.Module, batch: Batch, backend: str) -> Tensor:
        """Jet rows for the factored backend; the same rows by ``pointwise_rows`` for the
        generic one, whose batched backward through the jet graph is slow (Poisson 2D,
        920 rows: 13.5 s vs 0.23 s per step measured at load 13)."""
        if backend == "generic":
            return self.problem.rows_pointwise(model, *batch)
        return self.residuals(model, batch)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.problem.loss(model, *batch)

    def samples(self, batch: Batch) -> int:
        # The rows already carry 1/n_g (mean squares): the objective is 0.5 ||r||^2.
        return 1

    def evaluate(self, model: nn.Module, split: Batch) -> dict[str, float]:
        """Relative L2 error against the exact solution at all points of the split
        (validation: the held-out grid; train: the collocation points)."""
        return {"rel_l2": self.problem.relative_l2(model, torch.cat(split))}


class PoissonTask(PDETask):
    """Base of the Poisson tasks: ``(interior, boundary)`` points from a :class:`BoxSampler`."""

    problem: ClassVar[PoissonProblem]

    def make_points(self, seed: int) -> Batch:
        n_interior, n_boundary = self.points[self.size]
        sampler = BoxSampler(self.problem.dim, n_interior, n_boundary, seed=seed, dtype=self.dtype)
        return sampler.sample(0)
