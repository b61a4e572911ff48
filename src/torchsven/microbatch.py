"""Micro-batches: one residual row per group of ``b`` consecutive samples.

For residuals ``r`` of shape (S, ...) (dim 0: samples) and group size ``b``,
group ``g`` holds samples ``g b .. min((g + 1) b, S) - 1`` and its row is

    R_g = || r[group g] ||_2 = sqrt(sum of the group's squared residuals),

so ``0.5 ||R||^2 = 0.5 ||r||^2``: the objective is unchanged and Sven solves the
linearised ``R_g = 0`` for M = ceil(S / b) rows instead of N. The Jacobian row
is ``dR_g = sum_{i in g} (r_i / R_g) dr_i`` (0 for a group with ``R_g = 0``),
so the Gram matrix of the groups pools the per-sample blocks, cross terms
included. This keeps K at M x M for large batches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_microbatch_size", "group_rows"]


def check_microbatch_size(value: object) -> int | None:
    """Validate ``microbatch_size`` (None or an int >= 1)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"microbatch_size must be None or an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"microbatch_size must be None or an int >= 1, got {value}")
    return value


def _safe_norm(groups: Tensor) -> Tensor:
    """Row-wise 2-norm (M, k) -> (M,) whose gradient is 0 (not NaN) at a zero row."""
    sq = groups.square().sum(dim=1)
    zero = sq == 0
    norm = torch.sqrt(torch.where(zero, torch.ones_like(sq), sq))
    return torch.where(zero, torch.zeros_like(norm), norm)


def group_rows(residuals: Tensor, microbatch_size: int) -> Tensor:
    """Group rows (M,) = per-group 2-norms of ``residuals`` (S, ...) in groups of b samples."""
    samples = residuals.shape[0]
    flat = residuals.reshape(samples, -1)
    groups = math.ceil(samples / microbatch_size)
    pad = groups * microbatch_size - samples
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, flat.shape[1])])
    return _safe_norm(flat.reshape(groups, -1))
