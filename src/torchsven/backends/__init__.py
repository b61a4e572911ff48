"""Backends: how the filtered direction ``J^+_k r`` is computed.

* ``generic``: materialised Jacobian, exact for any differentiable closure.
* ``auto``: the fastest exact backend that applies (records which one ran).
"""

from __future__ import annotations

from torch import nn

from .base import Backend, Direction, FallbackRequired
from .generic import GenericBackend, jacobian

__all__ = [
    "BACKENDS",
    "Backend",
    "Direction",
    "FallbackRequired",
    "GenericBackend",
    "jacobian",
    "make_backend",
]

#: Names accepted by ``Sven(backend=...)``.
BACKENDS = ("auto", "generic")


def make_backend(name: str, model: nn.Module | None, generic: GenericBackend) -> Backend:
    """The primary backend for a step; ``generic`` is also the fallback."""
    if name in ("auto", "generic"):
        return generic
    raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
