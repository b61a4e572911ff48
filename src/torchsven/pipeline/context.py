"""What one step works with, and the transaction that makes it all-or-nothing.

:class:`SvenMemory` is everything a ``Sven`` carries from step to step besides
``torch.optim``'s ``state`` and ``param_groups`` (step count, adaptive damping,
counters, the seeded generator, the spectrum history, the warnings given). It
is plain data: it pickles, deep-copies and goes into ``state_dict()``.

:class:`StepContext` is built by ``Sven.step`` for one call and handed to the
stages (evaluator, update chain, acceptance policy); no stage sees the
optimizer. Parameters change only through :meth:`StepContext.apply`, which
takes a snapshot of the parameters and the model's buffers first, so a step
that raises, or a policy that rejects its trial, restores them bit for bit
(:meth:`StepContext.restore`). Per-parameter state is written only when the
step commits. See ``docs/design.md`` ("The step pipeline").
"""

from __future__ import annotations

import warnings
from collections.abc import MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..backends.base import flat_to_params
from ..config import SvenConfig
from ..damping import DampingState
from ..errors import SvenFallbackWarning
from ..solve import SpectralFilter
from ..spectrum import SpectrumRecord

__all__ = ["StepContext", "SvenMemory", "apply_update", "flat_state"]


def _counts() -> dict[str, int]:
    return {"accepted": 0, "rejected": 0, "skipped": 0, "closure_calls": 0}


@dataclass
class SvenMemory:
    """Sven's own state between steps (all of it goes into ``state_dict``)."""

    steps: int = 0
    damping: DampingState | None = None
    counts: dict[str, int] = field(default_factory=_counts)
    generator_state: Tensor | None = None
    history: list[SpectrumRecord] = field(default_factory=list)
    warned: set[str] = field(default_factory=set)

    def generator(self, seed: int) -> torch.Generator:
        """The seeded generator of masks and sketches, at its saved position."""
        gen = torch.Generator()
        if self.generator_state is None:
            gen.manual_seed(seed)
        else:
            gen.set_state(self.generator_state)
        return gen

    def robust_dict(self) -> dict[str, Any]:
        return {
            "damping": None if self.damping is None else asdict(self.damping),
            "counts": dict(self.counts),
        }

    def load_robust(self, data: dict[str, Any]) -> None:
        damping = data.get("damping")
        self.damping = None if damping is None else DampingState(**damping)
        self.counts = _counts()
        self.counts.update({k: int(v) for k, v in data.get("counts", {}).items()})

    def copy(self) -> SvenMemory:
        """A copy a step can change freely (history entries and tensors are never mutated)."""
        damping = None if self.damping is None else DampingState(**asdict(self.damping))
        return SvenMemory(
            self.steps,
            damping,
            dict(self.counts),
            self.generator_state,
            list(self.history),
            set(self.warned),
        )


def flat_state(state: MutableMapping[Tensor, dict], params: Sequence[Tensor], key: str) -> Tensor:
    """``state[p][key]`` of all params as one flat float64 vector (zeros when absent)."""
    parts = []
    for p in params:
        value = state[p].get(key) if p in state else None
        parts.append(
            torch.zeros(p.numel(), dtype=torch.float64, device=p.device)
            if value is None
            else value.detach().reshape(-1).to(torch.float64)
        )
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(parts)


def apply_update(
    params: Sequence[Tensor], lrs: Sequence[float], update: Sequence[Tensor], scale: float = 1.0
) -> None:
    """``theta_g <- theta_g - scale * lr_g * update_g`` in the parameters' dtype."""
    with torch.no_grad():
        for p, u, lr in zip(params, update, lrs, strict=True):
            p.add_(u.to(p.dtype), alpha=-lr * scale)


@dataclass
class StepContext:
    """One step's inputs and its transaction (see the module docstring).

    Attributes:
        config: the validated options.
        params: trainable parameters (``requires_grad`` and group ``lr > 0``).
        lrs: their group learning rates.
        model: the module, when known (buffers to restore, masks, factored backend).
        state: the optimizer's per-parameter state (read here, written on commit).
        memory: Sven's state between steps; the step works on a copy of it.
    """

    config: SvenConfig
    params: list[Tensor]
    lrs: list[float]
    model: nn.Module | None
    state: MutableMapping[Tensor, dict]
    memory: SvenMemory
    new_state: dict[str, Tensor] = field(default_factory=dict)
    _generator: torch.Generator | None = None
    _saved_params: list[Tensor] | None = None
    _saved_buffers: list[tuple[Tensor, Tensor]] | None = None

    @property
    def generator(self) -> torch.Generator:
        """The seeded generator of masks and sketches, positioned for this step."""
        if self._generator is None:
            self._generator = self.memory.generator(self.config.seed)
        return self._generator

    def keep_generator(self) -> None:
        """Record the generator's position in :attr:`memory` (on commit)."""
        if self._generator is not None:
            self.memory.generator_state = self._generator.get_state()

    # -------------------------------------------------------------- options
    @property
    def filter(self) -> SpectralFilter:
        """The spectral filter of this step (with the adapted damping factor)."""
        factor = None if self.memory.damping is None else self.memory.damping.factor
        return self.config.filter(factor)

    @property
    def uniform_lr(self) -> float | None:
        """The one lr of all trainable groups, or None when they differ."""
        distinct = set(self.lrs)
        if not distinct:
            return 0.0
        return self.lrs[0] if len(distinct) == 1 else None

    def split(self, flat: Tensor) -> list[Tensor]:
        """A flat (P,) vector as per-parameter tensors (views)."""
        return flat_to_params(flat, self.params)

    def warn_once(self, key: str, message: str, stacklevel: int = 4) -> None:
        """One SvenFallbackWarning per ``key`` over the optimizer's life."""
        if key not in self.memory.warned:
            self.memory.warned.add(key)
            warnings.warn(message, SvenFallbackWarning, stacklevel=stacklevel)

    # --------------------------------------------------------- transaction
    def save(self) -> None:
        """Snapshot the parameters and the model's buffers (once per step)."""
        if self._saved_params is None:
            self._saved_params = [p.detach().clone() for p in self.params]
            buffers = [] if self.model is None else list(self.model.buffers())
            self._saved_buffers = [(b, b.detach().clone()) for b in buffers]

    def apply(self, update: Sequence[Tensor], scale: float = 1.0, save: bool = True) -> None:
        """``theta <- theta - scale * lr * update``, after a snapshot of what it changes
        (``save=False``: the final move of a step that cannot fail any more)."""
        if save:
            self.save()
        apply_update(self.params, self.lrs, update, scale)

    def restore(self, buffers: bool = True) -> None:
        """Put the parameters (and the model's buffers) back as :meth:`save` found them."""
        if self._saved_params is None:
            return
        with torch.no_grad():
            for p, saved in zip(self.params, self._saved_params, strict=True):
                p.copy_(saved)
            if buffers:
                for b, saved in self._saved_buffers or []:
                    b.copy_(saved)

    def store(self) -> None:
        """Write :attr:`new_state` (flat float64 vectors) into ``state[p]``."""
        for key, flat in self.new_state.items():
            for p, part in zip(self.params, flat_to_params(flat, self.params), strict=True):
                self.state[p][key] = part.to(p.dtype).clone()
