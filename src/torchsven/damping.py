"""Adaptive (Levenberg-Marquardt) damping: the gain ratio and Nielsen's update.

With ``damping="adaptive"`` Sven damps every step by ``mu = lambda * s_1^2``
(``s_1`` the largest singular value of this step's Jacobian, so ``lambda`` is
scale-free) and adapts the factor ``lambda`` from the gain ratio

    rho = (f(theta) - f(theta + h)) / (f(theta) - m(h)),
    f = 0.5 ||r||^2,   m(h) = 0.5 ||r + J h||^2  (the linear model),

with Nielsen's rule (H. B. Nielsen, "Damping parameter in Marquardt's method",
IMM-REP-1999-05): on ``rho > accept`` the step is kept and
``lambda <- lambda * max(1/3, 1 - (2 rho - 1)^3)``, ``nu <- 2``; otherwise the
step is undone and ``lambda <- lambda * nu``, ``nu <- 2 nu``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "AdaptiveDamping",
    "DampingState",
    "default_rtol",
    "gain_ratio",
    "nielsen_update",
    "parse_damping",
    "serialize_damping",
]

#: ``nu`` stops doubling here (the factor is clamped anyway; this keeps nu finite).
_NU_MAX = 2.0**40


@dataclass(frozen=True)
class AdaptiveDamping:
    """Options of ``damping="adaptive"`` (pass an instance for non-default values).

    Attributes:
        init: the first factor ``lambda_0``; the first step uses ``mu = lambda_0 s_1^2``
            (Nielsen's ``tau``; ``1e-3`` is his default).
        lower: smallest factor; ``lambda`` never goes below it. Tiny on purpose:
            near a solution the step should become the undamped one (a floor of
            1e-12 stalled singular and badly scaled MGH problems); > 0 so that a
            rejection can raise it again.
        upper: largest factor; ``lambda`` never goes above it.
        accept: a step is kept when its gain ratio is ``> accept``.
    """

    init: float = 1e-3
    lower: float = 1e-30
    upper: float = 1e12
    accept: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("init", "lower", "upper", "accept"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"AdaptiveDamping.{name} must be a real number, got {type(value).__name__}"
                )
            if not math.isfinite(value):
                raise ValueError(f"AdaptiveDamping.{name} must be finite, got {value!r}")
        if not 0 < self.lower <= self.init <= self.upper:
            raise ValueError(
                "AdaptiveDamping needs 0 < lower <= init <= upper, got "
                f"lower={self.lower!r}, init={self.init!r}, upper={self.upper!r}"
            )
        if not 0 <= self.accept < 1:
            raise ValueError(f"AdaptiveDamping.accept must be in [0, 1), got {self.accept!r}")


@dataclass
class DampingState:
    """The adapted quantities: the factor ``lambda`` and Nielsen's ``nu``."""

    factor: float
    nu: float = 2.0


def parse_damping(value: Any) -> float | AdaptiveDamping:
    """``damping=`` as given to Sven: a number ``mu >= 0``, "adaptive", or AdaptiveDamping.

    A dict (from a state_dict) is read as AdaptiveDamping's fields.
    """
    if isinstance(value, AdaptiveDamping):
        return value
    if isinstance(value, str):
        if value != "adaptive":
            raise ValueError(
                f"damping must be a number >= 0, 'adaptive' or an AdaptiveDamping, got {value!r}"
            )
        return AdaptiveDamping()
    if isinstance(value, dict):
        return AdaptiveDamping(**value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            "damping must be a number >= 0, 'adaptive' or an AdaptiveDamping, got "
            f"{type(value).__name__}"
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {value!r}")
    return float(value)


def default_rtol(damping: float | AdaptiveDamping) -> float:
    """``rtol=None``: the paper's 1e-3 cut, or none under adaptive damping.

    Adaptive damping filters small singular values by ``s / (s^2 + lambda s_1^2)``
    and lets them in as ``lambda`` shrinks near a solution; a fixed cut would keep
    it from converging on ill-conditioned problems (badly scaled parameters).
    """
    return 0.0 if isinstance(damping, AdaptiveDamping) else 1e-3


def serialize_damping(value: float | AdaptiveDamping) -> float | dict[str, float]:
    """Plain data for a state_dict (loads with ``torch.load(weights_only=True)``)."""
    return asdict(value) if isinstance(value, AdaptiveDamping) else value


def gain_ratio(actual: float, predicted: float) -> float:
    """``rho = actual / predicted`` reduction; ``-inf`` for a non-finite or useless trial.

    A trial whose objective is NaN/Inf, or a step the linear model does not
    predict to help (``predicted <= 0``), gets ``-inf`` (always rejected).
    """
    if not math.isfinite(actual) or not predicted > 0 or not math.isfinite(predicted):
        return -math.inf
    return actual / predicted


def nielsen_update(
    state: DampingState, rho: float, options: AdaptiveDamping
) -> tuple[DampingState, bool]:
    """Next factor after a step with gain ratio ``rho``; returns (new state, accepted)."""
    if rho > options.accept:
        scale = max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
        factor = min(max(state.factor * scale, options.lower), options.upper)
        return DampingState(factor, 2.0), True
    factor = min(max(state.factor * state.nu, options.lower), options.upper)
    return DampingState(factor, min(2.0 * state.nu, _NU_MAX)), False
