"""The evaluator stage: closure -> residual rows -> filtered direction ``J^+_k r``.

:class:`LocalEvaluator` is the one place where a step calls the closure, groups
its rows (micro-batches), checks them for NaN/Inf, lets a backend do the
Jacobian work, solves and falls back to the generic backend (exactly once,
with one warning per reason). The collective counterpart for
``torch.distributed`` (:class:`torchsven.distributed.CollectiveEvaluator`)
implements the same two methods, :meth:`~LocalEvaluator.evaluate` and
:meth:`~LocalEvaluator.trial`. See ``docs/design.md`` ("The step pipeline").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ..backends.base import Backend, Direction, FallbackRequired, check_finite
from ..backends.generic import GenericBackend, jacobian
from ..clients import check_closure_output
from ..masks import Selection, select
from ..microbatch import group_rows
from ..precondition import (
    column_scaled_step,
    mean_objective_gradient,
    rms_scale,
    update_square_avg,
)
from ..randomized import nystrom_coefficients, randomized_step
from ..solve import SpectralSolution, jacobian_step
from ..variable_rank import randomized_components, spectral_components
from .context import StepContext, flat_state

__all__ = [
    "Evaluation",
    "Evaluator",
    "LocalEvaluator",
    "check_trial_output",
    "graph_row_change",
    "objective",
    "residual_rows",
]


def residual_rows(out: Any) -> Tensor:
    """Validate what a closure returned and flatten it to rows (N,)."""
    check_closure_output(out)  # Lightning's automatic-optimization closure: say how to switch
    if not isinstance(out, Tensor):
        raise TypeError(f"closure must return a tensor of residual rows, got {type(out).__name__}")
    if out.dim() == 0:
        raise ValueError(
            "closure must return residual rows (a tensor with at least one dimension, "
            "e.g. model(x) - y), got a 0-dim tensor; Sven needs every residual, not their "
            "sum (see torchsven.from_losses for per-sample losses)"
        )
    if not out.is_floating_point():
        raise TypeError(f"closure must return floating-point residual rows, got {out.dtype}")
    if out.numel() == 0:
        raise ValueError(
            f"closure returned residual rows with no elements (shape {tuple(out.shape)})"
        )
    if not out.requires_grad:
        raise ValueError(
            "closure returned residual rows without a grad_fn: they must be computed "
            "from parameters that have requires_grad=True, with autograd enabled (no "
            ".detach(), no torch.no_grad())"
        )
    return out.reshape(-1)


def objective(rows: Tensor) -> float:
    """``0.5 ||r||^2`` in float64 (NaN/Inf pass through)."""
    return 0.5 * float(rows.detach().reshape(-1).to(torch.float64).square().sum())


def check_trial_output(out: Any, n_rows: int) -> Tensor:
    """A trial call's rows (float, same count as the step's first call)."""
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
    return out


@dataclass
class Evaluation:
    """What the evaluator computed for one step (nothing has changed yet).

    Attributes:
        output: the closure's return value (first call).
        rows: (N,) residual rows solved for; locally they keep their graph.
        direction: per trainable parameter, float64: ``J^+_k r`` (zero outside
            the step's selection), before any learning rate.
        solution: the decomposition's diagnostics (and spectral factors).
        row_change: ``J direction`` (N,) float64, or None.
        backend: the backend that computed the direction.
        components: (k, P_s) rank-1 parts of the solve-space direction (variable rank).
        selection: the step's parameter selection (masks).
        new_state: flat per-parameter state to store if the step commits.
        extras: diagnostics for ``StepInfo.extras``.
    """

    output: Any
    rows: Tensor
    direction: list[Tensor]
    solution: SpectralSolution
    row_change: Tensor | None
    backend: str
    components: Tensor | None = None
    selection: Selection | None = None
    new_state: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


class Evaluator(Protocol):
    """What the step runner needs: the first evaluation and trial objectives."""

    def evaluate(self, closure: Callable[[], Any], ctx: StepContext) -> Evaluation: ...

    def trial(self, closure: Callable[[], Any], ctx: StepContext, n_rows: int) -> float: ...

    def row_change(self, ev: Evaluation, ctx: StepContext, update: Sequence[Tensor]) -> Tensor: ...

    def extras(self) -> dict[str, Any]: ...


def fallback_message(backend: str, reason: str, everyone: bool = False) -> str:
    where = "every rank uses" if everyone else "using"
    return (
        f"Sven: the {backend} backend cannot compute this step exactly ({reason}); "
        f"{where} the generic backend"
    )


def graph_row_change(rows: Tensor, params: Sequence[Tensor], vectors: Sequence[Tensor]) -> Tensor:
    """``J v`` (N,) float64 by double backward through the rows' graph (zeros where unused)."""
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


@dataclass
class _Solved:
    """A solve-space direction: flat (P_s,), optional components (k, P_s)."""

    flat: Tensor
    solution: SpectralSolution
    row_change: Tensor | None
    components: Tensor | None = None
    square_avg: Tensor | None = None  # new full "pre" second moment (P,)
    extras: dict[str, Any] = field(default_factory=dict)  # backend diagnostics


def _matfree_pays(rows: Tensor, ctx: StepContext) -> bool:
    """Generic backend: the matrix-free sketch (about ``4 (q + 1) l`` backward passes,
    O((N + P) l) memory) instead of the materialised J (N backward passes, O(N P))."""
    cfg = ctx.config
    columns = (cfg.rank or 0) + cfg.oversample
    return rows.numel() > 4 * (cfg.power_iters + 1) * columns


class LocalEvaluator:
    """Evaluates steps in one process with a primary backend and the generic fallback."""

    def __init__(self, primary: Backend, generic: GenericBackend) -> None:
        self.primary = primary
        self.generic = generic

    # ---------------------------------------------------------------- stage
    def evaluate(self, closure: Callable[[], Any], ctx: StepContext) -> Evaluation:
        """Call the closure (hooks active) and solve. Changes nothing but ``ctx``'s generator."""
        cfg = ctx.config
        sel = (
            select(cfg.mask, cfg.param_fraction, ctx.params, ctx.model, ctx.generator)
            if cfg.masked
            else Selection(ctx.params)
        )
        primary = self.generic if cfg.needs_generic else self.primary
        with torch.enable_grad():  # also for the backends' autograd calls after the closure
            # the selection's hooks first: the capture must see the layers' final outputs
            with sel.hooks(), primary.capture(sel.solve_params, sel) as captured:
                out = closure()
            rows = residual_rows(out)
            if cfg.microbatch_size is not None:
                rows = group_rows(out, cfg.microbatch_size)
            check_finite(rows.detach(), "the residual rows returned by the closure")
            if not ctx.params:
                direction = self.generic.direction(rows, [], ctx.filter)
                return Evaluation(out, rows, [], direction.solution, None, self.generic.name)
            if sel.index is None and not (cfg.needs_jacobian or cfg.randomized):
                direction, used = self.direction(primary, rows, ctx, captured, out)
                check_finite(direction.step, "the Sven step (the Jacobian has NaN or Inf entries)")
                return Evaluation(
                    out,
                    rows,
                    direction.step,
                    direction.solution,
                    direction.row_change,
                    used,
                    extras=dict(direction.extras),
                )
            solved, used = self._special(primary, rows, sel, ctx, captured, out)
        check_finite(solved.flat, "the Sven step (the Jacobian has NaN or Inf entries)")
        total = sum(p.numel() for p in ctx.params)
        new_state = {} if solved.square_avg is None else {"square_avg": solved.square_avg}
        extras = dict(solved.extras)
        if cfg.masked:
            extras["selected"] = int(solved.flat.numel())
        return Evaluation(
            out,
            rows,
            ctx.split(sel.to_full(solved.flat, total)),
            solved.solution,
            solved.row_change,
            used,
            solved.components,
            sel,
            new_state,
            extras,
        )

    def direction(
        self,
        primary: Backend,
        rows: Tensor,
        ctx: StepContext,
        captured: Any,
        output: Any,
        params: Sequence[Tensor] | None = None,
    ) -> tuple[Direction, str]:
        """The primary backend's direction, or the generic one when it cannot."""
        params = ctx.params if params is None else params
        if primary is self.generic:
            return self.generic.direction(rows, params, ctx.filter), self.generic.name
        try:
            return primary.direction(rows, params, ctx.filter, captured, output), primary.name
        except FallbackRequired as why:
            ctx.warn_once(why.reason, fallback_message(primary.name, why.reason), stacklevel=5)
            return self.generic.direction(rows, params, ctx.filter), self.generic.name

    def _special(
        self,
        primary: Backend,
        rows: Tensor,
        sel: Selection,
        ctx: StepContext,
        captured: Any,
        output: Any,
    ) -> tuple[_Solved, str]:
        """Directions of the paper's options: masks, "pre", variable rank, randomized."""
        cfg = ctx.config
        params = sel.solve_params
        if cfg.randomized and not cfg.needs_jacobian:
            pays = _matfree_pays(rows, ctx)
            if primary is not self.generic or pays:
                try:
                    return self._rank_k(primary, rows, params, ctx, captured, output), primary.name
                except FallbackRequired as why:
                    ctx.warn_once(why.reason, fallback_message(primary.name, why.reason), 6)
                if pays:  # matrix-free on the generic backend too
                    return self._rank_k(self.generic, rows, params, ctx, None, output), "generic"
        elif not (cfg.needs_jacobian or cfg.randomized):  # a tensor or row selection
            direction, used = self.direction(primary, rows, ctx, captured, output, params)
            flat = torch.cat([d.reshape(-1) for d in direction.step])
            return _Solved(flat, direction.solution, direction.row_change), used
        return self._materialised(rows, sel, ctx), self.generic.name

    def _rank_k(
        self,
        backend: Backend,
        rows: Tensor,
        params: list[Tensor],
        ctx: StepContext,
        captured: Any,
        output: Any,
    ) -> _Solved:
        """Randomized rank-k solve: matrix-free (block products ``K V``) where the
        backend declares it, else a Nystrom sketch of the formed K."""
        cfg = ctx.config
        if backend.provides_matfree:
            assert cfg.rank is not None
            d = backend.matfree_direction(
                rows,
                params,
                ctx.filter,
                captured,
                output,
                columns=cfg.rank + cfg.oversample,
                power_iters=cfg.power_iters,
                generator=ctx.generator,
            )
            flat = torch.cat([t.reshape(-1) for t in d.step])
            return _Solved(flat, d.solution, d.row_change, extras=dict(d.extras))
        gram = backend.gram_matrix(rows, params, captured, output)
        return self._nystrom(gram, rows, params, ctx)

    def _nystrom(
        self, gram: Tensor, rows: Tensor, params: list[Tensor], ctx: StepContext
    ) -> _Solved:
        """Randomized solve on K: ``c`` by a Nystrom sketch, ``J^T c`` by one backward."""
        cfg = ctx.config
        r64 = rows.detach().reshape(-1).to(torch.float64)
        coeffs, solution = nystrom_coefficients(
            gram, r64, ctx.filter, cfg.oversample, cfg.power_iters, ctx.generator
        )
        grads = torch.autograd.grad(
            rows, params, grad_outputs=coeffs.to(rows.dtype), retain_graph=True, allow_unused=True
        )
        flat = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1).to(torch.float64)
                for g, p in zip(grads, params, strict=True)
            ]
        )
        return _Solved(flat, solution, gram @ coeffs)

    def _materialised(self, rows: Tensor, sel: Selection, ctx: StepContext) -> _Solved:
        """Direction from the materialised J over the selection (generic backend)."""
        cfg, filt = ctx.config, ctx.filter
        jac = jacobian(rows, sel.solve_params, chunk_bytes=cfg.chunk_bytes)
        check_finite(jac, "the Jacobian of the residual rows")
        if sel.columns is not None:
            jac = jac[:, sel.columns.to(jac.device)]
        r64 = rows.detach().reshape(-1).to(torch.float64)
        scale, square_avg = None, None
        if cfg.precondition == "pre":
            square_avg = flat_state(ctx.state, ctx.params, "square_avg").to(jac.device)
            index = sel.index if sel.index is not None else slice(None)
            grad = mean_objective_gradient(jac, r64)
            square_avg[index] = update_square_avg(square_avg[index], grad, cfg.rmsprop_alpha)
            scale = rms_scale(square_avg[index], cfg.rmsprop_eps)
        scaled = jac if scale is None else jac * scale
        components = None
        sketch = (cfg.oversample, cfg.power_iters, ctx.generator)
        if cfg.variable_rank:
            if cfg.randomized:
                components, solution = randomized_components(scaled, r64, filt, *sketch)
            else:
                components, solution = spectral_components(scaled, r64, filt, cfg.solver)
            if scale is not None:
                components = components * scale
            flat = components.sum(0)
        elif cfg.randomized:
            flat, solution = randomized_step(scaled, r64, filt, *sketch)
            flat = flat if scale is None else flat * scale
        elif scale is not None:
            flat, solution = column_scaled_step(jac, r64, scale, filt, cfg.solver)
        else:
            flat, solution = jacobian_step(jac, r64, filt, cfg.solver)
        return _Solved(flat, solution, jac @ flat, components, square_avg)

    def extras(self) -> dict[str, Any]:
        """Evaluator-level diagnostics of the step (none for one process)."""
        return {}

    # ---------------------------------------------------------------- trials
    def trial(self, closure: Callable[[], Any], ctx: StepContext, n_rows: int) -> float:
        """Objective ``0.5 ||r||^2`` at the current parameters (a trial call)."""
        with torch.enable_grad():
            out = closure()
        return objective(check_trial_output(out, n_rows))

    def row_change(self, ev: Evaluation, ctx: StepContext, update: Sequence[Tensor]) -> Tensor:
        """``J h`` (N,) float64 for the applied change ``h_g = lr_g update_g``.

        Through the rows' graph (which the backends retain). When the evaluation
        also has ``row_change = J direction``, the graph must reproduce it: rows
        computed from detached copies of masked weights (``mask="rows"``) do not
        reach the parameters, which is a ValueError raised before anything changes.
        """
        scaled = [lr * u for u, lr in zip(update, ctx.lrs, strict=True)]
        change = graph_row_change(ev.rows, ctx.params, scaled)
        if ev.row_change is not None:
            plain = graph_row_change(ev.rows, ctx.params, ev.direction)
            expected = ev.row_change.to(torch.float64).reshape(-1)
            if float((plain - expected).norm()) > 1e-6 * float(expected.norm()) + 1e-300:
                raise ValueError(
                    "param groups with different lr need J h through the rows' autograd graph "
                    "(for the predicted reduction of damping='adaptive' / line_search), but "
                    "this step's rows do not reach the parameters through autograd (as with "
                    "mask='rows'); use one lr for all groups, or another mask"
                )
        return change
