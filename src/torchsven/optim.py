"""``torchsven.Sven``: Singular Value Descent as a ``torch.optim.Optimizer``.

The optimizer is a thin shell: it validates arguments, keeps param groups and
state, calls the closure, hands the residual rows to a backend and applies
``theta_g <- theta_g - lr_g * (J^+_k r)_g`` group by group. The linear algebra
is in :mod:`torchsven.solve`, the Jacobian work in :mod:`torchsven.backends`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .backends import BACKENDS, make_backend
from .backends.base import Backend, Direction, FallbackRequired, check_finite
from .backends.generic import DEFAULT_CHUNK_BYTES, GenericBackend
from .clients import check_closure, check_closure_output
from .damping import AdaptiveDamping, default_rtol, parse_damping, serialize_damping
from .distributed import check_not_ddp, make_data_parallel
from .errors import SvenFallbackWarning
from .globalize import RobustState, parse_line_search, parse_on_nonfinite, robust_step
from .info import StepInfo
from .microbatch import check_microbatch_size, group_rows
from .residuals import groups_of
from .solve import SOLVERS, SpectralFilter
from .variants import VARIANT_OPTIONS, Variants, check_variant_options

__all__ = ["GLOBAL_OPTIONS", "Sven"]

#: Options that hold for the whole solve; a param group may not set them.
GLOBAL_OPTIONS = (
    "rank",
    "rtol",
    "atol",
    "damping",
    "backend",
    "solver",
    "line_search",
    "on_nonfinite",
    *VARIANT_OPTIONS,
)


def _check_nonnegative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number >= 0, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_options(
    rank: Any,
    rtol: Any,
    atol: Any,
    damping: Any,
    backend: Any,
    solver: Any,
    line_search: Any = None,
    on_nonfinite: Any = "raise",
) -> dict[str, Any]:
    """Validate the global options; returns them normalised."""
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"rank must be None or an int >= 1, got {type(rank).__name__}")
        if rank < 1:
            raise ValueError(f"rank must be None or an int >= 1, got {rank}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver must be one of {list(SOLVERS)}, got {solver!r}")
    damping = parse_damping(damping)
    line_search = parse_line_search(line_search)
    if line_search is not None and isinstance(damping, AdaptiveDamping):
        raise ValueError(
            "line_search needs a fixed damping (a number); damping='adaptive' already "
            "rejects steps that do not reduce the objective"
        )
    return {
        "rank": rank,
        "rtol": default_rtol(damping) if rtol is None else _check_nonnegative("rtol", rtol),
        "atol": _check_nonnegative("atol", atol),
        "damping": damping,
        "backend": backend,
        "solver": solver,
        "line_search": line_search,
        "on_nonfinite": parse_on_nonfinite(on_nonfinite),
    }


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
            "from the parameters with autograd enabled (no .detach(), no torch.no_grad())"
        )
    return out.reshape(-1)


class Sven(torch.optim.Optimizer):
    r"""Singular Value Descent: ``theta <- theta - lr * J^+_k r``.

    ``r`` (N,) are the residual rows the closure returns (objective
    ``0.5 ||r||^2``), ``J = dr/dtheta`` (N, P) over the trainable parameters
    (``requires_grad`` and group ``lr > 0``), and ``J^+_k`` the truncated,
    optionally damped pseudo-inverse: singular value ``s_i`` (index i from 0,
    descending) is kept when ``i < rank`` and ``s_i > max(rtol * s_1, atol)``,
    and inverted as ``1/s`` or, with ``damping = mu > 0``, ``s / (s^2 + mu)``.
    Routes through a Gram matrix ``J J^T`` also drop ``s_i`` below its float64
    resolution ``sqrt(N eps) s_1``.

    Args:
        params: an ``nn.Module`` (all its parameters; enables model-aware
            backends) or an iterable of tensors / param-group dicts.
        lr: step size, per group; a group with ``lr = 0`` is frozen (left out of J).
        rank: keep at most this many singular directions (None: no cap).
        rtol: relative cut on singular values; None: 1e-3 (the paper's), or 0 with
            ``damping="adaptive"`` (the damping takes the place of the cut).
        atol: absolute cut on singular values.
        damping: Tikhonov damping ``mu >= 0`` (units of ``s^2``), or "adaptive"
            (Levenberg-Marquardt: ``mu = lambda s_1^2`` with ``lambda`` set by the
            gain ratio; steps that do not reduce ``0.5 ||r||^2`` are undone; one more
            closure call per step), or a :class:`torchsven.AdaptiveDamping` with options.
        backend: "auto" (factored when the model is known, falling back to generic
            for any step it cannot compute exactly), "factored" or "generic".
        model: the module the parameters belong to, when ``params`` are groups.
        microbatch_size: one residual row per group of this many samples (dim 0
            of the closure's output): ``R_g = ||r[group g]||_2``, see
            :mod:`torchsven.microbatch`; None: every residual is a row.
        verify: factored backend's coupling probe: "auto" (first step and
            whenever the model's structure changes) or "always".
        solver: decomposition of a materialised J: "auto", "svd", "gram", "normal".
        chunk_bytes: memory budget of one chunk of batched backward passes.
        process_group: a ``torch.distributed`` process group for exact
            data-parallel steps (each rank passes its local rows; the step equals
            one process on the concatenated batch), or None for one process.
            See :mod:`torchsven.distributed`.
        line_search: None, or "backtracking" (or a :class:`torchsven.BacktrackingLineSearch`):
            Armijo backtracking on ``lr`` (fixed damping only).
        on_nonfinite: "raise" (:class:`torchsven.NonFiniteError`, nothing changed) or
            "skip" (the step is skipped, counted and reported in ``last_step.extras``).
        precondition: RMSProp-style diagonal preconditioning: None, "pre" (scale
            J's columns by ``d = 1/(sqrt(v)+eps)``, v the running mean of the
            squared objective gradient ``J^T r / N``, and map the solution back:
            ``d * (J diag(d))^+ r``) or "post" (divide the update by the root of
            its own running mean square).
        rmsprop_alpha: decay of the running mean square ``v``, in [0, 1).
        rmsprop_eps: added to ``sqrt(v)``, > 0.
        momentum: heavy-ball momentum on the update, ``b <- mu b + u``, in [0, 1).
        variable_rank: keep the best prefix of the rank-1 components (in order
            of singular value) by evaluating the objective (more closure calls).
        param_fraction: update this fraction of the trainable entries per step, in (0, 1].
        mask: how the fraction is drawn: "entries", "tensors" or "rows" (output
            rows of Linear / ConvNd layers; needs the model).
        seed: seed of the generator for masks and randomized sketches.
        randomized: randomized solve with target ``rank`` (needs rank): SVD sketch of J
            (generic backend) or Nystrom sketch of K (factored backend).
        oversample: extra sketch columns of the randomized SVD.
        power_iters: power iterations of the randomized SVD.
        spectrum_every: record the spectrum every n steps in ``opt.spectrum_history``.

    ``step(closure)`` calls the closure under ``torch.enable_grad()``; the
    closure returns residual rows of any shape (``model(x) - y``), and ``step``
    returns that tensor. Sven never reads or writes ``.grad`` (so ``zero_grad``
    is harmless and ``torch.amp.GradScaler`` does not apply). Diagnostics of the
    last step are in ``opt.last_step`` (:class:`torchsven.StepInfo`).
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        rank: int | None = None,
        rtol: float | None = None,
        atol: float = 1e-10,
        damping: float | str | AdaptiveDamping = 0.0,
        backend: str = "auto",
        *,
        model: nn.Module | None = None,
        solver: str = "auto",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        process_group: Any = None,
        line_search: str | bool | None = None,
        on_nonfinite: str = "raise",
        precondition: str | None = None,
        rmsprop_alpha: float = 0.99,
        rmsprop_eps: float = 1e-8,
        momentum: float = 0.0,
        variable_rank: bool = False,
        param_fraction: float = 1.0,
        mask: str = "entries",
        seed: int = 0,
        randomized: bool = False,
        oversample: int = 10,
        power_iters: int = 2,
        spectrum_every: int | None = None,
        microbatch_size: int | None = None,
        verify: str = "auto",
    ) -> None:
        # --- distributed (torchsven.distributed): refuse DDP wrappers, validate the group
        check_not_ddp(params, "params")
        check_not_ddp(model, "model")
        self._data_parallel = make_data_parallel(process_group)
        # --- end distributed
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("model= must be the same module as the first argument")
            model, params = params, list(params.parameters())
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        _check_nonnegative("lr", lr)
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        self.options = _check_options(
            rank, rtol, atol, damping, backend, solver, line_search, on_nonfinite
        )
        self._robust = RobustState()
        self.chunk_bytes = chunk_bytes
        # --- options of the paper's method (torchsven.variants) ---
        self._variants = Variants(
            check_variant_options(
                self.options["rank"],
                self.options["backend"],
                model is not None,
                self._globalized(),
                self._data_parallel is not None,
                precondition=precondition,
                rmsprop_alpha=rmsprop_alpha,
                rmsprop_eps=rmsprop_eps,
                momentum=momentum,
                variable_rank=variable_rank,
                param_fraction=param_fraction,
                mask=mask,
                seed=seed,
                randomized=randomized,
                oversample=oversample,
                power_iters=power_iters,
                spectrum_every=spectrum_every,
            )
        )
        self.model = model
        self.microbatch_size = check_microbatch_size(microbatch_size)
        if verify not in ("auto", "always"):
            raise ValueError(f"verify must be 'auto' or 'always', got {verify!r}")
        self.verify = verify
        if self.microbatch_size is not None and (
            self._data_parallel is not None
            or self.options["line_search"]
            or isinstance(self.options["damping"], AdaptiveDamping)
        ):
            raise ValueError(
                "microbatch_size cannot be combined with process_group, line_search or "
                "damping='adaptive' (their trial calls compare per-sample rows)"
            )
        self._backend_cache: tuple[tuple, Backend, GenericBackend] | None = None
        self._backends()  # backend="factored" without a model fails here
        self.last_step: StepInfo | None = None
        self._steps = 0
        self._warned: set[str] = set()
        super().__init__(params, {"lr": float(lr)})
        if self._data_parallel is not None:  # distributed: same parameters on every rank
            self._data_parallel.check_parameters(self._trainable()[0])

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it may set ``lr`` but none of :data:`GLOBAL_OPTIONS`."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        for key in GLOBAL_OPTIONS:
            if key in param_group:
                raise ValueError(
                    f"param group sets {key!r}, which is global in Sven (one solve over all "
                    "parameters); pass it to Sven(...) instead"
                )
        if "lr" in param_group:
            _check_nonnegative("lr", param_group["lr"])
        params = param_group.get("params")
        tensors = [params] if isinstance(params, Tensor) else list(params or [])
        existing = [p for g in self.param_groups for p in g["params"]]
        self._check_homogeneous(existing + tensors)
        super().add_param_group(param_group)

    @staticmethod
    def _check_homogeneous(params: list[Tensor]) -> None:
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"params must hold tensors, got {type(p).__name__}")
            if not p.is_floating_point():
                raise TypeError(f"params must be floating-point tensors, got {p.dtype}")
        if params:
            first = params[0]
            for p in params[1:]:
                if p.device != first.device:
                    raise ValueError(
                        f"params must all be on one device, got {first.device} and {p.device}"
                    )
                if p.dtype != first.dtype:
                    raise ValueError(
                        f"params must all have one dtype, got {first.dtype} and {p.dtype}"
                    )

    def _trainable(self) -> tuple[list[Tensor], list[float]]:
        """Trainable parameters (requires_grad, group lr > 0) and their lrs."""
        params, lrs = [], []
        for i, group in enumerate(self.param_groups):
            lr = group["lr"]
            if isinstance(lr, Tensor):
                lr = float(lr)
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
                raise ValueError(f"param_groups[{i}]['lr'] must be a number >= 0, got {lr!r}")
            if lr == 0:
                continue
            for p in group["params"]:
                if p.requires_grad:
                    params.append(p)
                    lrs.append(float(lr))
        return params, lrs

    # ------------------------------------------------------------------- state
    @property
    def spectrum_history(self) -> list:
        """Spectrum records, one every ``spectrum_every`` steps (:class:`SpectrumRecord`)."""
        return self._variants.history

    @property
    def filter(self) -> SpectralFilter:
        """The spectral filter the next step uses."""
        o = self.options
        if isinstance(o["damping"], AdaptiveDamping):
            state = self._robust.damping
            factor = o["damping"].init if state is None else state.factor
            return SpectralFilter(o["rank"], o["rtol"], o["atol"], 0.0, relative_damping=factor)
        return SpectralFilter(o["rank"], o["rtol"], o["atol"], o["damping"])

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        options = dict(self.options)
        options["damping"] = serialize_damping(options["damping"])
        if options["line_search"] is not None:
            options["line_search"] = dataclasses.asdict(options["line_search"])
        state["sven"] = {
            "options": options,
            "steps": self._steps,
            "robust": self._robust.to_dict(),
            "variants": self._variants.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        sven = state_dict.pop("sven", None)
        if sven is not None:
            options = _check_options(**sven["options"])
            variants = Variants(self._variants.options)
            if "variants" in sven:
                variants.load_state_dict(
                    sven["variants"],
                    options["rank"],
                    options["backend"],
                    self.model is not None,
                    self._globalized(options),
                    self._data_parallel is not None,
                )
        super().load_state_dict(state_dict)
        if sven is not None:
            self.options = options
            self._steps = int(sven["steps"])
            self._variants = variants
            self._robust = RobustState.from_dict(sven.get("robust", {}))

    def _globalized(self, options: dict[str, Any] | None = None) -> str | None:
        """Which globalisation (torchsven.globalize) the options set, or None."""
        o = self.options if options is None else options
        if isinstance(o["damping"], AdaptiveDamping) or o["line_search"]:
            return "damping='adaptive' or line_search"
        if o["on_nonfinite"] != "raise":
            return "on_nonfinite='skip'"
        return None

    # -------------------------------------------------------------------- step
    def _backends(self) -> tuple[Backend, GenericBackend]:
        # Kept across steps: the factored backend remembers which model structures
        # passed its coupling probe.
        key = (self.options["backend"], self.options["solver"], self.chunk_bytes)
        if self._backend_cache is None or self._backend_cache[0] != key:
            generic = GenericBackend(self.options["solver"], self.chunk_bytes)
            primary = make_backend(
                self.options["backend"],
                self.model,
                generic,
                microbatch_size=self.microbatch_size,
                verify=self.verify,
            )
            self._backend_cache = (key, primary, generic)
        return self._backend_cache[1], self._backend_cache[2]

    def _direction(
        self,
        primary: Backend,
        generic: GenericBackend,
        rows: Tensor,
        params: list[Tensor],
        captured: Any,
        output: Tensor | None = None,
    ) -> tuple[Direction, str]:
        if primary is generic:
            return generic.direction(rows, params, self.filter), generic.name
        try:
            return primary.direction(rows, params, self.filter, captured, output), primary.name
        except FallbackRequired as why:
            if why.reason not in self._warned:
                self._warned.add(why.reason)
                warnings.warn(
                    f"Sven: the {primary.name} backend cannot compute this step exactly "
                    f"({why.reason}); using the generic backend",
                    SvenFallbackWarning,
                    stacklevel=3,
                )
            return generic.direction(rows, params, self.filter), generic.name

    def _evaluate(
        self, closure: Callable[[], Tensor], params: list[Tensor]
    ) -> tuple[Tensor, Tensor, Direction, str]:
        """Call the closure (under enable_grad, with the backend's capture) and solve.

        Returns the closure's output, its rows (N,), the direction and the name
        of the backend that computed it. Changes nothing.
        """
        if self._data_parallel is not None:  # distributed: global rows and direction
            return self._data_parallel.evaluate(self, closure, params)
        if self._variants.options.changes_direction:  # masks, "pre", randomized (variants)
            return self._variants.evaluate(self, closure, params)
        primary, generic = self._backends()
        with torch.enable_grad():  # also for the backends' autograd calls after the closure
            with primary.capture(params) as captured:
                out = closure()
            rows = residual_rows(out)
            if self.microbatch_size is not None:
                rows = group_rows(out, self.microbatch_size)
            check_finite(rows.detach(), "the residual rows returned by the closure")
            if not params:
                return out, rows, generic.direction(rows, [], self.filter), generic.name
            direction, used = self._direction(primary, generic, rows, params, captured, out)
        flat = torch.cat([d.reshape(-1) for d in direction.step])
        check_finite(flat, "the Sven step (the Jacobian has NaN or Inf entries)")
        return out, rows, direction, used

    @staticmethod
    def _apply(params: list[Tensor], lrs: list[float], step: list[Tensor]) -> None:
        """``theta_g <- theta_g - lr_g * step_g`` in the parameters' dtype."""
        with torch.no_grad():
            for p, d, lr in zip(params, step, lrs, strict=True):
                p.add_(d.to(p.dtype), alpha=-lr)

    def _info(
        self,
        rows: Tensor,
        direction: Direction,
        backend: str,
        damping: float | None = None,
        **extras: Any,
    ) -> StepInfo:
        if self._data_parallel is not None:  # distributed: communication volume
            extras = {**self._data_parallel.extras(), **extras}
        extras = {**direction.extras, **extras}  # backend diagnostics (matrix-free sketch)
        sq = float(rows.detach().to(torch.float64).square().sum())
        return StepInfo(
            loss=0.5 * sq,
            residual_norm=math.sqrt(sq),
            singular_values=direction.solution.singular_values,
            kept=direction.solution.kept,
            damping=self.options["damping"] if damping is None else damping,
            backend=backend,
            solver=direction.solution.solver,
            rows=rows.numel(),
            extras=extras,
        )

    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One Sven step. ``closure()`` returns residual rows; returns that tensor.

        Raises (and changes nothing: parameters, state and ``last_step`` stay as
        they were) on a closure that returns no tensor, a 0-dim or non-float
        tensor, rows without a grad_fn, or non-finite rows or Jacobian.
        Rows made by :func:`torchsven.residuals.stack` get their per-group
        norms reported in ``last_step.extras["groups"]``.
        """
        out = self._step(closure)
        # --- residual groups (torchsven.residuals.stack): per-group norms before the step
        layout = groups_of(out)
        if layout is not None and self.last_step is not None:
            extras = {**self.last_step.extras, "groups": layout.report()}
            self.last_step = dataclasses.replace(self.last_step, extras=extras)
        # --- end residual groups
        return out

    def _step(self, closure: Callable[[], Tensor]) -> Tensor:
        if closure is None or not callable(closure):
            check_closure(closure)  # transformers.Trainer's closure-less step: say what to do
            raise TypeError(
                "Sven.step needs a closure that returns residual rows, e.g. "
                "opt.step(lambda: model(x) - y)"
            )
        params, lrs = self._trainable()
        if self._variants.options.changes_step and not self._globalized():  # variants
            return self._variants.step(self, closure, params, lrs)
        o = self.options
        if (
            isinstance(o["damping"], AdaptiveDamping)
            or o["line_search"]
            or o["on_nonfinite"] != "raise"
        ):
            # --- distributed: the trial calls of a globalised step are collective too
            if self._data_parallel is not None:
                closure = self._data_parallel.collective_trials(closure)
            # --- end distributed
            try:
                out = robust_step(self, closure, params, lrs)  # torchsven.globalize
            except BaseException:
                self._variants.rollback()  # variants: the masks' generator draws
                raise
            self._variants.commit(self)  # variants: "pre" state; spectrum_every
            self._variants.record(self.last_step, self._steps - 1)
            return out
        out, rows, direction, used = self._evaluate(closure, params)
        self._apply(params, lrs, direction.step)
        self._steps += 1
        self.last_step = self._info(rows, direction, used)
        self._variants.record(self.last_step, self._steps - 1)  # spectrum_every
        return out
