"""Physics-informed Poisson 2D with Sven, float64 end to end.

    -Lap u = 2 pi^2 sin(pi x) sin(pi y) on [0, 1]^2,  u = 0 on the boundary,
    exact u = sin(pi x) sin(pi y); MLP 2-32-1 tanh; 800 interior + 120 boundary points.

Run: ``python examples/poisson2d.py [--steps 200] [--resample]``. Prints the
relative L2 error on a held-out 101 x 101 grid every 20 steps.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

import torchsven
from torchsven.pde import BoxSampler, poisson_2d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resample", action="store_true", help="new points every step")
    args = parser.parse_args()

    problem = poisson_2d()
    model = problem.make_model(seed=args.seed, dtype=torch.float64)  # the float64 switch
    sampler = BoxSampler(2, 800, 120, seed=args.seed, dtype=torch.float64)
    interior, boundary = sampler.sample(0)
    # Levenberg-Marquardt-style adaptive damping; no rank cut (rtol defaults to 0 with it).
    # problem.rows builds the rows from one forward-Laplacian jet over all points
    # (torchsven.pinn.forward_laplacian), so the factored backend computes the step.
    opt = torchsven.Sven(model, damping="adaptive", backend="factored")

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        if args.resample:
            interior, boundary = sampler.sample(step)
        opt.step(functools.partial(problem.rows, model, interior, boundary))
        if step % 20 == 0 or step == args.steps:
            groups = opt.last_step.extras["groups"]
            print(
                f"step {step:4d}  loss {opt.last_step.loss:.3e}  "
                f"pde rms {groups['pde']['rms']:.2e}  bc rms {groups['bc']['rms']:.2e}  "
                f"rel L2 {problem.relative_l2(model):.3e}  "
                f"({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    print(f"final relative L2 error: {problem.relative_l2(model):.3e}")


if __name__ == "__main__":
    main()
