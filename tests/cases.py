"""Shared float64 test cases: small models with inputs and targets.

Each builder returns a :class:`Case` whose ``residuals()`` gives the rows a
Sven closure would return. Backends are all tested on the same table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor

    def residuals(self) -> Tensor:
        return self.model(self.inputs) - self.targets

    def params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp(
    n: int = 12,
    d_in: int = 3,
    width: int = 8,
    d_out: int = 1,
    *,
    dtype=torch.float64,
    seed: int = 0,
    act: type[nn.Module] = nn.Tanh,
) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(d_in, width), act(), nn.Linear(width, width), act(), nn.Linear(width, d_out)
    ).to(dtype)
    g = _gen(seed + 1)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    y = torch.randn(n, d_out, generator=g, dtype=dtype)
    return Case(f"mlp-n{n}-w{width}-o{d_out}", model, x, y)


def convnet(n: int = 6, *, dtype=torch.float64, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 2),
    ).to(dtype)
    g = _gen(seed + 1)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=dtype)
    y = torch.randn(n, 2, generator=g, dtype=dtype)
    return Case(f"convnet-n{n}", model, x, y)


def linear_rank_deficient(
    n: int = 10, d: int = 6, rank: int = 3, *, dtype=torch.float64, seed: int = 0
) -> Case:
    """A bias-free Linear on inputs of rank ``rank``: J has rank ``rank`` exactly."""
    torch.manual_seed(seed)
    g = _gen(seed + 1)
    basis = torch.randn(rank, d, generator=g, dtype=dtype)
    x = torch.randn(n, rank, generator=g, dtype=dtype) @ basis
    model = nn.Linear(d, 1, bias=False).to(dtype)
    y = torch.randn(n, 1, generator=g, dtype=dtype)
    return Case(f"rank-deficient-r{rank}", model, x, y)


#: name -> builder of the shared table (float64 unless dtype is passed).
CASES: dict[str, Callable[..., Case]] = {
    "mlp-wide": lambda **kw: mlp(n=12, width=8, **kw),  # N < P
    "mlp-tall": lambda **kw: mlp(n=60, width=3, **kw),  # N > P
    "mlp-multi-output": lambda **kw: mlp(n=7, width=6, d_out=3, **kw),
    "convnet": convnet,
    "rank-deficient": linear_rank_deficient,
}


def matrix_with_spectrum(n: int, p: int, singular_values: list[float], *, seed: int = 0) -> Tensor:
    """(n, p) float64 matrix ``U diag(s) V^T`` with exactly the given singular values."""
    k = len(singular_values)
    assert k <= min(n, p)
    g = _gen(seed)
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(p, k, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T
