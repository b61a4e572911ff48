"""Assembly of the factored Gram matrix and of ``J^T c`` from per-layer terms.

A step's layer terms (:mod:`torchsven.backends.layers`) each cover some
parameters. A parameter covered by one term contributes through that term's
own Gram form (ghost or materialised); a parameter shared by several terms
(tied weights) has its per-row gradients summed and contributes
``G G^T``. :class:`GramAssembly` records this layout once per step and is
used by the local factored backend and, on the gathered factors of every
rank, by the collective (``torch.distributed``) evaluator, so both build K and
``J^T c`` by the same code.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .layers import EmbeddingTerm, LinearLikeTerm, Term

__all__ = ["GramAssembly", "RowsTerm"]

_F64 = torch.float64

#: param id -> [(term, parameter name in the term, module name)]
Contributions = dict[int, list[tuple[Term, str, str]]]


class RowsTerm(Term):
    """A layer term known only by its per-row gradients (dim 0: rows)."""

    def __init__(self, per_row: dict[str, Tensor]) -> None:
        self._rows = per_row

    def per_row(self, names: Sequence[str]) -> dict[str, Tensor]:
        return {n: self._rows[n] for n in names if n in self._rows}


@dataclass
class GramAssembly:
    """The distinct terms of a step and which parameters each covers.

    Attributes:
        terms: distinct layer terms, in parameter order.
        names: per term, the parameter names it covers.
        uses: per parameter, the ``(term index, name)`` pairs that give its gradient.
    """

    terms: list[Term]
    names: list[list[str]]
    uses: list[list[tuple[int, str]]]
    _shared: dict[int, Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, contributions: Contributions, params: Sequence[Tensor]) -> GramAssembly:
        index: dict[int, int] = {}
        terms: list[Term] = []
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
        return cls(terms, names, uses)

    def with_terms(self, terms: list[Term]) -> GramAssembly:
        """The same layout over other terms (e.g. rebuilt on every rank's rows)."""
        return GramAssembly(terms, self.names, self.uses)

    def _shared_rows(self, k: int, n_rows: int) -> Tensor:
        """Summed per-row gradients (N, numel) float64 of the k-th parameter (shared)."""
        if k not in self._shared:
            per_row = sum(self.terms[i].per_row([name])[name].to(_F64) for i, name in self.uses[k])
            self._shared[k] = per_row.reshape(n_rows, -1)
        return self._shared[k]

    def gram(self, n_rows: int, device: torch.device | str) -> Tensor:
        """``K = J J^T`` (N, N) float64."""
        gram = torch.zeros(n_rows, n_rows, dtype=_F64, device=device)
        single: dict[int, list[str]] = {}
        for k, mine in enumerate(self.uses):
            if len(mine) == 1:
                i, name = mine[0]
                single.setdefault(i, []).append(name)
            elif mine:
                per_row = self._shared_rows(k, n_rows)
                gram += per_row @ per_row.mT
        for i, names in single.items():
            gram += self.terms[i].gram(names)
        return gram

    def transpose_product(self, params: Sequence[Tensor], coeffs: Tensor) -> list[Tensor]:
        """``J^T c`` per parameter (each in its shape, float64) for row weights ``c`` (N,)."""
        out = []
        for k, (p, mine) in enumerate(zip(params, self.uses, strict=True)):
            if not mine:
                out.append(torch.zeros(p.shape, dtype=_F64, device=p.device))
            elif len(mine) == 1:
                i, name = mine[0]
                part = self.terms[i].weighted([name], coeffs)[name]
                out.append(part.to(_F64).reshape(p.shape))
            else:
                out.append((self._shared_rows(k, coeffs.numel()).mT @ coeffs).reshape(p.shape))
        return out

    # ------------------------------------------------------ exchange by rows
    def row_tensors(self) -> list[list[Tensor]]:
        """Per term, the row-indexed tensors (dim 0: rows) that determine it."""
        out = []
        for term, names in zip(self.terms, self.names, strict=True):
            if type(term) is LinearLikeTerm:
                out.append([term.a.detach(), term.g.detach()])
            elif type(term) is EmbeddingTerm:
                out.append([term.idx, term.g.detach()])
            else:
                per_row = term.per_row(names)
                out.append([per_row[n].detach() for n in names])
        return out

    def pack(self, rows: Tensor) -> Tensor:
        """(N, 1 + sum of factor widths) float64: ``[r_i | factors of row i]``."""
        cols = [rows.reshape(-1, 1).to(_F64)]
        for group in self.row_tensors():
            cols += [t.reshape(t.shape[0], -1).to(_F64) for t in group]
        return torch.cat(cols, dim=1)

    def fingerprint(self) -> float:
        """A number equal for assemblies whose terms have the same kinds, shapes and dtypes."""
        text = repr(
            [
                (type(t).__name__, [(tuple(x.shape[1:]), str(x.dtype)) for x in group])
                for t, group in zip(self.terms, self.row_tensors(), strict=True)
            ]
        )
        return float(zlib.crc32(text.encode()))

    def unpack(self, stacked: Tensor, ghost: Any) -> tuple[Tensor, GramAssembly]:
        """Rows (N,) and the assembly over the rows of ``stacked`` (packed by :meth:`pack`).

        The terms are rebuilt on those rows, so every per-layer choice (ghost or
        materialised form) is the one a single process on them makes.
        """
        n = stacked.shape[0]
        rows, offset = stacked[:, 0].contiguous(), 1
        rebuilt: list[Term] = []
        for term, names, group in zip(self.terms, self.names, self.row_tensors(), strict=True):
            parts = []
            for t in group:
                width = math.prod(t.shape[1:])
                block = stacked[:, offset : offset + width].reshape(n, *t.shape[1:])
                parts.append(block.to(t.dtype))
                offset += width
            rebuilt.append(_rebuild(term, names, parts, ghost))
        return rows, self.with_terms(rebuilt)


def _rebuild(term: Term, names: list[str], parts: list[Tensor], ghost: Any) -> Term:
    """``term``'s counterpart on other rows ``parts``."""
    if type(term) is LinearLikeTerm:
        return LinearLikeTerm(
            parts[0], parts[1], term.params, term.weight_name, term.bias_name, ghost
        )
    if type(term) is EmbeddingTerm:  # padding rows are already zero in g
        return EmbeddingTerm(parts[0], parts[1], term.params, term.name, None)
    return RowsTerm(dict(zip(names, parts, strict=True)))
