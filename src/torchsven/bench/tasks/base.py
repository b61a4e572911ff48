"""The benchmark Task interface.

A task is one small file in this package that subclasses :class:`Task` and is
decorated with :func:`register`. It knows

* its data (:meth:`Task.make_data`): train and validation tensors, made in code
  or from scikit-learn's shipped datasets, never downloaded;
* its model (:meth:`Task.make_model`), built from a seed, so every method
  starts from the same weights;
* its residual rows for a batch (:meth:`Task.residuals`), Sven's objective
  ``0.5 * ||r||^2`` (summed over the batch);
* the scalar loss that first-order methods minimise (:meth:`Task.loss`). By
  default it is the same objective divided by the number of samples in the
  batch, ``0.5 * ||r||^2 / n`` (for ``r = f - y`` that is half the MSE), so
  Sven and its peers minimise the same function up to a constant factor that
  the learning-rate grid absorbs. A task may override it (``digits-ce`` uses
  the mean cross-entropy, the loss people actually train with);
* its metrics (:meth:`Task.evaluate`), one dict per split. ``Task.metric`` names
  the validation metric (lower is better) that tunes the learning rate, sets
  the time-to-target threshold and is plotted.

The runner owns the loop: it calls :meth:`Task.batches` once per epoch with a
generator seeded by the run's seed, so all methods see the same data order.

Sizes: ``"full"`` (the full suite), ``"quick"`` (``make bench``, a couple of
seconds per run) and ``"tiny"`` (unit tests, well under a second).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["SIZES", "Batch", "Task", "TaskData", "seeded_model", "to_device"]

#: Problem sizes every task supports.
SIZES = ("full", "quick", "tiny")

#: What :meth:`Task.batches` yields and :meth:`Task.residuals` / :meth:`Task.loss`
#: take: a tuple of tensors (by default ``(x, y)``, sample-major).
Batch = tuple[Tensor, ...]


@dataclass(frozen=True)
class TaskData:
    """A task's tensors.

    Attributes:
        train: training tensors; with the default :meth:`Task.batches` they
            share dim 0 (samples) and are cut into minibatches.
        val: validation tensors, passed to :meth:`Task.evaluate` as a whole.
        info: anything else the task wants to keep (e.g. target scaling).
    """

    train: Batch
    val: Batch
    info: dict[str, Any] = field(default_factory=dict)


def to_device(data: TaskData, device: torch.device | str) -> TaskData:
    """``data`` with every tensor of ``train`` and ``val`` moved to ``device`` (same dtype)."""
    return TaskData(
        tuple(t.to(device) for t in data.train),
        tuple(t.to(device) for t in data.val),
        data.info,
    )


def seeded_model(build: Any, seed: int, dtype: torch.dtype) -> nn.Module:
    """``build()`` under ``torch.manual_seed(seed)`` (global RNG restored), cast to dtype."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.to(dtype)


class Task:
    """Base class of benchmark tasks; see the module docstring.

    Class attributes a task sets:
        name: the CLI name (``regression-1d``).
        summary: one line for ``torchsven bench list-tasks``.
        order: position in listings and tables (lower first).
        metric: key of :meth:`evaluate`'s dict used for tuning, targets, plots
            (lower is better, e.g. ``"mse"``, ``"error"``, ``"rel_l2"``).
        batch_size: minibatch size, or None for full batch.
        epochs: passes over the training data per size.
        evals_per_epoch: validation evaluations per epoch (curve resolution).
        eval_every: epochs between the end-of-epoch evaluations (full-batch tasks with
            many one-step epochs; the last epoch is always evaluated).
        dtype: parameter and data dtype.
        family: tasks that share one table in the report (e.g. ``"mgh"``), or None.
        suites: the sizes whose default suite includes the task (``--tasks``
            can always name it).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    order: ClassVar[int] = 100
    metric: ClassVar[str] = "mse"
    batch_size: ClassVar[int | None] = 32
    epochs: ClassVar[dict[str, int]] = {"full": 20, "quick": 5, "tiny": 1}
    evals_per_epoch: ClassVar[int] = 1
    eval_every: ClassVar[int] = 1
    dtype: ClassVar[torch.dtype] = torch.float32
    family: ClassVar[str | None] = None
    suites: ClassVar[tuple[str, ...]] = SIZES

    def __init__(self, size: str = "full") -> None:
        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {size!r}")
        self.size = size

    # ---------------------------------------------------------------- required
    def make_data(self, seed: int) -> TaskData:
        """Train and validation tensors for ``self.size``, from ``seed``."""
        raise NotImplementedError

    def make_model(self, seed: int) -> nn.Module:
        """A fresh model; the same seed gives the same weights (see :func:`seeded_model`)."""
        raise NotImplementedError

    def residuals(self, model: nn.Module, batch: Batch) -> Tensor:
        """Residual rows for a batch (any shape); Sven minimises ``0.5 * ||r||^2``."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: Batch) -> dict[str, float]:
        """Metrics of ``model`` on one split; must contain ``self.metric``."""
        raise NotImplementedError

    def sven_residuals(self, model: nn.Module, batch: Batch, backend: str) -> Tensor:
        """The rows Sven steps on with ``backend`` ("auto", "factored", "generic"); by
        default :meth:`residuals`. A task may give each backend its fastest form of the
        same rows (the PDE tasks: jets for the factored backend, per-point Jacobians
        for the generic one)."""
        return self.residuals(model, batch)

    # ---------------------------------------------------------------- defaults
    @property
    def num_epochs(self) -> int:
        return self.epochs[self.size]

    def samples(self, batch: Batch) -> int:
        """Number of samples in a batch (the loss divides by it)."""
        return batch[0].shape[0]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Scalar loss for first-order methods: ``0.5 * ||r||^2 / n``."""
        r = self.residuals(model, batch)
        return 0.5 * r.square().sum() / self.samples(batch)

    def sample_losses(self, model: nn.Module, batch: Batch) -> Tensor:
        """Per-sample losses (n,) >= 0, the paper's form of the rows (``sven-paper``).

        Default: the mean square of each sample's residual rows (the per-sample
        MSE; rows are grouped by their first dimension).
        """
        r = self.residuals(model, batch)
        return r.reshape(r.shape[0], -1).square().mean(1)

    def batches(self, data: TaskData, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch: shuffled minibatches of ``data.train`` (drop none), or the full batch."""
        if self.batch_size is None:
            yield data.train
            return
        n = data.train[0].shape[0]
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield tuple(t[idx] for t in data.train)

    def steps_per_epoch(self, data: TaskData) -> int:
        if self.batch_size is None:
            return 1
        n = self.samples(data.train)
        return -(-n // self.batch_size)
