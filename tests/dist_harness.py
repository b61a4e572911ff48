"""Run check functions in spawned gloo processes on 127.0.0.1, never hanging.

``run_ranks(world, module, plan)`` starts ``world`` processes once; each
initialises a gloo process group (60 s timeout) and, for every ``(size,
names)`` of the plan, runs the named checks of :data:`CHECKS` on a group of
the first ``size`` ranks (the whole world or a sub-group made with
``new_group``, so one spawn serves several world sizes). A check calls
:func:`group` for its process group. Results (plain Python data) come back per
world size and rank. A process that does not report within the overall
timeout is terminated and the call raises.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

CHECKS: dict[str, Callable[[int, int], Any]] = {}
_GROUP: list[Any] = [None]


def check(fn: Callable[[int, int], Any]) -> Callable[[int, int], Any]:
    """Register ``fn(rank, world) -> picklable result`` under its name."""
    CHECKS[fn.__name__] = fn
    return fn


def group() -> Any:
    """The process group the running check works on."""
    return _GROUP[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int, world: int, port: int, module: str, plan: list[tuple[int, list[str]]], results: Any
) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import importlib

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    importlib.import_module(module)  # registers the checks in this process
    out: dict[Any, Any] = {}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        for size, names in plan:
            # every rank takes part in new_group, members or not
            sub = dist.group.WORLD if size == world else dist.new_group(list(range(size)))
            if rank >= size:
                continue
            _GROUP[0] = sub
            for name in names:
                try:
                    out[(size, name)] = ("ok", CHECKS[name](rank, size))
                except Exception:
                    out[(size, name)] = ("error", traceback.format_exc())
            dist.barrier(group=sub)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        out["__init__"] = ("error", traceback.format_exc())
    results.put((rank, out))


def run_ranks(
    world: int, module: str, plan: list[tuple[int, list[str]]], timeout: float = 80.0
) -> dict[int, list[dict]]:
    """``{size: per rank {check name: ("ok", result) | ("error", traceback)}}``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, module, plan, results), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    collected: dict[int, dict] = {}
    try:
        while len(collected) < world:
            rank, out = results.get(timeout=timeout)
            collected[rank] = out
    except queue.Empty as exc:
        raise TimeoutError(
            f"ranks {sorted(set(range(world)) - set(collected))} did not finish in {timeout} s"
        ) from exc
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    by_size: dict[int, list[dict]] = {}
    for size, names in plan:
        by_size[size] = [
            {
                **{n: collected[r][(size, n)] for n in names if (size, n) in collected[r]},
                **({"__init__": collected[r]["__init__"]} if "__init__" in collected[r] else {}),
            }
            for r in range(size)
        ]
    return by_size
