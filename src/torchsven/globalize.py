"""Globalised Sven steps: adaptive damping, backtracking, non-finite handling.

A plain Sven step applies ``theta <- theta - h`` with ``h_g = lr_g (J^+_k r)_g``.
The steps here evaluate the objective ``f = 0.5 ||r||^2`` once more (or a few
times) at the trial point and keep the step only when it helps:

* adaptive damping (:mod:`torchsven.damping`): one trial, gain ratio against
  the linear model ``m(h) = 0.5 ||r - J h||^2``, Nielsen's update of the factor;
* backtracking: trials at ``theta - alpha h``, ``alpha = 1, ...`` until Armijo's
  ``f(theta - alpha h) <= f(theta) - c alpha r^T J h`` holds;
* ``on_nonfinite="skip"``: a step whose rows or Jacobian hold NaN/Inf leaves
  everything unchanged and is counted instead of raising.

A step that is not kept restores the parameters bit for bit from a copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .backends.base import Direction
from .damping import AdaptiveDamping, DampingState, gain_ratio, nielsen_update
from .errors import NonFiniteError
from .info import StepInfo

if TYPE_CHECKING:
    from .optim import Sven

__all__ = [
    "NONFINITE_MODES",
    "BacktrackingLineSearch",
    "RobustState",
    "linear_row_change",
    "objective",
    "parse_line_search",
    "parse_on_nonfinite",
    "robust_step",
]

#: Accepted values of ``Sven(on_nonfinite=...)``.
NONFINITE_MODES = ("raise", "skip")


@dataclass(frozen=True)
class BacktrackingLineSearch:
    """Options of ``line_search="backtracking"``.

    Attributes:
        armijo: sufficient-decrease constant ``c`` in
            ``f(theta - alpha h) <= f(theta) - c alpha r^T J h``.
        max_trials: closure calls before the step is given up (parameters restored).
        shrink_min, shrink_max: the next ``alpha`` is the minimiser of the
            quadratic through ``f(0)``, the slope and ``f(alpha)``, clipped to
            ``[shrink_min alpha, shrink_max alpha]``.
    """

    armijo: float = 1e-4
    max_trials: int = 10
    shrink_min: float = 0.1
    shrink_max: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.max_trials, bool) or not isinstance(self.max_trials, int):
            raise TypeError("BacktrackingLineSearch.max_trials must be an int >= 1")
        if self.max_trials < 1:
            raise ValueError(
                f"BacktrackingLineSearch.max_trials must be >= 1, got {self.max_trials}"
            )
        for name in ("armijo", "shrink_min", "shrink_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"BacktrackingLineSearch.{name} must be a real number")
        if not 0 < self.armijo < 1:
            raise ValueError(f"BacktrackingLineSearch.armijo must be in (0, 1), got {self.armijo}")
        if not 0 < self.shrink_min <= self.shrink_max < 1:
            raise ValueError(
                "BacktrackingLineSearch needs 0 < shrink_min <= shrink_max < 1, got "
                f"{self.shrink_min} and {self.shrink_max}"
            )


def parse_line_search(value: Any) -> BacktrackingLineSearch | None:
    """``line_search=``: None/False (off), True/"backtracking", an instance, or its dict."""
    if value is None or value is False:
        return None
    if value is True or value == "backtracking":
        return BacktrackingLineSearch()
    if isinstance(value, BacktrackingLineSearch):
        return value
    if isinstance(value, dict):
        return BacktrackingLineSearch(**value)
    if isinstance(value, str):
        raise ValueError(f"line_search must be None, 'backtracking' or True, got {value!r}")
    raise TypeError(
        "line_search must be None, 'backtracking', a bool or a BacktrackingLineSearch, got "
        f"{type(value).__name__}"
    )


def parse_on_nonfinite(value: Any) -> str:
    if not isinstance(value, str) or value not in NONFINITE_MODES:
        raise ValueError(f"on_nonfinite must be one of {list(NONFINITE_MODES)}, got {value!r}")
    return value


@dataclass
class RobustState:
    """What the globalised steps carry between steps (all in ``state_dict``)."""

    damping: DampingState | None = None
    counts: dict[str, int] = field(
        default_factory=lambda: {"accepted": 0, "rejected": 0, "skipped": 0, "closure_calls": 0}
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "damping": None if self.damping is None else asdict(self.damping),
            "counts": dict(self.counts),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RobustState:
        damping = data.get("damping")
        state = cls(None if damping is None else DampingState(**damping))
        state.counts.update({k: int(v) for k, v in data.get("counts", {}).items()})
        return state


# ---------------------------------------------------------------- pure helpers
def objective(rows: Tensor) -> float:
    """``0.5 ||r||^2`` in float64 (NaN/Inf pass through)."""
    return 0.5 * float(rows.detach().reshape(-1).to(torch.float64).square().sum())


def linear_row_change(
    rows: Tensor, params: Sequence[Tensor], lrs: Sequence[float], direction: Direction
) -> Tensor:
    """``J h`` (N,) float64 for the applied change ``h_g = lr_g step_g``.

    Uses the backend's ``row_change = J step`` when every group has the same lr;
    otherwise Jacobian-vector products by double backward through the rows'
    graph (which the backends retain). When the backend also gave ``row_change``,
    the graph's ``J step`` must reproduce it; a graph that does not reach the
    parameters (e.g. rows computed from detached copies of masked weights) is a
    ValueError, raised before anything changes.
    """
    n = rows.numel()
    if direction.row_change is not None and len(set(lrs)) <= 1:
        scale = lrs[0] if lrs else 0.0
        return scale * direction.row_change.to(torch.float64).reshape(-1)
    scaled = _graph_jvp(rows, params, [lr * d for d, lr in zip(direction.step, lrs, strict=True)])
    if direction.row_change is not None:
        plain = _graph_jvp(rows, params, direction.step)
        expected = direction.row_change.to(torch.float64).reshape(-1)
        if float((plain - expected).norm()) > 1e-6 * float(expected.norm()) + 1e-300:
            raise ValueError(
                "param groups with different lr need J h through the rows' autograd graph "
                "(for the predicted reduction of damping='adaptive' / line_search), but this "
                "step's rows do not reach the parameters through autograd (as with "
                "mask='rows'); use one lr for all groups, or another mask"
            )
    return scaled if scaled is not None else torch.zeros(n, dtype=torch.float64)


def _graph_jvp(rows: Tensor, params: Sequence[Tensor], vectors: Sequence[Tensor]) -> Tensor:
    """``J v`` (N,) float64 by double backward (zeros where the graph does not reach)."""
    flat_rows = rows.reshape(-1)
    zeros = torch.zeros(flat_rows.numel(), dtype=torch.float64, device=rows.device)
    probe = torch.zeros_like(flat_rows, requires_grad=True)
    with torch.enable_grad():
        grads = torch.autograd.grad(
            flat_rows, params, grad_outputs=probe, create_graph=True, allow_unused=True
        )
        pairs = [
            (g, v.to(g.dtype))
            for g, v in zip(grads, vectors, strict=True)
            if g is not None and g.requires_grad
        ]
        if not pairs:
            return zeros
        (jv,) = torch.autograd.grad(
            [g for g, _ in pairs], probe, grad_outputs=[v for _, v in pairs], allow_unused=True
        )
    return zeros if jv is None else jv.detach().to(torch.float64)


class _CountingClosure:
    """Wraps the user's closure: counts calls and keeps the first output."""

    def __init__(self, closure: Callable[[], Tensor]) -> None:
        self.closure = closure
        self.calls = 0
        self.first: Any = None

    def __call__(self) -> Any:
        out = self.closure()
        if self.calls == 0:
            self.first = out
        self.calls += 1
        return out

    def trial(self, n_rows: int) -> float:
        """Objective at the current parameters; the rows must match the first call's."""
        with torch.enable_grad():
            out = self()
        if not isinstance(out, Tensor) or not out.is_floating_point():
            raise TypeError(
                "closure must return floating-point residual rows on every call, got "
                f"{type(out).__name__ if not isinstance(out, Tensor) else out.dtype} "
                "on the trial call"
            )
        if out.numel() != n_rows:
            raise ValueError(
                f"closure returned {n_rows} rows on the first call of this step and "
                f"{out.numel()} on the trial call; a globalised step needs the same rows "
                "(same batch) on every call within one step"
            )
        return objective(out)


def _snapshot(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


def _restore(params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)


# ------------------------------------------------------------------ the step
def robust_step(opt: Sven, closure: Callable[[], Tensor], params: list[Tensor], lrs: list[float]):
    """One globalised step of ``opt`` (adaptive damping, backtracking and/or skip).

    Returns the closure's first output. Updates ``opt.last_step`` and the
    counters in ``opt._robust``; parameters change only for a kept step.
    """
    robust: RobustState = opt._robust
    counted = _CountingClosure(closure)
    try:
        out, rows, direction, used = opt._evaluate(counted, params)
    except NonFiniteError as err:
        if opt.options["on_nonfinite"] != "skip" or counted.calls == 0:
            raise
        robust.counts["closure_calls"] += counted.calls
        return _skip(opt, counted, err)
    damping = opt.options["damping"]
    s = direction.solution.singular_values
    mu = opt.filter.mu(s[0]) if s.numel() else 0.0
    if isinstance(damping, AdaptiveDamping):
        extras = _adaptive(opt, counted, rows, params, lrs, direction, damping)
    elif opt.options["line_search"] is not None:
        extras = _backtrack(opt, counted, rows, params, lrs, direction)
    else:
        opt._apply(params, lrs, direction.step)
        extras = {}
    robust.counts["closure_calls"] += counted.calls
    extras["closure_calls"] = counted.calls
    opt._steps += 1
    opt.last_step = opt._info(rows, direction, used, damping=mu, **extras)
    return out


def _skip(opt: Sven, counted: _CountingClosure, err: NonFiniteError) -> Any:
    rows = counted.first
    n = rows.numel() if isinstance(rows, Tensor) else 0
    loss = objective(rows) if isinstance(rows, Tensor) and rows.is_floating_point() else math.nan
    opt._robust.counts["skipped"] += 1
    opt._steps += 1
    opt.last_step = StepInfo(
        loss=loss,
        residual_norm=math.sqrt(2.0 * loss) if loss >= 0 else math.nan,
        singular_values=torch.zeros(0, dtype=torch.float64),
        kept=0,
        damping=0.0,
        backend="none",
        solver="none",
        rows=n,
        extras={"skipped": True, "reason": str(err), "closure_calls": counted.calls},
    )
    return rows


def _adaptive(
    opt: Sven,
    counted: _CountingClosure,
    rows: Tensor,
    params: list[Tensor],
    lrs: list[float],
    direction: Direction,
    options: AdaptiveDamping,
) -> dict[str, Any]:
    robust: RobustState = opt._robust
    before = robust.damping if robust.damping is not None else DampingState(options.init)
    s = direction.solution.singular_values
    s_max = float(s[0]) if s.numel() else 0.0
    rows64 = rows.detach().reshape(-1).to(torch.float64)
    f0 = 0.5 * float(rows64.square().sum())
    extras: dict[str, Any] = {
        "damping_factor_before": before.factor,
        "damping_before": before.factor * s_max**2,
    }
    if direction.solution.kept == 0 or not params:
        # Nothing to step along (zero Jacobian or no trainable parameter): no-op.
        robust.damping = before
        robust.counts["accepted"] += 1
        extras.update(
            gain_ratio=math.nan,
            accepted=True,
            predicted_reduction=0.0,
            actual_reduction=0.0,
            trial_loss=f0,
            damping_factor_after=before.factor,
            damping_after=extras["damping_before"],
        )
        return extras
    jh = linear_row_change(rows, params, lrs, direction)
    # f0 - m(h) = r^T J h - 0.5 ||J h||^2 (no cancellation against f0)
    predicted = float(rows64 @ jh) - 0.5 * float(jh.square().sum())
    if abs(predicted) <= 4 * torch.finfo(rows.dtype).eps * f0:
        # Nothing the objective could resolve in the rows' precision (zero rows, a
        # zero step, or a converged float32 run): keep lambda, take no trial.
        robust.damping = before
        robust.counts["accepted"] += 1
        extras.update(
            gain_ratio=math.nan,
            accepted=True,
            predicted_reduction=predicted,
            actual_reduction=0.0,
            trial_loss=f0,
            damping_factor_after=before.factor,
            damping_after=extras["damping_before"],
        )
        return extras
    actual, f_trial = -math.inf, math.nan
    saved = None
    if predicted > 0:
        saved = _snapshot(params)
        opt._apply(params, lrs, direction.step)
        try:
            f_trial = counted.trial(rows64.numel())
        except BaseException:
            _restore(params, saved)
            raise
        actual = f0 - f_trial
    rho = gain_ratio(actual, predicted)
    after, accepted = nielsen_update(before, rho, options)
    if not accepted and saved is not None:
        _restore(params, saved)
    robust.damping = after
    robust.counts["accepted" if accepted else "rejected"] += 1
    extras.update(
        gain_ratio=rho,
        accepted=accepted,
        predicted_reduction=predicted,
        actual_reduction=actual,
        trial_loss=f_trial,
        damping_factor_after=after.factor,
        damping_after=after.factor * s_max**2,
    )
    return extras


def _backtrack(
    opt: Sven,
    counted: _CountingClosure,
    rows: Tensor,
    params: list[Tensor],
    lrs: list[float],
    direction: Direction,
) -> dict[str, Any]:
    search: BacktrackingLineSearch = opt.options["line_search"]
    robust: RobustState = opt._robust
    rows64 = rows.detach().reshape(-1).to(torch.float64)
    f0 = 0.5 * float(rows64.square().sum())
    slope = 0.0
    if direction.solution.kept > 0 and params:
        # f(theta - alpha h) = f0 - alpha r^T J h + O(alpha^2)
        slope = float(rows64 @ linear_row_change(rows, params, lrs, direction))
    if not slope > 0:
        robust.counts["accepted"] += 1
        return {"accepted": True, "step_size": 0.0, "trial_loss": f0, "trials": 0}
    saved = _snapshot(params)
    alpha, trials, f_trial = 1.0, 0, math.nan
    try:
        while trials < search.max_trials:
            if trials:
                _restore(params, saved)
            opt._apply(params, [alpha * lr for lr in lrs], direction.step)
            f_trial = counted.trial(rows64.numel())
            trials += 1
            if math.isfinite(f_trial) and f_trial <= f0 - search.armijo * alpha * slope:
                robust.counts["accepted"] += 1
                return {
                    "accepted": True,
                    "step_size": alpha,
                    "trial_loss": f_trial,
                    "trials": trials,
                }
            alpha = _next_alpha(alpha, f0, slope, f_trial, search)
    except BaseException:
        _restore(params, saved)
        raise
    _restore(params, saved)
    robust.counts["rejected"] += 1
    return {"accepted": False, "step_size": 0.0, "trial_loss": f_trial, "trials": trials}


def _next_alpha(
    alpha: float, f0: float, slope: float, f_trial: float, search: BacktrackingLineSearch
) -> float:
    """Minimiser of the quadratic through f0, slope -slope and f(alpha), safeguarded."""
    lo, hi = search.shrink_min * alpha, search.shrink_max * alpha
    if not math.isfinite(f_trial):
        return hi
    curvature = f_trial - f0 + slope * alpha
    if curvature <= 0:
        return hi
    return min(max(slope * alpha * alpha / (2.0 * curvature), lo), hi)
