"""Residual rows from per-sample losses or errors.

Sven needs rows ``r`` whose half squared norm is the objective. Two common ways
to get them (docs/design.md, "Notation"):

* :func:`from_losses`: per-sample losses ``l_i >= 0`` -> ``r_i = l_i^(kappa/2)``.
* :func:`from_errors`: errors ``e = f - y`` -> ``sign(e) |e|^kappa``.

At 0 the derivative is the limit where it is finite and 0 where the power has
none (``kappa < 2`` on losses, ``kappa < 1`` on errors), so neither the value
nor any derivative is ever NaN.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ResidualGroups", "from_errors", "from_losses", "groups_of", "stack"]


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


# ------------------------------------------------------------ weighted groups
#: Name of the tensor attribute that carries a :class:`ResidualGroups` layout.
_GROUPS_ATTR = "_torchsven_residual_groups"


@dataclass(frozen=True)
class ResidualGroups:
    """Layout of rows built by :func:`stack`: which rows belong to which group.

    Attributes:
        names: group names, in row order.
        slices: each group's rows in the stacked (N,) tensor.
        weights: ``w_g`` per group.
        counts: ``n_g``, the number of entries of each group's residual.
        raw_square_sums: (G,) detached float64 ``sum(r_g^2)`` of the unweighted
            residuals, taken when the rows were stacked.
    """

    names: tuple[str, ...]
    slices: tuple[slice, ...]
    weights: tuple[float, ...]
    counts: tuple[int, ...]
    raw_square_sums: Tensor

    def report(self) -> dict[str, dict[str, float]]:
        """Per group: ``loss`` (``0.5 w_g MSE_g``, the group's share of ``0.5 ||r||^2``),
        ``mse`` and ``rms`` of the unweighted residual, ``weight`` and ``rows`` (n_g)."""
        sums = self.raw_square_sums.tolist()  # one host sync for all groups
        out = {}
        for name, w, n, sq in zip(self.names, self.weights, self.counts, sums, strict=True):
            mse = sq / n
            out[name] = {
                "loss": 0.5 * w * mse,
                "mse": mse,
                "rms": math.sqrt(mse),
                "weight": w,
                "rows": float(n),
            }
        return out


def _check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"weights[{name!r}] must be a real number >= 0, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"weights[{name!r}] must be a finite number >= 0, got {value!r}")
    return float(value)


def stack(groups: Mapping[str, Tensor], weights: Mapping[str, float] | None = None) -> Tensor:
    r"""Concatenate weighted residual groups into Sven rows.

    Group ``g`` with residual ``r_g`` (any shape, ``n_g`` entries) and weight
    ``w_g`` (default 1) contributes the rows ``sqrt(w_g / n_g) * r_g``, so

        0.5 * ||rows||^2 = 0.5 * sum_g w_g * mean(r_g^2),

    the usual weighted mean-squared PINN loss (times 0.5), e.g.
    ``stack({"pde": lap_res, "bc": u_b - g_b}, weights={"bc": 10.0})``.

    Returns:
        (N,) rows, ``N = sum_g n_g``, in the order of ``groups``. The tensor
        carries its layout (:func:`groups_of`); when a Sven closure returns it
        unchanged, ``opt.last_step.extras["groups"]`` reports each group's
        ``loss`` / ``mse`` / ``rms`` / ``weight`` / ``rows`` before the step.
        Any further operation on the rows (reshape, scaling) drops the layout.
    """
    if not isinstance(groups, Mapping):
        raise TypeError(
            f"groups must be a mapping name -> residual tensor, got {type(groups).__name__}"
        )
    if not groups:
        raise ValueError("groups must hold at least one residual group")
    weights = {} if weights is None else weights
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"weights must be a mapping name -> number or None, got {type(weights).__name__}"
        )
    unknown = [k for k in weights if k not in groups]
    if unknown:
        raise ValueError(
            f"weights name groups that do not exist: {unknown}; groups: {list(groups)}"
        )
    names, tensors, ws = [], [], []
    for name, r in groups.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"group names must be non-empty strings, got {name!r}")
        r = _check_tensor(f"groups[{name!r}]", r)
        if r.dim() == 0 or r.numel() == 0:
            raise ValueError(
                f"groups[{name!r}] must hold at least one residual entry per point, got shape "
                f"{tuple(r.shape)}"
            )
        if tensors and (r.dtype != tensors[0].dtype or r.device != tensors[0].device):
            raise ValueError(
                f"groups[{name!r}] has dtype {r.dtype} on {r.device}, but groups[{names[0]!r}] "
                f"has {tensors[0].dtype} on {tensors[0].device}; all groups must match"
            )
        names.append(name)
        tensors.append(r.reshape(-1))
        ws.append(_check_weight(name, weights.get(name, 1.0)))
    counts = [t.numel() for t in tensors]
    rows = torch.cat([t * math.sqrt(w / n) for t, w, n in zip(tensors, ws, counts, strict=True)])
    bounds = [0, *itertools.accumulate(counts)]
    raw = torch.stack([t.detach().to(torch.float64).square().sum() for t in tensors])
    layout = ResidualGroups(
        tuple(names),
        tuple(slice(a, b) for a, b in itertools.pairwise(bounds)),
        tuple(ws),
        tuple(counts),
        raw,
    )
    setattr(rows, _GROUPS_ATTR, layout)
    return rows


def groups_of(rows: object) -> ResidualGroups | None:
    """The layout of rows made by :func:`stack`, or None for any other object."""
    layout = getattr(rows, _GROUPS_ATTR, None) if isinstance(rows, Tensor) else None
    return layout if isinstance(layout, ResidualGroups) else None
