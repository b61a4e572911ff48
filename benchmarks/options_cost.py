"""Cost of the parameter-fraction masks and of the randomized SVD (CPU timings).

Usage: PYTHONPATH=src python benchmarks/options_cost.py [--quick]

1. Sven steps (generic backend) on an MLP with every mask at a few fractions:
   median time per step and the size of the materialised Jacobian (N x P_s,
   float64), beside a full step. Ratios are measured inside one run. Per-row
   reverse mode pays for the input gradients of every layer whatever the mask,
   so a row mask at fraction f costs about (1 + f) / 2 of a full step, while J
   shrinks to f; an entry mask saves nothing in J (the authors' observation).
2. The filtered solve of a random (N, P) J with a decaying spectrum (a decade
   per 10 indices): exact (``jacobian_step``) against ``randomized_step`` at
   target rank k, with the relative error of the step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import torchsven
from torchsven.randomized import randomized_step
from torchsven.solve import SpectralFilter, jacobian_step


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def masks(batch: int, width: int, repeats: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, 1),
    ).double()
    x = torch.randn(batch, 32, dtype=torch.float64)
    y = torch.randn(batch, 1, dtype=torch.float64)
    p_total = sum(p.numel() for p in model.parameters())
    print(f"MLP 32-3x{width}-1, P={p_total}, B={batch}, generic backend, float64")
    print(f"{'mask':>8} {'fraction':>8} {'ms/step':>9} {'vs full':>8} {'J MB':>8}")
    base = None
    for mask, fraction in [
        ("entries", 1.0),
        ("entries", 0.25),
        ("tensors", 0.25),
        ("rows", 0.5),
        ("rows", 0.25),
        ("rows", 0.1),
    ]:
        opt = torchsven.Sven(
            model, lr=1e-9, param_fraction=fraction, mask=mask, backend="generic", damping=0.0
        )
        t = _median_time(lambda opt=opt: opt.step(lambda: model(x) - y), repeats)
        cols = opt.last_step.extras.get("selected", p_total)
        cols = p_total if mask == "entries" else cols  # entries: J is computed in full
        base = base or t
        label = "none" if fraction == 1.0 else mask
        print(
            f"{label:>8} {fraction:>8.2f} {1e3 * t:>9.1f} {t / base:>8.2f} "
            f"{batch * cols * 8 / 2**20:>8.1f}"
        )


def randomized(n: int, p: int, k: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(n, min(n, p), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(p, min(n, p), generator=g, dtype=torch.float64)).Q
    s = (10.0 ** (-torch.arange(min(n, p), dtype=torch.float64) / 10)).clamp_min(1e-14)
    jac = (u * s) @ v.T
    r = torch.randn(n, generator=g, dtype=torch.float64)
    filt = SpectralFilter(rank=k, rtol=0.0, atol=0.0)
    exact, _ = jacobian_step(jac, r, filt, "svd")
    t_exact = _median_time(lambda: jacobian_step(jac, r, filt, "auto"), repeats)
    print(f"\nfiltered solve, J {n} x {p}, s_i = 10^(-i/10), rank k = {k}")
    print(f"{'solver':>22} {'ms':>9} {'vs exact':>9} {'rel. err':>9}")
    print(f"{'exact (auto)':>22} {1e3 * t_exact:>9.1f} {1.0:>9.2f} {0.0:>9.1e}")
    for oversample, power in [(10, 0), (10, 1), (10, 2)]:

        def run(o=oversample, q=power):
            return randomized_step(jac, r, filt, o, q, torch.Generator().manual_seed(1))

        t = _median_time(run, repeats)
        err = float((run()[0] - exact).norm() / exact.norm())
        print(
            f"{f'randomized p={oversample} q={power}':>22} {1e3 * t:>9.1f} "
            f"{t / t_exact:>9.2f} {err:>9.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        masks(batch=64, width=128, repeats=3)
        randomized(n=600, p=800, k=20, repeats=3)
    else:
        masks(batch=128, width=256, repeats=5)
        randomized(n=2000, p=3000, k=50, repeats=3)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
