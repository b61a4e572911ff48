"""Side by side: torchsven's factored backend vs the authors' Gram path (sambt/sven).

Their case (DESIGN.md section 1): MLP 64 -> 8 x 384 -> 10 (ReLU), P ~ 1.06M,
B = 128 per-sample cross-entropy losses, rows ``r_i = l_i`` (kappa = 2), rtol
1e-3, k = B, CPU, float32. Each method works on its own copy of the same
initial model; the step time is the median of ``--steps`` interleaved steps
after a warm-up, with the parameters reset (untimed) before every step, and an
SGD step on the same batch is timed alongside for the ratios. Also printed: the
relative difference of the two methods' first update from the same start.

Needs the authors' package (``from sven.nn import GramSvenWrapper``), installed
in its own environment, e.g.::

    python -m venv /tmp/authors-venv
    /tmp/authors-venv/bin/pip install -c constraints.txt torch numpy scipy
    /tmp/authors-venv/bin/pip install --no-deps /path/to/sambt-sven
    PYTHONPATH=src /tmp/authors-venv/bin/python benchmarks/authors_gram_compare.py

Without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, 384), nn.ReLU()]
    for _ in range(7):
        layers += [nn.Linear(384, 384), nn.ReLU()]
    layers.append(nn.Linear(384, 10))
    return nn.Sequential(*layers)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    try:
        from sven.nn import GramSvenWrapper
        from sven.opt import SvenGram
    except ImportError as exc:
        print(f"authors' package not importable ({exc}); skipping the comparison")
        return 0
    import torchsven

    torch.manual_seed(1)
    x = torch.randn(args.batch, 64)
    y = torch.randint(0, 10, (args.batch,))
    base = _model()
    start = copy.deepcopy(base.state_dict())

    ours_model = copy.deepcopy(base)
    ours = torchsven.Sven(ours_model, lr=1.0, rtol=1e-3, backend="factored")

    def ours_rows() -> torch.Tensor:
        return torchsven.from_losses(F.cross_entropy(ours_model(x), y, reduction="none"))

    theirs_model = copy.deepcopy(base)
    wrapper = GramSvenWrapper(
        theirs_model,
        lambda pred, t: F.cross_entropy(pred, t, reduction="none"),
        "cpu",
        capture="hooks",
    )
    theirs = SvenGram(wrapper, lr=1.0, k=args.batch, rtol=1e-3)

    sgd_model = copy.deepcopy(base)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=1e-3)

    def step_ours() -> None:
        ours.step(ours_rows)

    def step_theirs() -> None:
        wrapper.loss_and_grad((x, y))
        theirs.step()

    def step_sgd() -> None:
        sgd.zero_grad(set_to_none=True)
        F.cross_entropy(sgd_model(x), y).backward()
        sgd.step()

    def reset() -> None:
        with torch.no_grad():
            for model in (ours_model, theirs_model, sgd_model):
                for p, v in zip(model.parameters(), start.values(), strict=True):
                    p.copy_(v)

    # first update from the same start: do the two methods agree?
    reset()
    before = _flat(ours_model)
    step_ours()
    step_theirs()
    d_ours, d_theirs = _flat(ours_model) - before, _flat(theirs_model) - before
    agreement = float((d_ours - d_theirs).norm() / d_theirs.norm().clamp_min(1e-30))

    methods = {"torchsven factored": step_ours, "authors Gram": step_theirs, "SGD": step_sgd}
    for fn in methods.values():  # warm-up
        reset()
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.steps):
        for name, fn in methods.items():
            reset()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    result = {
        "params": sum(p.numel() for p in base.parameters()),
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "median_ms": med,
        "authors/torchsven": med["authors Gram"] / med["torchsven factored"],
        "torchsven/SGD": med["torchsven factored"] / med["SGD"],
        "authors/SGD": med["authors Gram"] / med["SGD"],
        "first_update_relative_difference": agreement,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
