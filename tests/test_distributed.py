"""Data-parallel Sven on gloo (2 and 3 spawned processes on 127.0.0.1).

The expectation is the dense float64 twin (tests/reference.py) run in this
process on the concatenated batch, step by step; every rank must match it to
1e-10 and hold bit-identical parameters after every step. Failure paths (a
rank that raises, NaN rows on one rank, ranks that disagree) must stop every
rank with a clear error and leave the group usable. Processes are spawned once
per world size and run all checks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from .dist_harness import check, run_ranks
from .reference import dense_jacobian, reference_step, rel_err

STEPS = 3
#: global batch split per world size (uneven on purpose for 2 and 3)
SPLITS = {2: [5, 9], 3: [6, 2, 5]}
EVEN = {2: [7, 7], 3: [5, 5, 5]}
LRS = (0.2, 0.1)
RTOL = 1e-6
#: rank cap of the even-batch run (below N: the cut by index is exercised)
CAP = 20


def build(n_total: int, seed: int = 0) -> tuple[nn.Module, list[dict], torch.Tensor, torch.Tensor]:
    """Model (float64, 2 outputs, frozen first bias), param groups and (STEPS, N, .) data."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    model[0].bias.requires_grad_(False)
    groups = [
        {"params": [model[0].weight, model[0].bias], "lr": LRS[0]},
        {"params": list(model[2].parameters()), "lr": LRS[1]},
    ]
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(STEPS, n_total, 3, generator=g, dtype=torch.float64)
    y = torch.randn(STEPS, n_total, 2, generator=g, dtype=torch.float64)
    return model, groups, x, y


def flat(model: nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def local_slice(split: list[int], rank: int) -> slice:
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def expected_run(split: list[int], rank: int | None) -> tuple[list[list[float]], list[dict]]:
    """Dense-SVD twin on the concatenated batch: params and diagnostics per step."""
    model, groups, x, y = build(sum(split))
    history, infos = [], []
    for t in range(STEPS):
        params = [p for g in groups for p in g["params"] if p.requires_grad]
        lrs = [g["lr"] for g in groups for p in g["params"] if p.requires_grad]
        jac, rows = dense_jacobian(lambda t=t: model(x[t]) - y[t], params)
        step, kept, s = reference_step(jac, rows, rank=rank, rtol=RTOL)
        infos.append({"loss": 0.5 * float(rows.square().sum()), "kept": kept, "s": s.tolist()})
        offset = 0
        with torch.no_grad():
            for p, lr in zip(params, lrs, strict=True):
                p -= lr * step[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
        history.append(flat(model))
    return history, infos


def _distributed_run(rank: int, world: int, split: list[int], cap: int | None) -> dict:
    import torch.distributed as dist

    import torchsven

    model, groups, x, y = build(sum(split))
    opt = torchsven.Sven(groups, model=model, rank=cap, rtol=RTOL, process_group=dist.group.WORLD)
    part = local_slice(split, rank)
    history, infos = [], []
    for t in range(STEPS):
        opt.step(lambda t=t: model(x[t, part]) - y[t, part])
        info = opt.last_step
        history.append(flat(model))
        infos.append(
            {
                "loss": info.loss,
                "kept": info.kept,
                "rows": info.rows,
                "s": info.singular_values.tolist(),
                "extras": dict(info.extras),
            }
        )
    return {"history": history, "infos": infos}


#: globalised options exercised collectively (trial calls, accept / reject)
GLOBALISED = {"adaptive": {"damping": "adaptive"}, "backtracking": {"line_search": "backtracking"}}


def globalised_run(rank: int, split: list[int], options: dict, group=None) -> dict:
    """Sven(model, lr=1.5, **options) for STEPS steps on rank ``rank``'s rows."""
    import torchsven

    model, _, x, y = build(sum(split))
    opt = torchsven.Sven(model, lr=1.5, rtol=RTOL, process_group=group, **options)
    part = local_slice(split, rank)
    history, accepted = [], []
    for _ in range(STEPS):
        opt.step(lambda: model(x[0, part]) - y[0, part])  # one batch: rejections happen
        history.append(flat(model))
        accepted.append(opt.last_step.extras["accepted"])
    return {"history": history, "accepted": accepted, "loss": opt.last_step.loss}


@check
def globalised(rank: int, world: int) -> dict:
    import torch.distributed as dist

    return {
        name: globalised_run(rank, SPLITS[world], options, dist.group.WORLD)
        for name, options in GLOBALISED.items()
    }


@check
def uneven_generic(rank: int, world: int) -> dict:
    return _distributed_run(rank, world, SPLITS[world], None)


@check
def even_generic(rank: int, world: int) -> dict:
    return _distributed_run(rank, world, EVEN[world], CAP)


@check
def raising_rank(rank: int, world: int) -> dict:
    """Rank 1 raises in the closure: every rank raises, nothing changes, the group lives on."""
    import torch.distributed as dist

    import torchsven

    model, groups, x, y = build(4 * world)
    opt = torchsven.Sven(groups, model=model, process_group=dist.group.WORLD)
    part = local_slice([4] * world, rank)

    def bad_closure() -> torch.Tensor:
        if rank == 1:
            raise KeyError("boom on rank 1")
        return model(x[0, part]) - y[0, part]

    before = flat(model)
    try:
        opt.step(bad_closure)
        raised = None
    except Exception as exc:
        raised = (type(exc).__name__, str(exc))
    unchanged = flat(model) == before and opt.last_step is None
    nan_raised = None
    try:
        opt.step(lambda: (model(x[0, part]) - y[0, part]) * (float("nan") if rank == 0 else 1.0))
    except Exception as exc:
        nan_raised = (type(exc).__name__, str(exc))
    unchanged = unchanged and flat(model) == before and opt.last_step is None
    opt.step(lambda: model(x[0, part]) - y[0, part])  # the group still works
    return {"raised": raised, "nan": nan_raised, "unchanged": unchanged, "after": flat(model)}


@check
def disagreeing_ranks(rank: int, world: int) -> dict:
    """Different parameters at construction, different lrs at a step: ValueError everywhere."""
    import torch.distributed as dist

    import torchsven

    model = build(2 * world)[0]
    errors = []
    if rank == 1:
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-12
    try:
        torchsven.Sven(model, process_group=dist.group.WORLD)
    except ValueError as exc:
        errors.append(str(exc))
    model, _, x, y = build(2 * world)
    opt = torchsven.Sven(model, process_group=dist.group.WORLD)
    opt.param_groups[0]["lr"] = 1.0 + rank
    try:
        opt.step(lambda: model(x[0, rank * 2 : rank * 2 + 2]) - y[0, rank * 2 : rank * 2 + 2])
    except ValueError as exc:
        errors.append(str(exc))
    ddp_error = None
    try:
        torchsven.Sven(nn.parallel.DistributedDataParallel(model), process_group=dist.group.WORLD)
    except TypeError as exc:
        ddp_error = str(exc)
    return {"errors": errors, "ddp": ddp_error}


NAMES = ["globalised", "uneven_generic", "even_generic", "raising_rank", "disagreeing_ranks"]


def as64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _ok(result: tuple[str, object]) -> object:
    status, value = result
    assert status == "ok", value
    return value


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_equals_one_process(world: int) -> None:
    ranks = run_ranks(world, __name__, NAMES)
    for rank_out in ranks:
        assert "__init__" not in rank_out, rank_out.get("__init__")

    runs_and_caps = (("uneven_generic", SPLITS[world], None), ("even_generic", EVEN[world], CAP))
    for name, split, cap in runs_and_caps:
        expected, infos = expected_run(split, cap)
        runs = [_ok(r[name]) for r in ranks]
        for t in range(STEPS):
            # bit-identical parameters on every rank after every step
            for run in runs[1:]:
                assert run["history"][t] == runs[0]["history"][t], (name, t)
            got = as64(runs[0]["history"][t])
            assert rel_err(got, as64(expected[t])) <= 1e-10, (name, t)
            for rank, run in enumerate(runs):
                info = run["infos"][t]
                assert info["rows"] == 2 * sum(split)
                assert abs(info["loss"] - infos[t]["loss"]) <= 1e-10 * infos[t]["loss"]
                n_rows = 2 * sum(split)
                assert info["kept"] == infos[t]["kept"] == min(cap or n_rows, n_rows)
                assert rel_err(as64(info["s"]), as64(infos[t]["s"])) <= 1e-10
                extras = info["extras"]
                assert extras["world_size"] == world
                assert extras["local_rows"] == 2 * split[rank]
                n_params = 3 * 16 + 16 * 2 + 2  # frozen first bias is left out of J
                padded = 2 * max(split) + 1
                assert extras["bytes_gathered"] == 8 * (4 * world + world * padded * (n_params + 1))
                step_bytes = 8 * (5 + n_params + len(infos[t]["s"]) + 4 * sum(split))
                assert extras["bytes_broadcast"] == step_bytes
                assert extras["bytes_reduced"] == 0

    # adaptive damping and backtracking: same trial losses and decisions everywhere
    for name, options in GLOBALISED.items():
        expected = globalised_run(0, [sum(SPLITS[world])], options)
        if name == "adaptive":  # both branches are exercised
            assert set(expected["accepted"]) == {True, False}
        for out in (_ok(r["globalised"])[name] for r in ranks):
            assert out["accepted"] == expected["accepted"], name
            assert abs(out["loss"] - expected["loss"]) <= 1e-10 * expected["loss"]
            for t in range(STEPS):
                assert rel_err(as64(out["history"][t]), as64(expected["history"][t])) <= 1e-10

    raising = [_ok(r["raising_rank"]) for r in ranks]
    for rank, out in enumerate(raising):
        assert out["unchanged"], rank
        kind, message = out["raised"]
        if rank == 1:
            assert kind == "KeyError" and "boom on rank 1" in message
        else:
            assert kind == "DistributedStepError"
            assert "rank(s) [1]" in message and "boom on rank 1" in message
        kind, message = out["nan"]
        assert kind == "NonFiniteError" and "rank(s) [0]" in message
        assert out["after"] == raising[0]["after"]
    assert raising[0]["after"] != flat(build(4 * world)[0])

    for rank, r in enumerate(ranks):
        out = _ok(r["disagreeing_ranks"])
        assert len(out["errors"]) == 2, (rank, out)
        assert "differ from rank 0" in out["errors"][0]
        assert "learning rates" in out["errors"][1]
        assert "DistributedDataParallel" in out["ddp"] and "ddp_model.module" in out["ddp"]


def test_process_group_without_init_is_rejected() -> None:
    import torch.distributed as dist

    import torchsven

    assert not dist.is_initialized()
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="init_process_group"):
        torchsven.Sven(model, process_group=object())
