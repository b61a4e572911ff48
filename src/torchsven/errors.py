"""Exceptions and warnings raised by torchsven."""

from __future__ import annotations

__all__ = ["NonFiniteError", "SvenFallbackWarning", "SvenPerformanceWarning"]


class NonFiniteError(ValueError):
    """Residual rows or their Jacobian hold NaN or Inf; nothing was changed."""


class SvenFallbackWarning(UserWarning):
    """A fast backend could not handle a step exactly and the generic backend ran instead."""


class SvenPerformanceWarning(UserWarning):
    """A hint that the same step could run much faster (e.g. pass the model)."""
