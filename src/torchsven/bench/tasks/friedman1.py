"""friedman1: scikit-learn's make_friedman1 regression (10 features, 5 informative)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from . import register
from ._common import mlp, regression_metrics, standardise
from .base import Batch, Task, TaskData, seeded_model


@register
class Friedman1(Task):
    """make_friedman1 (noise-free, sklearn's default), standardised, MLP 10-32-32-1 GELU."""

    name = "friedman1"
    summary = "sklearn make_friedman1 (10 features), MLP 10-32-32-1 GELU, batch 32"
    order = 20
    metric = "mse"
    batch_size = 32
    epochs: ClassVar[dict[str, int]] = {"full": 20, "quick": 4, "tiny": 1}
    sizes: ClassVar[dict[str, tuple[int, int]]] = {
        "full": (4_000, 2_000),
        "quick": (800, 800),
        "tiny": (96, 64),
    }

    def make_data(self, seed: int) -> TaskData:
        from sklearn.datasets import make_friedman1

        n_train, n_val = self.sizes[self.size]
        x, y = make_friedman1(n_samples=n_train + n_val, n_features=10, random_state=seed)
        xt = torch.as_tensor(x, dtype=torch.float64)
        yt = torch.as_tensor(y, dtype=torch.float64).reshape(-1, 1)
        x_train, x_val = standardise(xt[:n_train], xt[n_train:])
        y_train, y_val = standardise(yt[:n_train], yt[n_train:])
        return TaskData(
            (x_train.to(self.dtype), y_train.to(self.dtype)),
            (x_val.to(self.dtype), y_val.to(self.dtype)),
        )

    def make_model(self, seed: int) -> nn.Module:
        return seeded_model(lambda: mlp([10, 32, 32, 1]), seed, self.dtype)

    def residuals(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return model(x) - y

    def evaluate(self, model: nn.Module, split: Batch) -> dict[str, float]:
        return regression_metrics(model, *split)
