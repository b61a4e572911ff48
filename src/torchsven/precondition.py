"""RMSProp-style diagonal preconditioning and heavy-ball momentum for Sven.

Pure functions on flat float64 vectors; the optimizer keeps the state
(``square_avg`` and ``momentum_buffer`` per parameter, as torch.optim does).

* Before the pseudo-inverse (``precondition="pre"``): with the gradient of the
  mean objective ``g = J^T r / N`` (P,), the running average
  ``v <- alpha v + (1 - alpha) g^2`` and ``d = 1 / (sqrt(v) + eps)``, the step is
  ``delta = d * (J diag(d))^+_k r``: the Jacobian's columns are scaled, and the
  solution is mapped back to the parameters (the minimum ``||delta / d||``
  solution of ``J delta = r`` at full rank).
* After the pseudo-inverse (``precondition="post"``): with the Sven update
  ``u = J^+_k r``, ``v <- alpha v + (1 - alpha) u^2`` and the applied update
  ``u / (sqrt(v) + eps)``.
* Heavy-ball momentum on the update: ``b <- mu b + u``; ``b`` is applied.
"""

from __future__ import annotations

from torch import Tensor

from .solve import SpectralFilter, SpectralSolution, jacobian_step

__all__ = [
    "PRECONDITIONERS",
    "column_scaled_step",
    "heavy_ball",
    "mean_objective_gradient",
    "rms_scale",
    "update_square_avg",
]

#: Values of ``Sven(precondition=...)``.
PRECONDITIONERS = (None, "pre", "post")


def mean_objective_gradient(jac: Tensor, rows: Tensor) -> Tensor:
    """``g = J^T r / N`` (P,): the gradient of ``0.5 * mean(r^2)``; J (N, P), r (N,)."""
    return jac.mT @ rows / max(rows.numel(), 1)


def update_square_avg(square_avg: Tensor, value: Tensor, alpha: float) -> Tensor:
    """``alpha * v + (1 - alpha) * value^2`` (same shape as ``value``); a new tensor."""
    return alpha * square_avg + (1.0 - alpha) * value * value


def rms_scale(square_avg: Tensor, eps: float) -> Tensor:
    """``d = 1 / (sqrt(v) + eps)``, the diagonal preconditioner."""
    return 1.0 / (square_avg.sqrt() + eps)


def column_scaled_step(
    jac: Tensor, rows: Tensor, scale: Tensor, filt: SpectralFilter, solver: str = "auto"
) -> tuple[Tensor, SpectralSolution]:
    """``d * (J diag(d))^+_k r`` (P,) float64 for J (N, P), r (N,), d = ``scale`` (P,).

    The filter (rank, rtol, atol, damping) acts on the singular values of the
    scaled Jacobian ``J diag(d)``, which is what the solution reports.
    """
    step, solution = jacobian_step(jac * scale, rows, filt, solver)
    return scale * step, solution


def heavy_ball(buffer: Tensor, update: Tensor, momentum: float) -> Tensor:
    """``b <- mu * b + u``: the new buffer, which is also the applied update."""
    return momentum * buffer + update
