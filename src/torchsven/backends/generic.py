"""Exact generic backend: materialise J row-chunk by row-chunk, then solve.

Works for any differentiable closure, including residuals that contain
derivatives of the network with respect to its inputs (built with
``create_graph=True``). Cost: O(N P) memory for J and one backward per row
(batched with ``is_grads_batched`` where autograd's vmap supports the graph).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..matfree import ParamBlock, rank_k_step
from ..solve import SpectralFilter, SpectralSolution, jacobian_step
from .base import Backend, Direction, check_finite, flat_to_params

__all__ = ["AutogradJacobian", "GenericBackend", "jacobian"]

#: Default memory budget for one chunk of batched backward passes.
DEFAULT_CHUNK_BYTES = 1 << 28
#: Rows per batched backward: larger chunks are slower (cache), not faster.
MAX_CHUNK_ROWS = 32


def _rows_grads(
    rows: Tensor, params: Sequence[Tensor], grad_outputs: Tensor, batched: bool
) -> list[Tensor | None]:
    with warnings.catch_warnings():
        # vmap over the backward may fall back to a slow loop for some ops; the
        # result is still exact, the warning is noise for the user.
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        return list(
            torch.autograd.grad(
                rows,
                params,
                grad_outputs=grad_outputs,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )
        )


def _fill_chunk(
    out: Tensor, start: int, grads: Sequence[Tensor | None], params: Sequence[Tensor]
) -> None:
    offset = 0
    for g, p in zip(grads, params, strict=True):
        n = p.numel()
        if g is not None:
            out[start : start + g.shape[0], offset : offset + n] = g.reshape(g.shape[0], n)
        offset += n


def jacobian(
    rows: Tensor,
    params: Sequence[Tensor],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    mode: str = "batched",
) -> Tensor:
    """Dense Jacobian ``d rows / d params`` as an (N, P) float64 tensor.

    Args:
        rows: (N,) residual rows with a grad_fn.
        params: tensors that require grad; unused ones give zero columns.
        chunk_bytes: memory budget of one chunk of batched backward passes.
        mode: "batched" (vmap over autograd, falls back to "loop" where vmap
            cannot run the graph) or "loop" (one backward per row).
    """
    rows = rows.reshape(-1)
    n = rows.numel()
    p_total = sum(p.numel() for p in params)
    out = torch.zeros(n, p_total, dtype=torch.float64, device=rows.device)
    if n == 0 or p_total == 0:
        return out
    if mode == "batched":
        itemsize = max(p.element_size() for p in params)
        # One chunk holds grad_outputs (c, N) and grads (c, P), plus the graph's
        # batched intermediates, which we cannot see; budget for 4x the grads.
        # Every batched backward carries the whole graph for each of its rows, so
        # large chunks thrash the cache: 32 rows per chunk measured fastest
        # (benchmarks/jacobian_modes.py; 2x faster than 256 at P=17k).
        budget = chunk_bytes // max(1, 4 * (p_total + n) * itemsize)
        chunk = max(1, min(n, MAX_CHUNK_ROWS, budget))
        eye = torch.eye(n, dtype=rows.dtype, device=rows.device)
        try:
            for start in range(0, n, chunk):
                grads = _rows_grads(rows, params, eye[start : start + chunk], batched=True)
                _fill_chunk(out, start, grads, params)
            return out
        except RuntimeError:
            out.zero_()  # vmap could not run this graph: exact per-row loop below
    elif mode != "loop":
        raise ValueError(f"mode must be 'batched' or 'loop', got {mode!r}")
    unit = torch.zeros_like(rows)
    for i in range(n):
        unit[i] = 1
        grads = _rows_grads(rows, params, unit, batched=False)
        unit[i] = 0
        _fill_chunk(out, i, [None if g is None else g.unsqueeze(0) for g in grads], params)
    return out


class GenericBackend(Backend):
    """Materialised Jacobian, then SVD of J or eigh of J J^T / J^T J by shape.

    Args:
        solver: "auto", "svd", "gram" or "normal" (see :func:`torchsven.solve.jacobian_step`).
        chunk_bytes: memory budget for one chunk of batched backward passes.
        mode: "batched" or "loop" Jacobian rows (see :func:`jacobian`).
    """

    name = "generic"
    provides_matfree = True

    def __init__(
        self, solver: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES, mode: str = "batched"
    ) -> None:
        self.solver = solver
        self.chunk_bytes = chunk_bytes
        self.mode = mode

    def direction(
        self,
        rows: Tensor,
        params: Sequence[Tensor],
        filt: SpectralFilter,
        captured: Any = None,
        output: Tensor | None = None,
    ) -> Direction:
        jac = jacobian(rows, params, chunk_bytes=self.chunk_bytes, mode=self.mode)
        check_finite(jac, "the Jacobian of the residual rows")
        rows64 = rows.detach().reshape(-1).to(torch.float64)
        flat, solution = jacobian_step(jac, rows64, filt, self.solver)
        return Direction(flat_to_params(flat, params), solution, row_change=jac @ flat)

    def matfree_direction(
        self,
        rows: Tensor,
        params: Sequence[Tensor],
        filt: SpectralFilter,
        captured: Any = None,
        output: Tensor | None = None,
        *,
        columns: int,
        power_iters: int,
        generator: torch.Generator,
        probes: int = 4,
    ) -> Direction:
        """Rank-k step with K only through block products by autograd (never J).

        ``J^T V`` by batched vector-Jacobian products, ``J Z`` by the double-backward
        trick (:class:`AutogradJacobian`); the rest as in
        :meth:`torchsven.backends.factored.FactoredBackend.matfree_direction`.
        """
        params = list(params)
        rows = rows.reshape(-1)
        op = AutogradJacobian(rows, params, self.chunk_bytes)
        found = rank_k_step(op, rows, params, filt, columns, power_iters, generator, probes)
        check_finite(found.step, "the Sven step")
        solution = SpectralSolution(found.singular_values, found.kept, "matfree")
        return Direction(found.step, solution, found.row_change, found.extras)


class AutogradJacobian:
    """Block products with the Jacobian of ``rows`` by autograd (:mod:`torchsven.matfree`).

    * ``jt(V)``: ``J^T V`` by backward passes batched over V's columns
      (``is_grads_batched``), at most :data:`MAX_CHUNK_ROWS` columns per pass;
    * ``j(Z)``: ``J Z`` as the gradient of ``u -> <J^T u, Z>``: one backward of
      ``rows`` with ``create_graph=True`` builds ``g(u) = J^T u`` (linear in a
      dummy ``u``), then batched backward passes of ``g`` give ``J Z`` (the
      double-backward form of a Jacobian-vector product).

    Memory: the graph of the rows (already there), plus O((N + P) b) per chunk.
    """

    def __init__(self, rows: Tensor, params: list[Tensor], chunk_bytes: int) -> None:
        self.rows_tensor = rows
        self.rows = rows.numel()
        self.params = params
        p_total = sum(p.numel() for p in params)
        itemsize = max(p.element_size() for p in params)
        budget = chunk_bytes // max(1, 4 * (p_total + self.rows) * itemsize)
        self.chunk = max(1, min(MAX_CHUNK_ROWS, budget))
        self._linear: tuple[Tensor, list[Tensor | None]] | None = None

    def _batched(
        self, outputs: Sequence[Tensor], inputs: Sequence[Tensor], grad_outputs: Sequence[Tensor]
    ) -> list[Tensor | None]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            try:
                return list(
                    torch.autograd.grad(
                        outputs,
                        inputs,
                        grad_outputs=grad_outputs,
                        retain_graph=True,
                        allow_unused=True,
                        is_grads_batched=True,
                    )
                )
            except RuntimeError:  # vmap cannot run this graph: one pass per column
                columns = []
                for k in range(grad_outputs[0].shape[0]):
                    columns.append(
                        torch.autograd.grad(
                            outputs,
                            inputs,
                            grad_outputs=[g[k] for g in grad_outputs],
                            retain_graph=True,
                            allow_unused=True,
                        )
                    )
                return [
                    None if col[0] is None else torch.stack(list(col))
                    for col in zip(*columns, strict=True)
                ]

    def sketch(self, columns: int, generator: torch.Generator) -> Tensor:
        omega = [
            torch.randn((columns, *p.shape), generator=generator, dtype=torch.float64).to(
                p.device, p.dtype
            )
            for p in self.params
        ]
        return self.j(omega)

    def jt(self, v: Tensor) -> ParamBlock:
        b = v.shape[1]
        out = [torch.zeros(b, *p.shape, dtype=p.dtype, device=p.device) for p in self.params]
        vt = v.mT.to(self.rows_tensor.dtype)
        for start in range(0, b, self.chunk):
            grads = self._batched(
                [self.rows_tensor], self.params, [vt[start : start + self.chunk].contiguous()]
            )
            for o, g in zip(out, grads, strict=True):
                if g is not None:
                    o[start : start + g.shape[0]] = g
        return out

    def _linear_map(self) -> tuple[Tensor, list[Tensor | None]]:
        if self._linear is None:
            dummy = torch.zeros_like(self.rows_tensor, requires_grad=True)
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    self.rows_tensor,
                    self.params,
                    grad_outputs=dummy,
                    create_graph=True,
                    retain_graph=True,
                    allow_unused=True,
                )
            linear = [g if g is not None and g.requires_grad else None for g in grads]
            self._linear = (dummy, linear)
        return self._linear

    def j(self, z: ParamBlock) -> Tensor:
        b = z[0].shape[0]
        out = torch.zeros(self.rows, b, dtype=torch.float64, device=self.rows_tensor.device)
        dummy, grads = self._linear_map()
        used = [i for i, g in enumerate(grads) if g is not None]
        if not used:
            return out
        for start in range(0, b, self.chunk):
            sl = slice(start, start + self.chunk)
            try:
                (col,) = self._batched(
                    [grads[i] for i in used],  # type: ignore[misc]
                    [dummy],
                    [z[i][sl].to(self.params[i].dtype).contiguous() for i in used],
                )
            except RuntimeError as exc:
                raise RuntimeError(
                    "the matrix-free rank-k step needs J Z by double backward, which an op "
                    f"of the closure does not support ({str(exc).splitlines()[0]}); for "
                    "scaled_dot_product_attention call the model under "
                    "torch.nn.attention.sdpa_kernel(SDPBackend.MATH)"
                ) from exc
            if col is None:  # J^T u never reaches u: a backward that built no graph
                raise RuntimeError(
                    "the matrix-free rank-k step needs J Z by double backward, but the "
                    "gradient of the rows does not depend on their output gradients through "
                    "autograd (a custom autograd.Function whose backward is "
                    "once_differentiable or runs without grad); give it a differentiable "
                    "backward, or use randomized=False"
                )
            out[:, sl] = col.mT.to(torch.float64)
        return out
