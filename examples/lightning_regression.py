"""Sven in a Lightning module: manual optimization with a residual-rows closure.

    python examples/lightning_regression.py --epochs 30

Lightning's automatic optimization calls ``optimizer.step`` with a closure
that runs ``backward()`` and returns the scalar loss; Sven needs the residual
rows instead. So the module sets ``automatic_optimization = False`` and calls
``self.optimizers().step(closure=...)`` itself, with a closure that returns
``model(x) - y``. Sven reads no ``.grad``: no ``manual_backward`` and no
``zero_grad`` are needed. Checkpoints (``Sven.state_dict``) work as for any
optimizer. Data: the paper's 1-D function, generated in code.
"""

from __future__ import annotations

import argparse
import tempfile

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import torchsven


def target(x: Tensor) -> Tensor:
    """The paper's function, y = exp(-10 x^2) sin(2 x)."""
    return torch.exp(-10 * x**2) * torch.sin(2 * x)


class SvenRegressor(L.LightningModule):
    """A small MLP fitted by Sven: one Sven step per batch."""

    def __init__(self, width: int = 16, lr: float = 0.5) -> None:
        super().__init__()
        self.automatic_optimization = False  # Sven's closure returns residual rows
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torchsven.Sven:
        return torchsven.Sven(self.net, lr=self.lr)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        rows = self.optimizers().step(closure=lambda: self(x) - y)
        loss = rows.detach().pow(2).mean()
        self.log("train_mse", loss, prog_bar=True)
        return loss


def data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.rand(n, 1, generator=g) - 1
    return TensorDataset(x, target(x))


def mse(model: nn.Module, dataset: TensorDataset) -> float:
    x, y = dataset.tensors
    with torch.no_grad():
        return float((model(x) - y).pow(2).mean())


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train = data(args.samples)
    model = SvenRegressor()
    before = mse(model, train)
    with tempfile.TemporaryDirectory() as root:  # Lightning's files do not stay behind
        trainer = L.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        trainer.fit(model, DataLoader(train, batch_size=args.batch, shuffle=True))
    after = mse(model, train)
    backend = trainer.optimizers[0].last_step.backend
    print(f"train MSE {before:.3e} -> {after:.3e} in {args.epochs} epochs ({backend})")
    return {"before": before, "after": after, "backend": backend}


if __name__ == "__main__":
    main()
