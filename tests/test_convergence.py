"""Convergence: realisable fits reach round-off; Sven beats Adam on the paper's 1D task."""

from __future__ import annotations

import torch
from torch import nn

import torchsven


class DecayPlusWave(nn.Module):
    """y = a exp(b t) + c sin(w t): a small nonlinear least-squares model."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([1.0, -0.5, 0.2, 2.5], dtype=torch.float64))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a, b, c, w = self.theta
        return a * torch.exp(b * t) + c * torch.sin(w * t)


def test_realisable_curve_fit_reaches_round_off():
    t = torch.linspace(0, 2, 30, dtype=torch.float64)
    y = 2.0 * torch.exp(-1.3 * t) + 0.5 * torch.sin(3 * t)
    model = DecayPlusWave()
    opt = torchsven.Sven(model, lr=1.0, damping=0.0)
    for _ in range(15):
        opt.step(lambda: model(t) - y)
    final = 0.5 * float((model(t) - y).detach().square().sum())
    assert final < 1e-10 * 0.5 * float(y.square().sum())
    torch.testing.assert_close(
        model.theta.detach(), torch.tensor([2.0, -1.3, 0.5, 3.0], dtype=torch.float64)
    )


def test_overparameterised_mlp_interpolates_a_teacher():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    x = torch.randn(20, 2, dtype=torch.float64)
    y = teacher(x).detach()
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    opt = torchsven.Sven(student, lr=1.0, rtol=1e-6, damping=0.0)
    for _ in range(30):
        opt.step(lambda: student(x) - y)
    final = 0.5 * float((student(x) - y).detach().square().sum())
    assert final < 1e-10
    assert opt.last_step.kept == 20  # N < P: every row is solved


def _regression_1d(n_train: int = 1024, n_val: int = 512):
    """The paper's task: y = exp(-10 x^2) sin(2x), x ~ U[-1, 1], standardised targets."""
    g = torch.Generator().manual_seed(0)

    def sample(n: int):
        x = torch.rand(n, 1, generator=g) * 2 - 1
        return x, torch.exp(-10 * x**2) * torch.sin(2 * x)

    (xt, yt), (xv, yv) = sample(n_train), sample(n_val)
    mean, std = yt.mean(), yt.std()
    return xt, (yt - mean) / std, xv, (yv - mean) / std


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(),
        nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 1),
    )  # fmt: skip


def _train(method: str, lr: float, epochs: int = 3, batch: int = 32) -> float:
    xt, yt, xv, yv = _regression_1d()
    model = _mlp()
    if method == "sven":
        opt = torchsven.Sven(model, lr=lr, damping=0.0)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=order)
        for start in range(0, len(xt), batch):
            idx = perm[start : start + batch]
            if method == "sven":
                opt.step(lambda idx=idx: model(xt[idx]) - yt[idx])
            else:
                opt.zero_grad()
                (model(xt[idx]) - yt[idx]).square().mean().backward()
                opt.step()
    with torch.no_grad():
        return float((model(xv) - yv).square().mean())


def test_sven_beats_adam_on_shortened_regression_1d():
    # Same model init, data and batch order; each method tuned on a 2-point lr grid.
    sven = min(_train("sven", lr) for lr in (0.03, 0.1))
    adam = min(_train("adam", lr) for lr in (0.01, 0.03))
    assert sven < adam
    assert sven < 1e-3
