"""Exact data-parallel Sven on ``torch.distributed`` (DESIGN.md section 7).

Each of R ranks holds N_r residual rows (its local batch). A step with
``Sven(..., process_group=group)`` equals one process on the concatenated batch
(rows in rank order), to float64 round-off:

1. every rank calls the closure on its local batch; one small all-gather
   exchanges ``[status, N_r, P, lr fingerprint]`` so that a rank that raised,
   returned NaN rows or holds other parameters stops *every* rank;
2. factored backend: every rank computes its per-layer factors (and runs the
   backend's guard on its rows); rank 0 gathers the factor rows (padded to
   ``max N_r``, gloo's gather needs equal shapes), rebuilds the layer terms of
   the concatenated batch, forms K (N, N) in float64, solves and broadcasts
   ``c``; each rank forms ``J_r^T c_r`` from its own factors and one
   all-reduce sums the P-vector. If any rank's guard asks for the generic
   backend, all ranks take it together;
3. generic backend: rank 0 gathers the Jacobian rows ``[r_r | J_r]`` and solves
   ``J^+_k r`` in float64 exactly as a single process would, then broadcasts
   the step (P);
4. rank 0 broadcasts a header (verdict, kept, solver) before any result, and
   the global rows with the singular values, so every rank applies the same
   update bit for bit and reports global diagnostics.

Every branch (an error on any rank, non-finite rows or Jacobian, a fallback,
a failed solve, a globalised step's trial calls) is decided from collective
data, so ranks never wait on each other.
The traffic of a step is in ``opt.last_step.extras`` (``bytes_gathered``,
``bytes_broadcast``, ``bytes_reduced``, ``comm_seconds``).

``DistributedDataParallel`` is not supported: Sven reduces exactly itself, and
DDP's gradient hooks never fire under ``torch.autograd.grad`` (they would also
average ``J^T c``, which is a sum). Pass the plain module.
"""

from __future__ import annotations

import math
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .backends.base import Direction, flat_to_params
from .backends.generic import jacobian
from .damping import AdaptiveDamping
from .errors import NonFiniteError, SvenFallbackWarning
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


class _RowsTerm:
    """A layer term of the concatenated batch known by its per-row gradients."""

    def __init__(self, per_row: dict[str, Tensor]) -> None:
        self._rows = per_row

    def per_row(self, names: Sequence[str]) -> dict[str, Tensor]:
        return {n: self._rows[n] for n in names if n in self._rows}

    def gram(self, names: Sequence[str]) -> Tensor:
        out = None
        for t in self.per_row(names).values():
            flat = t.reshape(t.shape[0], -1).to(torch.float64)
            out = flat @ flat.mT if out is None else out + flat @ flat.mT
        assert out is not None
        return out


@dataclass
class TermLayout:
    """The layer terms of one rank's factored step and how their rows are packed.

    ``terms`` are the distinct layer terms (in parameter order, identical on
    every rank), ``names[i]`` the parameter names term i covers, and
    ``uses[p]`` the (term index, name) pairs of parameter p. A row of the packed
    matrix is ``[r_i | factors of row i of term 0 | term 1 | ...]``, float64.
    """

    terms: list[Any]
    names: list[list[str]]
    uses: list[list[tuple[int, str]]]
    tensors: list[list[Tensor]]

    @classmethod
    def of(cls, contributions: dict[int, list[tuple[Any, str, str]]], params: list[Tensor]):
        index: dict[int, int] = {}
        terms: list[Any] = []
        names: list[list[str]] = []
        uses: list[list[tuple[int, str]]] = []
        for p in params:
            mine = []
            for term, name, _module in contributions.get(id(p), []):
                if id(term) not in index:
                    index[id(term)] = len(terms)
                    terms.append(term)
                    names.append([])
                i = index[id(term)]
                if name not in names[i]:
                    names[i].append(name)
                mine.append((i, name))
            uses.append(mine)
        tensors = [_term_tensors(t, n) for t, n in zip(terms, names, strict=True)]
        return cls(terms, names, uses, tensors)

    def pack(self, rows: Tensor) -> Tensor:
        """(N_r, 1 + sum of factor widths) float64: ``[r | factors]`` per row."""
        cols = [rows.reshape(-1, 1).to(torch.float64)]
        for group in self.tensors:
            cols += [t.reshape(t.shape[0], -1).to(torch.float64) for t in group]
        return torch.cat(cols, dim=1)

    def fingerprint(self) -> float:
        """A number equal on ranks whose terms have the same kinds, shapes and dtypes."""
        text = repr(
            [
                (type(t).__name__, [(tuple(x.shape[1:]), str(x.dtype)) for x in group])
                for t, group in zip(self.terms, self.tensors, strict=True)
            ]
        )
        return float(zlib.crc32(text.encode()))

    def global_gram(self, stacked: Tensor, ghost: Any) -> tuple[Tensor, Tensor]:
        """Rows (N,) and K (N, N) float64 of the concatenated batch from packed rows.

        The terms are rebuilt on the concatenated factors, so every per-layer
        choice (ghost or materialised form) is the one a single process makes.
        """
        n = stacked.shape[0]
        rows, offset = stacked[:, 0].contiguous(), 1
        rebuilt = []
        for term, names, group in zip(self.terms, self.names, self.tensors, strict=True):
            parts = []
            for t in group:
                width = math.prod(t.shape[1:])
                block = stacked[:, offset : offset + width].reshape(n, *t.shape[1:])
                parts.append(block.to(t.dtype))
                offset += width
            rebuilt.append(_rebuild_term(term, names, parts, ghost))
        gram = torch.zeros(n, n, dtype=torch.float64, device=stacked.device)
        single: dict[int, list[str]] = {}
        shared = []
        for mine in self.uses:
            if len(mine) == 1:
                i, name = mine[0]
                single.setdefault(i, []).append(name)
            elif mine:
                shared.append(mine)
        for i, names in single.items():
            gram += rebuilt[i].gram(names)
        for mine in shared:
            per_row = sum(rebuilt[i].per_row([name])[name].to(torch.float64) for i, name in mine)
            per_row = per_row.reshape(n, -1)
            gram += per_row @ per_row.mT
        return rows, gram

    def transpose_product(self, params: list[Tensor], coeffs: Tensor) -> Tensor:
        """``J_r^T c_r`` (P,) float64 from this rank's own factors."""
        out = []
        for p, mine in zip(params, self.uses, strict=True):
            if not mine:
                out.append(torch.zeros(p.numel(), dtype=torch.float64, device=p.device))
            elif len(mine) == 1:
                i, name = mine[0]
                out.append(
                    self.terms[i].weighted([name], coeffs)[name].to(torch.float64).reshape(-1)
                )
            else:
                per_row = sum(
                    self.terms[i].per_row([name])[name].to(torch.float64) for i, name in mine
                )
                out.append(per_row.reshape(coeffs.numel(), -1).mT @ coeffs)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _term_tensors(term: Any, names: list[str]) -> list[Tensor]:
    """The row-indexed tensors (dim 0: rows) that determine ``term``."""
    from .backends.layers import EmbeddingTerm, LinearLikeTerm

    if type(term) is LinearLikeTerm:
        return [term.a.detach(), term.g.detach()]
    if type(term) is EmbeddingTerm:
        return [term.idx, term.g.detach()]
    per_row = term.per_row(names)
    return [per_row[n].detach() for n in names]


def _rebuild_term(term: Any, names: list[str], parts: list[Tensor], ghost: Any) -> Any:
    """``term``'s counterpart on the concatenated rows ``parts``."""
    from .backends.layers import EmbeddingTerm, LinearLikeTerm

    if type(term) is LinearLikeTerm:
        return LinearLikeTerm(
            parts[0], parts[1], term.params, term.weight_name, term.bias_name, ghost
        )
    if type(term) is EmbeddingTerm:  # padding rows are already zero in g
        return EmbeddingTerm(parts[0], parts[1], term.params, term.name, None)
    return _RowsTerm(dict(zip(names, parts, strict=True)))


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
        captured: Any = None
        try:
            with primary.capture(params) as captured, torch.enable_grad():
                out = closure()
                rows = residual_rows(out)
                microbatch = getattr(opt, "microbatch_size", None)
                if microbatch is not None:  # groups of this rank's samples
                    from .microbatch import group_rows

                    rows = group_rows(out, microbatch)
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
        used = "generic"
        with torch.enable_grad():  # the backends' autograd calls, also under no_grad()
            outcome = None
            if primary is not _generic and params:
                outcome = self._factored_solve(opt, primary, rows, params, sizes, captured, out)
                used = primary.name
            if outcome is None:
                outcome = self._generic_solve(opt, rows, params, sizes)
                used = "generic"
        self._raise_for(outcome)
        assert outcome.step is not None and outcome.solution is not None
        assert outcome.rows is not None
        if isinstance(getattr(closure, "first", None), Tensor):
            # a globalised step's counting closure (torchsven.globalize) compares its
            # trial calls, which return the global rows, with its first output
            closure.first = outcome.rows  # type: ignore[attr-defined]
        direction = Direction(
            flat_to_params(outcome.step, params), outcome.solution, outcome.row_change
        )
        return out, outcome.rows, direction, used

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

    # ------------------------------------------------------------ factored path
    def _factored_solve(
        self,
        opt: Sven,
        backend: Any,
        rows: Tensor,
        params: list[Tensor],
        sizes: Tensor,
        captured: Any,
        out: Tensor,
    ) -> _Outcome | None:
        """Factored data-parallel step; None when any rank needs the generic backend.

        Each rank computes its per-layer factors (hooks, guard, probe) and sends
        their rows to rank 0 (padded, one gather), which rebuilds the layer terms
        of the concatenated batch, forms K (N, N), solves and broadcasts ``c``.
        Each rank then forms ``J_r^T c_r`` from its own factors and one
        all-reduce sums the P-vector.
        """
        from .backends.base import FallbackRequired

        local_error: Exception | None = None
        reason = ""
        code, fingerprint, width = _OK, 0.0, 0
        layout: TermLayout | None = None
        try:
            try:
                contributions, _ = backend._factors(rows, params, captured, out)
                layout = TermLayout.of(contributions, params)
                packed = layout.pack(rows.detach())
                fingerprint, width = layout.fingerprint(), packed.shape[1]
            except FallbackRequired as why:
                code, reason = _FALLBACK, why.reason
            except Exception as exc:  # reported to every rank below
                local_error, code = exc, _RAISED
            table = self._all_gather(
                torch.tensor([code, fingerprint, width], dtype=torch.float64, device=self._device)
            )
            status = table[:, 0].to(torch.int64).tolist()
            self._raise_if_raised(status, local_error, "the factored backend")
            mismatch = bool((table[:, 1] != table[0, 1]).any())
            if _FALLBACK in status or mismatch:
                self._warn_fallback(opt, backend, status, reason)
                return None
            height = int(sizes.max())
            payload = torch.zeros(height + 1, width, dtype=torch.float64, device=self._device)
            payload[1 : rows.numel() + 1] = packed
            parts = self._gather(payload)
            header = torch.zeros(5, dtype=torch.float64, device=self._device)
            body: Tensor | None = None
            root_error: Exception | None = None
            if parts is not None:
                body, root_error = self._root_gram_solve(opt, backend, layout, parts, sizes, header)
            self._broadcast(header)
            status_code, _failed, kept, _solver, k = (int(v) for v in header.tolist())
            if status_code != _OK:
                if root_error is not None:
                    raise root_error
                return _Outcome(status_code, -1)
            n_total = int(sizes.sum())
            if body is None:
                body = torch.empty(k + 3 * n_total, dtype=torch.float64, device=self._device)
            self._broadcast(body)
            coeffs, s, global_rows, row_change = torch.split(body, [n_total, k, n_total, n_total])
            start = int(sizes[: self.rank].sum())
            local_c = coeffs[start : start + rows.numel()]
            # J_r^T c_r in the parameters' dtype (the factors' precision; DDP's bytes)
            step = layout.transpose_product(params, local_c).to(params[0].dtype)
            self._timed(lambda: dist.all_reduce(step, group=self.group))
            self.traffic.reduced += step.numel() * step.element_size()
            step = step.to(torch.float64)
            if not bool(torch.isfinite(step).all()):
                return _Outcome(_NONFINITE, -1)
            solution = SpectralSolution(s.cpu().clone(), kept, "gram")
            return _Outcome(_OK, -1, step, solution, global_rows, row_change)
        finally:
            release = getattr(captured, "release", None)
            if release is not None:
                release()

    def _warn_fallback(self, opt: Sven, backend: Any, status: list[int], reason: str) -> None:
        """The one-time SvenFallbackWarning of a collective fallback (same on every rank).

        Every rank takes part (one pickled all-gather of the reasons), whether
        or not it warns, so the collectives stay matched.
        """
        reasons = self._error_messages(RuntimeError(reason) if reason else None)
        failed = [i for i, s in enumerate(status) if s == _FALLBACK]
        text = (
            "; ".join(f"rank {i}: {reasons[i].split(': ', 1)[-1]}" for i in failed)
            if failed
            else "the ranks' layer factors have different shapes"
        )
        if text not in opt._warned:
            opt._warned.add(text)
            warnings.warn(
                f"Sven: the {backend.name} backend cannot compute this step exactly "
                f"({text}); every rank uses the generic backend",
                SvenFallbackWarning,
                stacklevel=5,
            )

    def _root_gram_solve(
        self,
        opt: Sven,
        backend: Any,
        layout: TermLayout,
        parts: list[Tensor],
        sizes: Tensor,
        header: Tensor,
    ) -> tuple[Tensor | None, Exception | None]:
        """Rank 0: K of the concatenated batch from the gathered factors, then ``c``.

        Fills ``header`` and returns ``[c (N) | s (N) | rows (N) | K c (N)]``, or
        None and the error (None for a non-finite K or c).
        """
        from .solve import gram_coefficients

        counts = sizes.tolist()
        stacked = torch.cat([part[1 : n + 1] for part, n in zip(parts, counts, strict=True)])
        try:
            global_rows, gram = layout.global_gram(stacked, backend.ghost)
            if bool(torch.isfinite(gram).all()):
                coeffs, solution = gram_coefficients(gram, global_rows, opt.filter)
            else:
                coeffs = None
        except Exception as exc:
            header[:2] = torch.tensor([_RAISED, -1])
            return None, exc
        if coeffs is None or not bool(torch.isfinite(coeffs).all()):
            header[:2] = torch.tensor([_NONFINITE, -1])
            return None, None
        s = solution.singular_values.to(device=coeffs.device, dtype=torch.float64)
        header[:] = torch.tensor(
            [_OK, -1, solution.kept, _SOLVER_CODES["gram"], s.numel()], dtype=torch.float64
        )
        return torch.cat([coeffs, s, global_rows, gram @ coeffs]), None

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
