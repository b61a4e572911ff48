"""Curve fitting: the data-fitting problems of the Moré-Garbow-Hillstrom set.

Eleven of the 35 problems in :mod:`torchsven.problems.mgh` fit a model to data
(Bard, Gaussian, Meyer, Gulf, Box 3-D, Kowalik-Osborne, Brown-Dennis, Osborne 1
and 2, Biggs EXP6, Watson); each is a task ``mgh-<name>`` of the family
``"mgh"``, which the report shows as one table. The "model" is the parameter
vector itself, full batch, float64. Seeds follow Moré's protocol: seed ``s``
starts from ``10**s`` times the standard start (seeds 0, 1, 2: x0, 10 x0,
100 x0; a zero start becomes ``10**s`` in every entry, as in MINPACK's
drivers). Metric: the cost ``0.5 sum_i f_i^2``; a run *solves* the problem when
its best cost is within 1e-4 (relative) of half the published minimum, or below
it (absolute 1e-12 on zero-residual problems). Every method minimises that cost
(``samples`` is 1, so the first-order loss is the same ``0.5 ||f||^2``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ...problems.mgh import PROBLEMS, Problem
from . import register
from .base import Batch, Task, TaskData

__all__ = ["CURVE_FITTING", "MGHTask", "ParameterVector", "solved"]

#: The data-fitting problems of the set (problem numbers 8-12 and 15-20).
CURVE_FITTING = (
    "bard",
    "gaussian",
    "meyer",
    "gulf",
    "box_3d",
    "kowalik_osborne",
    "brown_dennis",
    "osborne1",
    "biggs_exp6",
    "osborne2",
    "watson",
)
#: The two the quick suite (``make bench``) includes.
QUICK = ("kowalik_osborne", "osborne1")
#: Relative and absolute slack of :func:`solved`.
SOLVED_RTOL, SOLVED_ATOL = 1e-4, 1e-12


def solved(cost: float, fmin: float | None) -> bool:
    """``cost <= 0.5 fmin (1 + 1e-4) + 1e-12`` (``fmin`` is the published ``sum f_i^2``)."""
    if fmin is None:
        return False
    return cost <= 0.5 * fmin * (1 + SOLVED_RTOL) + SOLVED_ATOL


class ParameterVector(nn.Module):
    """A module holding one parameter vector ``x`` (n,); ``forward()`` returns it."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(x)

    def forward(self) -> Tensor:
        return self.x


class MGHTask(Task):
    """Base of the ``mgh-*`` tasks; subclasses set ``problem``."""

    family = "mgh"
    metric = "cost"
    batch_size = None
    dtype = torch.float64
    epochs: ClassVar[dict[str, int]] = {"full": 100, "quick": 40, "tiny": 3}
    problem: ClassVar[Problem]

    def start(self, seed: int) -> Tensor:
        """Moré's protocol: ``10**seed`` times the standard start (MINPACK's test drivers:
        a zero start becomes ``10**seed`` in every entry for seed > 0)."""
        x0 = torch.tensor(self.problem.x0, dtype=self.dtype)
        factor = 10.0**seed
        if seed > 0 and not bool(x0.any()):
            return torch.full_like(x0, factor)
        return x0 * factor

    def make_data(self, seed: int) -> TaskData:
        empty = torch.zeros(1, 0, dtype=self.dtype)
        return TaskData((empty,), (empty,), {"fmin": self.problem.fmin})

    def make_model(self, seed: int) -> nn.Module:
        return ParameterVector(self.start(seed))

    def residuals(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.problem.residuals(model())

    def sample_losses(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.residuals(model, batch).square()

    def samples(self, batch: Batch) -> int:
        return 1

    def evaluate(self, model: nn.Module, split: Batch) -> dict[str, float]:
        with torch.no_grad():
            cost = 0.5 * float(self.residuals(model, split).square().sum())
        return {"cost": cost, "solved": float(solved(cost, self.problem.fmin))}


def _make(name: str) -> type[MGHTask]:
    problem = PROBLEMS[name]
    fmin = "not listed" if problem.fmin is None else f"{problem.fmin:.6g}"
    cls = type(
        f"MGH_{name}",
        (MGHTask,),
        {
            "name": "mgh-" + name.replace("_", "-"),
            "summary": f"MGH {problem.number} {name} (n={problem.n}, m={problem.m}, "
            f"published min sum f^2 {fmin}), starts 10^seed x0",
            "order": 200 + problem.number,
            "problem": problem,
            "suites": ("full", "quick") if name in QUICK else ("full",),
            "__module__": __name__,
        },
    )
    return register(cls)  # type: ignore[return-value]


TASK_CLASSES = {name: _make(name) for name in CURVE_FITTING}
