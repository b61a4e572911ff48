"""Errors that tell users of training frameworks how to call Sven.

Frameworks written for first-order optimizers call ``optimizer.step`` in ways
Sven cannot use: Lightning's automatic optimization passes a closure that runs
``backward()`` itself and returns the scalar loss, and ``transformers.Trainer``
calls ``optimizer.step()`` with no closure. Both are recognised from the call
stack (only on the error path) and answered with what to write instead; see
the README section "Clients" and the examples ``lightning_regression.py`` and
``hf_trainer.py``.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor

__all__ = ["LIGHTNING_AUTOMATIC", "TRAINER_NO_CLOSURE", "check_closure", "check_closure_output"]

LIGHTNING_AUTOMATIC = (
    "Sven received Lightning's automatic-optimization closure, which runs backward() itself "
    "and returns the scalar loss; Sven needs the residual rows. In the LightningModule set "
    "`self.automatic_optimization = False` (in __init__) and step in training_step: "
    "`rows = self.optimizers().step(closure=lambda: self.net(x) - y)`, a closure that returns "
    "residual rows (model(x) - y, or torchsven.from_losses(per_sample_losses)) and calls "
    "neither backward() nor zero_grad() (see examples/lightning_regression.py)"
)

TRAINER_NO_CLOSURE = (
    "transformers.Trainer called Sven.step() without a closure; Sven needs one that returns "
    "the residual rows. Subclass Trainer and override training_step to call "
    "`sven.step(closure)` with a closure that returns residual rows (logits - one_hot(labels), "
    "or torchsven.from_losses(per_sample_losses)), and let the Trainer's own closure-less "
    "step() be a no-op (see examples/hf_trainer.py)"
)

#: module-name prefixes on the call stack -> what each client gets told
_AUTOMATIC_LOOPS = (
    "lightning.pytorch.loops.optimization.automatic",
    "pytorch_lightning.loops.optimization.automatic",
)
_TRAINER = ("transformers.trainer",)


def _caller_modules(limit: int = 64) -> list[str]:
    """``__name__`` of the modules of up to ``limit`` frames above this call."""
    names = []
    frame = sys._getframe(2)
    while frame is not None and len(names) < limit:
        names.append(str(frame.f_globals.get("__name__", "")))
        frame = frame.f_back
    return names


def check_closure_output(out: Any) -> None:
    """Raise the Lightning hint when a closure from its automatic loop gave no residual rows.

    Free when ``out`` has at least one dimension (the stack is only read otherwise).
    """
    if isinstance(out, Tensor) and out.dim() >= 1:
        return
    if any(name.startswith(_AUTOMATIC_LOOPS) for name in _caller_modules()):
        raise ValueError(LIGHTNING_AUTOMATIC)


def check_closure(closure: Any) -> None:
    """Raise the Trainer hint when ``transformers.Trainer`` stepped without a closure."""
    if closure is None and any(name.startswith(_TRAINER) for name in _caller_modules()):
        raise TypeError(TRAINER_NO_CLOSURE)
