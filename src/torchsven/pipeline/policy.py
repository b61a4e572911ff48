"""Acceptance policies: how much of the update a step applies.

Each policy receives the evaluation, the update (per parameter, before the
learning rates), the step context and a ``trial`` function (the objective
``0.5 ||r||^2`` after moving the parameters), never the optimizer. It moves
the parameters through ``ctx.apply`` / ``ctx.restore`` and returns an
:class:`Outcome` with its diagnostics:

* :func:`plain`: ``theta <- theta - lr u``;
* :func:`adaptive`: Levenberg-Marquardt damping ``mu = lambda s_1^2`` with the
  gain ratio against the predicted reduction and Nielsen's update of
  ``lambda`` (:mod:`torchsven.damping`); up to ``max_trials`` trials per call,
  each rejected one re-solving with more damping on the same decomposition;
* :func:`backtracking`: Armijo backtracking on ``lr``;
* :func:`variable_rank`: the best prefix of the rank-1 components.

Predicted reductions come from the spectral factors
(:meth:`torchsven.solve.SpectralSolution.predicted_reduction`) when every
group has one lr; only otherwise from ``J h`` through the rows' graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..backends.base import flat_to_params
from ..damping import AdaptiveDamping, DampingState, gain_ratio, nielsen_update
from ..variable_rank import greedy_prefix
from .context import StepContext
from .evaluate import Evaluation, Evaluator

__all__ = ["Outcome", "Trial", "adaptive", "backtracking", "plain", "policy_for", "variable_rank"]

#: ``trial()``: the objective at the current parameters (one closure call).
Trial = Callable[[], float]


@dataclass
class Outcome:
    """What a policy did: diagnostics, the kept count / damping to report, and the
    evaluation the applied step came from when the policy re-evaluated."""

    extras: dict[str, Any] = field(default_factory=dict)
    kept: int | None = None
    damping: float | None = None
    evaluation: Evaluation | None = None


def plain(
    ev: Evaluation, update: list[Tensor], ctx: StepContext, trial: Trial, **_: Any
) -> Outcome:
    """``theta_g <- theta_g - lr_g u_g`` (the last thing a plain step does: no snapshot)."""
    ctx.apply(update, save=False)
    return Outcome()


def _reduction(
    ev: Evaluation,
    update: Sequence[Tensor],
    ctx: StepContext,
    evaluator: Evaluator,
    rows64: Tensor,
) -> tuple[float, float]:
    """``(predicted, slope)`` of ``f`` along ``h_g = lr_g update_g``.

    ``predicted = f(theta) - m(h)``, ``slope = r^T J h``: from the spectral
    factors when every group has one lr, else from ``J h`` (rows' graph).
    """
    lr = ctx.uniform_lr
    if lr is not None and ev.solution.projections is not None:
        predicted = ev.solution.predicted_reduction(lr)
        slope = ev.solution.slope(lr)
        assert predicted is not None and slope is not None
        return predicted, slope
    if lr is not None and ev.row_change is not None:
        jh = lr * ev.row_change.to(torch.float64).reshape(-1)
    else:
        jh = evaluator.row_change(ev, ctx, update)
    slope = float(rows64 @ jh)
    return slope - 0.5 * float(jh.square().sum()), slope


def adaptive(
    ev: Evaluation,
    update: list[Tensor],
    ctx: StepContext,
    trial: Trial,
    evaluator: Evaluator,
    resolve: Callable[[], Evaluation] | None = None,
) -> Outcome:
    """Levenberg-Marquardt step with the gain ratio (see the module docstring).

    ``resolve()`` evaluates the step again with the damping now in
    ``ctx.memory`` (after a rejection, when ``max_trials`` allows another trial).
    """
    options = ctx.config.damping
    assert isinstance(options, AdaptiveDamping)
    memory = ctx.memory
    before = memory.damping if memory.damping is not None else DampingState(options.init)
    s = ev.solution.singular_values
    s_max = float(s[0]) if s.numel() else 0.0
    rows64 = ev.rows.detach().reshape(-1).to(torch.float64)
    f0 = 0.5 * float(rows64.square().sum())
    extras: dict[str, Any] = {
        "damping_factor_before": before.factor,
        "damping_before": before.factor * s_max**2,
    }
    state, used, trials = before, before.factor, 0
    accepted, rho, predicted, actual, f_trial = True, math.nan, 0.0, 0.0, f0
    while ev.solution.kept > 0 and ctx.params:  # else nothing to step along: a no-op
        predicted, _ = _reduction(ev, update, ctx, evaluator, rows64)
        if abs(predicted) <= 4 * torch.finfo(ev.rows.dtype).eps * f0:
            # Nothing the objective could resolve in the rows' precision (zero rows, a
            # zero step, or a converged float32 run): keep lambda, take no trial.
            accepted, rho, actual, f_trial = True, math.nan, 0.0, f0
            break
        actual, f_trial = -math.inf, math.nan
        if predicted > 0:
            ctx.apply(update)
            trials += 1
            f_trial = trial()
            actual = f0 - f_trial
        rho = gain_ratio(actual, predicted)
        used = state.factor
        state, accepted = nielsen_update(state, rho, options)
        if accepted:
            break
        ctx.restore()
        if trials >= ctx.config.max_trials or resolve is None:
            break
        memory.damping = state
        ev = resolve()
        update = ev.direction
    memory.damping = state
    memory.counts["accepted" if accepted else "rejected"] += 1
    extras.update(
        gain_ratio=rho,
        accepted=accepted,
        predicted_reduction=predicted,
        actual_reduction=actual,
        trial_loss=f_trial,
        damping_factor_after=state.factor,
        damping_after=state.factor * s_max**2,
    )
    if ctx.config.max_trials > 1:
        extras["trials"] = trials
    return Outcome(extras, kept=ev.solution.kept, damping=used * s_max**2, evaluation=ev)


def backtracking(
    ev: Evaluation,
    update: list[Tensor],
    ctx: StepContext,
    trial: Trial,
    evaluator: Evaluator,
    **_: Any,
) -> Outcome:
    """Armijo backtracking on the step size ``alpha`` in ``theta - alpha lr u``."""
    search = ctx.config.line_search
    assert search is not None
    counts = ctx.memory.counts
    rows64 = ev.rows.detach().reshape(-1).to(torch.float64)
    f0 = 0.5 * float(rows64.square().sum())
    slope = 0.0
    if ev.solution.kept > 0 and ctx.params:
        slope = _reduction(ev, update, ctx, evaluator, rows64)[1]
    if not slope > 0:
        counts["accepted"] += 1
        return Outcome({"accepted": True, "step_size": 0.0, "trial_loss": f0, "trials": 0})
    alpha, trials, f_trial = 1.0, 0, math.nan
    while trials < search.max_trials:
        if trials:
            ctx.restore()
        ctx.apply(update, alpha)
        f_trial = trial()
        trials += 1
        if math.isfinite(f_trial) and f_trial <= f0 - search.armijo * alpha * slope:
            counts["accepted"] += 1
            extras = {"accepted": True, "step_size": alpha, "trial_loss": f_trial}
            return Outcome({**extras, "trials": trials})
        alpha = _next_alpha(alpha, f0, slope, f_trial, search.shrink_min, search.shrink_max)
    ctx.restore()
    counts["rejected"] += 1
    return Outcome({"accepted": False, "step_size": 0.0, "trial_loss": f_trial, "trials": trials})


def _next_alpha(
    alpha: float, f0: float, slope: float, f_trial: float, shrink_min: float, shrink_max: float
) -> float:
    """Minimiser of the quadratic through f0, slope -slope and f(alpha), safeguarded."""
    lo, hi = shrink_min * alpha, shrink_max * alpha
    if not math.isfinite(f_trial):
        return hi
    curvature = f_trial - f0 + slope * alpha
    if curvature <= 0:
        return hi
    return min(max(slope * alpha * alpha / (2.0 * curvature), lo), hi)


def variable_rank(
    ev: Evaluation, update: list[Tensor], ctx: StepContext, trial: Trial, **_: Any
) -> Outcome:
    """Keep the best prefix of the rank-1 components (greedy, by the objective)."""
    comps, sel = ev.components, ev.selection
    assert comps is not None and sel is not None
    total = sum(p.numel() for p in ctx.params)

    def move_to(prefix: Tensor) -> None:
        ctx.restore(buffers=False)
        ctx.apply(flat_to_params(sel.to_full(prefix, total), ctx.params))

    running = torch.zeros_like(comps[0]) if comps.shape[0] else None

    def objective_after(m: int) -> float:
        nonlocal running
        running = running + comps[m - 1]
        move_to(running)
        return trial()

    start = 0.5 * float(ev.rows.detach().to(torch.float64).square().sum())
    best, _ = greedy_prefix(objective_after, comps.shape[0], start)
    move_to(comps[:best].sum(0))
    extras = {"variable_rank": best, "kept_by_filter": ev.solution.kept}
    return Outcome(extras, kept=best)


def policy_for(ctx: StepContext) -> Callable[..., Outcome]:
    """The acceptance policy the options select."""
    cfg = ctx.config
    if cfg.adaptive:
        return adaptive
    if cfg.line_search is not None:
        return backtracking
    if cfg.variable_rank and ctx.params:
        return variable_rank
    return plain
