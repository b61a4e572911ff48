"""Module calls broadcast over the batch (position tables, bias tables): factored and exact.

Each model calls a module (or a parameter-owning custom module) on an input
without the samples' dimension and combines its output with batched tensors;
K and the step of the factored backend must equal the dense float64 twins.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import torchsven
from torchsven.backends import FactoredBackend, FallbackRequired, GenericBackend
from torchsven.solve import SpectralFilter

from .cases import Case
from .reference import dense_jacobian, flat, rel_err

TOL = 1e-10
VOCAB, T, D = 9, 5, 6


class PositionTable(nn.Module):
    """A learned table called with no tensor input: output (T, d) or (1, H, T, T)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.table = nn.Parameter(0.3 * torch.randn(*shape))

    def forward(self, length: int) -> Tensor:
        return self.table[..., :length, :] if self.table.dim() == 2 else self.table[None]


class Positional(nn.Module):
    """Token embedding combined with tables broadcast over the batch.

    ``mode``: "kept" (position ids (1, T), as GPT-2), "absent" (ids (T,)),
    "sub" (subtracted, ids (1, T)), "mul" (a gate multiplying the hidden
    states), "alpha" (``torch.add(h, pos, alpha=0.5)``), "linear" (a Linear on
    a (1, T, d) tensor, then added), "table" (a torch.func module with no
    tensor input), "bias" (an attention-bias table (1, H, T, T) added to
    scores).
    """

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(T, D)
        self.proj = nn.Linear(D, D)
        self.table = PositionTable(T, D)
        self.bias = PositionTable(2, T, T)
        self.relative = nn.Embedding(2 * T - 1, 2)
        self.qk = nn.Linear(D, 2 * D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.tok(ids)
        positions = torch.arange(ids.shape[1])
        if self.mode == "kept":
            h = h + self.pos(positions[None])
        elif self.mode == "absent":
            h = self.pos(positions) + h
        elif self.mode == "sub":
            h = h - self.pos(positions[None])
        elif self.mode == "mul":
            h = torch.sigmoid(h) * self.pos(positions[None]) * h
        elif self.mode == "alpha":
            h = torch.add(h, self.pos(positions[None]), alpha=0.5)
        elif self.mode == "linear":
            h = h + self.proj(self.pos.weight[None, : ids.shape[1]].detach() * 2)
        elif self.mode == "table":
            h = h + self.table(ids.shape[1])
        elif self.mode == "permuted":  # T5-style relative bias: (T, T, H) -> (1, H, T, T)
            offsets = positions[:, None] - positions[None, :] + ids.shape[1] - 1
            table = self.relative(offsets).permute(2, 0, 1).unsqueeze(0)
            causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
            scores = torch.einsum("btd,bsd->bts", h, h)[:, None].expand(-1, 2, -1, -1)
            scores = torch.where(causal, scores + table, -1e4 - table)
            h = h + torch.softmax(scores, dim=-1).mean(dim=1) @ h
        elif self.mode == "bias":
            q, k = self.qk(h).chunk(2, dim=-1)
            scores = (q.reshape(*q.shape[:2], 2, -1).transpose(1, 2)) @ (
                k.reshape(*k.shape[:2], 2, -1).permute(0, 2, 3, 1)
            )
            weights = torch.softmax(scores + self.bias(ids.shape[1]), dim=-1)
            h = h + (weights @ h.reshape(*h.shape[:2], 2, -1).transpose(1, 2)).transpose(
                1, 2
            ).reshape(h.shape)
        return self.head(torch.tanh(self.norm(h)).mean(dim=1))


MODES = ["kept", "absent", "sub", "mul", "alpha", "linear", "table", "bias", "permuted"]


def positional_case(mode: str, n: int = 6, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = Positional(mode).double()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    return Case(mode, model, ids, torch.randn(n, 2, generator=g, dtype=torch.float64))


def _factored(case: Case, backend: FactoredBackend, residuals=None):
    residuals = case.residuals if residuals is None else residuals
    params = case.params()
    with backend.capture(params) as rec:
        out = residuals()
    gram = backend.gram_matrix(out.reshape(-1), params, rec, out)
    with backend.capture(params) as rec:
        out = residuals()
    direction = backend.direction(out.reshape(-1), params, SpectralFilter(), rec, out)
    return gram, direction


def _check(case: Case, backend: FactoredBackend | None = None, residuals=None) -> None:
    residuals = case.residuals if residuals is None else residuals
    backend = FactoredBackend(case.model) if backend is None else backend
    params = case.params()
    gram, direction = _factored(case, backend, residuals)
    jac, _ = dense_jacobian(residuals, params)
    assert jac.abs().sum() > 0
    assert rel_err(gram, jac @ jac.T) <= TOL
    ref = GenericBackend(solver="gram").direction(residuals().reshape(-1), params, SpectralFilter())
    assert rel_err(flat(direction.step), flat(ref.step)) <= TOL
    assert direction.solution.kept == ref.solution.kept


@pytest.mark.parametrize("mode", MODES)
def test_broadcast_calls_match_dense(mode):
    _check(positional_case(mode))


def test_broadcast_with_several_rows_per_sample():
    case = positional_case("kept", n=4)
    assert case.targets.shape[1] == 2
    _check(case)


def test_broadcast_with_micro_batches():
    steps = {}
    for backend in ("factored", "generic"):
        case = positional_case("bias", n=7)
        params = case.params()
        before = flat(params)
        opt = torchsven.Sven(case.model, backend=backend, microbatch_size=3)
        opt.step(case.residuals)
        assert opt.last_step.backend == backend and opt.last_step.rows == 3
        steps[backend] = flat(params) - before
    assert steps["generic"].abs().sum() > 0
    assert rel_err(steps["factored"], steps["generic"]) <= 1e-9


def test_broadcast_step_is_factored_in_sven():
    case = positional_case("kept")
    opt = torchsven.Sven(case.model, lr=0.5, backend="factored")
    before = case.residuals().norm()
    for _ in range(3):
        opt.step(case.residuals)
        assert opt.last_step.backend == "factored"
    assert case.residuals().norm() < before


class Unsupported(nn.Module):
    """A broadcast output that meets the batch through a matmul (no per-sample rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(T, D)
        self.head = nn.Linear(T, 2)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.tok(ids)  # (B, T, D)
        mixed = h @ self.pos(torch.arange(ids.shape[1])).T  # (B, T, T)
        return self.head(mixed.mean(dim=1))


def test_unsupported_consumer_falls_back_naming_module_and_op():
    torch.manual_seed(0)
    model = Unsupported().double()
    ids = torch.randint(0, VOCAB, (4, T))
    params = list(model.parameters())
    backend = FactoredBackend(model)
    with backend.capture(params) as rec:
        out = model(ids)
    with pytest.raises(FallbackRequired, match=r"module 'pos'.*used by MmBackward"):
        backend.gram_matrix(out.reshape(-1), params, rec, out)


class Coupled(nn.Module):
    """A broadcast table added to a batch mean: samples are coupled (probe must see it)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(T, D)
        self.head = nn.Linear(D, 1)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.tok(ids)
        h = h + self.pos(torch.arange(ids.shape[1]))
        h = h - h.mean(dim=0, keepdim=True)
        return self.head(torch.tanh(h)).mean(dim=1)


def test_coupled_samples_with_broadcast_call_fall_back():
    torch.manual_seed(0)
    model = Coupled().double()
    ids = torch.randint(0, VOCAB, (5, T))
    params = list(model.parameters())
    backend = FactoredBackend(model)
    with backend.capture(params) as rec:
        out = model(ids)
    with pytest.raises(FallbackRequired, match=r"probe|J\^T 1"):
        backend.gram_matrix(out.reshape(-1), params, rec, out)
