"""Pure linear algebra of one Sven step: spectral filters and filtered solves.

Every function here is stateless and works in float64 whatever the input dtype.
Notation (docs/design.md, "Notation"):

* ``jac``   J, (N, P): Jacobian of the N residual rows w.r.t. the P parameters.
* ``rows``  r, (N,): residual rows.
* ``gram``  K = J J^T, (N, N).
* ``normal`` J^T J, (P, P).

The Sven step is ``J^+_k r = V_k diag(phi(s)) U_k^T r`` with the filtered
inverse ``phi(s) = 1/s`` (or ``s / (s^2 + mu)`` with damping ``mu``) on the kept
singular values and 0 elsewhere. A singular value ``s_i`` (descending, index i
from 0) is kept when ``i < rank`` and ``s_i > max(rtol * s_1, atol, floor)``.

Through the Gram matrix (sample space, docs/design.md "The Gram identity"),
``J^+_k r = J^T c`` with ``c = U_k diag(phi(s) / s) U_k^T r``; ``phi(s)/s`` is
``1/e`` or ``1/(e + mu)`` with ``e = s^2``, so no division by ``s`` is needed.
An eigh of a Gram matrix in float64 resolves ``s_i`` only down to about
``sqrt(n eps64) s_1``: that ``floor`` is part of the cut on the Gram routes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CHOLESKY_MIN_ROWS",
    "SOLVERS",
    "SpectralFilter",
    "SpectralSolution",
    "choose_solver",
    "gram_coefficients",
    "gram_floor",
    "jacobian_step",
    "normal_step",
    "svd_step",
]

#: Decompositions a Jacobian step can use; "auto" picks one by shape.
SOLVERS = ("auto", "svd", "gram", "normal")

_EPS64 = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class SpectralFilter:
    """Which singular directions a step keeps and how it inverts them.

    Attributes:
        rank: keep at most this many directions (None: no cap).
        rtol: drop ``s_i <= rtol * s_1``.
        atol: drop ``s_i <= atol``.
        damping: Tikhonov / Levenberg-Marquardt ``mu >= 0`` in units of ``s^2``:
            the inverse ``1/s`` becomes ``s / (s^2 + mu)``.
        relative_damping: ``lambda >= 0`` adding ``lambda * s_1^2`` to ``mu``
            (scale-free damping, used by ``damping="adaptive"``).
    """

    rank: int | None = None
    rtol: float = 1e-3
    atol: float = 1e-10
    damping: float = 0.0
    relative_damping: float = 0.0

    def mu(self, s_max: float | Tensor) -> float:
        """The absolute damping ``mu + lambda * s_1^2`` for largest singular value ``s_max``."""
        if self.relative_damping == 0:
            return self.damping
        return self.damping + self.relative_damping * float(s_max) ** 2

    def keep(self, singular_values: Tensor, floor: float = 0.0) -> Tensor:
        """Boolean mask (k,) of the kept directions of descending ``singular_values``."""
        s = singular_values
        if s.numel() == 0:
            return torch.zeros(0, dtype=torch.bool, device=s.device)
        s_max = s[0]
        threshold = torch.clamp(s_max * self.rtol, min=max(self.atol, floor))
        mask = s > threshold
        if self.rank is not None and self.rank < s.numel():
            mask[self.rank :] = False
        return mask

    def inverse(self, singular_values: Tensor, floor: float = 0.0) -> tuple[Tensor, Tensor]:
        """Filtered inverse ``phi(s)`` (k,) with zeros where dropped, and the keep mask."""
        s = singular_values
        mask = self.keep(s, floor)
        safe = torch.where(mask, s, torch.ones_like(s))
        mu = self.mu(s[0]) if s.numel() else 0.0
        phi = safe / (safe * safe + mu) if mu > 0 else 1.0 / safe
        return torch.where(mask, phi, torch.zeros_like(s)), mask

    def inverse_square(self, eigenvalues: Tensor, floor: float = 0.0) -> tuple[Tensor, Tensor]:
        """``phi(s)/s`` = ``1/(e + mu)`` (k,) from descending Gram eigenvalues ``e = s^2``.

        Returns the weights, the keep mask and (as the mask's companion) uses
        ``s = sqrt(max(e, 0))`` for the cut.
        """
        s = torch.sqrt(torch.clamp(eigenvalues, min=0.0))
        mask = self.keep(s, floor)
        safe = torch.where(mask, eigenvalues, torch.ones_like(eigenvalues))
        weights = 1.0 / (safe + (self.mu(s[0]) if s.numel() else 0.0))
        return torch.where(mask, weights, torch.zeros_like(weights)), mask


@dataclass(frozen=True)
class SpectralSolution:
    """Diagnostics of one filtered solve.

    Attributes:
        singular_values: (k,) float64, descending, all that the decomposition produced.
        kept: number of directions used.
        solver: "svd", "gram" or "normal".
        projections: (k,) float64 ``u_i^T r``, the rows in the left singular basis,
            or None where the solve does not form them.
        factors: (k,) float64 filter factors ``f_i = s_i phi(s_i)`` (1 for a kept,
            undamped direction, 0 for a dropped one), or None with ``projections``.
    """

    singular_values: Tensor
    kept: int
    solver: str
    projections: Tensor | None = None
    factors: Tensor | None = None

    def predicted_reduction(self, scale: float = 1.0) -> float | None:
        """``f(theta) - m(h)`` for ``h = scale * J^+_k r``, or None without the factors.

        With ``p_i = u_i^T r`` and ``f_i`` the filter factors,
        ``0.5 ||r||^2 - 0.5 ||r - J h||^2 = sum_i p_i^2 (scale f_i)(2 - scale f_i) / 2``:
        a sum of terms >= 0 for ``0 <= scale f_i <= 2``, never the difference of
        two nearly equal norms (which loses everything on ill-conditioned J).
        """
        if self.projections is None or self.factors is None:
            return None
        g = scale * self.factors
        return float((self.projections.square() * g * (2.0 - g)).sum() / 2.0)

    def slope(self, scale: float = 1.0) -> float | None:
        """``r^T J h`` for ``h = scale * J^+_k r`` (``sum_i p_i^2 scale f_i``), or None."""
        if self.projections is None or self.factors is None:
            return None
        return float((self.projections.square() * self.factors).sum() * scale)


def gram_floor(n: int, s_max: float | Tensor) -> float:
    """Smallest singular value an eigh of an (n, n) float64 Gram matrix resolves."""
    return float(math.sqrt(max(n, 1) * _EPS64) * float(s_max))


def _descending_eigh(sym: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors of a symmetric float64 matrix."""
    sym = 0.5 * (sym + sym.mT)
    evals, evecs = torch.linalg.eigh(sym)
    return evals.flip(-1), evecs.flip(-1)


#: From this many rows on, a Gram solve that keeps every direction undamped takes the
#: eigenvalues alone (``eigvalsh``) and solves ``K c = r`` by Cholesky: about half
#: the cost of the eigenvectors it does not need (docs/design.md, "Solves").
CHOLESKY_MIN_ROWS = 256


def gram_coefficients(
    gram: Tensor, rows: Tensor, filt: SpectralFilter
) -> tuple[Tensor, SpectralSolution]:
    """Sample-space coefficients ``c`` (N,) with ``J^T c = J^+_k r``.

    With ``K = U diag(e) U^T``: ``c = U_k diag(1/(e + mu)) U_k^T r``. When every
    direction is kept and nothing is damped (``N >= CHOLESKY_MIN_ROWS``, no rank
    cap below N, ``mu = 0``, every ``s_i`` above the cut and the floor, decided
    from the eigenvalues), that is ``c = K^{-1} r``, solved by Cholesky instead
    of forming U; the solution then has no ``projections`` / ``factors``.

    Args:
        gram: K = J J^T, (N, N); symmetrised and upcast to float64 here.
        rows: r, (N,).
        filt: the spectral filter.

    Returns:
        ``c`` (N,) float64 and the solve's diagnostics (singular values ``sqrt(e)``).
    """
    gram = gram.to(torch.float64)
    rows = rows.to(torch.float64).reshape(-1)
    n = rows.numel()
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=rows.device)
        return empty, SpectralSolution(empty.cpu(), 0, "gram")
    sym = gram + gram.mT
    sym *= 0.5
    undamped = filt.damping == 0 and filt.relative_damping == 0
    if n >= CHOLESKY_MIN_ROWS and undamped and (filt.rank is None or filt.rank >= n):
        evals = torch.linalg.eigvalsh(sym).flip(-1)
        s = torch.sqrt(torch.clamp(evals, min=0.0))
        if bool(filt.keep(s, gram_floor(n, s[0])).all()):
            chol, info = torch.linalg.cholesky_ex(sym)
            if int(info) == 0:
                coeffs = torch.cholesky_solve(rows.unsqueeze(1), chol).squeeze(1)
                return coeffs, SpectralSolution(s.cpu(), n, "gram")
    evals, evecs = torch.linalg.eigh(sym)
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    s = torch.sqrt(torch.clamp(evals, min=0.0))
    floor = gram_floor(n, s[0])
    weights, mask = filt.inverse_square(evals, floor)
    projections = evecs.mT @ rows
    coeffs = evecs @ (weights * projections)
    factors = (evals * weights).cpu()
    return coeffs, SpectralSolution(s.cpu(), int(mask.sum()), "gram", projections.cpu(), factors)


def svd_step(jac: Tensor, rows: Tensor, filt: SpectralFilter) -> tuple[Tensor, SpectralSolution]:
    """``V_k diag(phi(s)) U_k^T r`` (P,) by a thin SVD of J (N, P); no floor."""
    jac = jac.to(torch.float64)
    rows = rows.to(torch.float64).reshape(-1)
    u, s, vh = torch.linalg.svd(jac, full_matrices=False)
    phi, mask = filt.inverse(s)
    projections = u.mT @ rows
    step = vh.mT @ (phi * projections)
    solution = SpectralSolution(s.cpu(), int(mask.sum()), "svd", projections.cpu(), (s * phi).cpu())
    return step, solution


def normal_step(
    normal: Tensor, jac_t_rows: Tensor, filt: SpectralFilter
) -> tuple[Tensor, SpectralSolution]:
    """Step (P,) from ``J^T J`` (P, P) and ``J^T r`` (P,), for P < N.

    With ``J^T J = V diag(e) V^T``: ``J^+_k r = V diag(phi(s)/s) V^T J^T r``.
    """
    normal = normal.to(torch.float64)
    jac_t_rows = jac_t_rows.to(torch.float64).reshape(-1)
    p = jac_t_rows.numel()
    evals, evecs = _descending_eigh(normal)
    s = torch.sqrt(torch.clamp(evals, min=0.0))
    weights, mask = filt.inverse_square(evals, gram_floor(p, s[0]))
    gradient_coords = evecs.mT @ jac_t_rows  # s_i u_i^T r
    step = evecs @ (weights * gradient_coords)
    positive = s > 0
    projections = torch.where(positive, gradient_coords / torch.where(positive, s, 1.0), 0.0)
    factors = (evals * weights).cpu()
    solution = SpectralSolution(s.cpu(), int(mask.sum()), "normal", projections.cpu(), factors)
    return step, solution


def choose_solver(n_rows: int, n_params: int) -> str:
    """Cheapest decomposition for a materialised (N, P) Jacobian.

    A thin SVD costs several times ``N P min(N, P)`` flops; forming a Gram matrix
    on the short side costs ``N P min(N, P)`` and its eigh ``min(N, P)^3``. The
    SVD has no floor, so it is used while it is cheap in absolute terms or the
    matrix is close to square; otherwise the Gram matrix on the short side.
    """
    short, long = min(n_rows, n_params), max(n_rows, n_params)
    if short * short * long <= 2e7 or long <= 4 * short:
        return "svd"
    return "gram" if n_rows <= n_params else "normal"


def jacobian_step(
    jac: Tensor, rows: Tensor, filt: SpectralFilter, solver: str = "auto"
) -> tuple[Tensor, SpectralSolution]:
    """Filtered step ``J^+_k r`` (P,) float64 from a materialised J (N, P).

    Args:
        jac: J, (N, P), any floating dtype (upcast to float64).
        rows: r, (N,).
        filt: spectral filter.
        solver: "svd", "gram" (eigh of J J^T), "normal" (eigh of J^T J) or "auto".
    """
    n, p = jac.shape
    if solver == "auto":
        solver = choose_solver(n, p)
    jac = jac.to(torch.float64)
    rows = rows.to(torch.float64).reshape(-1)
    if n == 0 or p == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return torch.zeros(p, dtype=torch.float64, device=jac.device), SpectralSolution(
            empty, 0, solver
        )
    if solver == "svd":
        return svd_step(jac, rows, filt)
    if solver == "gram":
        coeffs, info = gram_coefficients(jac @ jac.mT, rows, filt)
        return jac.mT @ coeffs, info
    if solver == "normal":
        return normal_step(jac.mT @ jac, jac.mT @ rows, filt)
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
