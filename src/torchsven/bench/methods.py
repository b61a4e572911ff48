"""Optimizers the benchmark compares, each behind one small :class:`Stepper`.

Every method has a learning-rate grid of the same length per size (the same
tuning budget); settings are tried on the first seed and the one with the best
validation metric wins. Methods built by other parts of torchsven (adaptive
damping, PolyakSGD) are detected at run time and listed as not yet available
until they exist.

Losses: Sven minimises ``0.5 ||r||^2`` of the task's residual rows; the other
methods minimise ``task.loss`` (``0.5 ||r||^2 / n`` unless the task says
otherwise, see :mod:`torchsven.bench.tasks.base`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .tasks.base import Batch, Task

__all__ = ["METHODS", "Method", "Stepper", "get_method", "muon_split"]

Setting = dict[str, Any]


class Stepper(Protocol):
    """One optimizer bound to a model and a task."""

    def step(self, batch: Batch) -> float:
        """Take one step on ``batch``; returns the objective before the step."""
        ...

    @property
    def steps(self) -> int:
        """Parameter updates taken so far (L-BFGS: iterations)."""
        ...


#: ``(model, task, setting, steps_per_epoch) -> Stepper``.
Builder = Callable[[nn.Module, Task, Setting, int], Stepper]


class TorchStepper:
    """First-order ``torch.optim`` optimizers on ``task.loss``: zero_grad, backward, step."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], model: nn.Module, task: Task):
        self.optimizers, self.model, self.task = optimizers, model, task
        self.steps = 0

    def step(self, batch: Batch) -> float:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss = self.task.loss(self.model, batch)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        self.steps += 1
        return float(loss.detach())


class ClosureStepper:
    """Optimizers whose ``step`` takes a closure that returns the loss (PolyakSGD)."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, task: Task):
        self.optimizer, self.model, self.task = optimizer, model, task
        self.steps = 0

    def step(self, batch: Batch) -> float:
        def closure() -> Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.task.loss(self.model, batch)
            loss.backward()
            return loss

        loss = self.optimizer.step(closure)
        self.steps += 1
        return float(loss.detach() if isinstance(loss, Tensor) else loss)


class LBFGSStepper:
    """Full-batch L-BFGS with a strong Wolfe line search.

    One :meth:`step` runs ``iterations`` L-BFGS iterations on the full batch
    (the runner passes the whole training set once per epoch), so L-BFGS
    takes as many parameter updates per epoch as the minibatch methods (the
    line search may evaluate the batch up to three times per iteration).
    """

    def __init__(self, model: nn.Module, task: Task, lr: float, iterations: int):
        self.model, self.task = model, task
        self.optimizer = torch.optim.LBFGS(
            model.parameters(),
            lr=lr,
            max_iter=iterations,
            max_eval=3 * iterations,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )

    @property
    def steps(self) -> int:
        state = self.optimizer.state[self.optimizer._params[0]]
        return int(state.get("n_iter", 0))

    def step(self, batch: Batch) -> float:
        def closure() -> Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.task.loss(self.model, batch)
            loss.backward()
            return loss

        return float(self.optimizer.step(closure).detach())


class SvenStepper:
    """``torchsven.Sven`` on the task's residual rows (objective ``0.5 ||r||^2``)."""

    def __init__(self, optimizer: Any, model: nn.Module, task: Task):
        self.optimizer, self.model, self.task = optimizer, model, task
        self.steps = 0

    def notes(self) -> dict[str, Any]:
        """Which backend and solver the last step used, and how many directions it kept."""
        info = self.optimizer.last_step
        if info is None:
            return {}
        return {
            "backend": info.backend,
            "solver": info.solver,
            "kept": info.kept,
            "rows": info.rows,
        }

    def step(self, batch: Batch) -> float:
        backend = self.optimizer.options["backend"]
        rows = self.optimizer.step(lambda: self.task.sven_residuals(self.model, batch, backend))
        self.steps += 1
        return 0.5 * float(rows.detach().square().sum()) / self.task.samples(batch)


def muon_split(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(Muon parameters, AdamW parameters).

    Muon takes the hidden 2-D weights: every 2-D parameter except the last one
    in module order (the output layer) and except matrices with a dimension of
    1 (vectors in disguise, such as a 1-input first layer). AdamW takes the rest.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() == 2]
    output = matrices[-1] if matrices else None
    muon = [p for p in matrices if p is not output and min(p.shape) > 1]
    muon_ids = {id(p) for p in muon}
    return muon, [p for p in params if id(p) not in muon_ids]


# ---------------------------------------------------------------- builders
def _sgd(model: nn.Module, task: Task, s: Setting, steps_per_epoch: int) -> Stepper:
    opt = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=0.9)
    return TorchStepper([opt], model, task)


def _adam(model: nn.Module, task: Task, s: Setting, steps_per_epoch: int) -> Stepper:
    return TorchStepper([torch.optim.Adam(model.parameters(), lr=s["lr"])], model, task)


def _adamw(model: nn.Module, task: Task, s: Setting, steps_per_epoch: int) -> Stepper:
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=1e-2)
    return TorchStepper([opt], model, task)


def _muon(model: nn.Module, task: Task, s: Setting, steps_per_epoch: int) -> Stepper:
    muon, rest = muon_split(model)
    opts: list[torch.optim.Optimizer] = []
    if muon:
        opts.append(
            torch.optim.Muon(muon, lr=s["lr"], weight_decay=1e-2, adjust_lr_fn="match_rms_adamw")
        )
    if rest:
        opts.append(torch.optim.AdamW(rest, lr=s["lr"], weight_decay=1e-2))
    return TorchStepper(opts, model, task)


def _lbfgs(model: nn.Module, task: Task, s: Setting, steps_per_epoch: int) -> Stepper:
    return LBFGSStepper(model, task, s["lr"], steps_per_epoch)


def _sven(**fixed: Any) -> Builder:
    def build(model: nn.Module, task: Task, s: Setting, steps_per_epoch: int) -> Stepper:
        import torchsven

        return SvenStepper(torchsven.Sven(model, **{**fixed, **s}), model, task)

    return build


def _polyak(model: nn.Module, task: Task, s: Setting, steps_per_epoch: int) -> Stepper:
    import torchsven

    return ClosureStepper(torchsven.PolyakSGD(model.parameters(), **s), model, task)


# ----------------------------------------------------------- availability
def _probe_model() -> nn.Module:
    return nn.Linear(2, 1)


def _has_adaptive_damping() -> str | None:
    import torchsven

    try:
        torchsven.Sven(_probe_model(), damping="adaptive")
    except (TypeError, ValueError) as e:
        return f"Sven(damping='adaptive') is not available yet ({e})"
    return None


def _has_polyak() -> str | None:
    import torchsven

    if not hasattr(torchsven, "PolyakSGD"):
        return "torchsven.PolyakSGD is not available yet"
    return None


def _has_muon() -> str | None:
    if not hasattr(torch.optim, "Muon"):
        return f"torch.optim.Muon needs a newer torch (this is {torch.__version__})"
    return None


# ----------------------------------------------------------------- registry
@dataclass(frozen=True)
class Method:
    """A benchmarked optimizer.

    Attributes:
        name: CLI and table name.
        summary: one line for ``list-methods``.
        build: ``(model, task, setting, steps_per_epoch) -> Stepper``.
        grids: settings to try per size; every method has the same count.
        full_batch: the runner hands it the whole training set once per epoch.
        availability: returns None when the method can run, else why not.
    """

    name: str
    summary: str
    build: Builder
    grids: dict[str, list[Setting]]
    full_batch: bool = False
    availability: Callable[[], str | None] = field(default=lambda: None)

    def unavailable(self) -> str | None:
        """None when the method can run here, else the reason it cannot."""
        return self.availability()

    def grid(self, size: str) -> list[Setting]:
        return [dict(s) for s in self.grids[size]]


def _lr_grid(full: list[float], quick: list[float], **extra: Any) -> dict[str, list[Setting]]:
    return {
        "full": [{"lr": lr, **extra} for lr in full],
        "quick": [{"lr": lr, **extra} for lr in quick],
        "tiny": [{"lr": quick[0], **extra}],
    }


_ADAM_LRS = ([3e-2, 1e-2, 3e-3], [1e-2, 3e-3])
#: Sven's grid: the defaults (lr=1, rtol=1e-3, no rank cap) first, then smaller steps.
_SVEN_GRID: dict[str, list[Setting]] = {
    "full": [{}, {"lr": 0.3}, {"lr": 0.1}],
    "quick": [{}, {"lr": 0.1}],
    "tiny": [{"lr": 0.3}],
}

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "sven",
            "torchsven.Sven, backend='auto' (factored Gram when available), grid over lr",
            _sven(),
            _SVEN_GRID,
        ),
        Method(
            "sven-svd",
            "Sven, generic backend + full SVD of the materialised J (the authors' first algorithm)",
            _sven(backend="generic", solver="svd"),
            _SVEN_GRID,
        ),
        Method(
            "lm",
            "Levenberg-Marquardt: Sven(damping='adaptive'), gain-ratio damping",
            _sven(damping="adaptive"),
            {"full": [{}, {"lr": 0.5}, {"lr": 0.25}], "quick": [{}, {"lr": 0.5}], "tiny": [{}]},
            availability=_has_adaptive_damping,
        ),
        Method(
            "sgd", "torch.optim.SGD, momentum 0.9", _sgd, _lr_grid([0.3, 0.1, 0.03], [0.1, 0.03])
        ),
        Method("adam", "torch.optim.Adam", _adam, _lr_grid(*_ADAM_LRS)),
        Method("adamw", "torch.optim.AdamW, weight_decay 1e-2", _adamw, _lr_grid(*_ADAM_LRS)),
        Method(
            "muon",
            "torch.optim.Muon on hidden 2-D weights (match_rms_adamw), AdamW on the rest",
            _muon,
            _lr_grid(*_ADAM_LRS),
            availability=_has_muon,
        ),
        Method(
            "lbfgs",
            "torch.optim.LBFGS, strong Wolfe, full batch, history 20",
            _lbfgs,
            _lr_grid([1.0, 0.5, 0.1], [1.0, 0.5]),
            full_batch=True,
        ),
        Method(
            "polyak-sgd",
            "torchsven.PolyakSGD: SGD with the Polyak step, f*=0, grid over max_lr",
            _polyak,
            {
                "full": [{"max_lr": 1.0}, {"max_lr": 0.3}, {"max_lr": 0.1}],
                "quick": [{"max_lr": 1.0}, {"max_lr": 0.3}],
                "tiny": [{"max_lr": 0.3}],
            },
            availability=_has_polyak,
        ),
    ]
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]
