"""Poisson PINNs: Sven against Adam and L-BFGS on the same points (float64).

For each problem (:mod:`torchsven.pde`): the same seeded model and the same
interior / boundary points for every method; relative L2 error against the
exact solution on the held-out grid, recorded against step and wall time.
Writes ``<out>/pinn_poisson.json`` and one PNG per problem (solution, error
field, error vs step, error vs wall time; for 5-D a 2-D slice at x3=x4=x5=1/2).

    python benchmarks/pinn_poisson.py --problems poisson-2d poisson-5d --out bench-out

Budgets (per problem): Sven ``--sven-steps`` steps (adaptive damping; each
step calls the closure twice), Adam ``--adam-steps`` steps (best of a small lr
grid), L-BFGS ``--lbfgs-steps`` iterations (strong Wolfe). Compare on wall
time as well as steps: the methods' steps cost differently.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

import torchsven
from torchsven.pde import BoxSampler, PoissonProblem, poisson_2d, poisson_5d

PROBLEMS: dict[str, tuple[Callable[[], PoissonProblem], tuple[int, int]]] = {
    "poisson-2d": (poisson_2d, (800, 120)),
    "poisson-5d": (poisson_5d, (1000, 500)),
}
GOALS = {"poisson-2d": 1e-5, "poisson-5d": 4.67e-4}
#: torch.optim.LBFGS called with max_iter=1 per step stalls (its first iteration
#: of every call restarts the step-size heuristic); 10 iterations per call works.
LBFGS_ITERS_PER_CALL = 10


def run_method(
    name: str,
    problem: PoissonProblem,
    model: nn.Module,
    interior: torch.Tensor,
    boundary: torch.Tensor,
    steps: int,
    setting: dict,
    every: int,
) -> dict:
    """Train ``model`` in place; returns the curve {step, time, rel_l2, loss}."""
    curve: dict[str, list[float]] = {"step": [], "time": [], "rel_l2": [], "loss": []}
    if name == "sven":
        opt = torchsven.Sven(model, **setting)

        def one_step() -> float:
            opt.step(lambda: problem.rows(model, interior, boundary))
            return opt.last_step.loss

    elif name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=setting["lr"])

        def one_step() -> float:
            opt.zero_grad(set_to_none=True)
            loss = problem.loss(model, interior, boundary)
            loss.backward()
            opt.step()
            return float(loss.detach())

    elif name == "lbfgs":
        opt = torch.optim.LBFGS(
            model.parameters(),
            lr=setting["lr"],
            max_iter=LBFGS_ITERS_PER_CALL,
            history_size=50,
            line_search_fn="strong_wolfe",
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = problem.loss(model, interior, boundary)
            loss.backward()
            return loss

        def one_step() -> float:
            return float(opt.step(closure).detach())

    else:
        raise ValueError(name)
    elapsed = 0.0
    stride = LBFGS_ITERS_PER_CALL if name == "lbfgs" else 1
    for step in range(stride, steps + 1, stride):
        start = time.perf_counter()
        loss = one_step()
        elapsed += time.perf_counter() - start
        if step % every == 0 or step in (steps, stride):
            curve["step"].append(step)
            curve["time"].append(elapsed)
            curve["loss"].append(loss)
            curve["rel_l2"].append(problem.relative_l2(model))
    return curve


def slice_grid(problem: PoissonProblem, n: int = 101) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D slice (x1, x2) of the domain, other coordinates 1/2: (n*n, d) points, axis."""
    axis = torch.linspace(0, 1, n, dtype=torch.float64)
    xy = torch.cartesian_prod(axis, axis)
    x = torch.full((n * n, problem.dim), 0.5, dtype=torch.float64)
    x[:, :2] = xy
    return x, axis


def plot(problem: PoissonProblem, models: dict, curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, axis = slice_grid(problem)
    n = axis.numel()
    exact = problem.exact(x).reshape(n, n)
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2), constrained_layout=True)
    with torch.no_grad():
        u = models["sven"](x).reshape(n, n)
    ext = (0, 1, 0, 1)
    im = axes[0].imshow(u.T, origin="lower", extent=ext, cmap="viridis")
    axes[0].set_title("Sven solution" + (" (slice x3..=1/2)" if problem.dim > 2 else ""))
    fig.colorbar(im, ax=axes[0])
    im = axes[1].imshow((u - exact).abs().T, origin="lower", extent=ext, cmap="magma")
    axes[1].set_title("|Sven - exact|")
    fig.colorbar(im, ax=axes[1])
    for name, curve in curves.items():
        axes[2].semilogy(curve["step"], curve["rel_l2"], label=name)
        axes[3].semilogy(curve["time"], curve["rel_l2"], label=name)
    for ax, xlabel in ((axes[2], "step"), (axes[3], "wall time [s]")):
        ax.axhline(GOALS[problem.name], color="k", ls="--", lw=0.8, label="goal")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("relative L2 error")
        ax.legend()
    fig.suptitle(problem.name)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sven-steps", type=int, default=200)
    parser.add_argument("--adam-steps", type=int, default=2000)
    parser.add_argument("--lbfgs-steps", type=int, default=1000)
    parser.add_argument("--adam-lrs", type=float, nargs="+", default=[1e-2, 3e-3, 1e-3])
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    doc = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "problems": {},
    }
    for pname in args.problems:
        make, (n_interior, n_boundary) = PROBLEMS[pname]
        problem = make()
        interior, boundary = BoxSampler(problem.dim, n_interior, n_boundary, seed=args.seed).sample(
            0
        )
        curves, models, settings = {}, {}, {}
        plan = [
            ("sven", args.sven_steps, [{"damping": "adaptive"}]),
            ("adam", args.adam_steps, [{"lr": lr} for lr in args.adam_lrs]),
            ("lbfgs", args.lbfgs_steps, [{"lr": 1.0}]),
        ]
        for method, steps, grid in plan:
            best = None
            for setting in grid:
                model = problem.make_model(seed=args.seed)
                curve = run_method(
                    method, problem, model, interior, boundary, steps, setting, args.every
                )
                print(
                    f"{pname} {method} {setting}: rel L2 {curve['rel_l2'][-1]:.3e} "
                    f"after {steps} steps, {curve['time'][-1]:.1f} s",
                    flush=True,
                )
                if best is None or curve["rel_l2"][-1] < best[0]["rel_l2"][-1]:
                    best = (curve, model, setting)
            curves[method], models[method], settings[method] = best
        doc["problems"][pname] = {
            "goal": GOALS[pname],
            "points": {"interior": n_interior, "boundary": n_boundary},
            "settings": settings,
            "final": {m: c["rel_l2"][-1] for m, c in curves.items()},
            "best": {m: min(c["rel_l2"]) for m, c in curves.items()},
            "wall_time_s": {m: c["time"][-1] for m, c in curves.items()},
            "curves": curves,
        }
        plot(problem, models, curves, os.path.join(args.out, f"{pname}.png"))
    with open(os.path.join(args.out, "pinn_poisson.json"), "w") as f:
        json.dump(doc, f, indent=1)
    for pname, res in doc["problems"].items():
        print(pname, "goal", res["goal"], "final", res["final"], "time", res["wall_time_s"])


if __name__ == "__main__":
    main()
