"""digits: scikit-learn's load_digits (1797 8x8 images, 10 classes), two ways.

* ``digits-label``: regress the one-hot label with squared error (10 rows per sample).
* ``digits-ce``: cross-entropy; Sven's rows are ``from_losses(ce, kappa=1)``, i.e.
  ``r_i = sqrt(ce_i)``, so ``0.5 ||r||^2 = 0.5 * sum_i ce_i`` is the same objective
  the first-order methods minimise (their loss is the mean cross-entropy).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...residuals import from_losses
from . import register
from ._common import classification_metrics, mlp, split
from .base import Batch, Task, TaskData, seeded_model

#: Training samples kept per reduced size (the full suite uses all 1437).
QUICK_TRAIN = {"quick": 320, "tiny": 64}


def load(size: str, seed: int, dtype: torch.dtype) -> TaskData:
    """Pixels / 16, a seeded 1437/360 split (fewer training samples when reduced)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    xt = torch.as_tensor(x, dtype=dtype) / 16.0
    yt = torch.as_tensor(y, dtype=torch.int64)
    train, val = split(xt.shape[0], 360, seed)
    if size in QUICK_TRAIN:
        train = train[: QUICK_TRAIN[size]]
        val = val[: 64 if size == "tiny" else None]
    return TaskData((xt[train], yt[train]), (xt[val], yt[val]))


class _Digits(Task):
    metric = "error"
    batch_size = 32
    epochs: ClassVar[dict[str, int]] = {"full": 20, "quick": 3, "tiny": 1}

    def make_data(self, seed: int) -> TaskData:
        return load(self.size, seed, self.dtype)

    def make_model(self, seed: int) -> nn.Module:
        return seeded_model(lambda: mlp([64, 32, 10]), seed, self.dtype)

    def evaluate(self, model: nn.Module, split: Batch) -> dict[str, float]:
        x, labels = split
        with torch.no_grad():
            logits = model(x)
            metrics = classification_metrics(logits, labels)
            onehot = F.one_hot(labels, 10).to(logits.dtype)
            metrics["mse"] = float((logits - onehot).square().mean())
        return metrics


@register
class DigitsLabel(_Digits):
    """One-hot label regression: rows ``f(x) - onehot(y)``, (n, 10)."""

    name = "digits-label"
    summary = "sklearn load_digits, one-hot label regression (10 rows/sample), MLP 64-32-10"
    # 10 rows per sample make the generic backend's steps ~10x dearer: fewer quick epochs
    epochs: ClassVar[dict[str, int]] = {"full": 20, "quick": 2, "tiny": 1}
    order = 40

    def residuals(self, model: nn.Module, batch: Batch) -> Tensor:
        x, labels = batch
        out = model(x)
        return out - F.one_hot(labels, 10).to(out.dtype)


@register
class DigitsCE(_Digits):
    """Cross-entropy: rows ``sqrt(ce_i)``; first-order loss: mean cross-entropy."""

    name = "digits-ce"
    summary = "sklearn load_digits, cross-entropy (rows from_losses(ce, kappa=1)), MLP 64-32-10"
    order = 50
    kappa = 1.0

    def residuals(self, model: nn.Module, batch: Batch) -> Tensor:
        x, labels = batch
        return from_losses(F.cross_entropy(model(x), labels, reduction="none"), self.kappa)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, labels = batch
        return F.cross_entropy(model(x), labels)

    def sample_losses(self, model: nn.Module, batch: Batch) -> Tensor:
        x, labels = batch
        return F.cross_entropy(model(x), labels, reduction="none")
