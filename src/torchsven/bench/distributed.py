"""``torchsven bench distributed``: data-parallel Sven step time and traffic on loopback.

For R in ``--processes`` (default 1, 2, 4) it spawns R gloo processes on
127.0.0.1 (one thread each), splits a fixed global batch over them and times
Sven steps with ``process_group=``. Per R it reports the median step time, the
share of it rank 0 spends inside collectives (``last_step.extras["comm_seconds"]``,
which includes waiting for the slowest rank),
the bytes gathered / broadcast / all-reduced per step, and beside it DDP's
traffic for the same model: one all-reduce of the P-float gradient (its time
measured in the same group). Finally it projects the communication time of
one step to a multi-node cluster from the byte counts and an assumed link
(bandwidth, per-collective latency): the generic path's O(N P) against the
factored path's O(N sum(d_in + d_out)) + P and DDP's P.

On loopback with more processes than cores the step time does not fall with R:
the processes share the cores. What transfers to a cluster is the byte count.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import multiprocessing as mp
import os
import platform
import queue
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["factored_bytes", "main", "mlp_layers", "project_seconds"]

#: assumed links for the projection: name -> (bytes per second, seconds per collective)
LINKS = {"10 GbE": (10e9 / 8, 50e-6), "100 Gb InfiniBand": (100e9 / 8, 5e-6)}


def mlp_layers(d_in: int, width: int, depth: int, d_out: int) -> list[tuple[int, int]]:
    """(d_in, d_out) of each Linear of the benchmark MLP."""
    dims = [d_in] + [width] * depth + [d_out]
    return list(itertools.pairwise(dims))


def factored_bytes(
    n_rows: int, layers: list[tuple[int, int]], n_params: int, itemsize: int = 4
) -> dict[str, int]:
    """Bytes per step of the factored data-parallel path (docs/design.md, "Distributed").

    Gathered (float64): the residual and, per Linear, the input x (d_in) and
    output gradient g (d_out) of every row; broadcast (float64): c, the rows
    and K c (N each); all-reduced: the P-vector ``sum_r J_r^T c_r`` in the
    parameters' dtype (``itemsize`` bytes), as DDP's gradient.
    """
    per_row = 1 + sum(d_in + d_out for d_in, d_out in layers)
    return {
        "gathered": 8 * n_rows * per_row,
        "broadcast": 8 * 4 * n_rows,
        "reduced": itemsize * n_params,
    }


def project_seconds(n_bytes: float, collectives: int, link: tuple[float, float]) -> float:
    """Communication time of a step on ``link`` = (bytes/s, s per collective)."""
    bandwidth, latency = link
    return collectives * latency + n_bytes / bandwidth


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _split(total: int, world: int) -> list[int]:
    base = [total // world] * world
    for i in range(total % world):
        base[i] += 1
    return base


def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], results: Any) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        import torch
        import torch.distributed as dist
        from torch import nn

        import torchsven

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(mlp_layers(**cfg["mlp"])):
            layers += [nn.Linear(d_in, d_out)] + ([nn.Tanh()] if i < cfg["mlp"]["depth"] else [])
        model = nn.Sequential(*layers)
        n_params = sum(p.numel() for p in model.parameters())
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(cfg["batch"], cfg["mlp"]["d_in"], generator=gen)
        y = torch.randn(cfg["batch"], cfg["mlp"]["d_out"], generator=gen)
        sizes = _split(cfg["batch"], world)
        lo = sum(sizes[:rank])
        xs, ys = x[lo : lo + sizes[rank]], y[lo : lo + sizes[rank]]
        group = dist.group.WORLD if world > 1 else None
        opt = torchsven.Sven(model, lr=0.1, backend=cfg["backend"], process_group=group)
        times, comm, extras = [], [], {}
        for step in range(cfg["warmup"] + cfg["steps"]):
            dist.barrier()
            start = time.perf_counter()
            opt.step(lambda: model(xs) - ys)
            elapsed = time.perf_counter() - start
            if step >= cfg["warmup"]:
                times.append(elapsed)
                extras = dict(opt.last_step.extras)
                comm.append(float(extras.get("comm_seconds", 0.0)))
        # DDP's traffic for the same model: one all-reduce of the P-float gradient
        grad = torch.randn(n_params)
        ddp = []
        for _ in range(cfg["steps"]):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(grad)
            ddp.append(time.perf_counter() - start)
        used = opt.last_step.backend
        dist.destroy_process_group()
        results.put(
            (
                rank,
                {
                    "times": times,
                    "comm": comm,
                    "extras": extras,
                    "ddp_allreduce": ddp,
                    "n_params": n_params,
                    "backend": used,
                },
            )
        )
    except Exception:
        results.put((rank, {"error": traceback.format_exc()}))


def _run_world(world: int, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, cfg, results), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out: dict[int, dict[str, Any]] = {}
    try:
        while len(out) < world:
            rank, data = results.get(timeout=timeout)
            out[rank] = data
    except queue.Empty as exc:
        raise TimeoutError(f"world {world}: no result within {timeout} s") from exc
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    for data in out.values():
        if "error" in data:
            raise RuntimeError(f"world {world} failed:\n{data['error']}")
    root = out[0]
    # a step ends when the slowest rank ends: per step, the max over ranks
    step_times = [max(out[r]["times"][i] for r in out) for i in range(len(root["times"]))]
    step = statistics.median(step_times)
    # rank 0 waits in the gather for the slowest rank, but not for its own solve
    comm = statistics.median(root["comm"])
    extras = root["extras"]
    return {
        "processes": world,
        "local_rows": _split(cfg["batch"], world),
        "backend": root["backend"],
        "n_params": root["n_params"],
        "step_ms": 1e3 * step,
        "comm_ms": 1e3 * comm,
        "comm_share": comm / step if world > 1 else 0.0,
        "bytes_gathered": int(extras.get("bytes_gathered", 0)),
        "bytes_broadcast": int(extras.get("bytes_broadcast", 0)),
        "bytes_reduced": int(extras.get("bytes_reduced", 0)),
        "collectives": int(extras.get("collectives", 0)),
        "ddp_allreduce_bytes": 4 * root["n_params"],
        "ddp_allreduce_ms": 1e3 * statistics.median(root["ddp_allreduce"]) if world > 1 else 0.0,
    }


def _projection(rows: list[dict[str, Any]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Communication time per step on cluster links, from bytes (measured or formula)."""
    multi = [r for r in rows if r["processes"] > 1]
    if not multi:
        return []
    measured = multi[-1]
    layers = mlp_layers(**cfg["mlp"])
    factored = factored_bytes(cfg["batch"], layers, measured["n_params"])
    paths = {
        f"Sven {measured['backend']} (measured, R={measured['processes']})": (
            measured["bytes_gathered"] + measured["bytes_broadcast"] + measured["bytes_reduced"],
            measured["collectives"],
        ),
        "Sven factored (formula)": (sum(factored.values()), 4),
        "DDP gradient all-reduce (float32)": (measured["ddp_allreduce_bytes"], 1),
    }
    out = []
    for path, (n_bytes, collectives) in paths.items():
        entry: dict[str, Any] = {"path": path, "bytes": int(n_bytes)}
        for link_name, link in LINKS.items():
            entry[f"ms on {link_name}"] = 1e3 * project_seconds(n_bytes, collectives, link)
        out.append(entry)
    return out


def _print_table(rows: list[dict[str, Any]], projection: list[dict[str, Any]]) -> None:
    head = (
        f"{'R':>2} {'local rows':>16} {'step ms':>9} {'comm ms':>9} {'comm %':>7} "
        f"{'gathered B':>11} {'bcast B':>9} {'reduced B':>10} {'DDP B':>9} {'DDP ms':>7}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['processes']:>2} {r['local_rows']!s:>16} {r['step_ms']:>9.2f} "
            f"{r['comm_ms']:>9.2f} {100 * r['comm_share']:>6.1f}% {r['bytes_gathered']:>11} "
            f"{r['bytes_broadcast']:>9} {r['bytes_reduced']:>10} {r['ddp_allreduce_bytes']:>9} "
            f"{r['ddp_allreduce_ms']:>7.2f}"
        )
    if projection:
        print("\nprojected communication per step on a cluster (bytes / bandwidth + latency):")
        for p in projection:
            links = "  ".join(f"{k[3:]}: {v:.3f} ms" for k, v in p.items() if k.startswith("ms"))
            print(f"  {p['path']:<42} {p['bytes']:>11} B  {links}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchsven bench distributed", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--processes", default="1,2,4", help="comma-separated world sizes")
    parser.add_argument("--batch", type=int, default=128, help="global batch (rows)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2, help="hidden layers")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per world size")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    try:
        worlds = [int(w) for w in args.processes.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--processes must be comma-separated ints, got {args.processes!r}")
    if not worlds or min(worlds) < 1:
        parser.error("--processes needs world sizes >= 1")
    if args.quick:
        args.batch, args.width, args.steps, args.warmup = 16, 8, 2, 1
    cfg = {
        "batch": args.batch,
        "backend": args.backend,
        "steps": args.steps,
        "warmup": args.warmup,
        "mlp": {"d_in": 8, "width": args.width, "depth": args.depth, "d_out": 1},
    }
    if args.batch < max(worlds):
        parser.error("--batch must be at least the largest world size")
    print(
        f"torchsven bench distributed: MLP 8-{args.depth}x{args.width}-1 float32, global batch "
        f"{args.batch}, backend {args.backend}, gloo on 127.0.0.1, 1 thread per process, "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})",
        flush=True,
    )
    rows = [_run_world(w, cfg, args.timeout) for w in worlds]
    projection = _projection(rows, cfg)
    _print_table(rows, projection)
    if args.json is not None:
        payload = {
            "config": cfg,
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": sys.version.split()[0],
            },
            "results": rows,
            "projection": projection,
            "links": {k: {"bytes_per_s": v[0], "latency_s": v[1]} for k, v in LINKS.items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
