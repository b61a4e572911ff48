"""Side by side: torchsven's factored backend vs the authors' Gram path (sambt/sven).

Cases (DESIGN.md section 3, measured there before):

* ``a``: MLP 64 -> 8 x 384 -> 10 (ReLU), P ~ 1.06M, B = 128 per-sample
  cross-entropy losses, rows ``r_i = l_i`` (kappa = 2);
* ``b``: MLP 32 -> 3 x 256 -> 1 (GELU), P ~ 140k, N = 512, rows ``r_i = f(x_i) - y_i``;
* ``c``: MLP 32 -> 3 x 1024 -> 1 (GELU), P ~ 2.1M, N = 512, same rows.

Both methods use rtol 1e-3 and k = N on CPU in float32; each works on its own
copy of the same initial model. The step time is the median of ``--steps``
interleaved steps after a warm-up, with the parameters reset (untimed) before
every step, and an SGD step (mean loss) on the same batch is timed alongside.
Also printed: the relative difference of the two methods' first update from
the same start. ``--threads`` sets torch's thread count (run once per count).

Needs the authors' package (``from sven.nn import GramSvenWrapper``) on the
path, e.g. rebuilt read-only in /tmp from the commits listed in the project's
notes (never committed here)::

    PYTHONPATH=/tmp/authors_sven:src python benchmarks/authors_gram_compare.py --case a

Without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CASES = ("a", "b", "c")


def _mlp(d_in: int, width: int, depth: int, d_out: int, act: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(d_in, width), act()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


def build(case: str, batch: int | None = None) -> dict[str, Any]:
    """Model, data and each method's loss / rows for one case."""
    torch.manual_seed(1)
    if case == "a":
        n = batch or 128
        model = _mlp(64, 384, 8, 10, nn.ReLU)
        x, y = torch.randn(n, 64), torch.randint(0, 10, (n,))
        return {
            "model": model,
            "x": x,
            "y": y,
            "per_sample": lambda pred, t: F.cross_entropy(pred, t, reduction="none"),
            "residual_fn": None,
            "kappa": 2.0,
        }
    width = {"b": 256, "c": 1024}[case]
    n = batch or 512
    model = _mlp(32, width, 3, 1, nn.GELU)
    x, y = torch.randn(n, 32), torch.randn(n, 1)
    return {
        "model": model,
        "x": x,
        "y": y,
        "per_sample": lambda pred, t: (pred - t).square().reshape(-1),
        "residual_fn": lambda pred, t: (pred - t).reshape(-1),
        "kappa": 1.0,
    }


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def steppers(spec: dict[str, Any]) -> tuple[dict[str, Callable[[], None]], list[nn.Module]]:
    """One step function per method (torchsven factored, authors Gram, SGD)."""
    from sven.nn import GramSvenWrapper
    from sven.opt import SvenGram

    import torchsven

    base, x, y = spec["model"], spec["x"], spec["y"]
    n = x.shape[0]
    ours_model = copy.deepcopy(base)
    ours = torchsven.Sven(ours_model, lr=1.0, rtol=1e-3, backend="factored")

    if spec["residual_fn"] is None:

        def ours_rows() -> Tensor:
            return torchsven.from_losses(spec["per_sample"](ours_model(x), y))
    else:

        def ours_rows() -> Tensor:
            return spec["residual_fn"](ours_model(x), y)

    theirs_model = copy.deepcopy(base)
    wrapper = GramSvenWrapper(
        theirs_model,
        spec["per_sample"],
        "cpu",
        kappa=spec["kappa"],
        residual_fn=spec["residual_fn"],
        capture="hooks",
    )
    theirs = SvenGram(wrapper, lr=1.0, k=n, rtol=1e-3)
    sgd_model = copy.deepcopy(base)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=1e-3)

    def step_ours() -> None:
        ours.step(ours_rows)
        if ours.last_step.backend != "factored":
            raise RuntimeError("torchsven fell back to the generic backend")

    def step_theirs() -> None:
        wrapper.loss_and_grad((x, y))
        theirs.step()

    def step_sgd() -> None:
        sgd.zero_grad(set_to_none=True)
        spec["per_sample"](sgd_model(x), y).mean().backward()
        sgd.step()

    methods = {"torchsven factored": step_ours, "authors Gram": step_theirs, "SGD": step_sgd}
    return methods, [ours_model, theirs_model, sgd_model]


def compare(case: str, steps: int, batch: int | None = None) -> dict[str, Any]:
    """Paired medians (ms) and ratios for one case."""
    spec = build(case, batch)
    start = copy.deepcopy(spec["model"].state_dict())
    methods, models = steppers(spec)

    def reset() -> None:
        with torch.no_grad():
            for model in models:
                for p, v in zip(model.parameters(), start.values(), strict=True):
                    p.copy_(v)

    reset()
    before = _flat(models[0])
    methods["torchsven factored"]()
    methods["authors Gram"]()
    d_ours, d_theirs = _flat(models[0]) - before, _flat(models[1]) - before
    agreement = float((d_ours - d_theirs).norm() / d_theirs.norm().clamp_min(1e-30))
    for fn in methods.values():  # warm-up
        reset()
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(steps):
        for name, fn in methods.items():
            reset()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {
        "case": case,
        "params": sum(p.numel() for p in spec["model"].parameters()),
        "rows": spec["x"].shape[0],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": os.getloadavg()[0],
        "median_ms": med,
        "authors/torchsven": med["authors Gram"] / med["torchsven factored"],
        "torchsven/SGD": med["torchsven factored"] / med["SGD"],
        "authors/SGD": med["authors Gram"] / med["SGD"],
        "first_update_relative_difference": agreement,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=CASES, nargs="*", default=list(CASES))
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=None, help="rows (default: the case's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    try:
        import sven.nn
        import sven.opt  # noqa: F401
    except ImportError as exc:
        print(f"authors' package not importable ({exc}); skipping the comparison")
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = [compare(case, args.steps, args.batch) for case in args.case]
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
