"""Time of a Sven step on GPT-2 (transformers, float32, plain call) relative to an Adam step.

Usage: PYTHONPATH=src python benchmarks/gpt2_step.py [--quick] [--threads N]

Models are built from configs (no download). Rows: one per sequence (the
square root of its mean next-token cross-entropy, ``torchsven.from_losses``).
Per configuration, timed interleaved in one run (median of the repeats):

* Adam: ``zero_grad``, forward, ``backward`` of the mean loss, ``step``;
* Sven, plain call ``model(input_ids=ids)`` (position embedding broadcast over
  the batch; factored backend through its consumers);
* Sven with batch-first ``position_ids`` (no broadcast; the earlier workaround).

The order of the three steps rotates from one repeat to the next (whichever
step follows Adam's pays for it: about 10% in a fixed order).

The printed ratios are Sven / Adam in the same run; ``uptime`` load is printed
with them (the machine is shared: compare ratios, not milliseconds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F
import transformers

import torchsven
from torchsven.errors import SvenFallbackWarning

CONFIGS = {
    # name: (vocab, width, layers, heads, batch, length)
    "gpt2-64x2": (256, 64, 2, 4, 32, 32),
    "gpt2-128x4": (512, 128, 4, 4, 32, 64),
}


def _model(vocab: int, width: int, layers: int, heads: int, length: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=length,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _losses(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor | None):
    kwargs = {} if positions is None else {"position_ids": positions}
    logits = model(input_ids=ids[:, :-1], **kwargs).logits
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)


def run(name: str, repeats: int) -> dict[str, float]:
    vocab, width, layers, heads, batch, length = CONFIGS[name]
    ids = torch.randint(0, vocab, (batch, length + 1), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(length).expand(batch, length)
    models = {k: _model(vocab, width, layers, heads, length) for k in ("adam", "plain", "pos")}
    adam = torch.optim.Adam(models["adam"].parameters(), lr=1e-4)
    sven_plain = torchsven.Sven(models["plain"], lr=1e-3)
    sven_pos = torchsven.Sven(models["pos"], lr=1e-3)

    def adam_step() -> None:
        adam.zero_grad()
        _losses(models["adam"], ids, None).mean().backward()
        adam.step()

    def plain_step() -> None:
        sven_plain.step(lambda: torchsven.from_losses(_losses(models["plain"], ids, None)))

    def pos_step() -> None:
        sven_pos.step(lambda: torchsven.from_losses(_losses(models["pos"], ids, positions)))

    steps = {"adam": adam_step, "sven plain": plain_step, "sven position_ids": pos_step}
    times: dict[str, list[float]] = {k: [] for k in steps}
    with warnings.catch_warnings():
        warnings.simplefilter("error", SvenFallbackWarning)  # a fallback would not be factored
        for fn in steps.values():
            fn()  # warm-up (and the factored backend's first-step probe)
        keys = list(steps)
        for r in range(repeats):
            for key in keys[r % 3 :] + keys[: r % 3]:  # rotate: no step always follows Adam
                fn = steps[key]
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    assert sven_plain.last_step.backend == "factored"
    medians = {k: statistics.median(v) for k, v in times.items()}
    p_total = sum(p.numel() for p in models["adam"].parameters())
    print(
        f"{name}: P={p_total}, B={batch}, T={length}, float32, "
        f"threads={torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}"
    )
    for key, seconds in medians.items():
        print(f"  {key:18s} {1e3 * seconds:8.1f} ms  {seconds / medians['adam']:5.2f}x Adam")
    return medians


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest configuration only")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    names = ["gpt2-64x2"] if args.quick else list(CONFIGS)
    for name in names:
        run(name, args.repeats)


if __name__ == "__main__":
    main()
