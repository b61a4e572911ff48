"""Sven in a ``transformers.Trainer``: the training step runs a Sven step with a closure.

    python examples/hf_trainer.py --epochs 8

``Trainer`` computes a scalar loss, calls ``backward()`` and then
``optimizer.step()`` without a closure; Sven needs a closure that returns the
residual rows. The recipe: subclass ``Trainer``, override ``training_step`` to
call ``sven.step(closure)`` (rows: ``logits - one_hot(labels)``), and make the
Trainer's own closure-less ``step()`` a no-op. The model is a tiny BERT-style
classifier built from a config (no download), called the plain way
(``model(input_ids=..., attention_mask=...)``): Sven runs its factored backend.
Task (generated in code): is token 1 in the sequence?
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

import torchsven


class TrainerSven(torchsven.Sven):
    """Sven whose closure-less ``step()`` (the Trainer's own call) does nothing.

    The Sven step already ran in :meth:`SvenTrainer.training_step`.
    """

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        return None if closure is None else super().step(closure)


class SvenTrainer(transformers.Trainer):
    """``Trainer`` whose update is one Sven step on the batch's residual rows."""

    def training_step(
        self, model: nn.Module, inputs: dict[str, Tensor], num_items_in_batch: int | None = None
    ) -> Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels")

        def closure() -> Tensor:  # residual rows (batch, classes)
            logits = model(**inputs).logits
            return logits - F.one_hot(labels, logits.shape[-1]).to(logits.dtype)

        rows = self.sven.step(closure)
        return 0.5 * rows.detach().pow(2).sum(dim=1).mean()  # the logged loss

    @property
    def sven(self) -> TrainerSven:
        optimizer = self.optimizer
        return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it


class Contains(torch.utils.data.Dataset):
    """Sequences of token ids; label 1 when token 1 occurs."""

    def __init__(self, n: int, length: int = 8, vocab: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, vocab, (n, length), generator=g)
        hit = torch.rand(n, generator=g) < 0.5
        where = torch.randint(0, length, (n,), generator=g)
        self.ids[hit, where[hit]] = 1
        self.labels = hit.long()

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


def tiny_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=12,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def accuracy(model: nn.Module, data: Contains) -> float:
    with torch.no_grad():
        logits = model(input_ids=data.ids, attention_mask=torch.ones_like(data.ids)).logits
    return float((logits.argmax(-1) == data.labels).float().mean())


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.3)
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    train = Contains(args.samples)
    model = tiny_classifier()
    before = accuracy(model, train)
    sven = TrainerSven(model, lr=args.lr)
    with tempfile.TemporaryDirectory() as root:  # the Trainer's files do not stay behind
        training_args = transformers.TrainingArguments(
            output_dir=root,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,  # Sven reads no .grad
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            seed=0,
        )
        trainer = SvenTrainer(
            model=model, args=training_args, train_dataset=train, optimizers=(sven, None)
        )
        trainer.train()
    after = accuracy(model, train)
    backend = sven.last_step.backend if sven.last_step is not None else None
    print(f"train accuracy {before:.2f} -> {after:.2f} in {args.epochs} epochs ({backend})")
    return {"before": before, "after": after, "backend": backend}


if __name__ == "__main__":
    main()
