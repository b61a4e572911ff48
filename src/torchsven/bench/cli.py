"""``torchsven bench``: the command line.

    torchsven bench [--quick | --full] [--tasks a,b] [--methods x,y] [--seeds N]
                    [--out DIR] [--threads T] [--no-progress] [--no-plots]
    torchsven bench list-tasks | list-methods
    torchsven bench report RESULTS.json [MORE.json ...] [--out DIR] [--json MERGED.json]
    torchsven bench speed [...]        (torchsven.bench.speed)
    torchsven bench distributed [...]  (torchsven.bench.distributed)

``python -m torchsven.bench ...`` is the same as ``torchsven bench ...``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

#: Seeds the full suite runs by default (the quick suite runs the first).
FULL_SEEDS = 3
#: Subcommands that live in modules of their own (other parts of torchsven).
EXTERNAL = {"speed": "speed", "distributed": "distributed"}


def _console(force_plain: bool = False) -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal or force_plain:
        console = Console(width=max(console.width, 200), highlight=False)
    return console


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchsven bench",
        description="Sven against SGD, Adam, AdamW, Muon, L-BFGS (and LM, PolyakSGD when "
        "available) on embedded tasks; prints tables, writes JSON, PNG plots and report.md. "
        "Other subcommands: list-tasks, list-methods, report RESULTS.json, speed, distributed.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="size",
        action="store_const",
        const="quick",
        help="the quick suite (default; what `make bench` runs, a few minutes)",
    )
    size.add_argument(
        "--full",
        dest="size",
        action="store_const",
        const="full",
        help=f"the full suite: full data and epochs, {FULL_SEEDS} seeds",
    )
    size.add_argument("--size", choices=("full", "quick", "tiny"), help="problem size")
    p.add_argument(
        "--tasks",
        help="comma-separated task names, shell patterns ('mgh-*') or families ('mgh') "
        "(default: the size's suite)",
    )
    p.add_argument(
        "--methods", help="comma-separated method names or patterns ('sven*') (default: all)"
    )
    p.add_argument("--seeds", type=int, help="number of seeds (default 1 quick, 3 full)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument(
        "--epochs",
        help="override epochs per task: TASK=E,... (names or patterns, e.g. "
        "'digits-label=5,mgh-*=50'); recorded in the JSON and the report",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these models are tiny and extra threads "
        "only add contention)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where models and data live: cpu (default) or cuda[:index] (an error when "
        "CUDA is not available)",
    )
    p.add_argument("--out", default="bench-out", help="output directory (default bench-out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def epoch_overrides(spec: str | None, tasks: Sequence[Any]) -> dict[Any, int]:
    """``--epochs 'a=5,mgh-*=50'`` -> {task: epochs} for the selected tasks it names.

    Later items override earlier ones. Raises ValueError for a malformed item, epochs < 1,
    or a plain name (no ``*?[``) that is not a selected task.
    """
    import fnmatch

    out: dict[Any, int] = {}
    for item in _split(spec) or []:
        pattern, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--epochs items must be TASK=E with E >= 1, got {item!r}")
        hits = [t for t in tasks if fnmatch.fnmatchcase(t.name, pattern.strip())]
        if not hits and not any(c in pattern for c in "*?["):
            raise ValueError(f"--epochs {item!r} matches none of the selected tasks")
        for t in hits:
            out[t] = int(value)
    return out


def list_tasks() -> int:
    from .tasks import load_all

    for name, cls in load_all().items():
        print(f"{name:16s} {cls.summary} [metric: {cls.metric}]")
    return 0


def list_methods() -> int:
    from .methods import METHODS

    for name, m in METHODS.items():
        why = m.unavailable()
        state = "" if why is None else f"  (not yet available: {why})"
        print(f"{name:12s} {m.summary}{state}")
    return 0


def _outputs(doc: dict[str, Any], out: str, plots: bool, console: Any) -> None:
    from .report import render_tables, write_markdown, write_plots

    render_tables(doc, console)
    paths = write_plots(doc, out) if plots else []
    md = write_markdown(doc, out, paths)
    console.print(f"wrote {md}" + (f" and {len(paths)} plot(s) in {out}" if paths else ""))


def report(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="torchsven bench report",
        description="Render tables, plots and report.md from saved JSON.",
    )
    p.add_argument(
        "results", nargs="+", help="results.json file(s) written by torchsven bench (merged)"
    )
    p.add_argument("--out", help="output directory (default: next to the first JSON)")
    p.add_argument("--json", help="also write the (merged) document to this path")
    p.add_argument(
        "--readme",
        help="also write the headline table ('Sven against the best peer'), the paper's "
        "1-D goals and where Sven loses into this Markdown file, between its "
        "<!-- bench-headline:start/end --> markers (then run tools/sync_readme.py)",
    )
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    from .report import load_json, merge_documents, save_json, write_readme_section

    try:
        doc = merge_documents([load_json(path) for path in args.results])
    except (OSError, ValueError) as e:
        raise SystemExit(f"torchsven bench report: {e}") from None
    out = args.out or os.path.dirname(os.path.abspath(args.results[0]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        save_json(doc, args.json)
    if args.readme:
        source = os.path.relpath(args.json or args.results[0])
        try:
            write_readme_section(doc, args.readme, source)
        except (OSError, ValueError) as e:
            raise SystemExit(f"torchsven bench report: {e}") from None
    _outputs(doc, out, not args.no_plots, _console())
    return 0


class _Progress:
    """A rich progress bar per run, and a one-line result when it ends.

    With ``partial`` set, every finished run is also appended to that JSON-lines
    file, so a long suite that is interrupted keeps what it measured.
    """

    def __init__(self, console: Any, bars: bool, partial: str | None = None) -> None:
        self.console, self.bars, self.partial = console, bars, partial
        self.progress: Any = None
        self.current: Any = None
        self.started = 0.0

    def __enter__(self) -> _Progress:
        if self.bars:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("epoch {task.completed:.1f}/{task.total:g}"),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def started_run(self, task: Any, method: Any, setting: dict[str, Any], seed: int) -> Any:
        from rich.markup import escape

        from .report import _setting

        self.started = time.perf_counter()
        if self.progress is None:
            return None
        label = escape(f"{task.name} {method.name} [{_setting(setting)}] seed {seed}")
        self.current = self.progress.add_task(label, total=task.num_epochs, loss="-")
        bar, current = self.progress, self.current

        def update(epoch: float, loss: float) -> None:
            bar.update(current, completed=epoch, loss=f"{loss:.3e}")

        return update

    def finished_run(self, run: Any) -> None:
        from .report import _num, _setting

        if self.progress is not None and self.current is not None:
            self.progress.remove_task(self.current)
        metric = run.curve[-1]["val"] if run.curve else {}
        shown = ", ".join(f"{k} {_num(v)}" for k, v in metric.items())
        status = "ok" if not run.diverged else f"DIVERGED ({run.message})"
        self.console.print(
            f"{run.task:14s} {run.method:11s} ({_setting(run.setting)}) seed {run.seed}: "
            f"{status}; val {shown}; {run.steps} steps, {run.train_time:.2f} s "
            f"({time.perf_counter() - self.started:.1f} s with evaluation)",
            highlight=False,
            markup=False,
        )
        if self.partial is not None:
            with open(self.partial, "a") as f:
                f.write(json.dumps(run.to_dict(), allow_nan=False) + "\n")


def run(argv: Sequence[str]) -> int:
    args = _run_parser().parse_args(argv)
    import torch

    from .methods import get_method, select_methods
    from .report import make_document, save_json
    from .runner import SuiteEvents, check_device, environment, run_suite
    from .tasks import get_task, select_tasks

    size = args.size or "quick"
    if args.threads < 1:
        raise SystemExit("torchsven bench: --threads must be >= 1")
    torch.set_num_threads(args.threads)
    n_seeds = args.seeds if args.seeds is not None else (FULL_SEEDS if size == "full" else 1)
    if n_seeds < 1:
        raise SystemExit("torchsven bench: --seeds must be >= 1")
    seeds = list(range(args.seed, args.seed + n_seeds))
    try:
        device = check_device(args.device)
        tasks = [get_task(n, size) for n in select_tasks(_split(args.tasks), size)]
        for task, epochs in epoch_overrides(args.epochs, tasks).items():
            task.epochs = {**task.epochs, size: epochs}
        methods = [get_method(n) for n in select_methods(_split(args.methods))]
    except ValueError as e:
        raise SystemExit(f"torchsven bench: {e}") from None
    console = _console()
    bars = not args.no_progress and console.is_terminal
    available = {m.name: m.unavailable() for m in methods}
    for name, why in available.items():
        if why is not None:
            console.print(f"[dim]skipping {name}: not yet available ({why})[/dim]")
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    partial = os.path.join(args.out, "runs.partial.jsonl")
    if os.path.exists(partial):
        os.remove(partial)
    with _Progress(console, bars, partial) as progress:
        events = SuiteEvents(progress.started_run, progress.finished_run)
        results = run_suite(tasks, methods, seeds, events, device)
    elapsed = time.perf_counter() - started
    data = {t.name: t.make_data(seeds[0]) for t in tasks}
    doc = make_document(
        results,
        tasks={
            t.name: {
                "summary": t.summary,
                "metric": t.metric,
                "batch_size": t.batch_size,
                "epochs": t.num_epochs,
                "steps_per_epoch": t.steps_per_epoch(data[t.name]),
                "train_samples": t.samples(data[t.name].train),
                "dtype": str(t.dtype).replace("torch.", ""),
                "family": t.family,
            }
            for t in tasks
        },
        methods={
            m.name: {
                "summary": m.summary,
                "available": available[m.name] is None,
                "reason": available[m.name],
                "grid": m.grid(size),
                "plain": m.is_plain(),
            }
            for m in methods
        },
        config={
            "size": size,
            "seeds": seeds,
            "threads": args.threads,
            "device": str(device),
            "command": "torchsven bench " + shlex.join(argv),
            "selection": "lowest best validation metric on the first seed",
            "suite_seconds": elapsed,
        },
        environment=environment(device),
    )
    path = os.path.join(args.out, "results.json")
    save_json(doc, path)
    os.remove(partial)  # everything it held is in results.json now
    _outputs(doc, args.out, not args.no_plots, console)
    console.print(f"wrote {path}; suite took {elapsed:.0f} s")
    return 0


def external(name: str, argv: Sequence[str]) -> int:
    """``torchsven bench speed|distributed``: hand over to that module's ``main(argv)``."""
    module = f"torchsven.bench.{EXTERNAL[name]}"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        print(f"{name} benchmark not available yet", file=sys.stderr)
        return 2
    return int(mod.main(list(argv)) or 0)


def bench(argv: Sequence[str]) -> int:
    """``torchsven bench ARGS``."""
    argv = list(argv)
    if argv and argv[0] in EXTERNAL:
        return external(argv[0], argv[1:])
    if argv and argv[0] == "list-tasks":
        return list_tasks()
    if argv and argv[0] == "list-methods":
        return list_methods()
    if argv and argv[0] == "report":
        return report(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    return run(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``torchsven`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    if argv[:1] in (["--version"], ["-V"]):
        import torchsven

        print(f"torchsven {torchsven.__version__}")
        return 0
    print(
        "usage: torchsven bench [--quick | --full] [options]\n"
        "       torchsven bench list-tasks | list-methods | report RESULTS.json | speed | "
        "distributed\n"
        "       torchsven --version\n"
        "Run `torchsven bench --help` for the options.",
        file=sys.stderr,
    )
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
