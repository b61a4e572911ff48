"""A tiny GPT-2 (transformers, built from a config) trained on a sonnet: Sven vs AdamW.

    MPLBACKEND=Agg python examples/gpt2_tiny.py --steps 60 --plot gpt2_tiny.png

Character-level language model on Shakespeare's Sonnet 18 (public domain,
shipped below). Both optimizers see the same batches of random windows.
Sven's closure returns one residual row per sequence (the square root of its
mean next-token cross-entropy, ``torchsven.from_losses``) from the plain call
``model(input_ids=ids)``, so it runs on the factored backend; AdamW minimises
the mean of the same losses. The plot shows the loss on every window of the
text against the step and against wall-clock time.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

import torchsven

SONNET_18 = """\
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""


def encode(text: str) -> tuple[Tensor, list[str]]:
    """Character ids (len,) and the vocabulary."""
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text]), vocab


def model_from_config(vocab: int, context: int, width: int, layers: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=context,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def sequence_losses(model: nn.Module, windows: Tensor) -> Tensor:
    """Mean next-token cross-entropy of each window (B,), from the plain call."""
    logits = model(input_ids=windows[:, :-1]).logits
    per_token = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
    return per_token.mean(dim=1)


def all_windows(ids: Tensor, context: int) -> Tensor:
    return ids.unfold(0, context + 1, 1)


def evaluate(model: nn.Module, windows: Tensor) -> float:
    with torch.no_grad():
        return float(sequence_losses(model, windows).mean())


def train(
    name: str, model: nn.Module, batches: list[Tensor], windows: Tensor, lr: float
) -> dict[str, list[float]]:
    """Loss on all windows after each step, and the seconds spent in steps."""
    if name == "sven":
        opt: torch.optim.Optimizer = torchsven.Sven(model, lr=lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    history = {"loss": [evaluate(model, windows)], "seconds": [0.0]}
    spent = 0.0
    for batch in batches:
        start = time.perf_counter()
        if name == "sven":
            opt.step(lambda batch=batch: torchsven.from_losses(sequence_losses(model, batch)))
        else:
            opt.zero_grad()
            sequence_losses(model, batch).mean().backward()
            opt.step()
        spent += time.perf_counter() - start
        history["loss"].append(evaluate(model, windows))
        history["seconds"].append(spent)
    if name == "sven":
        history["backend"] = [opt.last_step.backend]  # type: ignore[attr-defined]
    return history


def plot(results: dict[str, dict[str, list[float]]], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, history in results.items():
        by_step.plot(history["loss"], label=name)
        by_time.plot(history["seconds"], history["loss"], label=name)
    by_step.set_xlabel("step")
    by_time.set_xlabel("seconds in optimizer steps")
    for ax in (by_step, by_time):
        ax.set_ylabel("mean cross-entropy, all windows")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle("Tiny GPT-2 on Sonnet 18 (character level)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--sven-lr", type=float, default=0.2)
    parser.add_argument("--adamw-lr", type=float, default=3e-3)
    parser.add_argument("--plot", default=None, help="PNG path for the loss curves")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    ids, vocab = encode(SONNET_18)
    windows = all_windows(ids, args.context)
    g = torch.Generator().manual_seed(0)
    batches = [
        windows[torch.randint(0, windows.shape[0], (args.batch,), generator=g)]
        for _ in range(args.steps)
    ]
    results = {}
    for name, lr in (("sven", args.sven_lr), ("adamw", args.adamw_lr)):
        model = model_from_config(len(vocab), args.context, args.width, args.layers, seed=0)
        results[name] = train(name, model, batches, windows, lr)
        history = results[name]
        print(
            f"{name:6s} loss {history['loss'][0]:.3f} -> {history['loss'][-1]:.3f} "
            f"in {args.steps} steps, {history['seconds'][-1]:.2f} s in steps"
        )
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
