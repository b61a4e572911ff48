"""Tests of ``torchsven bench``: tasks, methods, runner, JSON, report and plots (tiny sizes)."""

from __future__ import annotations

import math

import pytest
import torch

from torchsven.bench.tasks import SIZES, TASKS, Task, get_task, load_all, register, select_tasks

TASK_NAMES = list(load_all())


def test_registry_has_the_required_tasks() -> None:
    for name in ("regression-1d", "friedman1", "diabetes", "digits-label", "digits-ce"):
        assert name in TASKS
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="size must be one of"):
        get_task("regression-1d", "huge")
    with pytest.raises(TypeError, match="Task subclass"):
        register(int)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_builds_and_evaluates(name: str) -> None:
    task = get_task(name, "tiny")
    data = task.make_data(0)
    model = task.make_model(0)
    for split in (data.train, data.val):
        metrics = task.evaluate(model, split)
        assert task.metric in metrics
        assert all(math.isfinite(v) for v in metrics.values())
    batch = next(iter(task.batches(data, torch.Generator().manual_seed(0))))
    rows = task.residuals(model, batch)
    assert rows.requires_grad and rows.dtype == task.dtype
    # the generic backend's route to the same rows, and the paper's per-sample losses
    torch.testing.assert_close(task.sven_residuals(model, batch, "generic"), rows)
    losses = task.sample_losses(model, batch)
    assert losses.dim() == 1 and bool((losses >= 0).all())
    loss = task.loss(model, batch)
    assert loss.dim() == 0 and loss.requires_grad
    # Sven's objective 0.5 ||r||^2 and the first-order loss agree up to a constant factor
    half_sq = 0.5 * float(rows.detach().square().sum()) / task.samples(batch)
    factor = 0.5 if name == "digits-ce" else 1.0
    assert half_sq == pytest.approx(factor * float(loss.detach()), rel=1e-5)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_is_deterministic_in_its_seed(name: str) -> None:
    task = get_task(name, "tiny")
    a, b, c = task.make_model(3), task.make_model(3), task.make_model(4)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert any(
        not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )
    d1, d2 = task.make_data(1), task.make_data(1)
    for t1, t2 in zip(d1.train + d1.val, d2.train + d2.val, strict=True):
        assert torch.equal(t1, t2)
    order1 = [b[0] for b in task.batches(d1, torch.Generator().manual_seed(5))]
    order2 = [b[0] for b in task.batches(d1, torch.Generator().manual_seed(5))]
    assert all(torch.equal(x, y) for x, y in zip(order1, order2, strict=True))
    # every training sample is visited once per epoch
    seen = sum(task.samples(b) for b in task.batches(d1, torch.Generator().manual_seed(5)))
    assert seen == task.samples(d1.train)
    assert len(order1) == task.steps_per_epoch(d1)


def test_task_sizes_and_epochs_are_declared() -> None:
    for cls in TASKS.values():
        assert issubclass(cls, Task)
        assert set(cls.epochs) == set(SIZES)
        assert cls.summary


# ------------------------------------------------------------------ methods
from torchsven.bench import cli  # noqa: E402
from torchsven.bench.methods import (  # noqa: E402
    GRID_SIZE,
    METHODS,
    SvenStepper,
    default_lr,
    get_method,
    muon_split,
    select_methods,
)
from torchsven.bench.report import (  # noqa: E402
    load_json,
    make_document,
    render_tables,
    runs_of,
    save_json,
    summarise,
    time_to_target,
    write_markdown,
    write_plots,
)
from torchsven.bench.runner import (  # noqa: E402
    RunResult,
    check_device,
    run_one,
    run_suite,
    select_best,
)
from torchsven.bench.tasks._common import mlp  # noqa: E402

AVAILABLE = [name for name, m in METHODS.items() if m.unavailable() is None]


def test_method_registry() -> None:
    names = ("sven", "sven-paper", "sven-svd", "lm", "sgd", "adam", "adamw", "muon", "lbfgs")
    for name in (*names, "polyak-sgd", "scipy", "sven-lsq"):
        assert name in METHODS
    # the same tuning budget for every method
    for size in SIZES:
        assert {len(m.grid(size)) for m in METHODS.values()} == {GRID_SIZE[size]}
    # Sven's grids: the defaults first for `sven`; lr x rtol for the plain variants
    assert METHODS["sven"].grid("full")[0] == {}
    assert {s.get("lr", default_lr()) for s in METHODS["sven"].grid("full")} == {
        default_lr(),
        0.3 * default_lr(),
    }
    assert {s.get("rtol") for s in METHODS["sven"].grid("full")} == {None, 1e-2}
    for name in ("sven-paper", "sven-svd"):
        grid = METHODS[name].grid("full")
        assert grid[0] == {"lr": 0.1, "rtol": 1e-3}  # the authors' defaults first
        assert {(s["lr"], s["rtol"]) for s in grid} == {
            (lr, rtol) for lr in (0.1, 0.03) for rtol in (1e-3, 1e-2)
        }
    assert {s.get("damping_init") for s in METHODS["lm"].grid("full")} == {None, 1.0}
    for m in METHODS.values():
        why = m.unavailable()
        assert why is None or (isinstance(why, str) and why)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


@pytest.mark.parametrize("name", [n for n in AVAILABLE if n not in ("scipy", "sven-lsq")])
def test_method_steps_and_reduces_the_loss(name: str) -> None:
    task = get_task("friedman1", "tiny")
    data = task.make_data(0)
    model = task.make_model(0)
    method = METHODS[name]
    stepper = method.build(model, task, method.grid("tiny")[0], 3)
    batch = data.train if method.full_batch else tuple(t[:32] for t in data.train)
    with torch.no_grad():
        before = float(task.loss(model, batch))
    first = stepper.step(batch)
    for _ in range(4):
        stepper.step(batch)
    with torch.no_grad():
        after = float(task.loss(model, batch))
    assert first == pytest.approx(before, rel=1e-5)
    assert stepper.steps >= 5
    assert after < before


def test_muon_gets_the_hidden_matrices() -> None:
    model = mlp([1, 16, 16, 16, 1])
    muon, rest = muon_split(model)
    assert [tuple(p.shape) for p in muon] == [(16, 16), (16, 16)]
    assert len(muon) + len(rest) == len(list(model.parameters()))
    muon, rest = muon_split(mlp([64, 32, 10]))
    assert [tuple(p.shape) for p in muon] == [(32, 64)]


# ------------------------------------------------------------------- runner
def test_run_is_reproducible_and_diverged_runs_are_kept() -> None:
    task = get_task("diabetes", "tiny")
    data = task.make_data(0)
    a = run_one(task, data, METHODS["sgd"], {"lr": 0.05}, 0)
    b = run_one(task, data, METHODS["sgd"], {"lr": 0.05}, 0)
    assert a.status == "ok" and len(a.curve) == 1 + task.num_epochs
    strip = [[{k: v for k, v in p.items() if k != "time"} for p in r.curve] for r in (a, b)]
    assert strip[0] == strip[1]
    bad = run_one(task, data, METHODS["sgd"], {"lr": 1e12}, 0)
    assert bad.diverged and bad.message
    assert select_best([bad, a], task.metric) == 1
    assert select_best([bad, bad], task.metric) == 0


def _curve(values: list[float], times: list[float]) -> list[dict]:
    return [
        {
            "epoch": float(i),
            "step": i,
            "time": t,
            "loss": 0.0,
            "train": {"mse": v},
            "val": {"mse": v},
        }
        for i, (v, t) in enumerate(zip(values, times, strict=True))
    ]


def _doc(runs: list[RunResult]) -> dict:
    task = {"summary": "t", "metric": "mse", "batch_size": 8, "epochs": 3, "steps_per_epoch": 1}
    methods = {
        m: {"summary": m, "available": True, "reason": None, "grid": []}
        for m in ("sven", "sgd", "adam")
    }
    methods["lm"] = {"summary": "lm", "available": False, "reason": "not yet", "grid": []}
    config = {"size": "tiny", "seeds": [0, 1], "command": "x"}
    return make_document(runs, {"t": task}, methods, config, {"torch": torch.__version__})


def test_summary_target_time_to_target_and_ratios() -> None:
    sven = RunResult("t", "sven", {"lr": 0.3}, 0, curve=_curve([1, 0.1, 0.01, 0.001], [0, 2, 4, 6]))
    sven.steps, sven.train_time, sven.selected = 3, 6.0, True
    sven1 = RunResult(
        "t", "sven", {"lr": 0.3}, 1, curve=_curve([1, 0.1, 0.01, 0.003], [0, 1, 2, 3])
    )
    sven1.steps, sven1.train_time, sven1.selected, sven1.role = 3, 3.0, True, "repeat"
    sgd = RunResult("t", "sgd", {"lr": 0.1}, 0, curve=_curve([1, 0.5, 0.1, 0.05], [0, 1, 2, 3]))
    sgd.steps, sgd.train_time, sgd.selected = 3, 1.5, True
    adam = RunResult("t", "adam", {"lr": 1.0}, 0, status="diverged", message="blew up")
    adam.curve, adam.selected = _curve([1, math.nan], [0, 1]), True
    s = summarise(_doc([sven, sven1, sgd, adam]))["t"]
    assert s["target"] == pytest.approx(2 * 0.002)  # median of Sven's finals 0.001, 0.003
    rows = s["rows"]
    assert rows["sven"]["val"] == pytest.approx(0.002)
    assert rows["sven"]["to_target"] == pytest.approx(4.5)  # median of 6 and 3
    assert math.isinf(rows["sgd"]["to_target"])
    assert rows["sven"]["ms_per_step"] == pytest.approx(1e3 * 1.5)  # median of 2000, 1000
    assert rows["sven"]["x_sgd"] == pytest.approx(1500 / 500)
    assert rows["adam"]["diverged"] == 1 and math.isnan(rows["adam"]["val"])
    assert time_to_target(sgd, "mse", 0.5) == 1.0


def test_json_round_trip_and_report_from_saved_json(tmp_path) -> None:
    task = get_task("diabetes", "tiny")
    methods = [METHODS["sgd"], METHODS["sven"]]
    runs = run_suite([task], methods, [0, 1])
    assert [(r.method, r.seed, r.role) for r in runs] == [
        ("sgd", 0, "tune"),
        ("sgd", 1, "repeat"),
        ("sven", 0, "tune"),
        ("sven", 1, "repeat"),
    ]
    runs.append(RunResult("diabetes", "adam", {"lr": 9.0}, 0, "diverged", "nan", selected=True))
    runs[-1].curve = _curve([1.0, math.nan], [0.0, 0.1])
    methods_doc = {
        m: {"summary": m, "available": True, "reason": None, "grid": []}
        for m in ("sgd", "sven", "adam")
    }
    tasks_doc = {
        "diabetes": {"summary": task.summary, "metric": "mse", "batch_size": 32, "epochs": 1}
    }
    doc = make_document(runs, tasks_doc, methods_doc, {"size": "tiny", "seeds": [0, 1]}, {})
    path = str(tmp_path / "results.json")
    save_json(doc, path)
    loaded = load_json(path)
    back = runs_of(loaded)
    assert [r.to_dict() for r in back] == [r.to_dict() for r in runs]
    assert math.isnan(back[-1].curve[1]["val"]["mse"])
    assert summarise(loaded)["diabetes"]["rows"]["adam"]["diverged"] == 1

    from rich.console import Console

    console = Console(record=True, width=220, file=open(tmp_path / "out.txt", "w"))  # noqa: SIM115
    render_tables(loaded, console)
    text = console.export_text()
    for word in ("diabetes", "sven", "sgd", "adam", "diverged 1/1"):
        assert word in text
    plots = write_plots(loaded, str(tmp_path / "plots"))
    assert len(plots) == 1
    with open(plots[0], "rb") as f:
        head = f.read()
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) > 5000
    with open(write_markdown(loaded, str(tmp_path), plots)) as f:
        md = f.read()
    assert "| sven | defaults |" in md and "![diabetes](diabetes.png)" in md
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match="not a torchsven bench results file"):
        load_json(str(bad))


# ---------------------------------------------------------------------- CLI
def test_cli_lists_and_dispatches(capsys, monkeypatch) -> None:
    assert cli.main(["bench", "list-tasks"]) == 0
    assert "regression-1d" in capsys.readouterr().out
    assert cli.main(["bench", "list-methods"]) == 0
    out = capsys.readouterr().out
    assert "sven-svd" in out and "lbfgs" in out
    monkeypatch.setitem(cli.EXTERNAL, "speed", "no_such_module_here")
    assert cli.main(["bench", "speed", "--x"]) == 2
    assert "speed benchmark not available yet" in capsys.readouterr().err
    seen: list[list[str]] = []

    class Fake:
        @staticmethod
        def main(argv: list[str]) -> int:
            seen.append(argv)
            return 7

    monkeypatch.setitem(cli.EXTERNAL, "distributed", "fake_for_test")
    monkeypatch.setitem(__import__("sys").modules, "torchsven.bench.fake_for_test", Fake)
    assert cli.main(["bench", "distributed", "--ranks", "2"]) == 7
    assert seen == [["--ranks", "2"]]
    assert cli.main([]) == 2


def test_cli_runs_a_tiny_suite(tmp_path, capsys) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "bench"
    rc = cli.main(
        [
            "bench",
            "--size",
            "tiny",
            "--tasks",
            "digits-ce",
            "--methods",
            "adam,sven,lm",
            "--out",
            str(out),
            "--no-progress",
            "--threads",
            str(threads),
        ]
    )
    assert rc == 0
    for name in ("results.json", "report.md", "digits-ce.png"):
        assert (out / name).stat().st_size > 0
    doc = load_json(str(out / "results.json"))
    assert doc["environment"]["torch"] == torch.__version__
    assert {r["method"] for r in doc["runs"]} <= {"adam", "sven", "lm"}
    assert "digits-ce" in capsys.readouterr().out
    assert cli.main(["bench", "report", str(out / "results.json"), "--no-plots"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["bench", "--tasks", "nope", "--out", str(out)])


# ------------------------------------------------- paper rows, curve fitting
def test_sven_paper_rows_are_the_per_sample_losses() -> None:
    """sven-paper's step is Sven on from_losses(per-sample MSE, kappa=2) = the losses."""
    import torchsven

    task = get_task("regression-1d", "tiny")
    data = task.make_data(0)
    batch = tuple(t[:8] for t in data.train)
    model, twin = task.make_model(0), task.make_model(0)
    stepper = METHODS["sven-paper"].build(model, task, {"lr": 0.1, "rtol": 1e-3}, 1)
    assert isinstance(stepper, SvenStepper) and stepper.rows == "losses"
    first = stepper.step(batch)
    x, y = batch
    reference = torchsven.Sven(twin, lr=0.1, rtol=1e-3, damping=0.0)
    losses = reference.step(lambda: (twin(x) - y).square().reshape(-1))
    assert first == pytest.approx(0.5 * float(losses.detach().sum()) / 8, rel=1e-6)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    # digits-ce: the per-sample losses are the cross-entropies
    ce = get_task("digits-ce", "tiny")
    d = ce.make_data(0)
    m = ce.make_model(0)
    expected = torch.nn.functional.cross_entropy(m(d.train[0]), d.train[1], reduction="none")
    torch.testing.assert_close(ce.sample_losses(m, d.train), expected)
    with pytest.raises(ValueError, match="rows must be"):
        SvenStepper(None, m, ce, rows="errors")


def test_curve_fitting_tasks_follow_mores_protocol() -> None:
    from torchsven.bench.tasks.mgh import CURVE_FITTING, solved
    from torchsven.problems import PROBLEMS

    assert [n for n in TASKS if n.startswith("mgh-")] == [
        "mgh-" + n.replace("_", "-") for n in CURVE_FITTING
    ]
    task = get_task("mgh-box-3d", "tiny")
    assert task.family == "mgh" and task.metric == "cost"
    problem = PROBLEMS["box_3d"]
    x0 = torch.tensor(problem.x0, dtype=torch.float64)
    for seed, factor in ((0, 1.0), (1, 10.0), (2, 100.0)):
        torch.testing.assert_close(task.make_model(seed).x.detach(), factor * x0)
    # a zero start becomes 10**seed everywhere (MINPACK's drivers)
    watson = get_task("mgh-watson", "tiny")
    assert float(watson.make_model(0).x.detach().abs().sum()) == 0.0
    torch.testing.assert_close(watson.make_model(1).x.detach(), torch.full((6,), 10.0).double())
    model = task.make_model(1)
    data = task.make_data(1)
    cost = task.evaluate(model, data.val)
    expected = 0.5 * float(problem.residuals(model.x.detach()).square().sum())
    assert cost == {"cost": pytest.approx(expected, rel=1e-12), "solved": 0.0}
    assert solved(0.5 * 48.98 * (1 + 1e-5), 48.98) and not solved(0.5 * 48.98 * 1.01, 48.98)
    assert solved(1e-13, 0.0) and not solved(1e-9, 0.0) and not solved(0.0, None)
    # the task's names, patterns and family select the same tasks
    assert select_tasks(["mgh"], "full") == select_tasks(["mgh-*"], "full")
    assert "mgh-meyer" not in select_tasks(None, "quick")
    assert "mgh-osborne1" in select_tasks(None, "quick")
    with pytest.raises(ValueError, match="unknown task 'nope-\\*'"):
        select_tasks(["nope-*"], "full")
    assert select_methods(["sven*"]) == ["sven", "sven-paper", "sven-svd", "sven-lsq"]
    with pytest.raises(ValueError, match="unknown method"):
        select_methods(["zz*"])


def test_scipy_and_lm_solve_a_curve_fit_and_solvers_only_run_there() -> None:
    task = get_task("mgh-box-3d", "quick")
    data = task.make_data(0)
    scipy_run = run_one(task, data, METHODS["scipy"], {"method": "lm", "x_scale": "jac"}, 0)
    assert scipy_run.status == "ok" and scipy_run.best("cost") < 1e-20
    assert scipy_run.curve[1]["val"]["solved"] == 1.0
    assert 0 < scipy_run.steps <= 2 * task.num_epochs and scipy_run.notes["nfev"] > 0
    lm = run_one(task, data, METHODS["lm"], {}, 0)
    assert lm.status == "ok" and lm.best("cost") < 1e-20
    assert lm.notes["backend"] == "generic"  # Sven on the parameter vector
    # solvers of small least-squares problems skip the other tasks
    runs = run_suite([get_task("diabetes", "tiny")], [METHODS["scipy"], METHODS["sgd"]], [0])
    assert {r.method for r in runs} == {"sgd"}


# -------------------------------------------------------------- device, epochs
def test_device_is_checked_with_a_clear_error(tmp_path) -> None:
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda"):
        check_device("tpu")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda"):
        check_device("meta")
    if torch.cuda.is_available():
        assert check_device("cuda").type == "cuda"
    else:
        with pytest.raises(ValueError, match="CUDA is not available here"):
            check_device("cuda")
        with pytest.raises(SystemExit, match="CUDA is not available"):
            cli.main(["bench", "--size", "tiny", "--device", "cuda", "--out", str(tmp_path)])
        assert not any(tmp_path.iterdir())  # refused before anything ran or was written
    task = get_task("diabetes", "tiny")
    run = run_one(task, task.make_data(0), METHODS["sven"], {}, 0, device="cpu")
    assert run.status == "ok"


def test_epoch_overrides() -> None:
    tasks = [get_task(n, "tiny") for n in ("diabetes", "mgh-bard", "mgh-meyer")]
    got = cli.epoch_overrides("diabetes=2,mgh-*=5", tasks)
    assert {t.name: e for t, e in got.items()} == {"diabetes": 2, "mgh-bard": 5, "mgh-meyer": 5}
    assert cli.epoch_overrides(None, tasks) == {}
    # later items win; a pattern may match nothing (one command line for several parts)
    got = cli.epoch_overrides("mgh-bard=7,*=2,poisson-*=9", tasks)
    assert {t.name: e for t, e in got.items()} == {"diabetes": 2, "mgh-bard": 2, "mgh-meyer": 2}
    for bad in ("diabetes", "diabetes=0", "diabetes=x", "nope=3"):
        with pytest.raises(ValueError, match="--epochs"):
            cli.epoch_overrides(bad, tasks)


# ----------------------------------------------------- headline and goals
def _run(task: str, method: str, values: list[float], seed: int = 0, **kw) -> RunResult:
    run = RunResult(
        task, method, {}, seed, curve=_curve(values, [float(i) for i in range(len(values))])
    )
    run.steps, run.train_time, run.selected = len(values) - 1, float(len(values) - 1), True
    for k, v in kw.items():
        setattr(run, k, v)
    return run


def _headline_doc(runs: list[RunResult]) -> dict:
    names = ("sven", "sven-paper", "lm", "adam", "lbfgs", "sgd")
    methods = {m: {"summary": m, "available": True, "reason": None, "grid": []} for m in names}
    tasks = {
        "regression-1d": {"summary": "r", "metric": "mse", "batch_size": 32, "epochs": 3},
        "mgh-bard": {
            "summary": "b",
            "metric": "mse",
            "batch_size": None,
            "epochs": 3,
            "family": "mgh",
        },
    }
    env = {"git_commit": "abc", "cpu": "cpu", "torch_threads": 1, "load_average": "0.1 0.1 0.1"}
    return make_document(runs, tasks, methods, {"size": "full", "seeds": [0, 1]}, env)


def test_headline_goals_and_where_sven_loses(tmp_path) -> None:
    from torchsven.bench.report import (
        family_table,
        paper_goals,
        sven_versus_peers,
        where_sven_loses,
        write_readme_section,
    )

    t = "regression-1d"
    runs = [
        _run(t, "sven", [1.0, 1e-3, 1e-4, 3e-4]),
        _run(t, "sven-paper", [1.0, 0.5, 1e-3, 1e-3]),
        _run(t, "sven-paper", [1.0, math.nan], seed=1, status="diverged", message="x"),
        _run(t, "lm", [1.0, 1e-6, 1e-7, 1e-8]),
        _run(t, "adam", [1.0, 0.1, 1e-3, 1e-3]),
        _run(t, "lbfgs", [1.0, 1e-2, 1e-6, 1e-6]),
        _run(t, "sgd", [1.0, 0.5, 0.2, 0.1]),
    ]
    runs[0].curve[-1]["train"] = {"mse": 1e-5}  # sven fits its training data, not val
    for method, solved_flags in (("lm", [0.0, 1.0, 1.0]), ("adam", [0.0, 0.0, 0.0])):
        run = _run("mgh-bard", method, [1.0, 0.5, 0.1])
        for p, flag in zip(run.curve, solved_flags, strict=True):
            p["val"]["solved"] = flag
        runs.append(run)
    doc = _headline_doc(runs)
    rows = sven_versus_peers(doc)
    assert rows[0][0] == "regression-1d (mse)"
    assert rows[0][2] == "lm 1.00e-08" and rows[0][3] == "lbfgs 1.00e-06"
    assert rows[0][4] == "100" and rows[0][-1] == "Sven 100x better"
    assert rows[1][2] == "lm 1/1" and rows[1][3] == "adam 0/1" and rows[1][-1] == "Sven solves more"
    goals = {g[0]: g for g in paper_goals(doc)}
    lm_adam = goals["LM >= 100x below Adam (median best val MSE)"]
    assert lm_adam[1].endswith("1.00e+05x") and lm_adam[2] == "yes"
    plain = goals["best plain Sven >= 3x below Adam, no diverged seed"]
    assert plain[2] == "no" and "diverged 1/2" in plain[1]  # sven-paper lost a seed
    lbfgs = goals["LM reaches L-BFGS's best in <= 0.5x L-BFGS's wall time"]
    assert lbfgs[1].startswith("median ratio 0.5") and lbfgs[2] == "yes"  # 1 s vs 2 s
    loses = where_sven_loses(doc)
    assert any("sven-paper: 1 of 2 seeds diverged" in line for line in loses)
    assert any("`regression-1d`, sven: validation mse rose" in line for line in loses)
    header, table = family_table(doc, "mgh")
    assert header == ["task", "lm", "adam"] and table[-1] == ["**solved**", "**1/1**", "**0/1**"]
    # the README section is rewritten between its markers, and only there
    readme = tmp_path / "bench.md"
    readme.write_text(
        "intro\n<!-- bench-headline:start -->\nold\n<!-- bench-headline:end -->\nend\n"
    )
    write_readme_section(doc, str(readme), "benchmarks/full/results.json")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n") and "old" not in text
    assert "| regression-1d (mse) |" in text and "benchmarks/full/results.json" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        write_readme_section(doc, str(readme), "x")
    assert readme.read_text() == "no markers"


def test_full_batch_tasks_evaluate_every_few_epochs() -> None:
    task = get_task("poisson-2d", "tiny")
    task.epochs = {**task.epochs, "tiny": 7}
    run = run_one(task, task.make_data(0), METHODS["adam"], {"lr": 1e-3}, 0)
    assert task.eval_every == 5 and run.steps == 7
    assert [p["epoch"] for p in run.curve] == [0.0, 5.0, 7.0]  # start, every 5th, the last
