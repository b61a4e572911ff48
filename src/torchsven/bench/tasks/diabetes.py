"""diabetes: scikit-learn's load_diabetes (442 patients, 10 features), a small noisy regression."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from . import register
from ._common import mlp, regression_metrics, split, standardise
from .base import Batch, Task, TaskData, seeded_model


@register
class Diabetes(Task):
    """load_diabetes, seeded 342/100 split, standardised, MLP 10-32-1 GELU, batch 32."""

    name = "diabetes"
    summary = "sklearn load_diabetes (442 x 10, noisy), MLP 10-32-1 GELU, batch 32"
    order = 30
    metric = "mse"
    batch_size = 32
    epochs: ClassVar[dict[str, int]] = {"full": 30, "quick": 8, "tiny": 1}
    n_val = 100

    def make_data(self, seed: int) -> TaskData:
        from sklearn.datasets import load_diabetes

        x, y = load_diabetes(return_X_y=True)
        xt = torch.as_tensor(x, dtype=torch.float64)
        yt = torch.as_tensor(y, dtype=torch.float64).reshape(-1, 1)
        train, val = split(xt.shape[0], self.n_val, seed)
        if self.size == "tiny":
            train, val = train[:96], val[:64]
        x_train, x_val = standardise(xt[train], xt[val])
        y_train, y_val = standardise(yt[train], yt[val])
        return TaskData(
            (x_train.to(self.dtype), y_train.to(self.dtype)),
            (x_val.to(self.dtype), y_val.to(self.dtype)),
        )

    def make_model(self, seed: int) -> nn.Module:
        return seeded_model(lambda: mlp([10, 32, 1]), seed, self.dtype)

    def residuals(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return model(x) - y

    def evaluate(self, model: nn.Module, split: Batch) -> dict[str, float]:
        return regression_metrics(model, *split)
