"""Exact data-parallel Sven on ``torch.distributed`` (DESIGN.md section 7).

Each of R ranks holds N_r residual rows (its local batch). A step with
``Sven(..., process_group=group)`` equals one process on the concatenated batch
(rows in rank order), to float64 round-off:

1. every rank calls the closure on its local batch; one small all-gather
   exchanges ``[status, N_r, P, lr fingerprint]`` so that a rank that raised,
   returned NaN rows or holds other parameters stops *every* rank;
2. generic backend: rank 0 gathers the Jacobian rows ``[r_r | J_r]`` (padded to
   ``max N_r`` for gloo) and solves ``J^+_k r`` in float64 exactly as a single
   process would;
3. rank 0 broadcasts a header (verdict, kept, solver) and then the step (P),
   the singular values and the global rows, so every rank applies the same
   update bit for bit and reports global diagnostics.

Every branch (an error on any rank, non-finite rows or Jacobian, a failed
solve) is decided from collective data, so ranks never wait on each other.
The traffic of a step is in ``opt.last_step.extras`` (``bytes_gathered``,
``bytes_broadcast``, ``bytes_reduced``, ``comm_seconds``).

``DistributedDataParallel`` is not supported: Sven reduces exactly itself, and
DDP's gradient hooks never fire under ``torch.autograd.grad`` (they would also
average ``J^T c``, which is a sum). Pass the plain module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .backends.base import Direction, flat_to_params
from .backends.generic import jacobian
from .damping import AdaptiveDamping
from .errors import NonFiniteError
from .solve import SOLVERS, SpectralSolution, jacobian_step

if TYPE_CHECKING:
    from .optim import Sven

__all__ = [
    "DataParallel",
    "DistributedStepError",
    "check_not_ddp",
    "make_data_parallel",
]

# Status codes exchanged between ranks.
_OK, _RAISED, _NONFINITE, _MISMATCH = 0, 1, 2, 3
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


def make_data_parallel(process_group: Any) -> DataParallel | None:
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
    return DataParallel(process_group)


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
    extras: dict[str, object] = field(default_factory=dict)


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


class DataParallel:
    """Collective Sven steps over one process group (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.root = dist.get_global_rank(group, 0)
        self.traffic = Traffic()
        self.local_rows = 0
        self._device = torch.device("cpu")
        self._globalised = False  # the current step is a globalised one (trial calls)

    # ------------------------------------------------------------ collectives
    def _timed(self, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        self.traffic.seconds += time.perf_counter() - start
        self.traffic.collectives += 1
        return result

    def _all_gather(self, local: Tensor) -> Tensor:
        """(world, *local.shape) from equal-shaped tensors."""
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        self._timed(lambda: dist.all_gather(parts, local, group=self.group))
        self.traffic.gathered += local.numel() * local.element_size() * self.world_size
        return torch.stack(parts)

    def _gather(self, local: Tensor) -> list[Tensor] | None:
        """Rank 0 receives every rank's (equal-shaped) tensor; others get None."""
        parts = (
            [torch.empty_like(local) for _ in range(self.world_size)] if self.rank == 0 else None
        )
        self._timed(lambda: dist.gather(local, parts, dst=self.root, group=self.group))
        self.traffic.gathered += local.numel() * local.element_size() * self.world_size
        return parts

    def _broadcast(self, tensor: Tensor) -> Tensor:
        self._timed(lambda: dist.broadcast(tensor, src=self.root, group=self.group))
        self.traffic.broadcast += tensor.numel() * tensor.element_size()
        return tensor

    def _error_messages(self, error: BaseException | None) -> list[str]:
        """Every rank's error text (only on the failure path: a pickled all-gather)."""
        text = "" if error is None else f"{type(error).__name__}: {error}"
        messages: list[Any] = [None] * self.world_size
        self._timed(lambda: dist.all_gather_object(messages, text, group=self.group))
        return [str(m) for m in messages]

    # ------------------------------------------------------------------- checks
    def check_parameters(self, params: Sequence[Tensor]) -> None:
        """Raise ValueError unless every rank holds the same parameter values."""
        flat = (
            torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])
            if params
            else torch.zeros(0, dtype=torch.float64)
        )
        sizes = self._all_gather(torch.tensor([float(flat.numel())], device=flat.device))
        if bool((sizes != sizes[0]).any()):
            raise ValueError(
                "process_group: the ranks hold different numbers of parameters "
                f"({[int(s) for s in sizes.reshape(-1).tolist()]}); build the same model on "
                "every rank"
            )
        reference = self._broadcast(flat.clone())
        same = torch.tensor([float(torch.equal(reference, flat))], device=flat.device)
        agree = self._all_gather(same)
        if not bool((agree == 1).all()):
            bad = [i for i, v in enumerate(agree.reshape(-1).tolist()) if v != 1]
            raise ValueError(
                f"process_group: the parameters on rank(s) {bad} differ from rank 0's; seed "
                "every rank identically or broadcast rank 0's parameters "
                "(torch.distributed.broadcast) before creating Sven"
            )
        self.traffic = Traffic()

    def _agree_on_closure(
        self, code: int, n_rows: int, n_params: int, fingerprint: float, error: Exception | None
    ) -> Tensor:
        """All-gather ``[status, N_r, P, fingerprint]``; raise on every rank if any failed."""
        local = torch.tensor(
            [code, n_rows, n_params, fingerprint], dtype=torch.float64, device=self._device
        )
        table = self._all_gather(local)
        status = table[:, 0].to(torch.int64).tolist()
        self._raise_if_raised(status, error, "the closure")
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

    # --------------------------------------------------------------------- step
    def evaluate(
        self, opt: Sven, closure: Callable[[], Tensor], params: list[Tensor]
    ) -> tuple[Tensor, Tensor, Direction, str]:
        """The collective counterpart of ``Sven._evaluate``.

        Returns the local closure output, the *global* rows (N,) float64 in rank
        order, the global direction (identical on every rank) and the backend
        name. Raises on every rank, changing nothing, if any rank failed.
        """
        from .optim import residual_rows

        self.traffic = Traffic()
        self._device = params[0].device if params else torch.device("cpu")
        primary, _generic = opt._backends()
        error: Exception | None = None
        out: Any = None
        rows: Tensor | None = None
        code, n_rows = _OK, 0
        try:
            with primary.capture(params) as _captured, torch.enable_grad():
                out = closure()
                rows = residual_rows(out)
            n_rows = rows.numel()
            if not bool(torch.isfinite(rows.detach()).all()):
                code = _NONFINITE
        except Exception as exc:  # reported to every rank below
            error, code = exc, _RAISED
        n_params = sum(p.numel() for p in params)
        lrs = opt._trainable()[1]
        globalised, self._globalised = self._globalised, False
        sizes = self._agree_on_closure(code, n_rows, n_params, lr_fingerprint(lrs), error)
        needs_row_change = opt.options.get("line_search") or isinstance(
            opt.options["damping"], AdaptiveDamping
        )
        if globalised and needs_row_change and len(set(lrs)) > 1:
            raise ValueError(
                "process_group with adaptive damping or a line search needs one lr for all "
                f"trainable param groups (got {sorted(set(lrs))}): the predicted reduction "
                "comes from the gathered J step, which has no per-group split"
            )
        assert rows is not None
        self.local_rows = n_rows
        with torch.enable_grad():  # the Jacobian's autograd calls, also under no_grad()
            outcome = self._generic_solve(opt, rows, params, sizes)
        self._raise_for(outcome)
        assert outcome.step is not None and outcome.solution is not None
        assert outcome.rows is not None
        direction = Direction(
            flat_to_params(outcome.step, params), outcome.solution, outcome.row_change
        )
        return out, outcome.rows, direction, "generic"

    def collective_trials(self, closure: Callable[[], Tensor]) -> Callable[[], Tensor]:
        """Wrap a closure for a globalised step (torchsven.globalize).

        The first call of a step goes to :meth:`evaluate` unchanged; every later
        (trial) call returns the *global* rows (N,) float64, all-gathered in rank
        order, so the trial objective and every accept / reject decision are the
        same on every rank. A rank that raises in a trial stops every rank.
        """
        calls = 0
        self._globalised = True

        def wrapped() -> Tensor:
            nonlocal calls
            calls += 1
            return closure() if calls == 1 else self.trial_rows(closure)

        return wrapped

    def trial_rows(self, closure: Callable[[], Tensor]) -> Tensor:
        """Call ``closure`` on every rank and all-gather its rows (no finite check)."""
        error: Exception | None = None
        local = torch.zeros(0, dtype=torch.float64, device=self._device)
        code = _OK
        try:
            out = closure()
            if not isinstance(out, Tensor) or not out.is_floating_point():
                raise TypeError(
                    "closure must return floating-point residual rows on every call, got "
                    f"{type(out).__name__ if not isinstance(out, Tensor) else out.dtype} "
                    "on a trial call"
                )
            local = out.detach().reshape(-1).to(device=self._device, dtype=torch.float64)
        except Exception as exc:  # reported to every rank below
            error, code = exc, _RAISED
        sizes = self._agree(code, local.numel(), error, "a trial call of the closure")
        height = int(sizes.max())
        padded = torch.zeros(height, dtype=torch.float64, device=self._device)
        padded[: local.numel()] = local
        gathered = self._all_gather(padded)
        return torch.cat([gathered[i, :n] for i, n in enumerate(sizes.tolist())])

    def _agree(self, code: int, n_rows: int, error: Exception | None, where: str) -> Tensor:
        """All-gather ``[status, N_r]``; raise on every rank if any raised; returns N_r."""
        local = torch.tensor([code, n_rows], dtype=torch.float64, device=self._device)
        table = self._all_gather(local)
        self._raise_if_raised(table[:, 0].to(torch.int64).tolist(), error, where)
        return table[:, 1].to(torch.int64)

    def _raise_if_raised(self, status: list[int], error: Exception | None, where: str) -> None:
        if not any(s == _RAISED for s in status):
            return
        messages = self._error_messages(error)
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

    def _generic_solve(
        self, opt: Sven, rows: Tensor, params: list[Tensor], sizes: Tensor
    ) -> _Outcome:
        """Gather ``[r_r | J_r]`` on rank 0, solve there, broadcast the outcome."""
        n_params = sum(p.numel() for p in params)
        height = int(sizes.max())
        local_error: Exception | None = None
        try:
            jac = (
                jacobian(rows, params, chunk_bytes=opt.chunk_bytes)
                if params
                else torch.zeros(rows.numel(), 0, dtype=torch.float64, device=self._device)
            )
            payload = stack_padded(rows.detach().to(torch.float64), jac, height, _OK)
        except Exception as exc:  # reported through the gather's status row
            local_error = exc
            payload = stack_padded(
                torch.zeros(0, dtype=torch.float64, device=self._device),
                torch.zeros(0, n_params, dtype=torch.float64, device=self._device),
                height,
                _RAISED,
            )
        parts = self._gather(payload)
        header = torch.zeros(5, dtype=torch.float64, device=self._device)
        body: Tensor | None = None
        root_error: Exception | None = None
        if parts is not None:
            body, root_error = self._root_solve(opt, parts, sizes, header, n_params)
        self._broadcast(header)
        status, failed_rank, kept, solver_code, k = (int(v) for v in header.tolist())
        if status != _OK:
            if local_error is not None:
                raise local_error
            if root_error is not None:
                raise root_error
            return _Outcome(status, failed_rank)
        n_total = int(sizes.sum())
        if body is None:
            body = torch.empty(n_params + k + 2 * n_total, dtype=torch.float64, device=self._device)
        self._broadcast(body)
        step, s, global_rows, row_change = torch.split(body, [n_params, k, n_total, n_total])
        solution = SpectralSolution(s.cpu().clone(), kept, SOLVERS[solver_code])
        return _Outcome(_OK, -1, step, solution, global_rows, row_change)

    def _root_solve(
        self, opt: Sven, parts: list[Tensor], sizes: Tensor, header: Tensor, n_params: int
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
            flat, solution = jacobian_step(jac, global_rows, opt.filter, opt.options["solver"])
        except Exception as exc:
            header[:2] = torch.tensor([_RAISED, -1])
            return None, exc
        if not bool(torch.isfinite(flat).all()):
            header[:2] = torch.tensor([_NONFINITE, -1])
            return None, None
        s = solution.singular_values.to(device=flat.device, dtype=torch.float64)
        header[:] = torch.tensor(
            [_OK, -1, solution.kept, _SOLVER_CODES[solution.solver], s.numel()],
            dtype=torch.float64,
        )
        body = torch.cat([flat, s, global_rows, jac @ flat])
        return body, None
