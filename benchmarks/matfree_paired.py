"""N = 8192 rank-64 matrix-free step vs an SGD step, paired in one process.

Usage: PYTHONPATH=src python benchmarks/matfree_paired.py [--out PREFIX] [--repeats R]

The issue-18 goal case: MLP 32-256-256-1 (tanh, float32, P = 74,497), N = 8192
rows, ``Sven(model, rank=64, randomized=True, power_iters=q, oversample=p)``.
SGD and Sven steps alternate in the same process (so both see the same machine
state), after one warm-up step each; the ratio is that of the medians over
``repeats`` pairs. Run for 1 and 2 torch threads. Also reported: the time of
the dominant product alone (``B = J^T Q`` with l columns) and its flop count
``2 l N P`` against about ``6 N P`` for SGD's forward and backward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

import torchsven

N, RANK = 8192, 64
#: (power_iters, oversample) per configuration
CONFIGS = [(0, 10), (0, 0), (1, 10)]


def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1)
    )
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(N, 32, generator=g), torch.randn(N, 1, generator=g)


def paired(threads: int, power_iters: int, oversample: int, repeats: int) -> dict:
    """Median seconds of alternating SGD and Sven steps on the same model and rows."""
    torch.set_num_threads(threads)
    model, x, y = _problem()
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4)
    sven = torchsven.Sven(
        model,
        lr=1e-4,
        rank=RANK,
        randomized=True,
        power_iters=power_iters,
        oversample=oversample,
        damping=0.0,
    )

    def sgd_step() -> None:
        sgd.zero_grad()
        (0.5 * (model(x) - y).square().sum()).backward()
        sgd.step()

    def sven_step() -> None:
        sven.step(lambda: model(x) - y)

    sgd_step()
    sven_step()
    times: dict[str, list[float]] = {"sgd": [], "sven": []}
    for _ in range(repeats):
        for name, step in (("sgd", sgd_step), ("sven", sven_step)):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    sgd_s, sven_s = statistics.median(times["sgd"]), statistics.median(times["sven"])
    return {
        "threads": threads,
        "power_iters": power_iters,
        "oversample": oversample,
        "columns": RANK + oversample,
        "sgd_seconds": sgd_s,
        "sven_seconds": sven_s,
        "ratio": sven_s / sgd_s,
        "block_products": sven.last_step.extras["block_products"],
        "load": os.getloadavg(),
    }


def render(rows: list[dict]) -> str:
    lines = [
        f"MLP 32-256-256-1, float32, N = {N}, rank {RANK}: SGD and Sven steps alternating in"
        " one process (median of the pairs).",
        "",
        "| threads | power_iters | l | block products | SGD step | Sven step | ratio | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['threads']} | {r['power_iters']} | {r['columns']} | {r['block_products']} "
            f"| {1e3 * r['sgd_seconds']:.0f} ms | {r['sven_seconds']:.2f} s "
            f"| {r['ratio']:.1f}x | {r['load'][0]:.2f} |"
        )
    lines += [
        "",
        "Flop floor: `B = J^T Q` is `2 l N P` flops against about `6 N P` for SGD's forward and"
        f" backward, i.e. about l / 3 SGD steps ({(RANK + 10) / 3:.1f}x at l = {RANK + 10},"
        f" {RANK / 3:.1f}x at l = {RANK}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/matfree_paired")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for threads in (1, 2):
        for q, p in CONFIGS:
            rows.append(paired(threads, q, p, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(render(rows))
    print(render(rows))


if __name__ == "__main__":
    main()
