"""Spectrum diagnostics: a history of singular values over training, and a plot.

``Sven(spectrum_every=n)`` records, at steps 0, n, 2n, ..., a
:class:`SpectrumRecord` in ``opt.spectrum_history``; :func:`plot_spectrum` draws
the normalised spectra ``s_i / s_1`` coloured by step and, beside them, the
effective rank and the kept count over training.

Effective rank (Roy and Vetterli 2007): ``exp(H(p))`` with ``p_i = s_i / sum s``
and ``H`` the Shannon entropy; 1 for a single direction, ``k`` for ``k`` equal ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["SpectrumRecord", "effective_rank", "plot_spectrum"]


def effective_rank(singular_values: Tensor) -> float:
    """``exp(-sum p_i log p_i)``, ``p = s / sum(s)`` over the positive ``s``; 0 if none."""
    s = singular_values.detach().to(torch.float64).reshape(-1)
    s = s[s > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


@dataclass(frozen=True)
class SpectrumRecord:
    """The spectrum of one step.

    Attributes:
        step: index of the step (0 for the first).
        singular_values: (k,) float64 CPU, descending, as in ``StepInfo``.
        kept: directions the step used.
        effective_rank: :func:`effective_rank` of ``singular_values``.
        loss: ``0.5 ||r||^2`` before the step.
    """

    step: int
    singular_values: Tensor
    kept: int
    effective_rank: float
    loss: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "singular_values": self.singular_values.tolist(),
            "kept": self.kept,
            "effective_rank": self.effective_rank,
            "loss": self.loss,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpectrumRecord:
        return cls(
            int(data["step"]),
            torch.as_tensor(data["singular_values"], dtype=torch.float64).clone(),
            int(data["kept"]),
            float(data["effective_rank"]),
            float(data["loss"]),
        )


def plot_spectrum(history: Sequence[SpectrumRecord] | Any, path: str | None = None) -> Any:
    """Draw a spectrum history; returns the matplotlib Figure (saved to ``path`` if given).

    Args:
        history: a list of :class:`SpectrumRecord` or a ``Sven`` optimizer with
            ``spectrum_every`` set.
        path: file to save the figure to (any format matplotlib knows).

    Left: ``s_i / s_1`` against ``i`` (log scale), one line per record, coloured
    by step. Right: effective rank and kept directions against the step.
    """
    import matplotlib.pyplot as plt

    records = list(getattr(history, "spectrum_history", history))
    if not records:
        raise ValueError("history has no records: set Sven(spectrum_every=n) and take steps")
    fig, (ax_s, ax_r) = plt.subplots(1, 2, figsize=(10, 4))
    cmap = plt.get_cmap("viridis")
    last = max(r.step for r in records) or 1
    for rec in records:
        s = rec.singular_values
        if s.numel() == 0 or float(s[0]) <= 0:
            continue
        ax_s.semilogy(
            range(1, s.numel() + 1),
            (s / s[0]).clamp_min(1e-300).numpy(),
            color=cmap(rec.step / last),
            lw=1,
        )
    ax_s.set_xlabel("index i")
    ax_s.set_ylabel("s_i / s_1")
    ax_s.set_title("spectrum over training")
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, last))
    fig.colorbar(mappable, ax=ax_s, label="step")
    steps = [r.step for r in records]
    ax_r.plot(steps, [r.effective_rank for r in records], marker=".", label="effective rank")
    ax_r.plot(steps, [r.kept for r in records], marker=".", label="kept")
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("directions")
    ax_r.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
