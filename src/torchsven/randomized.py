"""Randomized truncated decompositions for large row counts (seeded).

* :func:`randomized_svd` (Halko, Martinsson, Tropp 2011, alg. 4.4 + 5.1): a
  Gaussian sketch ``Y = J Omega`` (N, l) with ``l = min(rank + oversample, N, P)``,
  ``power_iters`` re-orthonormalised power iterations ``Q <- orth(J orth(J^T Q))``,
  then the SVD of the small ``B = Q^T J`` (l, P). Cost O(N P l) instead of
  O(N P min(N, P)).
* :func:`nystrom_eigh` (Tropp et al. 2017, the shifted Nystrom approximation):
  top eigenpairs of a PSD Gram matrix K (N, N), given as a tensor or as a
  function ``V -> K V``, from ``l = min(rank + oversample, N)`` products.

When ``l`` reaches ``min(N, P)`` (``N`` for Nystrom) the sketch spans the whole
range and both equal the exact decomposition up to round-off. Random numbers
come from a ``torch.Generator`` (drawn on the CPU in float64, then moved), so a
seeded generator gives the same sketch on every device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .solve import SpectralFilter, SpectralSolution, gram_floor

__all__ = [
    "nystrom_coefficients",
    "nystrom_eigh",
    "randomized_step",
    "randomized_svd",
    "sketch_size",
]

_EPS64 = torch.finfo(torch.float64).eps


def sketch_size(rank: int, oversample: int, limit: int) -> int:
    """Columns of the sketch: ``min(rank + oversample, limit)``, at least 1."""
    return max(1, min(rank + oversample, limit))


def _gaussian(n: int, l: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randn(n, l, generator=generator, dtype=torch.float64).to(device)


def _orth(mat: Tensor) -> Tensor:
    return torch.linalg.qr(mat, mode="reduced").Q


def randomized_svd(
    jac: Tensor,
    rank: int,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Approximate thin SVD of J (N, P): ``U`` (N, l), ``s`` (l,) descending, ``Vh`` (l, P).

    All ``l = min(rank + oversample, N, P)`` computed triplets are returned; the
    caller's filter keeps at most ``rank`` of them.
    """
    jac = jac.to(torch.float64)
    n, p = jac.shape
    l = sketch_size(rank, oversample, min(n, p))
    q = _orth(jac @ _gaussian(p, l, generator, jac.device))
    for _ in range(power_iters):
        q = _orth(jac @ _orth(jac.mT @ q))
    u_small, s, vh = torch.linalg.svd(q.mT @ jac, full_matrices=False)
    return q @ u_small, s, vh


def randomized_step(
    jac: Tensor,
    rows: Tensor,
    filt: SpectralFilter,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, SpectralSolution]:
    """``V_k diag(phi(s)) U_k^T r`` (P,) by :func:`randomized_svd`; target rank ``filt.rank``."""
    if filt.rank is None:
        raise ValueError("a randomized solve needs rank=k (the target rank of the sketch)")
    rows = rows.to(torch.float64).reshape(-1)
    u, s, vh = randomized_svd(jac, filt.rank, oversample, power_iters, generator)
    phi, mask = filt.inverse(s)
    step = vh.mT @ (phi * (u.mT @ rows))
    return step, SpectralSolution(s.cpu(), int(mask.sum()), "randomized")


def nystrom_eigh(
    gram: Tensor | Callable[[Tensor], Tensor],
    n: int,
    rank: int,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Top eigenpairs of a PSD K (n, n): eigenvalues (l,) descending, eigenvectors (n, l).

    ``gram`` is K itself or a function ``V (n, m) -> K V``. With the sketch
    basis ``Q`` (n, l) and ``Y = K Q``, a shift ``nu = sqrt(n) eps ||Y||_F``
    keeps the core ``Q^T (Y + nu Q)`` positive definite; the eigenpairs of
    ``(Y + nu Q) (Q^T (Y + nu Q))^{-1} (Y + nu Q)^T`` minus ``nu`` are returned.
    """
    if isinstance(gram, Tensor):
        mat = gram.to(torch.float64)
        device = mat.device

        def matmul(v: Tensor) -> Tensor:
            return mat @ v
    else:
        matmul = gram
    l = sketch_size(rank, oversample, n)
    q = _orth(_gaussian(n, l, generator, torch.device(device)))
    for _ in range(power_iters):
        q = _orth(matmul(q).to(torch.float64))
    y = matmul(q).to(torch.float64)
    nu = float(n**0.5 * _EPS64 * torch.linalg.norm(y))
    y_nu = y + nu * q
    core = q.mT @ y_nu
    chol, info = torch.linalg.cholesky_ex(0.5 * (core + core.mT))
    if int(info) == 0:
        factor = torch.linalg.solve_triangular(chol, y_nu.mT, upper=False).mT  # Y_nu C^{-T}
        u, sigma, _ = torch.linalg.svd(factor, full_matrices=False)
        evals = torch.clamp(sigma * sigma - nu, min=0.0)
        return evals, u
    # Not positive definite even after the shift: Rayleigh-Ritz on the basis.
    evals, w = torch.linalg.eigh(0.5 * (q.mT @ y + (q.mT @ y).mT))
    return evals.flip(-1), q @ w.flip(-1)


def nystrom_coefficients(
    gram: Tensor | Callable[[Tensor], Tensor],
    rows: Tensor,
    filt: SpectralFilter,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, SpectralSolution]:
    """Sample-space coefficients ``c = U_k diag(1/(e + mu)) U_k^T r`` (N,) from a Nystrom sketch.

    The Gram route's float64 floor ``sqrt(N eps) s_1`` applies as in
    :func:`torchsven.solve.gram_coefficients`; ``filt.rank`` is the target rank.
    """
    if filt.rank is None:
        raise ValueError("a randomized solve needs rank=k (the target rank of the sketch)")
    rows = rows.to(torch.float64).reshape(-1)
    n = rows.numel()
    evals, evecs = nystrom_eigh(gram, n, filt.rank, oversample, power_iters, generator, rows.device)
    s = torch.sqrt(evals)
    weights, mask = filt.inverse_square(evals, gram_floor(n, s[0]))
    coeffs = evecs @ (weights * (evecs.mT @ rows))
    return coeffs, SpectralSolution(s.cpu(), int(mask.sum()), "nystrom")
