"""Exact data-parallel Sven: the paper's 1D regression on R processes.

Run on one machine with two CPU processes (gloo, loopback):

    torchrun --nproc_per_node=2 examples/distributed_regression.py

Every rank builds the same model (same seed), takes its slice of each global
batch (uneven slices are fine) and calls ``opt.step`` with its local residual
rows. The step equals one process on the concatenated batch; rank 0 prints the
global loss and the bytes each step moved, and at the end every rank checks
that its parameters are bit-identical to rank 0's.
"""

from __future__ import annotations

import argparse
import datetime
import math

import torch
import torch.distributed as dist
from torch import nn

import torchsven


def target(x: torch.Tensor) -> torch.Tensor:
    """The paper's function, y = exp(-10 x^2) sin(2 x)."""
    return torch.exp(-10 * x**2) * torch.sin(2 * x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--backend", default="auto", help="Sven backend")
    args = parser.parse_args(argv)

    started_here = not dist.is_initialized()
    if started_here:  # torchrun sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    torch.manual_seed(0)  # identical model on every rank (Sven checks it)
    model = nn.Sequential(
        nn.Linear(1, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 1)
    ).double()
    opt = torchsven.Sven(
        model, lr=1.0, damping="adaptive", backend=args.backend, process_group=dist.group.WORLD
    )

    # uneven split of each global batch: rank r gets about (r + 1) shares
    shares = [r + 1 for r in range(world)]
    sizes = [args.batch * s // sum(shares) for s in shares]
    sizes[-1] += args.batch - sum(sizes)
    start = sum(sizes[:rank])
    data = torch.Generator().manual_seed(1)  # same global batches on every rank

    for step in range(args.steps):
        x = 2 * torch.rand(args.batch, 1, generator=data, dtype=torch.float64) - 1
        x_local = x[start : start + sizes[rank]]
        opt.step(lambda x_local=x_local: model(x_local) - target(x_local))
        info = opt.last_step
        if rank == 0 and (step % max(1, args.steps // 10) == 0 or step == args.steps - 1):
            extras = info.extras
            print(
                f"step {step:4d}  loss {info.loss:.3e}  rows {info.rows} (local {sizes})  "
                f"kept {info.kept}  gathered {extras['bytes_gathered']} B  "
                f"broadcast {extras['bytes_broadcast']} B  reduced {extras['bytes_reduced']} B",
                flush=True,
            )

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    identical = bool(torch.equal(flat, reference))
    x = torch.linspace(-1, 1, 1001, dtype=torch.float64).unsqueeze(1)
    with torch.no_grad():
        mse = float((model(x) - target(x)).square().mean())
    if rank == 0:
        print(f"validation MSE {mse:.3e}  (rms error {math.sqrt(mse):.2e})")
    print(f"rank {rank}: parameters identical to rank 0: {identical}", flush=True)
    if started_here:
        dist.destroy_process_group()
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
