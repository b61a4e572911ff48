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

__all__ = [
    "GRID_SIZE",
    "METHODS",
    "Method",
    "Stepper",
    "default_is_plain",
    "default_lr",
    "get_method",
    "muon_split",
    "select_methods",
]

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
    """``torchsven.Sven`` on the task's rows.

    ``rows="residuals"``: the task's residual rows (objective ``0.5 ||r||^2``).
    ``rows="losses"``: the paper's form, ``from_losses(task.sample_losses, kappa=2)``,
    i.e. ``r_i = l_i`` (the half Gauss-Newton step of the paper and the authors' code).
    Residual rows come from ``task.sven_residuals(model, batch, backend)`` (the same
    values by the task's fastest route to J on that backend; ``generic`` says the
    optimizer runs the generic backend).
    Either way :meth:`step` returns ``0.5 * sum_i ||r_i||^2 / n`` of the task's residual
    rows where those are the rows, and ``0.5 * sum_i l_i / n`` for the paper's rows (the
    same for one output per sample).
    """

    def __init__(
        self,
        optimizer: Any,
        model: nn.Module,
        task: Task,
        rows: str = "residuals",
        generic: bool = False,
    ):
        if rows not in ("residuals", "losses"):
            raise ValueError(f"rows must be 'residuals' or 'losses', got {rows!r}")
        self.optimizer, self.model, self.task, self.rows = optimizer, model, task, rows
        self.generic = generic  # backend='generic': the task's rows for that backend
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
        n = self.task.samples(batch)
        if self.rows == "losses":
            from ..residuals import from_losses

            rows = self.optimizer.step(
                lambda: from_losses(self.task.sample_losses(self.model, batch), kappa=2.0)
            )
            self.steps += 1
            return 0.5 * float(rows.detach().sum()) / n
        backend = "generic" if self.generic else "auto"
        rows = self.optimizer.step(lambda: self.task.sven_residuals(self.model, batch, backend))
        self.steps += 1
        return 0.5 * float(rows.detach().square().sum()) / n


class SolveStepper:
    """A least-squares solver that runs to completion in one call (curve-fitting tasks).

    The first :meth:`step` runs the whole solve from the model's parameter vector and
    writes the solution back; later steps do nothing (the curve is flat after the first
    epoch and the wall time is the solve's). ``steps`` counts residual evaluations
    (``nfev``; Jacobian evaluations are in :meth:`notes`).
    """

    def __init__(self, solve: Callable[[Callable[[Tensor], Tensor], Tensor], Any], model, task):
        self.solve, self.model, self.task = solve, model, task
        self.steps = 0
        self.result: Any = None

    def notes(self) -> dict[str, Any]:
        if self.result is None:
            return {}
        r = self.result
        return {
            "nfev": int(r.nfev),
            "njev": None if getattr(r, "njev", None) is None else int(r.njev),
            "status": int(r.status),
            "message": str(r.message)[:200],
        }

    def step(self, batch: Batch) -> float:
        (x,) = list(self.model.parameters())
        with torch.no_grad():
            before = 0.5 * float(self.task.residuals(self.model, batch).square().sum())
        if self.result is None:
            problem = self.task.problem  # type: ignore[attr-defined]
            self.result = self.solve(problem.residuals, x.detach().clone())
            solution = self.result.x
            if not isinstance(solution, Tensor):
                solution = torch.as_tensor(solution)
            with torch.no_grad():
                x.copy_(solution.to(dtype=x.dtype, device=x.device).reshape(x.shape))
            self.steps = int(self.result.nfev)
        return before


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


def _sven(rows: str = "residuals", **fixed: Any) -> Builder:
    def build(model: nn.Module, task: Task, s: Setting, steps_per_epoch: int) -> Stepper:
        import torchsven

        options = {**fixed, **s}
        if "damping_init" in options:  # lm's grid: the first damping factor lambda_0
            options["damping"] = torchsven.AdaptiveDamping(init=options.pop("damping_init"))
        # curve fitting: Sven on the parameter vector itself (no module to factor)
        target: Any = model
        if task.family == "mgh":
            target = list(model.parameters())
            options.setdefault("backend", "generic")  # no module: the generic backend
        generic = options.get("backend") == "generic"
        return SvenStepper(torchsven.Sven(target, **options), model, task, rows, generic)

    return build


def _scipy(model: nn.Module, task: Task, s: Setting, steps_per_epoch: int) -> Stepper:
    """``scipy.optimize.least_squares`` with the exact Jacobian (autograd), float64 numpy."""
    import numpy as np
    import scipy.optimize

    budget = 2 * task.num_epochs

    def solve(fun: Callable[[Tensor], Tensor], x0: Tensor) -> Any:
        def f(v: Any) -> Any:
            with torch.no_grad():
                return fun(torch.from_numpy(v)).numpy()

        def jac(v: Any) -> Any:
            return torch.autograd.functional.jacobian(fun, torch.from_numpy(v)).numpy()

        return scipy.optimize.least_squares(
            f, x0.cpu().double().numpy().astype(np.float64), jac=jac, max_nfev=budget, **s
        )

    return SolveStepper(solve, model, task)


def _sven_lsq(model: nn.Module, task: Task, s: Setting, steps_per_epoch: int) -> Stepper:
    """``torchsven.least_squares`` (scipy's interface on tensors)."""
    import torchsven

    budget = 2 * task.num_epochs

    def solve(fun: Callable[[Tensor], Tensor], x0: Tensor) -> Any:
        return torchsven.least_squares(fun, x0, max_nfev=budget, **s)  # type: ignore[attr-defined]

    return SolveStepper(solve, model, task)


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


def _has_least_squares() -> str | None:
    import torchsven

    if not hasattr(torchsven, "least_squares"):
        return "torchsven.least_squares is not available yet (issue 16)"
    return None


def _has_scipy() -> str | None:
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        return "scipy is not installed"
    return None


def _curve_fitting(task: Task) -> bool:
    return task.family == "mgh"


def _any_task(task: Task) -> bool:
    return True


def default_lr() -> float:
    """The ``lr`` that ``torchsven.Sven(model)`` uses when none is given."""
    import torchsven

    return float(torchsven.Sven(_probe_model()).param_groups[0]["lr"])


def default_is_plain() -> bool:
    """Whether ``torchsven.Sven(model)`` is plain Sven (no damping, no line search)."""
    import torchsven

    opt = torchsven.Sven(_probe_model())
    options = {**opt.defaults, **dict(getattr(opt, "options", {}) or {})}
    damping = options.get("damping", 0.0)
    return (
        isinstance(damping, (int, float))
        and not isinstance(damping, bool)
        and damping == 0
        and not options.get("line_search")
    )


# ----------------------------------------------------------------- registry
#: Settings per method and size: the same for every method (the same tuning budget).
GRID_SIZE = {"full": 4, "quick": 2, "tiny": 1}

Grids = dict[str, list[Setting]] | Callable[[], dict[str, list[Setting]]]


@dataclass(frozen=True)
class Method:
    """A benchmarked optimizer.

    Attributes:
        name: CLI and table name.
        summary: one line for ``list-methods``.
        build: ``(model, task, setting, steps_per_epoch) -> Stepper``.
        grids: settings to try per size (or a function returning them, for grids
            that depend on the library's defaults); every method has the same count,
            :data:`GRID_SIZE`.
        full_batch: the runner hands it the whole training set once per epoch.
        availability: returns None when the method can run, else why not.
        applies: whether the method runs on a task (solvers of small least-squares
            problems run only on the curve-fitting family).
    """

    name: str
    summary: str
    build: Builder
    grids: Grids
    full_batch: bool = False
    availability: Callable[[], str | None] = field(default=lambda: None)
    applies: Callable[[Task], bool] = field(default=_any_task)
    plain: bool | Callable[[], bool] = False

    def is_plain(self) -> bool:
        """Plain Sven: no damping and no line search (what the paper describes)."""
        return bool(self.plain() if callable(self.plain) else self.plain)

    def unavailable(self) -> str | None:
        """None when the method can run here, else the reason it cannot."""
        return self.availability()

    def grid(self, size: str) -> list[Setting]:
        grids = self.grids() if callable(self.grids) else self.grids
        return [dict(s) for s in grids[size]]


def _lr_grid(full: list[float], quick: list[float], **extra: Any) -> dict[str, list[Setting]]:
    return {
        "full": [{"lr": lr, **extra} for lr in full],
        "quick": [{"lr": lr, **extra} for lr in quick],
        "tiny": [{"lr": quick[0], **extra}],
    }


def _product(**axes: list[Any]) -> list[Setting]:
    """Every combination of the axes, the first axis varying slowest; None = leave out."""
    out: list[Setting] = [{}]
    for key, values in axes.items():
        out = [{**s, **({} if v is None else {key: v})} for s in out for v in values]
    return out


_ADAM_LRS = ([3e-2, 1e-2, 3e-3, 1e-3], [1e-2, 3e-3])


def _sven_defaults_grid() -> dict[str, list[Setting]]:
    """``sven``: the library's defaults first (``Sven(model)``), then lr x rtol around them.

    lr in {default, 0.3 x default} x rtol in {default, 1e-2}: whatever the defaults
    become, the first setting is ``Sven(model)`` with no arguments.
    """
    lr = default_lr()
    return {
        "full": _product(lr=[None, 0.3 * lr], rtol=[None, 1e-2]),
        "quick": [{}, {"lr": 0.3 * lr}],
        "tiny": [{}],
    }


#: Plain Sven (no damping): lr x rtol, the authors' defaults (lr 0.1, rtol 1e-3) first.
_PLAIN_GRID: dict[str, list[Setting]] = {
    "full": _product(lr=[0.1, 0.03], rtol=[1e-3, 1e-2]),
    "quick": [{"lr": 0.1, "rtol": 1e-3}, {"lr": 0.03, "rtol": 1e-3}],
    "tiny": [{"lr": 0.1, "rtol": 1e-3}],
}
#: LM: lr x the first damping factor (rtol stays 0, adaptive damping's default: a fixed
#: cut stalls LM on ill-conditioned problems).
_LM_GRID: dict[str, list[Setting]] = {
    "full": _product(lr=[None, 0.5], damping_init=[None, 1.0]),
    "quick": [{}, {"lr": 0.5}],
    "tiny": [{}],
}
#: least-squares solvers: method x x_scale (scipy's own choices).
_LSQ_GRID: dict[str, list[Setting]] = {
    "full": _product(method=["lm", "trf"], x_scale=["jac", 1.0]),
    "quick": [{"method": "lm", "x_scale": "jac"}, {"method": "trf", "x_scale": "jac"}],
    "tiny": [{"method": "lm", "x_scale": "jac"}],
}

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "sven",
            "torchsven.Sven(model) with the library's defaults, grid lr x rtol around them",
            _sven(),
            _sven_defaults_grid,
            plain=default_is_plain,
        ),
        Method(
            "sven-paper",
            "plain Sven on the paper's rows from_losses(per-sample losses, kappa=2) "
            "(half Gauss-Newton step; authors' lr 0.1, rtol 1e-3), grid lr x rtol",
            _sven("losses", damping=0.0),
            _PLAIN_GRID,
            plain=True,
        ),
        Method(
            "sven-svd",
            "plain Sven (no damping) on residual rows, generic backend + full SVD of the "
            "materialised J (the authors' first algorithm), grid lr x rtol",
            _sven(backend="generic", solver="svd", damping=0.0),
            _PLAIN_GRID,
            plain=True,
        ),
        Method(
            "lm",
            "Levenberg-Marquardt: Sven(damping='adaptive'), grid lr x first damping factor",
            _sven(damping="adaptive"),
            _LM_GRID,
            availability=_has_adaptive_damping,
        ),
        Method(
            "sgd",
            "torch.optim.SGD, momentum 0.9",
            _sgd,
            _lr_grid([0.3, 0.1, 0.03, 0.01], [0.1, 0.03]),
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
            _lr_grid([1.0, 0.5, 0.2, 0.1], [1.0, 0.5]),
            full_batch=True,
        ),
        Method(
            "polyak-sgd",
            "torchsven.PolyakSGD: SGD with the Polyak step, f*=0, grid over max_lr",
            _polyak,
            {
                "full": [{"max_lr": v} for v in (1.0, 0.3, 0.1, 0.03)],
                "quick": [{"max_lr": 1.0}, {"max_lr": 0.3}],
                "tiny": [{"max_lr": 0.3}],
            },
            availability=_has_polyak,
        ),
        Method(
            "sven-lsq",
            "torchsven.least_squares (scipy's interface on tensors), curve fitting only, "
            "grid method x x_scale",
            _sven_lsq,
            _LSQ_GRID,
            full_batch=True,
            availability=_has_least_squares,
            applies=_curve_fitting,
        ),
        Method(
            "scipy",
            "scipy.optimize.least_squares (MINPACK lm / trf), exact Jacobian, curve fitting "
            "only, grid method x x_scale",
            _scipy,
            _LSQ_GRID,
            full_batch=True,
            availability=_has_scipy,
            applies=_curve_fitting,
        ),
    ]
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def select_methods(patterns: list[str] | None) -> list[str]:
    """Method names for ``--methods``: names or shell patterns (``sven*``); None: all."""
    import fnmatch

    if patterns is None:
        return list(METHODS)
    chosen: list[str] = []
    for pattern in patterns:
        hits = [name for name in METHODS if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(f"unknown method {pattern!r}; known methods: {', '.join(METHODS)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen
