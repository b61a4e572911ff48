"""Backends: how the filtered direction ``J^+_k r`` is computed.

* ``generic``: materialised Jacobian, exact for any differentiable closure.
* ``factored``: Gram matrix from per-layer hook factors (needs the model).
* ``auto``: factored when the model is known, with the generic backend as the
  fallback for any step the factored one cannot compute exactly.
"""

from __future__ import annotations

from torch import nn

from .base import Backend, Direction, FallbackRequired
from .factored import FactoredBackend
from .generic import GenericBackend, jacobian

__all__ = [
    "BACKENDS",
    "Backend",
    "Direction",
    "FactoredBackend",
    "FallbackRequired",
    "GenericBackend",
    "jacobian",
    "make_backend",
]

#: Names accepted by ``Sven(backend=...)``.
BACKENDS = ("auto", "generic", "factored")


def make_backend(
    name: str,
    model: nn.Module | None,
    generic: GenericBackend,
    *,
    microbatch_size: int | None = None,
    verify: str = "auto",
) -> Backend:
    """The primary backend for a step; ``generic`` is also the fallback.

    "auto" gives the factored backend when ``model`` is known, else ``generic``;
    "factored" without a model is a ValueError.
    """
    if name == "generic" or (name == "auto" and model is None):
        return generic
    if name in ("auto", "factored"):
        if model is None:
            raise ValueError(
                "backend='factored' needs the model: pass the nn.Module as Sven's first "
                "argument or as model=..."
            )
        return FactoredBackend(model, microbatch_size=microbatch_size, verify=verify)
    raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
