"""Training frameworks: Lightning (manual optimization) and the transformers Trainer recipe.

The examples run at tiny sizes (CPU, no logger files, no downloads); the
frameworks' own first-order calling conventions get errors that say what to
write instead.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import runpy
import tempfile
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchsven
from torchsven.clients import check_closure, check_closure_output
from torchsven.errors import SvenFallbackWarning

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name), run_name="example")


def test_lightning_example_trains_with_sven_on_the_factored_backend():
    with warnings.catch_warnings():
        warnings.simplefilter("error", SvenFallbackWarning)
        result = _example("lightning_regression.py")["main"](
            ["--epochs", "3", "--samples", "64", "--batch", "32"]
        )
    assert result["backend"] == "factored"
    assert result["after"] < 0.5 * result["before"]


class Automatic(L.LightningModule):
    """Written for a first-order optimizer: automatic optimization, scalar loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)

    def configure_optimizers(self) -> torchsven.Sven:
        return torchsven.Sven(self.net)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).pow(2).mean()


def test_lightning_automatic_optimization_error_says_how_to_switch():
    model = Automatic()
    before = [p.detach().clone() for p in model.parameters()]
    data = TensorDataset(torch.randn(8, 2), torch.randn(8, 1))
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_steps=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        with pytest.raises(ValueError, match=r"automatic_optimization = False.*closure="):
            trainer.fit(model, DataLoader(data, batch_size=4))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_hf_trainer_recipe_trains_on_the_factored_backend():
    with warnings.catch_warnings():
        warnings.simplefilter("error", SvenFallbackWarning)
        result = _example("hf_trainer.py")["main"](
            ["--epochs", "3", "--samples", "64", "--batch", "16"]
        )
    assert result["backend"] == "factored"
    assert result["after"] > result["before"]


def test_plain_trainer_with_sven_says_to_override_training_step():
    example = _example("hf_trainer.py")
    model = example["tiny_classifier"]()
    with tempfile.TemporaryDirectory() as root:
        args = transformers.TrainingArguments(
            output_dir=root,
            max_steps=1,
            per_device_train_batch_size=8,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
        )
        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=example["Contains"](16),
            optimizers=(torchsven.Sven(model), None),
        )
        with pytest.raises(TypeError, match=r"override training_step.*hf_trainer\.py"):
            trainer.train()


def test_client_checks_stay_silent_outside_the_frameworks():
    check_closure_output(torch.ones(()))  # plain 0-dim output: the usual error follows
    check_closure(None)
    opt = torchsven.Sven(nn.Linear(2, 1))
    with pytest.raises(ValueError, match="0-dim tensor"):
        opt.step(lambda: torch.ones((), requires_grad=True))
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step(None)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_closure_falls_back_naming_torch_compile(fullgraph):
    torch.manual_seed(0)
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    init = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double().state_dict()
    steps = {}
    for backend in ("auto", "generic"):
        model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
        model.load_state_dict(init)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
        opt = torchsven.Sven(model, backend=backend)
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        if backend == "auto":
            with pytest.warns(SvenFallbackWarning, match=r"torch\.compile-d.*uncompiled model"):
                opt.step(lambda c=compiled: c(x) - y)
        else:
            opt.step(lambda c=compiled: c(x) - y)
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        steps[backend] = after - before
    assert steps["generic"].abs().sum() > 0
    assert torch.allclose(steps["auto"], steps["generic"], rtol=1e-12, atol=1e-14)


def test_gpt2_tiny_example_runs_sven_factored_and_adamw_with_a_plot(tmp_path):
    path = tmp_path / "curves.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error", SvenFallbackWarning)
        args = ["--steps", "3", "--batch", "4", "--context", "8", "--width", "8"]
        results = _example("gpt2_tiny.py")["main"]([*args, "--layers", "1", "--plot", str(path)])
    assert results["sven"]["backend"] == ["factored"]
    for history in (results["sven"], results["adamw"]):
        assert len(history["loss"]) == 4
        assert history["loss"][-1] < history["loss"][0]
    assert path.stat().st_size > 1000
