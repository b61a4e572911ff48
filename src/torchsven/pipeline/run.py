"""One Sven step as one transaction through the stages (``docs/design.md``).

    ev      = evaluator.evaluate(closure, ctx)     rows, finite check, backend, solve
    update  = run_chain(ev.direction, ctx)         post-RMS, momentum
    outcome = policy(ev, update, ctx, trial)       plain | adaptive | backtracking | variable rank
    info    = step_info(...)                       one StepInfo builder

``run_step`` returns the closure's first output and the :class:`StepInfo`; the
caller (``Sven.step``) commits ``ctx`` on success and restores it on any
exception. ``on_nonfinite="skip"`` turns a NonFiniteError into a skipped step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..info import StepInfo
from ..residuals import groups_of
from ..solve import SpectralSolution
from ..spectrum import SpectrumRecord, effective_rank
from .context import StepContext
from .evaluate import Evaluation, Evaluator, objective
from .policy import Outcome, policy_for
from .update import run_chain

__all__ = ["CountingClosure", "record_spectrum", "run_step", "step_info"]


class CountingClosure:
    """The user's closure, counting its calls and keeping the first output."""

    def __init__(self, closure: Callable[[], Any]) -> None:
        self.closure = closure
        self.calls = 0
        self.first: Any = None

    def __call__(self) -> Any:
        out = self.closure()
        if self.calls == 0:
            self.first = out
        self.calls += 1
        return out


def step_info(
    rows: Tensor,
    solution: SpectralSolution,
    backend: str,
    damping: float,
    kept: int | None = None,
    extras: dict[str, Any] | None = None,
) -> StepInfo:
    """The one StepInfo builder: ``loss`` and ``residual_norm`` from the rows (one sync)."""
    sq = float(rows.detach().to(torch.float64).square().sum())
    extras = dict(extras or {})
    if solution.projections is not None:  # ||J^T r||_2 = sqrt(r^T K r), free from the solve
        s, p = solution.singular_values, solution.projections
        extras.setdefault("gradient_norm", float((s.square() * p.square()).sum().sqrt()))
    return StepInfo(
        loss=0.5 * sq,
        residual_norm=math.sqrt(sq),
        singular_values=solution.singular_values,
        kept=solution.kept if kept is None else kept,
        damping=damping,
        backend=backend,
        solver=solution.solver,
        rows=rows.numel(),
        extras=extras,
    )


def _skipped(counted: CountingClosure, err: NonFiniteError) -> StepInfo:
    rows = counted.first
    n = rows.numel() if isinstance(rows, Tensor) else 0
    loss = objective(rows) if isinstance(rows, Tensor) and rows.is_floating_point() else math.nan
    return StepInfo(
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


def run_step(
    closure: Callable[[], Any], ctx: StepContext, evaluator: Evaluator
) -> tuple[Any, StepInfo]:
    """Evaluate, update, accept; returns the closure's first output and the StepInfo.

    Moves the parameters (through ``ctx``) and ``ctx.memory``'s counters; the
    caller commits or restores.
    """
    cfg = ctx.config
    counted = CountingClosure(closure)
    try:
        ev = evaluator.evaluate(counted, ctx)
    except NonFiniteError as err:
        if cfg.on_nonfinite != "skip" or counted.calls == 0:
            raise
        ctx.memory.counts["skipped"] += 1
        ctx.memory.counts["closure_calls"] += counted.calls
        return counted.first, _skipped(counted, err)
    ctx.new_state.update(ev.new_state)
    update = run_chain(ev.direction, ctx)
    # trial calls return the closure's rows as they come (micro-batches ungrouped)
    n_rows = ev.output.numel() if cfg.microbatch_size is not None else ev.rows.numel()

    def trial() -> float:
        return evaluator.trial(counted, ctx, n_rows)

    def resolve() -> Evaluation:
        return evaluator.evaluate(counted, ctx)

    outcome: Outcome = policy_for(ctx)(ev, update, ctx, trial, evaluator=evaluator, resolve=resolve)
    final = outcome.evaluation or ev
    extras = {**final.extras, **outcome.extras, **evaluator.extras()}
    if cfg.globalized is not None or cfg.variable_rank:
        extras["closure_calls"] = counted.calls
    if cfg.globalized is not None:
        ctx.memory.counts["closure_calls"] += counted.calls
    layout = groups_of(ev.output)
    if layout is not None:
        extras["groups"] = layout.report()
    damping = outcome.damping
    if damping is None:
        damping = float(cfg.damping) if not cfg.adaptive else 0.0
    info = step_info(final.rows, final.solution, final.backend, damping, outcome.kept, extras)
    return ev.output, info


def record_spectrum(ctx: StepContext, info: StepInfo) -> None:
    """Append this step's spectrum to the history when ``spectrum_every`` says so."""
    every = ctx.config.spectrum_every
    index = ctx.memory.steps
    if every is not None and index % every == 0:
        s = info.singular_values
        record = SpectrumRecord(index, s, info.kept, effective_rank(s), info.loss)
        ctx.memory.history.append(record)
