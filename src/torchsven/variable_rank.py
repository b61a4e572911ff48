"""Variable rank: choose how many singular directions to keep by the objective.

The Sven step splits into rank-1 components in order of singular value,
``J^+_k r = sum_{i < k} delta_i`` with ``delta_i = v_i phi(s_i) (u_i^T r)``.
:func:`greedy_prefix` evaluates the objective after the prefixes
``delta_0``, ``delta_0 + delta_1``, ... in turn, stops at the first prefix that
does not improve on the best one so far, and keeps the best (0 components when
the first one already makes the objective worse).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .randomized import randomized_svd
from .solve import SpectralFilter, SpectralSolution, choose_solver, gram_floor

__all__ = ["greedy_prefix", "randomized_components", "spectral_components"]


def _eigh_descending(sym: Tensor) -> tuple[Tensor, Tensor]:
    evals, evecs = torch.linalg.eigh(0.5 * (sym + sym.mT))
    return evals.flip(-1), evecs.flip(-1)


def _from_svd(
    u: Tensor, s: Tensor, vh: Tensor, rows: Tensor, filt: SpectralFilter, solver: str
) -> tuple[Tensor, SpectralSolution]:
    phi, mask = filt.inverse(s)
    idx = mask.nonzero().reshape(-1)
    coeffs = phi[idx] * (u[:, idx].mT @ rows)
    return coeffs[:, None] * vh[idx], SpectralSolution(s.cpu(), int(idx.numel()), solver)


def spectral_components(
    jac: Tensor, rows: Tensor, filt: SpectralFilter, solver: str = "auto"
) -> tuple[Tensor, SpectralSolution]:
    """Rank-1 components (k, P) of the filtered step, descending singular value.

    Their sum is :func:`torchsven.solve.jacobian_step` with the same ``solver``
    (same kept set, floors included). J (N, P), r (N,); float64.
    """
    jac = jac.to(torch.float64)
    rows = rows.to(torch.float64).reshape(-1)
    n, p = jac.shape
    if solver == "auto":
        solver = choose_solver(n, p)
    if n == 0 or p == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return torch.zeros(0, p, dtype=torch.float64), SpectralSolution(empty, 0, solver)
    if solver == "svd":
        u, s, vh = torch.linalg.svd(jac, full_matrices=False)
        return _from_svd(u, s, vh, rows, filt, solver)
    if solver == "gram":
        evals, evecs = _eigh_descending(jac @ jac.mT)
    elif solver == "normal":
        evals, evecs = _eigh_descending(jac.mT @ jac)
    else:
        raise ValueError(f"solver must be 'auto', 'svd', 'gram' or 'normal', got {solver!r}")
    s = torch.sqrt(torch.clamp(evals, min=0.0))
    weights, mask = filt.inverse_square(evals, gram_floor(evals.numel(), s[0]))
    idx = mask.nonzero().reshape(-1)
    basis = evecs[:, idx]
    if solver == "gram":  # delta_i = J^T u_i (u_i^T r) / (e_i + mu)
        comps = (weights[idx] * (basis.mT @ rows))[:, None] * (jac.mT @ basis).mT
    else:  # delta_i = v_i (v_i^T J^T r) / (e_i + mu)
        comps = (weights[idx] * (basis.mT @ (jac.mT @ rows)))[:, None] * basis.mT
    return comps, SpectralSolution(s.cpu(), int(idx.numel()), solver)


def randomized_components(
    jac: Tensor,
    rows: Tensor,
    filt: SpectralFilter,
    oversample: int,
    power_iters: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, SpectralSolution]:
    """Rank-1 components (k, P) of :func:`torchsven.randomized.randomized_step`."""
    if filt.rank is None:
        raise ValueError("a randomized solve needs rank=k (the target rank of the sketch)")
    rows = rows.to(torch.float64).reshape(-1)
    u, s, vh = randomized_svd(jac, filt.rank, oversample, power_iters, generator)
    return _from_svd(u, s, vh, rows, filt, "randomized")


def greedy_prefix(
    objective_after: Callable[[int], float], n_components: int, start: float
) -> tuple[int, list[float]]:
    """Best prefix length m in 0..n_components by a greedy scan.

    Args:
        objective_after: ``m -> f(theta - lr * sum_{i < m} delta_i)``, called for
            m = 1, 2, ... in order.
        n_components: number of components available.
        start: the objective at m = 0 (the current parameters).

    Returns:
        The kept prefix length and the objective values seen (``start`` first).
        The scan stops at the first value that is larger than the best so far
        (or not finite).
    """
    best_m, best = 0, start
    seen = [start]
    for m in range(1, n_components + 1):
        value = objective_after(m)
        seen.append(value)
        if not (math.isfinite(value) and value <= best):
            break
        best_m, best = m, value
    return best_m, seen
