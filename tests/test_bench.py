"""Tests of ``torchsven bench``: tasks, methods, runner, JSON, report and plots (tiny sizes)."""

from __future__ import annotations

import math

import pytest
import torch

from torchsven.bench.tasks import SIZES, TASKS, Task, get_task, load_all, register

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
from torchsven.bench.methods import METHODS, get_method, muon_split  # noqa: E402
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
from torchsven.bench.runner import RunResult, run_one, run_suite, select_best  # noqa: E402
from torchsven.bench.tasks._common import mlp  # noqa: E402

AVAILABLE = [name for name, m in METHODS.items() if m.unavailable() is None]


def test_method_registry() -> None:
    for name in ("sven", "sven-svd", "lm", "sgd", "adam", "adamw", "muon", "lbfgs", "polyak-sgd"):
        assert name in METHODS
    # the same tuning budget for every method
    for size in SIZES:
        assert len({len(m.grid(size)) for m in METHODS.values()}) == 1
    for m in METHODS.values():
        why = m.unavailable()
        assert why is None or (isinstance(why, str) and why)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


@pytest.mark.parametrize("name", AVAILABLE)
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
    assert "| sven |" in md and "![diabetes](diabetes.png)" in md
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
