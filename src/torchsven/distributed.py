"""Exact data-parallel Sven on ``torch.distributed`` (``docs/design.md``, "Distributed").

Each of R ranks holds N_r residual rows (its local batch). A step with
``Sven(..., process_group=group)`` equals one process on the concatenated batch
(rows in rank order), to float64 round-off:

1. every rank calls the closure on its local batch; one small all-gather
   exchanges ``[status, N_r, P, lr fingerprint]`` so that a rank that raised,
   returned NaN rows or holds other parameters stops *every* rank;
2. factored backend: every rank computes its per-layer factors (and runs the
   backend's guard on its rows); rank 0 gathers the factor rows (padded to
   ``max N_r``, gloo's gather needs equal shapes), rebuilds the layer terms of
   the concatenated batch, forms K (N, N) in float64 with the same
   :class:`~torchsven.backends.assembly.GramAssembly` as a single process,
   solves and broadcasts ``c``; each rank forms ``J_r^T c_r`` from its own
   factors (the same assembly) and one all-reduce sums the P-vector. If any
   rank's guard asks for the generic backend, all ranks take it together;
3. generic backend: rank 0 gathers the Jacobian rows ``[r_r | J_r]`` and solves
   ``J^+_k r`` in float64 exactly as a single process would, then broadcasts
   the step (P);
4. rank 0 broadcasts a header (verdict, kept, solver) before any result, and
   the global rows with the singular values, so every rank applies the same
   update bit for bit and reports global diagnostics;
5. ``randomized=True`` (matrix-free rank-k steps, :mod:`torchsven.matfree`):
   nothing is gathered but rows. Every rank wraps its local block products
   (from its factors, or by autograd on the generic backend) in a
   :class:`~torchsven.matfree.ReducedOperator`: each ``J^T V`` is one
   all-reduce of a parameter block, the sketch draws the same test block on
   every rank (equal generator states), and orthonormalisation is Cholesky QR
   with one all-reduce of an (l, l) matrix. The step comes from reduced
   quantities only, so it is bit-identical on every rank; rows and ``J step``
   are all-gathered at the end with every rank's status.

Every branch (an error on any rank, non-finite rows or Jacobian, a fallback,
a failed solve, a globalised step's trial calls) is decided from collective
data, so ranks never wait on each other. :class:`CollectiveEvaluator` is the
evaluator stage of the step pipeline (:mod:`torchsven.pipeline`): the same
``evaluate`` / ``trial`` as the local one; the update chain and the
acceptance policies run unchanged on its (identical) results.
The traffic of a step is in ``opt.last_step.extras`` (``bytes_gathered``,
``bytes_broadcast``, ``bytes_reduced``, ``comm_seconds``).

``DistributedDataParallel`` is not supported: Sven reduces exactly itself, and
DDP's gradient hooks never fire under ``torch.autograd.grad`` (they would also
average ``J^T c``, which is a sum). Pass the plain module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .backends.assembly import GramAssembly
from .backends.base import Backend, FallbackRequired, flat_to_params
from .backends.factored import SKETCH_FACTOR, FactoredJacobian
from .backends.generic import AutogradJacobian, GenericBackend, jacobian
from .errors import NonFiniteError
from .matfree import JacobianOperator, ProductFailed, ReducedOperator, rank_k_step
from .microbatch import group_rows
from .pipeline.context import StepContext
from .pipeline.evaluate import (
    Evaluation,
    check_trial_output,
    fallback_message,
    objective,
    residual_rows,
)
from .solve import SOLVERS, SpectralFilter, SpectralSolution, gram_coefficients, jacobian_step

__all__ = [
    "Collective",
    "CollectiveEvaluator",
    "DistributedStepError",
    "check_not_ddp",
    "make_collective",
]

T = TypeVar("T")

# Status codes exchanged between ranks.
_OK, _RAISED, _NONFINITE, _FALLBACK = 0, 1, 2, 3
_SOLVER_CODES = {name: i for i, name in enumerate(SOLVERS)}


class DistributedStepError(RuntimeError):
    """Another rank failed during a data-parallel Sven step; nothing was changed."""


def check_not_ddp(module: Any, argument: str) -> None:
    """Raise TypeError when ``module`` is a ``DistributedDataParallel`` wrapper."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        raise TypeError(
            f"{argument} is a DistributedDataParallel model; Sven does not use DDP: pass "
            "the wrapped module (ddp_model.module) and Sven(..., process_group=group). Sven "
            "computes derivatives with torch.autograd.grad, so DDP's gradient all-reduce "
            "never runs, and Sven's own reduction is exact (one process on the "
            "concatenated batch)"
        )


def make_collective(process_group: Any) -> Collective | None:
    """Validate ``Sven(process_group=...)``; None means a single process."""
    if process_group is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "process_group was given but torch.distributed is not initialized: call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment)"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD) or None, got {type(process_group).__name__}"
        )
    return Collective(process_group)


@dataclass
class Traffic:
    """Bytes one rank's collectives moved in a step, and the wall time they took."""

    gathered: int = 0
    broadcast: int = 0
    reduced: int = 0
    seconds: float = 0.0
    collectives: int = 0

    def as_extras(self, world_size: int, local_rows: int) -> dict[str, object]:
        return {
            "world_size": world_size,
            "local_rows": local_rows,
            "bytes_gathered": self.gathered,
            "bytes_broadcast": self.broadcast,
            "bytes_reduced": self.reduced,
            "comm_seconds": self.seconds,
            "collectives": self.collectives,
        }


@dataclass
class _Outcome:
    """What the root decided and broadcast; identical on every rank."""

    status: int
    failed_rank: int
    step: Tensor | None = None
    solution: SpectralSolution | None = None
    rows: Tensor | None = None
    row_change: Tensor | None = None


#: header broadcast by the root: [status, failed rank, kept, solver code, k]
_HEADER = 5


def _spectral(solution: SpectralSolution, device: torch.device, factors: bool) -> list[Tensor]:
    """``[s (k)]``, and with ``factors`` the projections and filter factors (k each).

    The factors (for the predicted reductions of adaptive damping and line
    searches) travel only on steps that use them; NaN where the solve has none.
    """
    s = solution.singular_values.to(device=device, dtype=torch.float64)
    if not factors:
        return [s]
    if solution.projections is None or solution.factors is None:
        return [s, torch.full_like(s, torch.nan), torch.full_like(s, torch.nan)]
    return [
        s,
        *(
            t.to(device=device, dtype=torch.float64)
            for t in (solution.projections, solution.factors)
        ),
    ]


def _solution_from(parts: Sequence[Tensor], kept: int, solver: str) -> SpectralSolution:
    s = parts[0].cpu().clone()
    if len(parts) == 1 or bool(torch.isnan(parts[1]).any()):
        return SpectralSolution(s, kept, solver)
    return SpectralSolution(s, kept, solver, parts[1].cpu().clone(), parts[2].cpu().clone())


def _add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` where Python has it (3.11+)."""
    add_note = getattr(error, "add_note", None)
    if add_note is not None:
        add_note(note)


def lr_fingerprint(lrs: Sequence[float]) -> float:
    """One float that differs when the trainable set or its learning rates differ."""
    return float(sum((i + 1) * lr for i, lr in enumerate(lrs)))


def stack_padded(rows: Tensor, jac: Tensor, height: int, status: int) -> Tensor:
    """Gather payload ``(height + 1, P + 1)``: row 0 is ``[status, 0...]``, then ``[r | J]``.

    Rows beyond ``N_r`` are zero padding (gloo's gather needs equal shapes).
    """
    n, p = jac.shape
    payload = torch.zeros(height + 1, p + 1, dtype=torch.float64, device=jac.device)
    payload[0, 0] = status
    if status == _OK:
        payload[1 : n + 1, 0] = rows
        payload[1 : n + 1, 1:] = jac
    return payload


def _wants_factors(ctx: StepContext) -> bool:
    """Whether the step's policy uses predicted reductions (spectral factors)."""
    return ctx.config.adaptive or ctx.config.line_search is not None


class Collective:
    """One process group's collectives, with traffic accounting and agreement checks."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.root = dist.get_global_rank(group, 0)
        self.traffic = Traffic()
        self.local_rows = 0
        self.device = torch.device("cpu")

    # ------------------------------------------------------------ collectives
    def timed(self, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        self.traffic.seconds += time.perf_counter() - start
        self.traffic.collectives += 1
        return result

    def all_gather(self, local: Tensor) -> Tensor:
        """(world, *local.shape) from equal-shaped tensors."""
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        self.timed(lambda: dist.all_gather(parts, local, group=self.group))
        self.traffic.gathered += local.numel() * local.element_size() * self.world_size
        return torch.stack(parts)

    def gather(self, local: Tensor) -> list[Tensor] | None:
        """Rank 0 receives every rank's (equal-shaped) tensor; others get None."""
        parts = (
            [torch.empty_like(local) for _ in range(self.world_size)] if self.rank == 0 else None
        )
        self.timed(lambda: dist.gather(local, parts, dst=self.root, group=self.group))
        self.traffic.gathered += local.numel() * local.element_size() * self.world_size
        return parts

    def broadcast(self, tensor: Tensor) -> Tensor:
        self.timed(lambda: dist.broadcast(tensor, src=self.root, group=self.group))
        self.traffic.broadcast += tensor.numel() * tensor.element_size()
        return tensor

    def all_reduce(self, tensor: Tensor) -> Tensor:
        self.timed(lambda: dist.all_reduce(tensor, group=self.group))
        self.traffic.reduced += tensor.numel() * tensor.element_size()
        return tensor

    def error_messages(self, error: BaseException | None) -> list[str]:
        """Every rank's error text (only on the failure path: a pickled all-gather)."""
        text = "" if error is None else f"{type(error).__name__}: {error}"
        messages: list[Any] = [None] * self.world_size
        self.timed(lambda: dist.all_gather_object(messages, text, group=self.group))
        return [str(m) for m in messages]

    # ------------------------------------------------------------------- checks
    def check_parameters(self, params: Sequence[Tensor]) -> None:
        """Raise ValueError unless every rank holds the same parameter values."""
        flat = (
            torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])
            if params
            else torch.zeros(0, dtype=torch.float64)
        )
        sizes = self.all_gather(torch.tensor([float(flat.numel())], device=flat.device))
        if bool((sizes != sizes[0]).any()):
            raise ValueError(
                "process_group: the ranks hold different numbers of parameters "
                f"({[int(s) for s in sizes.reshape(-1).tolist()]}); build the same model on "
                "every rank"
            )
        reference = self.broadcast(flat.clone())
        same = torch.tensor([float(torch.equal(reference, flat))], device=flat.device)
        agree = self.all_gather(same)
        if not bool((agree == 1).all()):
            bad = [i for i, v in enumerate(agree.reshape(-1).tolist()) if v != 1]
            raise ValueError(
                f"process_group: the parameters on rank(s) {bad} differ from rank 0's; seed "
                "every rank identically or broadcast rank 0's parameters "
                "(torch.distributed.broadcast) before creating Sven"
            )
        self.traffic = Traffic()

    def agree(self, code: int, n_rows: int, error: Exception | None, where: str) -> Tensor:
        """All-gather ``[status, N_r]``; raise on every rank if any raised; returns N_r."""
        local = torch.tensor([code, n_rows], dtype=torch.float64, device=self.device)
        table = self.all_gather(local)
        self.raise_if_raised(table[:, 0].to(torch.int64).tolist(), error, where)
        return table[:, 1].to(torch.int64)

    def raise_if_raised(self, status: list[int], error: Exception | None, where: str) -> None:
        if not any(s == _RAISED for s in status):
            return
        messages = self.error_messages(error)
        failed = [i for i, s in enumerate(status) if s == _RAISED]
        if error is not None:
            _add_note(
                error,
                f"Sven: rank {self.rank} raised in {where}; every rank of the process "
                "group stopped this step",
            )
            raise error
        details = "; ".join(f"rank {i}: {messages[i]}" for i in failed)
        raise DistributedStepError(
            f"Sven step aborted on every rank because rank(s) {failed} raised in {where} "
            f"({details}); nothing was changed"
        )

    def extras(self) -> dict[str, object]:
        """Communication diagnostics of the last step for ``StepInfo.extras``."""
        return self.traffic.as_extras(self.world_size, self.local_rows)


class CollectiveEvaluator:
    """The evaluator stage over a process group (see the module docstring).

    ``evaluate`` returns the *global* rows (N,) float64 in rank order and the
    global direction, identical on every rank; ``trial`` returns the global
    objective. Raises on every rank, changing nothing, if any rank failed.
    """

    def __init__(self, collective: Collective, primary: Backend, generic: GenericBackend) -> None:
        self.collective = collective
        self.primary = primary
        self.generic = generic

    # --------------------------------------------------------------------- step
    def evaluate(self, closure: Callable[[], Any], ctx: StepContext) -> Evaluation:
        comm = self.collective
        comm.traffic = Traffic()
        params = ctx.params
        comm.device = params[0].device if params else torch.device("cpu")
        error: Exception | None = None
        out: Any = None
        rows: Tensor | None = None
        code, n_rows = _OK, 0
        captured: Any = None
        try:
            with self.primary.capture(params) as captured, torch.enable_grad():
                out = closure()
                rows = residual_rows(out)
                if ctx.config.microbatch_size is not None:  # groups of this rank's samples
                    rows = group_rows(out, ctx.config.microbatch_size)
            n_rows = rows.numel()
            if not bool(torch.isfinite(rows.detach()).all()):
                code = _NONFINITE
        except Exception as exc:  # reported to every rank below
            error, code = exc, _RAISED
        n_params = sum(p.numel() for p in params)
        sizes = self._agree_on_closure(code, n_rows, n_params, lr_fingerprint(ctx.lrs), error)
        if (ctx.config.adaptive or ctx.config.line_search) and ctx.uniform_lr is None:
            raise ValueError(
                "process_group with adaptive damping or a line search needs one lr for all "
                f"trainable param groups (got {sorted(set(ctx.lrs))}): the predicted reduction "
                "comes from the gathered J step, which has no per-group split"
            )
        assert rows is not None
        comm.local_rows = n_rows
        filt = ctx.filter
        with torch.enable_grad():  # the backends' autograd calls, also under no_grad()
            if ctx.config.randomized and params:
                return self._matfree_evaluate(ctx, out, rows, sizes, captured)
            outcome, used = None, self.generic.name
            if self.primary is not self.generic and params:
                outcome = self._factored_solve(ctx, rows, sizes, captured, out, filt)
                used = self.primary.name
            if outcome is None:
                outcome = self._generic_solve(ctx, rows, sizes, filt)
                used = self.generic.name
        self._raise_for(outcome)
        assert outcome.step is not None and outcome.solution is not None
        assert outcome.rows is not None
        return Evaluation(
            out,
            outcome.rows,
            list(flat_to_params(outcome.step, params)),
            outcome.solution,
            outcome.row_change,
            used,
        )

    def trial(self, closure: Callable[[], Any], ctx: StepContext, n_rows: int) -> float:
        """Every rank calls ``closure``; the objective of the all-gathered global rows.

        No finite check (a NaN objective is a rejected trial); a rank that raises
        stops every rank.
        """
        comm = self.collective
        error: Exception | None = None
        local = torch.zeros(0, dtype=torch.float64, device=comm.device)
        code = _OK
        try:
            with torch.enable_grad():
                out = closure()
            if not isinstance(out, Tensor) or not out.is_floating_point():
                check_trial_output(out, -1)  # raises the TypeError
            local = out.detach().reshape(-1).to(device=comm.device, dtype=torch.float64)
        except Exception as exc:  # reported to every rank below
            error, code = exc, _RAISED
        sizes = comm.agree(code, local.numel(), error, "a trial call of the closure")
        height = int(sizes.max())
        padded = torch.zeros(height, dtype=torch.float64, device=comm.device)
        padded[: local.numel()] = local
        gathered = comm.all_gather(padded)
        rows = torch.cat([gathered[i, :n] for i, n in enumerate(sizes.tolist())])
        return objective(check_trial_output(rows, n_rows))

    def row_change(self, ev: Evaluation, ctx: StepContext, update: Sequence[Tensor]) -> Tensor:
        raise ValueError(
            "process_group needs one lr for all trainable param groups with adaptive "
            "damping or a line search"
        )

    def extras(self) -> dict[str, object]:
        return self.collective.extras()

    # ------------------------------------------------------------- agreement
    def _agree_on_closure(
        self, code: int, n_rows: int, n_params: int, fingerprint: float, error: Exception | None
    ) -> Tensor:
        """All-gather ``[status, N_r, P, fingerprint]``; raise on every rank if any failed."""
        comm = self.collective
        local = torch.tensor(
            [code, n_rows, n_params, fingerprint], dtype=torch.float64, device=comm.device
        )
        table = comm.all_gather(local)
        status = table[:, 0].to(torch.int64).tolist()
        comm.raise_if_raised(status, error, "the closure")
        if any(s == _NONFINITE for s in status):
            failed = [i for i, s in enumerate(status) if s == _NONFINITE]
            raise NonFiniteError(
                f"the residual rows returned by the closure on rank(s) {failed} contain NaN "
                "or Inf; the step was not taken on any rank and nothing was changed"
            )
        if bool((table[:, 2] != table[0, 2]).any()) or bool((table[:, 3] != table[0, 3]).any()):
            raise ValueError(
                "process_group: the ranks disagree on the trainable parameters or their "
                f"learning rates (P per rank {table[:, 2].to(torch.int64).tolist()}); every "
                "rank must build the same optimizer"
            )
        return table[:, 1].to(torch.int64)

    def _raise_for(self, outcome: _Outcome) -> None:
        if outcome.status == _OK:
            return
        where = f"rank {outcome.failed_rank}" if outcome.failed_rank >= 0 else "rank 0's solve"
        if outcome.status == _NONFINITE:
            raise NonFiniteError(
                f"the Jacobian of the residual rows or the Sven step contains NaN or Inf "
                f"({where}); the step was not taken on any rank and nothing was changed"
            )
        raise DistributedStepError(
            f"Sven step aborted on every rank: {where} raised while computing the "
            "Jacobian rows or the solve (its own traceback is on that rank); nothing "
            "was changed"
        )

    def _broadcast_result(
        self,
        header: Tensor,
        body: Tensor | None,
        lengths: Callable[[int], list[int]],
        factors: bool,
    ) -> tuple[list[int], list[Tensor] | None]:
        """Broadcast the root's header, then (when it says OK) its body, split by ``lengths``."""
        comm = self.collective
        comm.broadcast(header)
        values = [int(v) for v in header.tolist()]
        if values[0] != _OK:
            return values, None
        sizes = lengths(values[4]) + [values[4]] * (2 * factors)
        if body is None:
            body = torch.empty(sum(sizes), dtype=torch.float64, device=comm.device)
        comm.broadcast(body)
        return values, list(torch.split(body, sizes))

    # -------------------------------------------------------------- generic path
    def _generic_solve(
        self, ctx: StepContext, rows: Tensor, sizes: Tensor, filt: SpectralFilter
    ) -> _Outcome:
        """Gather ``[r_r | J_r]`` on rank 0, solve there, broadcast the outcome."""
        comm, params = self.collective, ctx.params
        n_params = sum(p.numel() for p in params)
        height = int(sizes.max())
        local_error: Exception | None = None
        try:
            jac = (
                jacobian(rows, params, chunk_bytes=ctx.config.chunk_bytes)
                if params
                else torch.zeros(rows.numel(), 0, dtype=torch.float64, device=comm.device)
            )
            payload = stack_padded(rows.detach().to(torch.float64), jac, height, _OK)
        except Exception as exc:  # reported through the gather's status row
            local_error = exc
            no_rows = torch.zeros(0, dtype=torch.float64, device=comm.device)
            no_jac = torch.zeros(0, n_params, dtype=torch.float64, device=comm.device)
            payload = stack_padded(no_rows, no_jac, height, _RAISED)
        parts = comm.gather(payload)
        header = torch.zeros(_HEADER, dtype=torch.float64, device=comm.device)
        body: Tensor | None = None
        root_error: Exception | None = None
        if parts is not None:
            body, root_error = self._root_solve(ctx, parts, sizes, header, filt)
        n_total = int(sizes.sum())
        values, split = self._broadcast_result(
            header, body, lambda k: [n_params, k, n_total, n_total], _wants_factors(ctx)
        )
        status, failed_rank, kept, solver_code = values[:4]
        if split is None:
            if local_error is not None:
                raise local_error
            if root_error is not None:
                raise root_error
            return _Outcome(status, failed_rank)
        step, s, global_rows, row_change, *factors = split
        solution = _solution_from([s, *factors], kept, SOLVERS[solver_code])
        return _Outcome(_OK, -1, step, solution, global_rows, row_change)

    def _root_solve(
        self,
        ctx: StepContext,
        parts: list[Tensor],
        sizes: Tensor,
        header: Tensor,
        filt: SpectralFilter,
    ) -> tuple[Tensor | None, Exception | None]:
        """Rank 0: concatenate the rows, solve as one process would, fill ``header``."""
        statuses = [int(part[0, 0]) for part in parts]
        if _RAISED in statuses:
            header[:2] = torch.tensor([_RAISED, statuses.index(_RAISED)])
            return None, None
        counts = sizes.tolist()
        stacked = torch.cat([part[1 : n + 1] for part, n in zip(parts, counts, strict=True)])
        global_rows, jac = stacked[:, 0].contiguous(), stacked[:, 1:]
        if not bool(torch.isfinite(jac).all()):
            header[:2] = torch.tensor([_NONFINITE, -1])
            return None, None
        try:
            flat, solution = jacobian_step(jac, global_rows, filt, ctx.config.solver)
        except Exception as exc:
            header[:2] = torch.tensor([_RAISED, -1])
            return None, exc
        if not bool(torch.isfinite(flat).all()):
            header[:2] = torch.tensor([_NONFINITE, -1])
            return None, None
        spectral = _spectral(solution, flat.device, _wants_factors(ctx))
        code = _SOLVER_CODES[solution.solver]
        header[:] = torch.tensor(
            [_OK, -1, solution.kept, code, spectral[0].numel()], dtype=torch.float64
        )
        body = torch.cat([flat, spectral[0], global_rows, jac @ flat, *spectral[1:]])
        return body, None

    # ------------------------------------------------------------ factored path
    def _factored_solve(
        self,
        ctx: StepContext,
        rows: Tensor,
        sizes: Tensor,
        captured: Any,
        out: Tensor,
        filt: SpectralFilter,
    ) -> _Outcome | None:
        """Factored data-parallel step; None when any rank needs the generic backend.

        Each rank computes its per-layer factors (hooks, guard, probe) and sends
        their rows to rank 0 (padded, one gather), which rebuilds the layer terms
        of the concatenated batch, forms K (N, N), solves and broadcasts ``c``.
        Each rank then forms ``J_r^T c_r`` from its own factors and one
        all-reduce sums the P-vector.
        """
        comm, params = self.collective, ctx.params
        try:
            agreed = self._agreed_factors(
                ctx, rows, captured, out, lambda c, _, a: (a, a.pack(rows.detach()))
            )
            if agreed is None:
                return None
            assembly, packed = agreed
            height = int(sizes.max())
            payload = torch.zeros(
                height + 1, packed.shape[1], dtype=torch.float64, device=comm.device
            )
            payload[1 : rows.numel() + 1] = packed
            parts = comm.gather(payload)
            header = torch.zeros(_HEADER, dtype=torch.float64, device=comm.device)
            body: Tensor | None = None
            root_error: Exception | None = None
            if parts is not None:
                body, root_error = self._root_gram_solve(
                    assembly, parts, sizes, header, filt, _wants_factors(ctx)
                )
            n_total = int(sizes.sum())
            values, split = self._broadcast_result(
                header, body, lambda k: [n_total, k, n_total, n_total], _wants_factors(ctx)
            )
            if split is None:
                if root_error is not None:
                    raise root_error
                return _Outcome(values[0], -1)
            coeffs, s, global_rows, row_change, *factors = split
            start = int(sizes[: comm.rank].sum())
            local_c = coeffs[start : start + rows.numel()]
            # J_r^T c_r in the parameters' dtype (the factors' precision; DDP's bytes)
            local_step = assembly.transpose_product(params, local_c)
            step = torch.cat([t.reshape(-1) for t in local_step]).to(params[0].dtype)
            step = comm.all_reduce(step).to(torch.float64)
            if not bool(torch.isfinite(step).all()):
                return _Outcome(_NONFINITE, -1)
            solution = _solution_from([s, *factors], values[2], "gram")
            return _Outcome(_OK, -1, step, solution, global_rows, row_change)
        finally:
            release = getattr(captured, "release", None)
            if release is not None:
                release()

    # ------------------------------------------------------------ matrix-free path
    def _matfree_evaluate(
        self, ctx: StepContext, out: Any, rows: Tensor, sizes: Tensor, captured: Any
    ) -> Evaluation:
        """Matrix-free rank-k step over the ranks (module docstring, step 5)."""
        comm, params, cfg = self.collective, ctx.params, ctx.config
        assert cfg.rank is not None
        rows = rows.reshape(-1)
        found, error = None, None
        try:
            local, used = self._block_operator(ctx, rows, captured, out)
            op = ReducedOperator(local, comm.all_reduce, params)
            try:
                found = rank_k_step(
                    op,
                    rows,
                    params,
                    ctx.filter,
                    cfg.rank + cfg.oversample,
                    cfg.power_iters,
                    ctx.generator,
                    sketch_factor=SKETCH_FACTOR if used == self.primary.name else 1.0,
                    reduce=comm.all_reduce,
                    total_rows=int(sizes.sum()),
                )
            except ProductFailed:  # op.error is set on the rank(s) that raised
                pass
            except Exception as exc:  # from reduced data: raised alike on every rank
                error = exc
        finally:
            release = getattr(captured, "release", None)
            if release is not None:
                release()
        error = op.error or error
        height = int(sizes.max())
        payload = torch.zeros(1 + 2 * height, dtype=torch.float64, device=comm.device)
        payload[0] = _RAISED if error is not None else _OK
        if found is not None:
            n = rows.numel()
            payload[1 : n + 1] = rows.detach().to(torch.float64)
            payload[1 + height : 1 + height + n] = found.row_change
        table = comm.all_gather(payload)
        comm.raise_if_raised(
            table[:, 0].to(torch.int64).tolist(), error, "the matrix-free block products"
        )
        assert found is not None
        if not all(bool(torch.isfinite(t).all()) for t in found.step):
            raise NonFiniteError(
                "the matrix-free Sven step contains NaN or Inf (the Jacobian of the residual "
                "rows has non-finite entries); the step was not taken on any rank and nothing "
                "was changed"
            )
        counts = sizes.tolist()
        global_rows = torch.cat([table[i, 1 : n + 1] for i, n in enumerate(counts)])
        row_change = torch.cat(
            [table[i, 1 + height : 1 + height + n] for i, n in enumerate(counts)]
        )
        solution = SpectralSolution(found.singular_values, found.kept, "matfree")
        return Evaluation(
            out, global_rows, found.step, solution, row_change, used, extras=dict(found.extras)
        )

    def _agreed_factors(
        self,
        ctx: StepContext,
        rows: Tensor,
        captured: Any,
        out: Any,
        prepare: Callable[[Any, Any, GramAssembly], T],
    ) -> T | None:
        """``prepare(contributions, layout, assembly)`` on this rank's layer factors, when
        every rank has factors with the same layer structure (one all-gather of
        ``[status, fingerprint]``); None, after the one-time fallback warning, when
        any rank needs the generic backend. Raises on every rank if any raised."""
        comm = self.collective
        code, reason, fingerprint = _OK, "", 0.0
        error: Exception | None = None
        prepared: T | None = None
        try:
            contributions, layout = self.primary._factors(rows, ctx.params, captured, out)
            assembly = GramAssembly.of(contributions, ctx.params)
            prepared = prepare(contributions, layout, assembly)
            fingerprint = assembly.fingerprint()
        except FallbackRequired as why:
            code, reason = _FALLBACK, why.reason
        except Exception as exc:  # reported to every rank below
            error, code = exc, _RAISED
        table = comm.all_gather(
            torch.tensor([code, fingerprint], dtype=torch.float64, device=comm.device)
        )
        status = table[:, 0].to(torch.int64).tolist()
        comm.raise_if_raised(status, error, "the factored backend")
        if _FALLBACK in status or bool((table[:, 1] != table[0, 1]).any()):
            self._warn_fallback(ctx, status, reason)
            return None
        return prepared

    def _block_operator(
        self, ctx: StepContext, rows: Tensor, captured: Any, out: Any
    ) -> tuple[JacobianOperator, str]:
        """This rank's block products: from its factors when every rank has them
        (same layer structure), else by autograd on every rank."""
        if self.primary is not self.generic:
            local = self._agreed_factors(
                ctx,
                rows,
                captured,
                out,
                lambda c, layout, _: FactoredJacobian(ctx.params, c, layout),
            )
            if local is not None:
                return local, self.primary.name
        return AutogradJacobian(rows, ctx.params, self.generic.chunk_bytes), self.generic.name

    def _warn_fallback(self, ctx: StepContext, status: list[int], reason: str) -> None:
        """The one-time SvenFallbackWarning of a collective fallback (same on every rank).

        Every rank takes part (one pickled all-gather of the reasons), whether
        or not it warns, so the collectives stay matched.
        """
        reasons = self.collective.error_messages(RuntimeError(reason) if reason else None)
        failed = [i for i, s in enumerate(status) if s == _FALLBACK]
        text = (
            "; ".join(f"rank {i}: {reasons[i].split(': ', 1)[-1]}" for i in failed)
            if failed
            else "the ranks' layer factors have different shapes"
        )
        ctx.warn_once(text, fallback_message(self.primary.name, text, everyone=True), 7)

    def _root_gram_solve(
        self,
        assembly: GramAssembly,
        parts: list[Tensor],
        sizes: Tensor,
        header: Tensor,
        filt: SpectralFilter,
        factors: bool,
    ) -> tuple[Tensor | None, Exception | None]:
        """Rank 0: K of the concatenated batch from the gathered factors, then ``c``.

        Fills ``header`` and returns ``[c (N) | s (k) | rows (N) | K c (N) | p, f (k)]``,
        or None and the error (None for a non-finite K or c).
        """
        counts = sizes.tolist()
        stacked = torch.cat([part[1 : n + 1] for part, n in zip(parts, counts, strict=True)])
        try:
            global_rows, merged = assembly.unpack(stacked, self.primary.ghost)
            gram = merged.gram(global_rows.numel(), stacked.device)
            coeffs = None
            if bool(torch.isfinite(gram).all()):
                coeffs, solution = gram_coefficients(gram, global_rows, filt)
        except Exception as exc:
            header[:2] = torch.tensor([_RAISED, -1])
            return None, exc
        if coeffs is None or not bool(torch.isfinite(coeffs).all()):
            header[:2] = torch.tensor([_NONFINITE, -1])
            return None, None
        spectral = _spectral(solution, coeffs.device, factors)
        header[:] = torch.tensor(
            [_OK, -1, solution.kept, _SOLVER_CODES["gram"], spectral[0].numel()],
            dtype=torch.float64,
        )
        body = torch.cat([coeffs, spectral[0], global_rows, gram @ coeffs, *spectral[1:]])
        return body, None
