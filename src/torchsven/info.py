"""StepInfo: the diagnostics of one Sven step (``opt.last_step``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["StepInfo"]


@dataclass(frozen=True)
class StepInfo:
    """What one ``Sven.step`` did. ``opt.last_step`` is None before the first step
    and unchanged by a step that raised.

    Attributes:
        loss: ``0.5 * ||r||^2`` before the step.
        residual_norm: ``||r||`` before the step.
        singular_values: (k,) float64 CPU tensor, descending: all that the
            decomposition produced (k = min(N, P) for an SVD, N or P for a Gram eigh).
        kept: number of singular directions used (0: the step was a no-op).
        damping: the damping ``mu`` the step used.
        backend: the backend that computed the step ("generic", "factored").
        solver: the decomposition ("svd", "gram" = eigh of J J^T, "normal" = eigh of J^T J).
        rows: N, the number of residual rows.
        extras: further diagnostics of optional features, by name.
    """

    loss: float
    residual_norm: float
    singular_values: Tensor
    kept: int
    damping: float
    backend: str
    solver: str
    rows: int
    extras: Mapping[str, object] = field(default_factory=dict)
