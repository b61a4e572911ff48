"""Small helpers shared by task modules (not a task itself)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["classification_metrics", "mlp", "regression_metrics", "split", "standardise"]


def mlp(sizes: list[int], activation: type[nn.Module] = nn.GELU) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]) -> act -> ... -> Linear(sizes[-2], sizes[-1])``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def standardise(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """Scale every tensor by the training mean and std (per column); (train, *others)."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp_min(1e-12)
    return tuple((t - mean) / std for t in (train, *others))


def split(n: int, n_val: int, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random split of ``range(n)`` into (train indices, val indices)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:], order[:n_val]


def regression_metrics(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """``{"mse": mean((f - y)^2)}`` over every output."""
    with torch.no_grad():
        return {"mse": float((model(x) - y).square().mean())}


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy, error rate and mean cross-entropy of logits (n, C) against labels (n,)."""
    accuracy = float((logits.argmax(1) == labels).float().mean())
    return {
        "accuracy": accuracy,
        "error": 1.0 - accuracy,
        "ce": float(F.cross_entropy(logits, labels)),
    }
