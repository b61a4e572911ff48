"""regression-1d: the paper's 1-D function fit, y = exp(-10 x^2) sin(2 x)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from . import register
from ._common import mlp, regression_metrics
from .base import Batch, Task, TaskData, seeded_model


def target(x: Tensor) -> Tensor:
    """``y = exp(-10 x^2) sin(2 x)``."""
    return torch.exp(-10 * x.square()) * torch.sin(2 * x)


@register
class Regression1D(Task):
    """x ~ U[-1, 1], standardised targets, MLP 1-16-16-16-1 GELU (593 parameters), batch 32."""

    name = "regression-1d"
    summary = "paper's 1-D fit exp(-10x^2) sin(2x), MLP 1-16-16-16-1 GELU, batch 32"
    order = 10
    metric = "mse"
    batch_size = 32
    epochs: ClassVar[dict[str, int]] = {"full": 20, "quick": 4, "tiny": 1}
    #: (train, validation) samples per size.
    sizes: ClassVar[dict[str, tuple[int, int]]] = {
        "full": (10_000, 10_000),
        "quick": (2_000, 1_000),
        "tiny": (96, 64),
    }

    def make_data(self, seed: int) -> TaskData:
        n_train, n_val = self.sizes[self.size]
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n_train + n_val, 1, generator=g, dtype=torch.float64) * 2 - 1
        y = target(x)
        mean, std = y[:n_train].mean(), y[:n_train].std()
        y = (y - mean) / std
        x, y = x.to(self.dtype), y.to(self.dtype)
        return TaskData(
            (x[:n_train], y[:n_train]),
            (x[n_train:], y[n_train:]),
            {"target_mean": float(mean), "target_std": float(std)},
        )

    def make_model(self, seed: int) -> nn.Module:
        return seeded_model(lambda: mlp([1, 16, 16, 16, 1]), seed, self.dtype)

    def residuals(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return model(x) - y

    def evaluate(self, model: nn.Module, split: Batch) -> dict[str, float]:
        return regression_metrics(model, *split)
