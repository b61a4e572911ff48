"""The options of the paper's method on top of the plain Sven step.

``Sven(precondition=..., momentum=..., variable_rank=..., param_fraction=...,
mask=..., randomized=..., spectrum_every=...)``. The math is in
:mod:`torchsven.precondition`, :mod:`torchsven.masks`,
:mod:`torchsven.randomized`, :mod:`torchsven.variable_rank` and
:mod:`torchsven.spectrum`; this module validates the options and runs one
step with them (:class:`Variants`). Its state (the seeded generator, the
spectrum history) goes into ``Sven.state_dict()``; the per-parameter
``square_avg`` and ``momentum_buffer`` live in ``opt.state[p]``.

One step, in order:

1. draw the parameter selection (masks) from the seeded generator;
2. call the closure (row-mask hooks active) and get the rows r;
3. direction on the selected columns: through the backend, or, when an option
   needs the Jacobian itself (``precondition="pre"``, ``mask="entries"`` with
   ``param_fraction < 1``, ``variable_rank``, ``randomized``), from the
   materialised J of the generic backend;
4. ``precondition="post"``, then momentum, on the full update;
5. apply with the group lrs, or (``variable_rank``) keep the best prefix of
   rank-1 components by evaluating the closure.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .backends.base import Direction, FallbackRequired, check_finite, flat_to_params
from .backends.generic import jacobian
from .errors import SvenFallbackWarning
from .info import StepInfo
from .masks import MASKS, Selection, select
from .precondition import (
    PRECONDITIONERS,
    column_scaled_step,
    heavy_ball,
    mean_objective_gradient,
    rms_scale,
    update_square_avg,
)
from .randomized import nystrom_coefficients, randomized_step
from .solve import SpectralFilter, SpectralSolution, jacobian_step
from .spectrum import SpectrumRecord, effective_rank
from .variable_rank import greedy_prefix, randomized_components, spectral_components

if TYPE_CHECKING:
    from .optim import Sven

__all__ = ["VARIANT_OPTIONS", "VariantOptions", "Variants", "check_variant_options"]

#: Sven keyword arguments owned by this module (global: a param group may not set them).
VARIANT_OPTIONS = (
    "precondition",
    "rmsprop_alpha",
    "rmsprop_eps",
    "momentum",
    "variable_rank",
    "param_fraction",
    "mask",
    "seed",
    "randomized",
    "oversample",
    "power_iters",
    "spectrum_every",
)


@dataclass(frozen=True)
class VariantOptions:
    """Validated options (see ``Sven``'s docstring for their meaning)."""

    precondition: str | None = None
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 1e-8
    momentum: float = 0.0
    variable_rank: bool = False
    param_fraction: float = 1.0
    mask: str = "entries"
    seed: int = 0
    randomized: bool = False
    oversample: int = 10
    power_iters: int = 2
    spectrum_every: int | None = None

    @property
    def needs_jacobian(self) -> bool:
        """Whether the step needs the materialised J (generic backend). ``randomized``
        alone does not: on a backend with a Gram matrix it is a Nystrom solve."""
        return (
            self.precondition == "pre"
            or self.variable_rank
            or (self.param_fraction < 1.0 and self.mask == "entries")
        )

    @property
    def needs_generic(self) -> bool:
        """Whether only the generic backend runs these options: a materialised J, or
        row masks (their leaf tensors belong to no module the factored hooks see)."""
        return self.needs_jacobian or (self.param_fraction < 1.0 and self.mask == "rows")

    @property
    def changes_direction(self) -> bool:
        """Masks, ``"pre"`` or randomized: the direction itself differs."""
        return self.param_fraction < 1.0 or self.precondition == "pre" or self.randomized

    @property
    def changes_update(self) -> bool:
        """``"post"``, momentum or variable rank: what is applied differs."""
        return self.precondition == "post" or self.momentum > 0 or self.variable_rank

    @property
    def changes_step(self) -> bool:
        """Whether any option changes the plain Sven step (``spectrum_every`` does not)."""
        return self != VariantOptions(seed=self.seed, spectrum_every=self.spectrum_every)

    @property
    def active(self) -> bool:
        """Whether :class:`Variants` runs the step (an option is set)."""
        return self.changes_step or self.spectrum_every is not None


def _real(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool,
    high_open: bool,
    expected: str,
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    ok = math.isfinite(value) and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def _int(name: str, value: Any, low: int, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_variant_options(
    rank: int | None = None,
    backend: str = "auto",
    has_model: bool = True,
    globalized: str | None = None,
    distributed: bool = False,
    **kwargs: Any,
) -> VariantOptions:
    """Validate the options in :data:`VARIANT_OPTIONS` and their combinations.

    The optimizer's settings that the checks involve: ``rank``, ``backend``,
    ``has_model``, ``globalized`` (which of adaptive damping, line search or
    ``on_nonfinite="skip"`` is set, or None) and ``distributed`` (a process
    group). Raises TypeError / ValueError naming the argument.
    """
    unknown = set(kwargs) - set(VARIANT_OPTIONS)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    o = {**asdict(VariantOptions()), **kwargs}
    if o["precondition"] not in PRECONDITIONERS:
        raise ValueError(f"precondition must be None, 'pre' or 'post', got {o['precondition']!r}")
    alpha = _real(
        "rmsprop_alpha",
        o["rmsprop_alpha"],
        0.0,
        1.0,
        low_open=False,
        high_open=True,
        expected="a number in [0, 1)",
    )
    eps = _real(
        "rmsprop_eps",
        o["rmsprop_eps"],
        0.0,
        math.inf,
        low_open=True,
        high_open=True,
        expected="a finite number > 0",
    )
    momentum = _real(
        "momentum",
        o["momentum"],
        0.0,
        1.0,
        low_open=False,
        high_open=True,
        expected="a number in [0, 1)",
    )
    if not isinstance(o["variable_rank"], bool):
        raise TypeError(f"variable_rank must be a bool, got {type(o['variable_rank']).__name__}")
    fraction = _real(
        "param_fraction",
        o["param_fraction"],
        0.0,
        1.0,
        low_open=True,
        high_open=False,
        expected="a number in (0, 1]",
    )
    if o["mask"] not in MASKS:
        raise ValueError(f"mask must be one of {list(MASKS)}, got {o['mask']!r}")
    seed = _int("seed", o["seed"], 0, "an int >= 0")
    if not isinstance(o["randomized"], bool):
        raise TypeError(f"randomized must be a bool, got {type(o['randomized']).__name__}")
    oversample = _int("oversample", o["oversample"], 0, "an int >= 0")
    power_iters = _int("power_iters", o["power_iters"], 0, "an int >= 0")
    every = o["spectrum_every"]
    if every is not None:
        every = _int("spectrum_every", every, 1, "None or an int >= 1")
    opts = VariantOptions(
        o["precondition"],
        alpha,
        eps,
        momentum,
        o["variable_rank"],
        fraction,
        o["mask"],
        seed,
        o["randomized"],
        oversample,
        power_iters,
        every,
    )
    if opts.variable_rank and (opts.precondition == "post" or opts.momentum > 0):
        raise ValueError(
            "variable_rank=True cannot be combined with precondition='post' or momentum > 0: "
            "variable rank chooses the update by evaluating the objective at it, and those "
            "options change the update afterwards (precondition='pre' is allowed)"
        )
    if opts.randomized and rank is None:
        raise ValueError(
            "randomized=True needs rank=k: the randomized SVD's target rank "
            "(the sketch has rank + oversample columns)"
        )
    if opts.param_fraction < 1 and opts.mask == "rows" and not has_model:
        raise ValueError(
            "mask='rows' needs the model whose layers are masked: pass Sven(model, ...) or model="
        )
    if opts.changes_update and globalized is not None:
        raise ValueError(
            f"precondition='post', momentum and variable_rank cannot be combined with "
            f"{globalized}: those accept or scale the step by the objective, and these "
            "change the update afterwards (param_fraction, precondition='pre' and "
            "randomized can)"
        )
    if opts.changes_step and distributed:
        raise ValueError(
            "precondition, momentum, variable_rank, param_fraction < 1 and randomized cannot "
            "be combined with process_group (distributed Sven) yet; spectrum_every can"
        )
    if opts.needs_generic and backend not in ("auto", "generic"):
        raise ValueError(
            f"backend={backend!r} cannot be combined with precondition='pre', variable_rank "
            "or mask='entries'/'rows' with param_fraction < 1: they run on the generic "
            "backend (backend='generic' or 'auto')"
        )
    return opts


@dataclass(frozen=True)
class _Solve:
    """A direction on the selected columns: flat (P_s,), optional components (k, P_s)."""

    flat: Tensor
    solution: SpectralSolution
    components: Tensor | None
    row_change: Tensor | None
    square_avg: Tensor | None  # new full "pre" second moment (P,), or None
    extras: dict[str, Any] | None = None  # matrix-free: sketch diagnostics for StepInfo


def _matfree_pays(rows: Tensor, filt: SpectralFilter, o: VariantOptions) -> bool:
    """Generic backend: the matrix-free sketch (about ``4 (q + 1) l`` backward passes,
    O((N + P) l) memory) instead of the materialised J (N backward passes, O(N P))."""
    columns = (filt.rank or 0) + o.oversample
    return rows.numel() > 4 * (o.power_iters + 1) * columns


def _full_state(opt: Sven, params: Sequence[Tensor], key: str) -> Tensor:
    """``opt.state[p][key]`` of all params as one flat float64 vector (zeros when absent)."""
    parts = []
    for p in params:
        value = opt.state[p].get(key) if p in opt.state else None
        parts.append(
            torch.zeros(p.numel(), dtype=torch.float64, device=p.device)
            if value is None
            else value.detach().reshape(-1).to(torch.float64)
        )
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _warn_fallback(opt: Sven, backend: str, reason: str) -> None:
    """The optimizer's one-time fallback warning (as ``Sven._direction`` gives it)."""
    if reason not in opt._warned:
        opt._warned.add(reason)
        warnings.warn(
            f"Sven: the {backend} backend cannot compute this step exactly ({reason}); "
            "using the generic backend",
            SvenFallbackWarning,
            stacklevel=4,
        )


def _residual_rows(out: Any) -> Tensor:
    """:func:`torchsven.optim.residual_rows` (imported late: optim imports this module)."""
    from .optim import residual_rows

    return residual_rows(out)


def _store(opt: Sven, params: Sequence[Tensor], key: str, flat: Tensor) -> None:
    """``opt.state[p][key]`` from a flat float64 vector over ``params`` (in their dtype)."""
    for p, part in zip(params, flat_to_params(flat, params), strict=True):
        opt.state[p][key] = part.to(p.dtype).clone()


class Variants:
    """Runs Sven steps with :class:`VariantOptions`; holds the generator and history."""

    def __init__(self, options: VariantOptions) -> None:
        self.options = options
        self.generator = torch.Generator().manual_seed(options.seed)
        self.history: list[SpectrumRecord] = []
        self._pending: dict[str, Any] = {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "options": asdict(self.options),
            "generator": bytes(self.generator.get_state().tolist()),
            "history": [r.to_dict() for r in self.history],
        }

    def load_state_dict(
        self,
        state: dict[str, Any],
        rank: int | None,
        backend: str,
        has_model: bool,
        globalized: str | None,
        distributed: bool,
    ) -> None:
        options = check_variant_options(
            rank, backend, has_model, globalized, distributed, **state["options"]
        )
        self.options = options
        self.generator.set_state(torch.tensor(list(state["generator"]), dtype=torch.uint8))
        self.history = [SpectrumRecord.from_dict(r) for r in state["history"]]

    # ------------------------------------------------------------- direction
    def _materialised(
        self,
        opt: Sven,
        rows: Tensor,
        sel: Selection,
        params: Sequence[Tensor],
        filt: SpectralFilter,
    ) -> _Solve:
        o = self.options
        jac = jacobian(rows, sel.solve_params, chunk_bytes=opt.chunk_bytes)
        check_finite(jac, "the Jacobian of the residual rows")
        if sel.columns is not None:
            jac = jac[:, sel.columns.to(jac.device)]
        r64 = rows.detach().reshape(-1).to(torch.float64)
        scale, square_avg = None, None
        if o.precondition == "pre":
            square_avg = _full_state(opt, params, "square_avg").to(jac.device)
            index = sel.index if sel.index is not None else slice(None)
            grad = mean_objective_gradient(jac, r64)
            square_avg[index] = update_square_avg(square_avg[index], grad, o.rmsprop_alpha)
            scale = rms_scale(square_avg[index], o.rmsprop_eps)
        scaled = jac if scale is None else jac * scale
        solver = opt.options["solver"]
        components = None
        if o.variable_rank:
            if o.randomized:
                components, solution = randomized_components(
                    scaled, r64, filt, o.oversample, o.power_iters, self.generator
                )
            else:
                components, solution = spectral_components(scaled, r64, filt, solver)
            if scale is not None:
                components = components * scale
            flat = components.sum(0)
        elif o.randomized:
            flat, solution = randomized_step(
                scaled, r64, filt, o.oversample, o.power_iters, self.generator
            )
            flat = flat if scale is None else flat * scale
        elif scale is not None:
            flat, solution = column_scaled_step(jac, r64, scale, filt, solver)
        else:
            flat, solution = jacobian_step(jac, r64, filt, solver)
        return _Solve(flat, solution, components, jac @ flat, square_avg)

    # ------------------------------------------------------------------ step
    def step(
        self, opt: Sven, closure: Callable[[], Tensor], params: list[Tensor], lrs: list[float]
    ) -> Tensor:
        """One Sven step with the options; changes nothing if it raises."""
        generator_state = self.generator.get_state()
        originals = [p.detach().clone() for p in params] if self.options.variable_rank else []
        try:
            return self._step(opt, closure, params, lrs)
        except BaseException:
            self.generator.set_state(generator_state)
            with torch.no_grad():
                for p, original in zip(params, originals, strict=False):
                    p.copy_(original)
            raise

    def _evaluate(
        self, opt: Sven, closure: Callable[[], Tensor], params: list[Tensor]
    ) -> tuple[Tensor, Tensor, _Solve, Selection, Tensor, str]:
        """Stages 1-3: selection, closure, direction. Changes nothing but the generator.

        Returns the closure's output, its rows, the solve-space solution, the
        selection, the full update (P,) float64 and the backend used.
        """
        o = self.options
        filt = opt.filter
        sel = select(o.mask, o.param_fraction, params, opt.model, self.generator)
        primary, generic = opt._backends()
        if o.needs_generic:
            primary = generic
        with primary.capture(sel.solve_params) as captured, sel.hooks(), torch.enable_grad():
            out = closure()
        rows = _residual_rows(out)
        check_finite(rows.detach(), "the residual rows returned by the closure")
        total = sum(p.numel() for p in params)
        if not params:
            solved = _Solve(
                torch.zeros(0, dtype=torch.float64),
                generic.direction(rows, [], filt).solution,
                None,
                None,
                None,
            )
            used = generic.name
        elif o.needs_jacobian or (
            o.randomized and primary is generic and not _matfree_pays(rows, filt, o)
        ):
            solved = self._materialised(opt, rows, sel, params, filt)
            used = generic.name
        elif o.randomized:
            try:
                solved = self._nystrom(primary, rows, sel.solve_params, filt, captured, out)
                used = primary.name
            except FallbackRequired as why:
                _warn_fallback(opt, primary.name, why.reason)
                if _matfree_pays(rows, filt, o):  # matrix-free on the generic backend too
                    solved = self._nystrom(generic, rows, sel.solve_params, filt, None, out)
                else:
                    solved = self._materialised(opt, rows, sel, params, filt)
                used = generic.name
        else:
            direction, used = opt._direction(
                primary, generic, rows, sel.solve_params, captured, out
            )
            flat = torch.cat([d.reshape(-1) for d in direction.step])
            solved = _Solve(flat, direction.solution, None, direction.row_change, None)
        check_finite(solved.flat, "the Sven step (the Jacobian has NaN or Inf entries)")
        return out, rows, solved, sel, sel.to_full(solved.flat, total), used

    def _nystrom(
        self,
        backend: Any,
        rows: Tensor,
        params: list[Tensor],
        filt: SpectralFilter,
        captured: Any,
        output: Tensor,
    ) -> _Solve:
        """Randomized solve on a Gram backend: K from the backend, ``c`` by a Nystrom
        sketch of K, the step ``J^T c`` by one backward (the rows' graph is kept)."""
        o = self.options
        # --- matrix-free rank-k step (torchsven.matfree): K only through block products
        if hasattr(backend, "matfree_direction"):
            assert filt.rank is not None
            d = backend.matfree_direction(
                rows,
                params,
                filt,
                captured,
                output,
                columns=filt.rank + o.oversample,
                power_iters=o.power_iters,
                generator=self.generator,
            )
            flat = torch.cat([t.reshape(-1) for t in d.step])
            return _Solve(flat, d.solution, None, d.row_change, None, dict(d.extras))
        # --- end matrix-free
        gram = backend.gram_matrix(rows, params, captured, output)
        r64 = rows.detach().reshape(-1).to(torch.float64)
        coeffs, solution = nystrom_coefficients(
            gram, r64, filt, o.oversample, o.power_iters, self.generator
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
        return _Solve(flat, solution, None, gram @ coeffs, None)

    def evaluate(
        self, opt: Sven, closure: Callable[[], Tensor], params: list[Tensor]
    ) -> tuple[Tensor, Tensor, Direction, str]:
        """``Sven._evaluate`` with the direction options (masks, "pre", randomized).

        For the globalised steps of :mod:`torchsven.globalize`: the direction is
        the full update per parameter, ``row_change = J update``. State updates
        wait for :meth:`commit` (called when the step is done); :meth:`rollback`
        undoes the generator draws of a step that raised.
        """
        self._pending = {"generator": self.generator.get_state()}
        out, rows, solved, _sel, update, used = self._evaluate(opt, closure, params)
        if solved.square_avg is not None:
            self._pending["square_avg"] = (params, solved.square_avg)
        step = flat_to_params(update, params)
        direction = Direction(step, solved.solution, solved.row_change, solved.extras or {})
        return out, rows, direction, used

    def commit(self, opt: Sven) -> None:
        """Store the state of the step :meth:`evaluate` computed."""
        pending, self._pending = self._pending, {}
        if "square_avg" in pending:
            params, value = pending["square_avg"]
            _store(opt, params, "square_avg", value)

    def rollback(self) -> None:
        """Undo the generator draws of the step :meth:`evaluate` computed."""
        pending, self._pending = self._pending, {}
        if "generator" in pending:
            self.generator.set_state(pending["generator"])

    def _step(
        self, opt: Sven, closure: Callable[[], Tensor], params: list[Tensor], lrs: list[float]
    ) -> Tensor:
        o = self.options
        out, rows, solved, sel, update, used = self._evaluate(opt, closure, params)
        new_state: dict[str, Tensor] = {}
        if solved.square_avg is not None:
            new_state["square_avg"] = solved.square_avg
        if o.precondition == "post":
            square_avg = update_square_avg(
                _full_state(opt, params, "square_avg").to(update.device), update, o.rmsprop_alpha
            )
            update = update / (square_avg.sqrt() + o.rmsprop_eps)
            new_state["square_avg"] = square_avg
        if o.momentum > 0:
            update = heavy_ball(
                _full_state(opt, params, "momentum_buffer").to(update.device), update, o.momentum
            )
            new_state["momentum_buffer"] = update
        lr_full = (
            torch.cat(
                [
                    torch.full((p.numel(),), lr, dtype=torch.float64, device=update.device)
                    for p, lr in zip(params, lrs, strict=True)
                ]
            )
            if params
            else update
        )
        extras: dict[str, Any] = {}
        kept = solved.solution.kept
        extras.update(solved.extras or {})  # matrix-free sketch diagnostics
        if o.param_fraction < 1:
            extras["selected"] = int(solved.flat.numel())
        if o.variable_rank and params:
            kept, calls = self._variable_rank(closure, params, sel, solved, lr_full, rows)
            extras.update(
                variable_rank=kept, closure_calls=calls, kept_by_filter=solved.solution.kept
            )
        else:
            opt._apply(params, lrs, flat_to_params(update, params))
        for key, value in new_state.items():
            _store(opt, params, key, value)
        solution = SpectralSolution(solved.solution.singular_values, kept, solved.solution.solver)
        row_change = solved.row_change if o.precondition != "post" and o.momentum == 0 else None
        info = opt._info(rows, Direction([], solution, row_change), used, **extras)
        opt._steps += 1
        opt.last_step = info
        self.record(info, opt._steps - 1)
        return out

    def record(self, info: StepInfo, index: int) -> None:
        """Append step ``index``'s spectrum to the history when it is due."""
        every = self.options.spectrum_every
        if every is not None and index % every == 0:
            s = info.singular_values
            self.history.append(SpectrumRecord(index, s, info.kept, effective_rank(s), info.loss))

    def _variable_rank(
        self,
        closure: Callable[[], Tensor],
        params: list[Tensor],
        sel: Selection,
        solved: _Solve,
        lr_full: Tensor,
        rows: Tensor,
    ) -> tuple[int, int]:
        """Greedy best prefix; leaves the params at it. Returns (prefix, closure calls)."""
        comps = solved.components
        assert comps is not None
        total = lr_full.numel()
        origin = [p.detach().clone() for p in params]

        def move_to(prefix: Tensor) -> None:
            step = lr_full * sel.to_full(prefix, total)
            with torch.no_grad():
                for p, p0, d in zip(params, origin, flat_to_params(step, params), strict=True):
                    p.copy_(p0 - d.to(p.dtype))

        running = torch.zeros_like(comps[0]) if comps.shape[0] else None

        def objective_after(m: int) -> float:
            nonlocal running
            running = running + comps[m - 1]
            move_to(running)
            with torch.enable_grad():
                r = _residual_rows(closure()).detach().to(torch.float64)
            return 0.5 * float(r.square().sum())

        start = 0.5 * float(rows.detach().to(torch.float64).square().sum())
        best, seen = greedy_prefix(objective_after, comps.shape[0], start)
        move_to(comps[:best].sum(0))
        return best, len(seen)
