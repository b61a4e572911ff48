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

from .dist_harness import check, group, run_ranks
from .reference import dense_jacobian, reference_step, rel_err

STEPS = 3
#: global batch split per world size (uneven on purpose for 2 and 3)
SPLITS = {2: [5, 9], 3: [6, 2, 5]}
EVEN = {2: [7, 7], 3: [5, 5, 5]}
LRS = (0.2, 0.1)
RTOL = 1e-6
#: rank cap of the even-batch run (below N: the cut by index is exercised)
CAP = 20


class Scale(nn.Module):
    """A module with no factor rule: the factored backend uses per-row torch.func grads."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.s + 0.1 * torch.sin(h)


class Mixed(nn.Module):
    """Embedding -> LayerNorm -> Scale -> Linear (2 outputs): every kind of layer term."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 4, dtype=torch.float64)
        self.norm = nn.LayerNorm(4, dtype=torch.float64)
        self.scale = Scale(12)
        self.head = nn.Linear(12, 2, dtype=torch.float64)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(idx)).reshape(idx.shape[0], -1)
        return self.head(torch.tanh(self.scale(h)))


def build(
    n_total: int, seed: int = 0, kind: str = "mlp"
) -> tuple[nn.Module, list[dict], torch.Tensor, torch.Tensor]:
    """Model (float64, 2 outputs), param groups and (STEPS, N, .) data.

    "mlp": Linear-Tanh-Linear with a frozen first bias and two lrs; "mixed":
    :class:`Mixed` on token indices, one group.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "mixed":
        model = Mixed()
        x = torch.randint(0, 50, (STEPS, n_total, 3), generator=g)
        y = torch.randn(STEPS, n_total, 2, generator=g, dtype=torch.float64)
        return model, [{"params": list(model.parameters()), "lr": LRS[0]}], x, y
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    model[0].bias.requires_grad_(False)
    groups = [
        {"params": [model[0].weight, model[0].bias], "lr": LRS[0]},
        {"params": list(model[2].parameters()), "lr": LRS[1]},
    ]
    x = torch.randn(STEPS, n_total, 3, generator=g, dtype=torch.float64)
    y = torch.randn(STEPS, n_total, 2, generator=g, dtype=torch.float64)
    return model, groups, x, y


def flat(model: nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def local_slice(split: list[int], rank: int) -> slice:
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def expected_run(
    split: list[int], rank: int | None, kind: str = "mlp", pde: bool = False
) -> tuple[list[list[float]], list[dict]]:
    """Dense-SVD twin on the concatenated batch: params and diagnostics per step."""
    model, groups, x, y = build(sum(split), kind=kind)
    history, infos = [], []
    for t in range(STEPS):
        params = [p for g in groups for p in g["params"] if p.requires_grad]
        lrs = [g["lr"] for g in groups for p in g["params"] if p.requires_grad]
        jac, rows = dense_jacobian(residual_fn(model, x[t], y[t], pde), params)
        step, kept, s = reference_step(jac, rows, rank=rank, rtol=RTOL)
        infos.append({"loss": 0.5 * float(rows.square().sum()), "kept": kept, "s": s.tolist()})
        offset = 0
        with torch.no_grad():
            for p, lr in zip(params, lrs, strict=True):
                p -= lr * step[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
        history.append(flat(model))
    return history, infos


def residual_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pde: bool):
    """Closure: ``model(x) - y``, or with ``pde`` a residual holding ``d model / d x``."""

    def rows() -> torch.Tensor:
        if not pde:
            return model(x) - y
        xx = x.clone().requires_grad_(True)
        u = model(xx)
        (du,) = torch.autograd.grad(u.sum(), xx, create_graph=True)
        return u - y + 0.5 * du[:, :2]

    return rows


def _distributed_run(
    rank: int,
    world: int,
    split: list[int],
    cap: int | None,
    backend: str = "generic",
    kind: str = "mlp",
    pde: bool = False,
) -> dict:
    import warnings

    import torchsven

    model, groups, x, y = build(sum(split), kind=kind)
    opt = torchsven.Sven(
        groups, model=model, rank=cap, rtol=RTOL, backend=backend, process_group=group()
    )
    part = local_slice(split, rank)
    history, infos = [], []
    for t in range(STEPS):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(residual_fn(model, x[t, part], y[t, part], pde))
        info = opt.last_step
        history.append(flat(model))
        infos.append(
            {
                "loss": info.loss,
                "kept": info.kept,
                "rows": info.rows,
                "s": info.singular_values.tolist(),
                "extras": dict(info.extras),
                "backend": info.backend,
                "warnings": [str(w.message) for w in caught],
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
    out: dict = {
        name: globalised_run(rank, SPLITS[world], options, group())
        for name, options in GLOBALISED.items()
    }
    out["trial_raise"] = trial_raise(rank)
    return out


def trial_raise(rank: int) -> dict:
    """Rank 1 raises in the trial call of an adaptive step: every rank raises, nothing moves."""
    import torchsven

    model, _, x, y = build(8)
    opt = torchsven.Sven(model, damping="adaptive", process_group=group())
    part = local_slice([4, 4], rank)
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        if rank == 1 and calls == 2:
            raise RuntimeError("trial failed on rank 1")
        return model(x[0, part]) - y[0, part]

    before = flat(model)
    try:
        opt.step(closure)
        raised = None
    except Exception as exc:
        raised = (type(exc).__name__, str(exc))
    return {"raised": raised, "unchanged": flat(model) == before and opt.last_step is None}


#: update options with a process group: the update chain runs on the identical evaluation
CHAINED = {"momentum": {"momentum": 0.5}, "post": {"precondition": "post"}}


def chained_run(rank: int, split: list[int], options: dict, group=None) -> list[list[float]]:
    """Sven(model, lr=0.3, **options) for STEPS steps on rank ``rank``'s rows."""
    import torchsven

    model, _, x, y = build(sum(split))
    opt = torchsven.Sven(model, lr=0.3, rtol=RTOL, process_group=group, **options)
    part = local_slice(split, rank)
    history = []
    for t in range(STEPS):
        opt.step(lambda t=t: model(x[t, part]) - y[t, part])
        history.append(flat(model))
    return history


@check
def chained(rank: int, world: int) -> dict:
    return {name: chained_run(rank, SPLITS[world], o, group()) for name, o in CHAINED.items()}


@check
def example_script(rank: int, world: int) -> int:
    """examples/distributed_regression.py (torchrun's entry point) on this group."""
    import runpy
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "distributed_regression.py"
    return runpy.run_path(str(path), run_name="example")["main"](["--steps", "3", "--batch", "11"])


@check
def uneven_generic(rank: int, world: int) -> dict:
    return _distributed_run(rank, world, SPLITS[world], None)


@check
def even_generic(rank: int, world: int) -> dict:
    return _distributed_run(rank, world, EVEN[world], CAP)


@check
def uneven_factored(rank: int, world: int) -> dict:
    return _distributed_run(rank, world, SPLITS[world], None, "factored")


@check
def mixed_factored(rank: int, world: int) -> dict:
    return _distributed_run(rank, world, SPLITS[world], None, "factored", "mixed")


@check
def pde_fallback(rank: int, world: int) -> dict:
    return _distributed_run(rank, world, SPLITS[world], None, "auto", "mlp", pde=True)


@check
def raising_rank(rank: int, world: int) -> dict:
    """Rank 1 raises in the closure: every rank raises, nothing changes, the group lives on."""
    import torchsven

    model, groups, x, y = build(4 * world)
    opt = torchsven.Sven(groups, model=model, process_group=group())
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
    after = flat(model)
    skipping = torchsven.Sven(model, on_nonfinite="skip", process_group=group())
    skipping.step(lambda: (model(x[1, part]) - y[1, part]) / (rank != world - 1))
    skipped = skipping.last_step.extras.get("skipped") is True and flat(model) == after
    return {
        "raised": raised,
        "nan": nan_raised,
        "unchanged": unchanged,
        "after": after,
        "skipped": skipped,
    }


@check
def disagreeing_ranks(rank: int, world: int) -> dict:
    """Different parameters at construction, different lrs at a step: ValueError everywhere."""
    import torchsven

    model = build(2 * world)[0]
    errors = []
    if rank == 1:
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-12
    try:
        torchsven.Sven(model, process_group=group())
    except ValueError as exc:
        errors.append(str(exc))
    model, _, x, y = build(2 * world)
    opt = torchsven.Sven(model, process_group=group())
    opt.param_groups[0]["lr"] = 1.0 + rank
    try:
        opt.step(lambda: model(x[0, rank * 2 : rank * 2 + 2]) - y[0, rank * 2 : rank * 2 + 2])
    except ValueError as exc:
        errors.append(str(exc))
    ddp_error = None
    try:
        torchsven.Sven(nn.parallel.DistributedDataParallel(model), process_group=group())
    except TypeError as exc:
        ddp_error = str(exc)
    return {"errors": errors, "ddp": ddp_error}


#: One spawn of 3 processes serves both world sizes: the checks of size 3 run
#: on the whole group, those of size 2 on a sub-group of ranks 0 and 1. Checks
#: that use the default group (the example script, DDP) run with 3.
PLAN = [
    (
        3,
        [
            "example_script",
            "disagreeing_ranks",
            "uneven_generic",
            "uneven_factored",
            "mixed_factored",
            "pde_fallback",
            "raising_rank",
        ],
    ),
    (
        2,
        [
            "globalised",
            "chained",
            "uneven_generic",
            "even_generic",
            "uneven_factored",
            "mixed_factored",
            "raising_rank",
        ],
    ),
]


#: (check, split, rank cap, model kind, residual with input derivatives) per world size
RUNS = {
    world: [
        ("uneven_generic", SPLITS[world], None, "mlp", False),
        ("even_generic", EVEN[world], CAP, "mlp", False),
        ("uneven_factored", SPLITS[world], None, "mlp", False),
        ("mixed_factored", SPLITS[world], None, "mixed", False),
        ("pde_fallback", SPLITS[world], None, "mlp", True),
    ]
    for world in (2, 3)
}
BACKEND_USED = {
    "uneven_generic": "generic",
    "even_generic": "generic",
    "uneven_factored": "factored",
    "mixed_factored": "factored",
    "pde_fallback": "generic",
}
#: parameters left out of J (frozen first bias of the MLP)
FROZEN = {"mlp": 16, "mixed": 0}


def _check_traffic(
    name: str, extras: dict, world: int, split: list[int], n_params: int, n_sv: int
) -> None:
    """Bytes per step: exact for the generic path; for the factored path the
    P-float all-reduce and a gather far below the generic path's J rows."""
    padded = 2 * max(split) + 1  # rows of the largest rank + the status row
    n_rows = 2 * sum(split)
    jacobian_bytes = 8 * world * padded * (n_params + 1)
    if BACKEND_USED[name] == "generic" and name != "pde_fallback":
        assert extras["bytes_gathered"] == 8 * 4 * world + jacobian_bytes
        assert extras["bytes_broadcast"] == 8 * (5 + n_params + n_sv + 2 * n_rows)
        assert extras["bytes_reduced"] == 0
    elif BACKEND_USED[name] == "factored":
        assert extras["bytes_reduced"] == 8 * n_params
        assert extras["bytes_gathered"] > 0
        assert extras["bytes_broadcast"] == 8 * (5 + n_sv + 3 * n_rows)


def as64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _ok(result: tuple[str, object]) -> object:
    status, value = result
    assert status == "ok", value
    return value


@pytest.fixture(scope="module")
def spawned() -> dict[int, list[dict]]:
    return run_ranks(3, __name__, PLAN)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_equals_one_process(world: int, spawned: dict[int, list[dict]]) -> None:
    ranks = spawned[world]
    names = dict(PLAN)[world]
    for rank_out in ranks:
        assert "__init__" not in rank_out, rank_out.get("__init__")

    for name, split, cap, kind, pde in (run for run in RUNS[world] if run[0] in names):
        expected, infos = expected_run(split, cap, kind, pde)
        runs = [_ok(r[name]) for r in ranks]
        n_rows = 2 * sum(split)
        for t in range(STEPS):
            # bit-identical parameters on every rank after every step
            for run in runs[1:]:
                assert run["history"][t] == runs[0]["history"][t], (name, t)
            got = as64(runs[0]["history"][t])
            assert rel_err(got, as64(expected[t])) <= 1e-10, (name, t)
            for rank, run in enumerate(runs):
                info = run["infos"][t]
                assert info["backend"] == BACKEND_USED[name], (name, info["backend"])
                assert info["rows"] == n_rows
                assert abs(info["loss"] - infos[t]["loss"]) <= 1e-10 * infos[t]["loss"]
                assert info["kept"] == infos[t]["kept"] == min(cap or n_rows, n_rows)
                assert rel_err(as64(info["s"]), as64(infos[t]["s"])) <= 1e-10
                extras = info["extras"]
                assert extras["world_size"] == world
                assert extras["local_rows"] == 2 * split[rank]
                n_params = len(expected[t]) - FROZEN[kind]
                _check_traffic(name, extras, world, split, n_params, len(infos[t]["s"]))
        fallback_warned = [w for w in runs[0]["infos"][0]["warnings"] if "generic backend" in w]
        assert bool(fallback_warned) == (name == "pde_fallback"), (name, fallback_warned)

    _check_raising(ranks, world)
    if world == 2:
        _check_globalised(ranks)
        _check_chained(ranks)
    else:
        _check_example_and_disagreement(ranks)


def _check_globalised(ranks: list[dict]) -> None:
    world = len(ranks)
    for rank, r in enumerate(ranks):
        out = _ok(r["globalised"])["trial_raise"]
        assert out["unchanged"], rank
        kind, message = out["raised"]
        assert "trial failed on rank 1" in message
        assert kind == ("RuntimeError" if rank == 1 else "DistributedStepError")
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


def _check_chained(ranks: list[dict]) -> None:
    world = len(ranks)
    for name, options in CHAINED.items():
        expected = chained_run(0, [sum(SPLITS[world])], options)
        for out in (_ok(r["chained"])[name] for r in ranks):
            for t in range(STEPS):
                assert rel_err(as64(out[t]), as64(expected[t])) <= 1e-10, (name, t)


def _check_example_and_disagreement(ranks: list[dict]) -> None:
    assert [_ok(r["example_script"]) for r in ranks] == [0] * len(ranks)
    for rank, r in enumerate(ranks):
        out = _ok(r["disagreeing_ranks"])
        assert len(out["errors"]) == 2, (rank, out)
        assert "differ from rank 0" in out["errors"][0]
        assert "learning rates" in out["errors"][1]
        assert "DistributedDataParallel" in out["ddp"] and "ddp_model.module" in out["ddp"]


def _check_raising(ranks: list[dict], world: int) -> None:
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
        assert out["skipped"], rank  # on_nonfinite="skip": every rank skips together
    assert raising[0]["after"] != flat(build(4 * world)[0])


def test_process_group_without_init_is_rejected() -> None:
    import torch.distributed as dist

    import torchsven

    assert not dist.is_initialized()
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="init_process_group"):
        torchsven.Sven(model, process_group=object())


def test_bench_traffic_formulas() -> None:
    from torchsven.bench.distributed import factored_bytes, mlp_layers, project_seconds

    layers = mlp_layers(d_in=8, width=64, depth=2, d_out=1)
    assert layers == [(8, 64), (64, 64), (64, 1)]
    n_params = sum(d_in * d_out + d_out for d_in, d_out in layers)
    got = factored_bytes(256, layers, n_params)
    # per row: the residual and x, g of each Linear, float64; the step in float32
    assert got == {
        "gathered": 8 * 256 * (1 + 72 + 128 + 65),
        "broadcast": 8 * 4 * 256,
        "reduced": 4 * n_params,
    }

    assert project_seconds(1e9, 2, (1e9, 1e-3)) == pytest.approx(1.002)


def test_bench_rejects_bad_arguments() -> None:
    from torchsven.bench.distributed import main

    with pytest.raises(SystemExit):
        main(["--processes", "two"])
    with pytest.raises(SystemExit):
        main(["--processes", "4", "--batch", "2"])
