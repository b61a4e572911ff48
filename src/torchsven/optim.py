"""``torchsven.Sven``: Singular Value Descent as a ``torch.optim.Optimizer``.

The optimizer is a thin shell: it validates its options (:mod:`torchsven.config`),
keeps param groups and state, and runs each step as one transaction through
the stages of :mod:`torchsven.pipeline` (evaluate, update chain, acceptance
policy, StepInfo). ``docs/design.md`` describes the pipeline.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from .backends import make_backend
from .backends.generic import DEFAULT_CHUNK_BYTES, GenericBackend
from .clients import check_closure
from .config import (
    CORE_OPTIONS,
    GLOBAL_OPTIONS,
    GROUP_KEYS,
    VARIANT_OPTIONS,
    SvenConfig,
    check_compatible,
    check_nonnegative,
    make_config,
)
from .damping import AdaptiveDamping
from .distributed import CollectiveEvaluator, check_not_ddp, make_collective
from .errors import SvenPerformanceWarning
from .info import StepInfo
from .pipeline.context import StepContext, SvenMemory
from .pipeline.evaluate import Evaluator, LocalEvaluator
from .pipeline.run import record_spectrum, run_step
from .solve import SpectralFilter
from .spectrum import SpectrumRecord

__all__ = ["GLOBAL_OPTIONS", "Sven"]


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
        max_trials: with ``damping="adaptive"``: trials per ``step`` call; a rejected
            trial is undone and the step re-evaluated with the raised damping (one
            more closure call and solve each) until one is accepted or the trials
            are used up.
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
        max_trials: int = 1,
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
        check_not_ddp(params, "params")
        check_not_ddp(model, "model")
        collective = make_collective(process_group)
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("model= must be the same module as the first argument")
            model, params = params, list(params.parameters())
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        check_nonnegative("lr", lr)
        options = {k: v for k, v in locals().items() if k in {f.name for f in fields(SvenConfig)}}
        config = make_config(**options)
        check_compatible(config, model is not None, collective is not None)
        self.config = config
        self.model = model
        self.last_step: StepInfo | None = None
        self._memory = SvenMemory()
        self._collective = collective
        self._evaluator_cache: tuple[SvenConfig, Evaluator] | None = None
        self._evaluator()  # backend="factored" without a model fails here
        super().__init__(params, {"lr": float(lr)})
        if collective is not None:  # same parameters on every rank
            collective.check_parameters(self._trainable()[0])

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
        for key in param_group:
            if key not in GROUP_KEYS:
                raise ValueError(
                    f"param group sets {key!r}, which Sven does not use (a param group "
                    f"may set: {sorted(GROUP_KEYS - {'params'})}); remove it"
                )
        if "lr" in param_group:
            check_nonnegative("lr", param_group["lr"])
        params = param_group.get("params")
        tensors = [params] if isinstance(params, Tensor) else list(params or [])
        existing = [p for g in self.param_groups for p in g["params"]]
        _check_homogeneous(existing + tensors)
        super().add_param_group(param_group)

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

    # --------------------------------------------------------------- options
    @property
    def options(self) -> Mapping[str, Any]:
        """The global options (read-only view; ``rtol`` resolved)."""
        return MappingProxyType({k: getattr(self.config, k) for k in CORE_OPTIONS})

    @property
    def filter(self) -> SpectralFilter:
        """The spectral filter the next step uses."""
        damping = self._memory.damping
        return self.config.filter(None if damping is None else damping.factor)

    @property
    def spectrum_history(self) -> list[SpectrumRecord]:
        """Spectrum records, one every ``spectrum_every`` steps (:class:`SpectrumRecord`)."""
        return self._memory.history

    @property
    def backend(self) -> Any:
        """The primary backend object (the factored backend keeps verified structures)."""
        evaluator = self._evaluator()
        return getattr(evaluator, "primary", None)

    def _evaluator(self) -> Evaluator:
        """The evaluator for the current options (derived state: rebuilt on demand)."""
        cfg = self.config
        if self._evaluator_cache is None or self._evaluator_cache[0] != cfg:
            generic = GenericBackend(cfg.solver, cfg.chunk_bytes)
            primary = make_backend(
                cfg.backend,
                self.model,
                generic,
                microbatch_size=cfg.microbatch_size,
                verify=cfg.verify,
            )
            if self._collective is not None:
                evaluator: Evaluator = CollectiveEvaluator(self._collective, primary, generic)
            else:
                evaluator = LocalEvaluator(primary, generic)
            self._evaluator_cache = (cfg, evaluator)
        return self._evaluator_cache[1]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        memory = self._memory
        generator = memory.generator(self.config.seed).get_state()
        state["sven"] = {
            "options": self.config.core_dict(),
            "steps": memory.steps,
            "robust": memory.robust_dict(),
            "variants": {
                "options": self.config.variant_dict(),
                "generator": bytes(generator.tolist()),
                "history": [r.to_dict() for r in memory.history],
            },
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict (also one saved by torchsven 0.1.0); nothing changes on error."""
        state_dict = dict(state_dict)
        sven = state_dict.pop("sven", None)
        config, memory = self.config, self._memory
        if sven is not None:
            variants = sven.get("variants", {})
            current = {f.name: getattr(self.config, f.name) for f in fields(SvenConfig)}
            config = make_config(
                **{
                    **current,
                    **{
                        k: v
                        for k, v in sven["options"].items()
                        if k in (*CORE_OPTIONS, "max_trials")
                    },
                    **{
                        k: v for k, v in variants.get("options", {}).items() if k in VARIANT_OPTIONS
                    },
                }
            )
            check_compatible(config, self.model is not None, self._collective is not None)
            memory = SvenMemory(steps=int(sven["steps"]), warned=set(self._memory.warned))
            memory.load_robust(sven.get("robust", {}))
            if "generator" in variants:
                generator = torch.tensor(list(variants["generator"]), dtype=torch.uint8)
                memory.generator(config.seed).set_state(generator)  # validates the state
                memory.generator_state = generator
            memory.history = [SpectrumRecord.from_dict(r) for r in variants.get("history", [])]
        super().load_state_dict(state_dict)
        self.config, self._memory = config, memory

    def __getstate__(self) -> dict[str, Any]:
        """Everything ``copy.deepcopy``, ``pickle`` and ``torch.save`` need.

        ``torch.optim.Optimizer.__getstate__`` keeps only defaults, state and
        param_groups; Sven adds its options, model and memory. The evaluator
        (backends, hooks) is derived and rebuilt after loading.
        """
        if self._collective is not None:
            raise TypeError(
                "a Sven with process_group cannot be copied or pickled (a process group "
                "is bound to its processes); save opt.state_dict() and load it into a "
                "Sven built on the new group"
            )
        state = super().__getstate__()
        state.update(
            config=self.config,
            model=self.model,
            last_step=self.last_step,
            _memory=self._memory,
            _collective=None,
            _evaluator_cache=None,
        )
        return state

    # -------------------------------------------------------------------- step
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One Sven step. ``closure()`` returns residual rows; returns that tensor.

        Raises (and changes nothing: parameters, state and ``last_step`` stay as
        they were) on a closure that returns no tensor, a 0-dim or non-float
        tensor, rows without a grad_fn, or non-finite rows or Jacobian.
        Rows made by :func:`torchsven.residuals.stack` get their per-group
        norms reported in ``last_step.extras["groups"]``.
        """
        if closure is None or not callable(closure):
            check_closure(closure)  # transformers.Trainer's closure-less step: say what to do
            raise TypeError(
                "Sven.step needs a closure that returns residual rows, e.g. "
                "opt.step(lambda: model(x) - y); Sven solves for every row at once, so "
                "it cannot step from .grad like first-order optimizers"
            )
        params, lrs = self._trainable()
        evaluator = self._evaluator()
        ctx = StepContext(self.config, params, lrs, self.model, self.state, self._memory.copy())
        try:
            out, info = run_step(closure, ctx, evaluator)
        except BaseException:
            ctx.restore()
            raise
        ctx.store()
        ctx.keep_generator()
        record_spectrum(ctx, info)
        ctx.memory.steps += 1
        self._memory = ctx.memory
        self.last_step = info
        self._hint(info)
        return out

    def _hint(self, info: StepInfo) -> None:
        """Once: parameters without their module run the (slower) generic backend."""
        if (
            self.model is None
            and self.config.backend == "auto"
            and info.backend == "generic"
            and "hint:model" not in self._memory.warned
        ):
            self._memory.warned.add("hint:model")
            warnings.warn(
                "Sven got parameters without their nn.Module, so it uses the generic "
                "backend (a materialised Jacobian). Pass the module, Sven(model, ...), or "
                "model=model with param groups, for the factored backend (exact and much "
                "faster on nn.Linear/Conv/Embedding/norm models); backend='generic' "
                "silences this",
                SvenPerformanceWarning,
                stacklevel=3,
            )


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
                raise ValueError(f"params must all have one dtype, got {first.dtype} and {p.dtype}")
