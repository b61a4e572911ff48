"""Which arguments should ``Sven(model)`` default to?  Measured on every bench task.

For every candidate (explicit ``Sven`` keyword arguments), every task of the
benchmark and every seed, one run of the bench's training loop
(:func:`torchsven.bench.runner.run_one`: the task's model, data, order and
divergence rule) with ``Sven(model, **candidate)`` on the task's residual rows.
A candidate is a safe default when no (task, seed) diverges; it is "within reach
of tuned Sven" on a task when its median best validation metric is within
``--reach`` (default 3x) of the best median any candidate reached there (the
candidates include plain Sven's lr grid, so the best is at least "tuned plain
Sven").

    OMP_NUM_THREADS=1 python benchmarks/defaults/measure.py [--size full]
        [--tasks a,b] [--candidates name,...] [--seeds 3] [--out benchmarks/defaults]
        [--epochs task=E,...]

Writes ``results.json`` (every run, the environment, ``uptime`` load before and
after) and ``results.md`` (a table task x candidate: median best validation
metric, diverged seeds, median ms per step) into ``--out``. Runs of several
invocations (e.g. split over tasks to use both cores) merge with ``--merge``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from torchsven.bench.methods import Method, _sven
from torchsven.bench.report import _num
from torchsven.bench.runner import environment, run_one
from torchsven.bench.tasks import get_task, select_tasks

#: name -> Sven keyword arguments. "current" is whatever the library defaults are.
CANDIDATES: dict[str, dict[str, Any]] = {
    "current": {},
    "plain-lr0.3": {"lr": 0.3, "damping": 0.0},
    "plain-lr0.1": {"lr": 0.1, "damping": 0.0},
    "plain-lr0.03": {"lr": 0.03, "damping": 0.0},
    "plain-lr0.1-rtol1e-2": {"lr": 0.1, "rtol": 1e-2, "damping": 0.0},
    "backtracking": {"lr": 1.0, "damping": 0.0, "line_search": "backtracking"},
    "adaptive": {"lr": 1.0, "damping": "adaptive"},
}


def load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def measure(
    task_names: list[str],
    candidates: list[str],
    seeds: list[int],
    size: str,
    epochs: dict[str, int],
) -> list[dict[str, Any]]:
    runs = []
    for task_name in task_names:
        task = get_task(task_name, size)
        if task_name in epochs:
            task.epochs = {**task.epochs, size: epochs[task_name]}
        for seed in seeds:
            data = task.make_data(seed)
            for name in candidates:
                kwargs = CANDIDATES[name]
                method = Method(f"sven[{name}]", name, _sven(**kwargs), {size: [{}]})
                started = time.perf_counter()
                run = run_one(task, data, method, {}, seed)
                row = {
                    "task": task_name,
                    "candidate": name,
                    "kwargs": kwargs,
                    "seed": seed,
                    "epochs": task.num_epochs,
                    "status": run.status,
                    "message": run.message,
                    "best_val": run.best(task.metric),
                    "final_val": run.final("val", task.metric),
                    "metric": task.metric,
                    "steps": run.steps,
                    "train_time": run.train_time,
                    "seconds": time.perf_counter() - started,
                    "backend": run.notes.get("backend"),
                }
                runs.append(row)
                print(
                    f"{task_name:14s} seed {seed} {name:22s} {run.status:8s} "
                    f"best {_num(row['best_val'])} final {_num(row['final_val'])} "
                    f"{run.steps} steps {run.train_time:.1f} s  {run.message[:60]}",
                    flush=True,
                )
    return runs


_LINE = re.compile(
    r"^(?P<task>\S+)\s+seed (?P<seed>\d+) (?P<candidate>\S+)\s+(?P<status>ok|diverged)\s+"
    r"best (?P<best>\S+) final (?P<final>\S+) (?P<steps>\d+) steps "
    r"(?P<time>[\d.]+) s\s*(?P<msg>.*)$"
)


def runs_from_log(path: str) -> list[dict[str, Any]]:
    """Runs recovered from the progress lines of a part stopped before it wrote its JSON
    (task, seed, candidate, status, best/final validation metric, steps, training time)."""

    def number(text: str) -> float:
        return math.nan if text == "-" else float(text)

    runs = []
    with open(path) as f:
        for line in f:
            m = _LINE.match(line.rstrip("\n"))
            if m is None:
                continue
            runs.append(
                {
                    "task": m["task"],
                    "candidate": m["candidate"],
                    "kwargs": CANDIDATES.get(m["candidate"]),
                    "seed": int(m["seed"]),
                    "status": m["status"],
                    "message": m["msg"].strip(),
                    "best_val": number(m["best"]),
                    "final_val": number(m["final"]),
                    "steps": int(m["steps"]),
                    "train_time": float(m["time"]),
                    "recovered_from_log": path,
                }
            )
    return runs


def _median(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def summarise(runs: list[dict[str, Any]], reach: float) -> dict[str, Any]:
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    candidates = list(dict.fromkeys(r["candidate"] for r in runs))
    table: dict[str, dict[str, Any]] = {}
    for t in tasks:
        table[t] = {}
        for c in candidates:
            sel = [r for r in runs if r["task"] == t and r["candidate"] == c]
            if not sel:
                continue
            ok = [r for r in sel if r["status"] == "ok"]
            table[t][c] = {
                "seeds": len(sel),
                "diverged": len(sel) - len(ok),
                "best_val": _median([r["best_val"] for r in ok]) if ok else math.nan,
                "ms_per_step": _median(
                    [1e3 * r["train_time"] / r["steps"] for r in ok if r["steps"]]
                ),
            }
        finite = [v["best_val"] for v in table[t].values() if v["diverged"] == 0]
        finite = [v for v in finite if math.isfinite(v)]
        best = min(finite) if finite else math.nan
        for v in table[t].values():
            if not math.isfinite(best) or not math.isfinite(v["best_val"]):
                v["ratio_to_best"] = math.nan
            elif best == 0:  # a zero-residual fit solved exactly
                v["ratio_to_best"] = 1.0 if v["best_val"] == 0 else math.inf
            else:
                v["ratio_to_best"] = v["best_val"] / best
            v["within_reach"] = bool(
                v["diverged"] == 0
                and math.isfinite(v["ratio_to_best"])
                and v["ratio_to_best"] <= reach
            )
    verdict = {}
    for c in candidates:
        cells = [table[t][c] for t in tasks if c in table[t]]
        verdict[c] = {
            "tasks": len(cells),
            "diverged_runs": sum(v["diverged"] for v in cells),
            "runs": sum(v["seeds"] for v in cells),
            "within_reach": sum(v["within_reach"] for v in cells),
            "worst_ratio": max(
                (v["ratio_to_best"] for v in cells if math.isfinite(v["ratio_to_best"])),
                default=math.nan,
            ),
        }
    return {"reach": reach, "table": table, "verdict": verdict}


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    table, verdict = s["table"], s["verdict"]
    candidates = list(verdict)
    lines = [
        "# Sven's defaults, measured on every bench task",
        "",
        f"Command(s): {'; '.join('`' + c + '`' for c in doc['commands'])}",
        "",
        f"Machine: {doc['environment'].get('cpu')}, torch {doc['environment'].get('torch')}, "
        f"1 thread, commit {doc['environment'].get('git_commit')}; load average "
        f"(1/5/15 min) before/after each part: {', '.join(doc['loads'])}.",
        "",
        "Each cell: median over seeds of the best validation metric (lower is better), "
        "`D k/n` when k of n seeds diverged (NaN/Inf, a raised step, or an objective above "
        "1e6 x its first value; a diverged seed is left out of the median), and the ratio to "
        "the best candidate on that task that never diverged. A candidate is *within reach* "
        f"where that ratio is <= {s['reach']:g}.",
        "",
        "Candidates (explicit `Sven` arguments):",
        "",
    ]
    for c in candidates:
        lines.append(f"- `{c}`: `{json.dumps(CANDIDATES.get(c, {}))}`")
    lines += ["", "| task | " + " | ".join(candidates) + " |", "|---|" + "---|" * len(candidates)]
    for t, row in table.items():
        cells = []
        for c in candidates:
            v = row.get(c)
            if v is None:
                cells.append("")
                continue
            text = f"{_num(v['best_val'])} ({_num(v['ratio_to_best'])}x)"
            if v["diverged"]:
                text = f"D {v['diverged']}/{v['seeds']}; " + text
            cells.append(text)
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| candidate | diverged runs | tasks within reach | worst ratio to best |",
        "|---|---|---|---|",
    ]
    for c, v in verdict.items():
        lines.append(
            f"| {c} | {v['diverged_runs']}/{v['runs']} | {v['within_reach']}/{v['tasks']} | "
            f"{_num(v['worst_ratio'])} |"
        )
    lines += ["", "Time per step (ms, median over seeds; diverged runs excluded):", ""]
    lines += ["| task | " + " | ".join(candidates) + " |", "|---|" + "---|" * len(candidates)]
    for t, row in table.items():
        lines.append(
            f"| {t} | "
            + " | ".join(_num(row[c]["ms_per_step"]) if c in row else "" for c in candidates)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="full", choices=("full", "quick", "tiny"))
    p.add_argument("--tasks", help="comma-separated (default: every task of the size's suite)")
    p.add_argument("--candidates", help="comma-separated (default: all)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", default="", help="task=E,... overrides of the number of epochs")
    p.add_argument("--reach", type=float, default=3.0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent))
    p.add_argument("--part", help="write part-<PART>.json only (merge later with --merge)")
    p.add_argument("--merge", nargs="+", help="merge these part files into results.json/md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        parts = []
        for path in args.merge:
            if path.endswith(".log"):  # a part stopped early: its progress lines
                runs = runs_from_log(path)
                note = f"{len(runs)} runs recovered from the log {os.path.basename(path)}"
                parts.append({"environment": {}, "commands": [note], "loads": [], "runs": runs})
                continue
            with open(path) as f:
                parts.append(json.load(f))
        runs = [r for part in parts for r in part["runs"]]
        doc = {
            "environment": next((p["environment"] for p in parts if p["environment"]), {}),
            "commands": [c for part in parts for c in part["commands"]],
            "loads": [x for part in parts for x in part["loads"]],
            "runs": runs,
        }
    else:
        tasks = select_tasks(args.tasks.split(",") if args.tasks else None, args.size)
        candidates = args.candidates.split(",") if args.candidates else list(CANDIDATES)
        epochs = {k: int(v) for k, v in (kv.split("=") for kv in args.epochs.split(",") if kv)}
        before = load()
        started = time.perf_counter()
        runs = measure(tasks, candidates, list(range(args.seeds)), args.size, epochs)
        import sys

        doc = {
            "environment": environment(),
            "commands": [
                "OMP_NUM_THREADS=1 python "
                + " ".join(["benchmarks/defaults/measure.py", *sys.argv[1:]])
            ],
            "loads": [f"{before} / {load()} ({time.perf_counter() - started:.0f} s)"],
            "runs": runs,
        }
    doc["summary"] = summarise(doc["runs"], args.reach)
    name = f"part-{args.part}.json" if args.part else "results.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(doc, f, indent=1, default=lambda x: None)
        f.write("\n")
    if not args.part:
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
