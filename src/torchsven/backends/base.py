"""What a backend is: it turns residual rows into the filtered Sven direction.

A backend may observe the closure while it runs (``capture``: the factored
backend installs hooks there) and then computes, from the residual rows and the
trainable parameters, the direction ``J^+_k r`` per parameter.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..solve import SpectralFilter, SpectralSolution

__all__ = ["Backend", "Direction", "FallbackRequired", "flat_to_params"]


class FallbackRequired(Exception):
    """Raised by a fast backend that cannot compute this step exactly.

    The optimizer then runs the generic backend on the same rows. ``reason``
    names the module or the condition, for the one-time warning.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Direction:
    """The filtered Sven direction of one step (before the learning rate).

    Attributes:
        step: ``J^+_k r`` split per trainable parameter, each in its parameter's
            shape, float64.
        solution: singular values, kept count and decomposition used.
        row_change: ``J step`` (N,) float64, the linear model's change of the rows
            for a unit learning rate, or None when the backend does not form it.
        extras: diagnostics for ``StepInfo.extras`` (e.g. the matrix-free
            sketch's residual), by name.
    """

    step: list[Tensor]
    solution: SpectralSolution
    row_change: Tensor | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)


def flat_to_params(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat (P,) vector into tensors shaped like ``params`` (views)."""
    out, offset = [], 0
    for p in params:
        n = p.numel()
        out.append(flat[offset : offset + n].view(p.shape))
        offset += n
    return out


class Backend(abc.ABC):
    """Computes the filtered direction for the residual rows of one closure call.

    Declared capabilities (the evaluator asks these, never ``hasattr``):
    ``provides_gram``: :meth:`gram_matrix` is implemented; ``provides_matfree``:
    :meth:`matfree_direction` (rank-k steps through block products ``K V``).
    """

    name: str = "abstract"
    provides_gram: bool = False
    provides_matfree: bool = False

    @contextlib.contextmanager
    def capture(self, params: Sequence[Tensor], selection: Any = None) -> Iterator[Any]:
        """Context active while the closure runs; yields what ``direction`` needs.

        ``selection``: the step's :class:`torchsven.masks.Selection` when it
        routes layer rows through leaf tensors (``mask="rows"``).
        """
        yield None

    @abc.abstractmethod
    def direction(
        self,
        rows: Tensor,
        params: Sequence[Tensor],
        filt: SpectralFilter,
        captured: Any = None,
        output: Tensor | None = None,
    ) -> Direction:
        """``J^+_k r`` for rows (N,) with a grad_fn and the trainable ``params``.

        ``captured`` is what ``capture`` yielded; ``output`` the closure's
        unflattened return value (dim 0: samples), when the caller has it.
        """

    def gram_matrix(
        self,
        rows: Tensor,
        params: Sequence[Tensor],
        captured: Any,
        output: Tensor | None = None,
    ) -> Tensor:
        """``K = J J^T`` (N, N) float64; only where :attr:`provides_gram` is True."""
        raise NotImplementedError(f"the {self.name} backend does not provide a Gram matrix")

    def matfree_direction(
        self,
        rows: Tensor,
        params: Sequence[Tensor],
        filt: SpectralFilter,
        captured: Any,
        output: Tensor | None = None,
        *,
        columns: int,
        power_iters: int,
        generator: torch.Generator,
        probes: int = 4,
    ) -> Direction:
        """Rank-k step through block products; only where :attr:`provides_matfree` is True."""
        raise NotImplementedError(f"the {self.name} backend has no matrix-free rank-k step")


def all_finite(tensor: Tensor | Sequence[Tensor]) -> bool:
    """Whether every entry of ``tensor`` (or of several) is finite; one host sync.

    The sum of the entries is NaN or +-Inf whenever one entry is (NaN propagates;
    Inf plus -Inf is NaN), so a finite sum proves every entry finite without the
    temporaries of ``isfinite``; only a non-finite sum (a non-finite entry, or
    finite entries whose sum overflows) is settled entry by entry.
    """
    tensors = [tensor] if isinstance(tensor, Tensor) else list(tensor)
    tensors = [t for t in tensors if t.numel() and t.is_floating_point()]
    if not tensors:
        return True
    if len(tensors) == 1:
        total = tensors[0].sum()
    else:
        total = torch.stack([t.sum().to(torch.float64) for t in tensors]).sum()
    if math.isfinite(float(total)):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def check_finite(tensor: Tensor | Sequence[Tensor], what: str) -> None:
    """Raise NonFiniteError when ``tensor`` (or any of several) holds NaN or Inf.

    One host sync however many tensors are checked (:func:`all_finite`).
    """
    from ..errors import NonFiniteError

    if not all_finite(tensor):
        raise NonFiniteError(
            f"{what} contains NaN or Inf; the step was not taken and nothing was changed"
        )
