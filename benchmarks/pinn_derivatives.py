"""Cost of PDE residual rows and of their parameter Jacobian, by route.

Laplacian rows ``-Lap u - f`` of an MLP d-width-1 tanh on N points (float64):

* rows only: nested autograd (tensor helpers), torch.func ``vmap(hessian)``,
  torch.func ``vmap(jacfwd(jacrev))`` (what the callable helpers use);
* rows + Jacobian (N, P) as Sven's generic backend takes it: batched
  (``is_grads_batched``, vmap over backward) and per-row loop, for the nested
  autograd rows and for :func:`torchsven.pinn.pointwise_rows`.

Times are the best of ``--repeats`` runs, in one process (ratios are what
matters on a shared machine).

    python benchmarks/pinn_derivatives.py --dim 2 --width 32 --points 920
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.func import hessian, vmap

from torchsven import pinn
from torchsven.backends.generic import jacobian


def best_time(fn: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--points", type=int, default=920)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    d = args.dim
    model = nn.Sequential(nn.Linear(d, args.width), nn.Tanh(), nn.Linear(args.width, 1)).double()
    params = list(model.parameters())
    x = torch.rand(args.points, d, dtype=torch.float64)

    def source(z: torch.Tensor) -> torch.Tensor:
        return torch.sin(math.pi * z).prod(1)

    def autograd_rows() -> torch.Tensor:
        xg = x.clone().requires_grad_(True)
        return -pinn.laplacian(model(xg), xg) - source(xg)

    def func_hessian_rows() -> torch.Tensor:
        def scalar(z: torch.Tensor) -> torch.Tensor:
            return model(z.unsqueeze(0)).reshape(())

        return -vmap(hessian(scalar))(x).diagonal(dim1=1, dim2=2).sum(1) - source(x)

    def func_rows() -> torch.Tensor:
        return -pinn.laplacian(model, x) - source(x)

    def pointwise() -> torch.Tensor:
        return pinn.pointwise_rows(model, lambda u, z: -pinn.laplacian(u, z) - source(z), x)

    ref = autograd_rows().detach()
    for fn in (func_hessian_rows, func_rows, pointwise):
        assert float((fn().detach() - ref).abs().max()) < 1e-10
    r = args.repeats
    print(
        f"dim {d}, width {args.width}, N {args.points}, P {sum(p.numel() for p in params)}, "
        f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}"
    )
    print("rows only (ms):")
    for name, fn in [
        ("nested autograd", autograd_rows),
        ("torch.func vmap(hessian)", func_hessian_rows),
        ("torch.func vmap(jacfwd(jacrev))", func_rows),
        ("pointwise_rows (values only)", pointwise),
    ]:
        print(f"  {name:34s} {1e3 * best_time(fn, r):9.1f}")
    print("rows + Jacobian (N, P) via the generic backend (ms):")
    j_ref = jacobian(autograd_rows(), params, mode="loop")
    for name, fn, mode in [
        ("nested autograd, batched", autograd_rows, "batched"),
        ("nested autograd, loop", autograd_rows, "loop"),
        ("torch.func rows, batched", func_rows, "batched"),
        ("pointwise_rows, batched", pointwise, "batched"),
        ("pointwise_rows, loop", pointwise, "loop"),
    ]:
        jac = jacobian(fn(), params, mode=mode)
        err = float((jac - j_ref).abs().max() / j_ref.abs().max())
        t = best_time(lambda fn=fn, mode=mode: jacobian(fn(), params, mode=mode), r)
        print(f"  {name:34s} {1e3 * t:9.1f}   max rel. diff to loop {err:.1e}")


if __name__ == "__main__":
    main()
