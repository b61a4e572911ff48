"""The update chain: what is applied, from the direction ``u = J^+_k r``.

Small pure pieces on flat float64 vectors, run in order; each reads its state
from ``state[p]`` and returns the new value, which the step stores only when
it commits (optax-style: ``(update, state) -> (update, new state)``):

* ``precondition="post"``: ``v <- alpha v + (1 - alpha) u^2``, ``u <- u / (sqrt(v) + eps)``;
* momentum: ``b <- mu b + u``, ``u <- b``.

The math is in :mod:`torchsven.precondition`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..config import SvenConfig
from ..precondition import heavy_ball, update_square_avg
from .context import StepContext, flat_state

__all__ = ["Piece", "chain_of", "run_chain"]

#: ``piece(update, state) -> (update, new_state)`` on flat float64 vectors.
Piece = tuple[str, Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]]


def post_rms(alpha: float, eps: float) -> Piece:
    """RMSProp scaling of the update by its own running mean square."""

    def piece(update: Tensor, square_avg: Tensor) -> tuple[Tensor, Tensor]:
        square_avg = update_square_avg(square_avg, update, alpha)
        return update / (square_avg.sqrt() + eps), square_avg

    return "square_avg", piece


def momentum(mu: float) -> Piece:
    """Heavy-ball momentum: the buffer is the applied update."""

    def piece(update: Tensor, buffer: Tensor) -> tuple[Tensor, Tensor]:
        update = heavy_ball(buffer, update, mu)
        return update, update

    return "momentum_buffer", piece


def chain_of(config: SvenConfig) -> list[Piece]:
    """The pieces the options ask for, in order (empty for a plain Sven step)."""
    pieces = []
    if config.precondition == "post":
        pieces.append(post_rms(config.rmsprop_alpha, config.rmsprop_eps))
    if config.momentum > 0:
        pieces.append(momentum(config.momentum))
    return pieces


def run_chain(direction: list[Tensor], ctx: StepContext) -> list[Tensor]:
    """The update to apply (per parameter); new state goes to ``ctx.new_state``."""
    pieces = chain_of(ctx.config)
    if not pieces or not ctx.params:
        return direction
    update = torch.cat([d.reshape(-1) for d in direction])
    for key, piece in pieces:
        update, ctx.new_state[key] = piece(
            update, flat_state(ctx.state, ctx.params, key).to(update.device)
        )
    return ctx.split(update)
