"""Residual rows from per-sample losses or errors.

Sven needs rows ``r`` whose half squared norm is the objective. Two common ways
to get them (DESIGN.md section 1):

* :func:`from_losses`: per-sample losses ``l_i >= 0`` -> ``r_i = l_i^(kappa/2)``.
* :func:`from_errors`: errors ``e = f - y`` -> ``sign(e) |e|^kappa``.

At 0 the derivative is the limit where it is finite and 0 where the power has
none (``kappa < 2`` on losses, ``kappa < 1`` on errors), so neither the value
nor any derivative is ever NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["from_errors", "from_losses"]


def _check_kappa(kappa: float) -> float:
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)):
        raise TypeError(f"kappa must be a real number > 0, got {type(kappa).__name__}")
    if not (math.isfinite(kappa) and kappa > 0):
        raise ValueError(f"kappa must be a finite number > 0, got {kappa!r}")
    return float(kappa)


def _check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    return value


def _safe_power(magnitude: Tensor, power: float) -> Tensor:
    """``magnitude ** power`` for magnitude >= 0, 0 at 0, with a NaN-free derivative.

    Where ``magnitude == 0`` the value is 0 and the derivative 0 (the limit for
    power > 1; the convention where the power has no derivative).
    """
    positive = magnitude > 0
    safe = torch.where(positive, magnitude, torch.ones_like(magnitude))
    return torch.where(positive, safe**power, torch.zeros_like(magnitude))


def from_losses(losses: Tensor, kappa: float = 2.0) -> Tensor:
    """Rows ``r_i = l_i ** (kappa / 2)`` from per-sample losses.

    Args:
        losses: (N,) per-sample losses, every entry >= 0 (e.g.
            ``F.cross_entropy(logits, y, reduction="none")``).
        kappa: exponent > 0; 2 (default) solves the linearised ``l_i = 0``.

    Returns:
        (N,) rows, differentiable, no NaN at ``l_i = 0`` (derivative there: 1 for
        kappa = 2, 0 otherwise).
    """
    kappa = _check_kappa(kappa)
    losses = _check_tensor("losses", losses)
    if losses.dim() != 1:
        raise ValueError(
            f"losses must be a 1-D tensor of per-sample losses (N,), got shape "
            f"{tuple(losses.shape)}; use reduction='none' and flatten if needed"
        )
    if bool((losses < 0).any()):
        raise ValueError(
            f"losses must be >= 0, got a minimum of {float(losses.min()):.6g}; "
            "for signed quantities use from_errors"
        )
    if kappa == 2.0:
        return losses
    return _safe_power(losses, kappa / 2)


def from_errors(errors: Tensor, kappa: float = 2.0) -> Tensor:
    """Signed rows ``sign(e) |e| ** kappa`` from errors ``e = f - y``.

    Args:
        errors: (N, ...) errors; every entry becomes a row (shape kept).
        kappa: exponent > 0; 1 gives the errors themselves (Gauss-Newton).

    Returns:
        Tensor of the shape of ``errors``; no NaN at ``e = 0`` (derivative there:
        1 for kappa = 1, 0 otherwise).
    """
    kappa = _check_kappa(kappa)
    errors = _check_tensor("errors", errors)
    if errors.dim() == 0:
        raise ValueError("errors must have at least one dimension (N, ...), got a 0-dim tensor")
    if kappa == 1.0:
        return errors
    return torch.sign(errors) * _safe_power(errors.abs(), kappa)
