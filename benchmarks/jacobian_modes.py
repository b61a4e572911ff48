"""How the generic backend should build Jacobian rows: measured side by side.

Compares, in one process, for an MLP with plain residuals and for a PDE-style
residual with input derivatives:
  * ``batched``: torch.autograd.grad(..., is_grads_batched=True) in row chunks,
  * ``loop``: one torch.autograd.grad per row,
  * ``torch.func``: jacrev over functional_call (needs the module, so only for
    plain residuals; shown for reference, the generic backend takes any closure),
and a plain forward + backward of the summed rows for scale.

    python benchmarks/jacobian_modes.py [--rows 64] [--width 64] [--repeats 5]

Prints medians in ms and ratios to the forward + backward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from torchsven.backends.generic import jacobian


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(2, args.width), nn.Tanh(), nn.Linear(args.width, args.width), nn.Tanh(),
        nn.Linear(args.width, 1),
    ).double()  # fmt: skip
    params = list(model.parameters())
    x = torch.rand(args.rows, 2, dtype=torch.float64)

    def plain() -> torch.Tensor:
        return model(x).reshape(-1)

    def laplacian() -> torch.Tensor:
        xr = x.clone().requires_grad_(True)
        u = model(xr)
        (g,) = torch.autograd.grad(u.sum(), xr, create_graph=True)
        lap = sum(
            torch.autograd.grad(g[:, i].sum(), xr, create_graph=True)[0][:, i] for i in range(2)
        )
        return lap.reshape(-1)

    names = dict(model.named_parameters())

    def func_jac() -> torch.Tensor:
        def f(p):
            return torch.func.functional_call(model, p, (x,)).reshape(-1)

        jac = torch.func.jacrev(f)(names)
        return torch.cat([jac[k].reshape(args.rows, -1) for k in names], dim=1)

    print(f"rows={args.rows} width={args.width} P={sum(p.numel() for p in params)}")
    for label, rows_fn in [("plain residual", plain), ("laplacian residual", laplacian)]:
        base = _median_ms(
            lambda fn=rows_fn: torch.autograd.grad(fn().sum(), params, allow_unused=True),
            args.repeats,
        )
        print(f"{label}: forward+backward {base:.2f} ms")
        for mode in ("batched", "loop"):
            ms = _median_ms(lambda m=mode, fn=rows_fn: jacobian(fn(), params, mode=m), args.repeats)
            print(f"  {mode:>10}: {ms:8.2f} ms  ({ms / base:5.1f}x)")
        if rows_fn is plain:
            ms = _median_ms(func_jac, args.repeats)
            print(f"  {'torch.func':>10}: {ms:8.2f} ms  ({ms / base:5.1f}x)")


if __name__ == "__main__":
    main()
