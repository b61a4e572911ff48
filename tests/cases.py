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


# ----------------------------------------------------------------- layer families
# Cases for the factored backend: every supported layer kind, mixed models and
# the awkward ones (weight sharing, frozen parts, custom modules, no bias).
class Block(nn.Module):
    """Tiny pre-norm transformer block on token ids (Embedding + LN + attention + MLP)."""

    def __init__(self, vocab: int = 11, d: int = 8, heads: int = 2, seq: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(0.1 * torch.randn(seq, d))
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 2)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.embed(idx) + self.pos
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(dim=1))


class Shared(nn.Module):
    """One Linear applied twice (weight sharing by reuse)."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.shared = nn.Linear(d, d)
        self.out = nn.Linear(d, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


class Tied(nn.Module):
    """One parameter reached through two different modules (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.out = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.a(x)) + torch.tanh(self.b(x**2)))


class Scaled(nn.Module):
    """A custom module with its own parameters and forward (torch.func path)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.shift = nn.Parameter(0.1 * torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.scale + self.shift) * self.scale.sum()


class MyLinear(nn.Linear):
    """A Linear subclass with its own forward: must not be read as a plain Linear."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) ** 2


def _case(name: str, model: nn.Module, x: Tensor, d_out: int, seed: int, dtype) -> Case:
    model = model.to(dtype)
    g = _gen(seed + 1)
    y = torch.randn(x.shape[0], d_out, generator=g, dtype=dtype)
    return Case(name, model, x, y)


def transformer(n: int = 6, *, dtype=torch.float64, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = Block()
    idx = torch.randint(0, 11, (n, 5), generator=_gen(seed + 2))
    return _case("transformer", model, idx, 2, seed, dtype)


def _seq_x(n: int, shape: tuple[int, ...], seed: int, dtype) -> Tensor:
    return torch.randn(n, *shape, generator=_gen(seed + 3), dtype=dtype)


def layer_case(kind: str, n: int = 6, *, dtype=torch.float64, seed: int = 0) -> Case:
    """One model per layer family, each followed by a small Linear head."""
    torch.manual_seed(seed)
    flat = nn.Flatten()
    if kind == "linear-seq":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(20, 2))
        x = _seq_x(n, (5, 3), seed, dtype)
    elif kind == "linear-nobias":
        model = nn.Sequential(nn.Linear(3, 5, bias=False), nn.Tanh(), nn.Linear(5, 1, bias=False))
        x = _seq_x(n, (3,), seed, dtype)
    elif kind == "conv1d":
        model = nn.Sequential(
            nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
            nn.Tanh(),
            flat,
            nn.LazyLinear(2),
        )
        x = _seq_x(n, (4, 9), seed, dtype)
    elif kind == "conv2d":
        model = nn.Sequential(
            nn.Conv2d(4, 4, 3, stride=(2, 1), padding=1, dilation=(1, 2), groups=4),
            nn.Tanh(),
            nn.Conv2d(4, 3, 2, padding="same", padding_mode="reflect", bias=False),
            nn.Tanh(),
            flat,
            nn.LazyLinear(2),
        )
        x = _seq_x(n, (4, 5, 6), seed, dtype)
    elif kind == "groupnorm":
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), flat, nn.LazyLinear(1)
        )
        x = _seq_x(n, (2, 4, 4), seed, dtype)
    elif kind == "batchnorm-eval":
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
        with torch.no_grad():
            model[1].running_mean.uniform_(-0.5, 0.5)
            model[1].running_var.uniform_(0.5, 2.0)
            model[1].weight.uniform_(0.5, 1.5)
        model.eval()
        x = _seq_x(n, (3,), seed, dtype)
    elif kind == "layernorm-seq":
        model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), flat, nn.Linear(16, 1))
        x = _seq_x(n, (4, 3), seed, dtype)
    elif kind == "embedding":
        model = nn.Sequential(nn.Embedding(7, 3, padding_idx=1), flat, nn.Linear(12, 2))
        x = torch.randint(0, 7, (n, 4), generator=_gen(seed + 3))
    elif kind == "shared":
        model = Shared()
        x = _seq_x(n, (3,), seed, dtype)
    elif kind == "tied":
        model = Tied()
        x = _seq_x(n, (4,), seed, dtype)
    elif kind == "frozen-part":
        model = nn.Sequential(
            nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)
        )
        model[2].requires_grad_(False)
        model[4].bias.requires_grad_(False)
        x = _seq_x(n, (3,), seed, dtype)
    elif kind == "custom":
        model = nn.Sequential(nn.Linear(3, 4), Scaled(4), MyLinear(4, 3), nn.Linear(3, 1))
        x = _seq_x(n, (3,), seed, dtype)
    elif kind == "inplace-relu":
        model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(inplace=True), nn.Linear(6, 1))
        x = _seq_x(n, (3,), seed, dtype)
    elif kind == "transformer":
        return transformer(n, dtype=dtype, seed=seed)
    else:
        raise ValueError(f"unknown layer case {kind!r}")
    model = model.to(dtype)
    with torch.no_grad():
        model(x)  # materialise lazy modules
    d_out = model(x).shape[-1]
    return _case(f"layer-{kind}", model, x, d_out, seed, dtype)


#: Layer families and mixed models of the factored backend's tests.
LAYER_CASES = (
    "linear-seq",
    "linear-nobias",
    "conv1d",
    "conv2d",
    "groupnorm",
    "batchnorm-eval",
    "layernorm-seq",
    "embedding",
    "shared",
    "tied",
    "frozen-part",
    "custom",
    "inplace-relu",
    "transformer",
)


def tiny_gpt2(
    seed: int = 0, vocab: int = 23, positions: int = 16, width: int = 8, layers: int = 2
) -> nn.Module:
    """float64 ``transformers.GPT2LMHeadModel`` from a config (no download, no dropout)."""
    import transformers  # a client extra: imported by the tests that use it only

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).double()
