"""Results document (JSON), summary, rich tables, PNG plots and the Markdown report.

Everything here is a function of the results document, so ``torchsven bench
report results.json`` renders exactly what the run printed.

Summary per (task, method), over the winning setting's runs (one per seed):
medians over seeds of the final train / validation metric, the best validation
metric, accuracy where the task has one, steps, training wall time (optimizer
steps only, evaluation excluded), time to target and time per step, and the
largest peak memory. The target of a task is twice the best (lowest) median
final validation metric of any method; time to target is the training time at
the first evaluation whose validation metric is at or below it. Diverged runs
count as never reaching it and are shown as diverged, never dropped.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

from .runner import BLOWUP, RunResult

__all__ = [
    "SCHEMA",
    "load_json",
    "make_document",
    "merge_documents",
    "render_tables",
    "save_json",
    "summarise",
    "write_markdown",
    "write_plots",
]

SCHEMA = "torchsven-bench/1"

COLUMNS = [
    "method",
    "setting (won)",
    "backend",
    "train",
    "val",
    "best val",
    "val acc",
    "steps",
    "wall s",
    "to target s",
    "ms/step",
    "x SGD",
    "peak MiB",
    "status",
]


# ------------------------------------------------------------------ document
def make_document(
    runs: Sequence[RunResult],
    tasks: dict[str, dict[str, Any]],
    methods: dict[str, dict[str, Any]],
    config: dict[str, Any],
    environment: dict[str, Any],
) -> dict[str, Any]:
    """The JSON-ready results document (schema :data:`SCHEMA`)."""
    return {
        "schema": SCHEMA,
        "environment": environment,
        "config": {"blowup": BLOWUP, **config},
        "tasks": tasks,
        "methods": methods,
        "runs": [r.to_dict() for r in runs],
    }


def save_json(doc: dict[str, Any], path: str) -> None:
    """Write the document as strict JSON (NaN/Inf as null)."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")


def load_json(path: str) -> dict[str, Any]:
    """Read a results document; checks the schema tag."""
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a torchsven bench results file (schema {SCHEMA!r})")
    return doc


def merge_documents(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One document from several (e.g. a suite run in parts): tasks, methods and runs.

    The environment and config are the first document's; every part's config
    is kept under ``config["parts"]``. A task may appear in several parts with
    different methods; the same (task, method) in two parts is an error.
    """
    if not docs:
        raise ValueError("merge_documents needs at least one document")
    first = docs[0]
    merged = {**first, "tasks": {}, "methods": {}, "runs": []}
    owner: dict[tuple[str, str], int] = {}
    for i, doc in enumerate(docs):
        for run in doc["runs"]:
            key = (run["task"], run["method"])
            if owner.setdefault(key, i) != i:
                raise ValueError(f"task {key[0]!r}, method {key[1]!r} is in more than one file")
        for name, task in doc["tasks"].items():
            merged["tasks"].setdefault(name, task)
        merged["methods"].update(doc["methods"])
        merged["runs"].extend(doc["runs"])
    if len(docs) > 1:
        merged["config"] = {**first["config"], "parts": [d["config"] for d in docs]}
        merged["config"]["command"] = "; ".join(d["config"].get("command", "?") for d in docs)
    return merged


def runs_of(doc: dict[str, Any]) -> list[RunResult]:
    return [RunResult.from_dict(_nan(d)) for d in doc["runs"]]


def _nan(x: Any) -> Any:
    """null metric values back to NaN (inverse of the strict-JSON conversion)."""
    if x is None:
        return math.nan
    if isinstance(x, dict):
        keep = {"peak_mib", "message", "notes", "setting"}
        return {k: (v if k in keep else _nan(v)) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan(v) for v in x]
    return x


# ------------------------------------------------------------------- summary
def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def time_to_target(run: RunResult, metric: str, target: float) -> float:
    """Training seconds until the validation metric first reaches ``target`` (inf: never)."""
    for point in run.curve:
        value = point["val"].get(metric, math.nan)
        if math.isfinite(value) and value <= target:
            return float(point["time"])
    return math.inf


def summarise(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task: ``{"target": float, "rows": {method: {...}}}`` from the selected runs."""
    runs = runs_of(doc)
    out: dict[str, dict[str, Any]] = {}
    for task_name, task in doc["tasks"].items():
        metric = task["metric"]
        rows: dict[str, dict[str, Any]] = {}
        for method in doc["methods"]:
            chosen = [r for r in runs if r.task == task_name and r.method == method and r.selected]
            if not chosen:
                continue
            ok = [r for r in chosen if not r.diverged]
            steps = _median([r.steps for r in ok])
            wall = _median([r.train_time for r in ok])
            rows[method] = {
                "setting": chosen[0].setting,
                "seeds": [r.seed for r in chosen],
                "diverged": len(chosen) - len(ok),
                "runs": len(chosen),
                "train": _median([r.final("train", metric) for r in ok]),
                "val": _median([r.final("val", metric) for r in ok]),
                "best_val": _median([r.best(metric) for r in ok]),
                "accuracy": _median([r.final("val", "accuracy") for r in ok]),
                "steps": steps,
                "wall": wall,
                "ms_per_step": 1e3 * _median([r.train_time / r.steps for r in ok if r.steps]),
                "peak_mib": max(
                    (r.peak_mib for r in chosen if r.peak_mib is not None), default=None
                ),
                "messages": sorted({r.message for r in chosen if r.message}),
                "notes": chosen[0].notes,
                "_runs": chosen,
            }
        finals = [row["val"] for row in rows.values() if math.isfinite(row["val"])]
        target = 2 * min(finals) if finals else math.nan
        sgd = rows.get("sgd", {}).get("ms_per_step", math.nan)
        for row in rows.values():
            times = [time_to_target(r, metric, target) for r in row.pop("_runs")]
            row["to_target"] = statistics.median(times) if times else math.inf
            row["x_sgd"] = _ratio(row["ms_per_step"], sgd)
        out[task_name] = {"metric": metric, "target": target, "rows": rows}
    return out


# --------------------------------------------------------------- formatting
def _num(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return (
        f"{x:.{digits - 1}e}" if (abs(x) < 1e-2 or abs(x) >= 1e4) and x != 0 else f"{x:.{digits}g}"
    )


def _setting(s: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items())


def cells(method: str, row: dict[str, Any]) -> list[str]:
    """One table row as strings (shared by the terminal table and the Markdown)."""
    status = "ok" if not row["diverged"] else f"diverged {row['diverged']}/{row['runs']}"
    acc = row["accuracy"]
    return [
        method,
        _setting(row["setting"]),
        str(row["notes"].get("backend", "")),
        _num(row["train"]),
        _num(row["val"]),
        _num(row["best_val"]),
        f"{100 * acc:.1f}%" if math.isfinite(acc) else "-",
        "-" if not math.isfinite(row["steps"]) else f"{row['steps']:.0f}",
        _num(row["wall"]),
        "never" if not math.isfinite(row["to_target"]) else _num(row["to_target"]),
        _num(row["ms_per_step"]),
        _num(row["x_sgd"]),
        "-" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}",
        status,
    ]


def _title(name: str, task: dict[str, Any], summary: dict[str, Any]) -> str:
    return (
        f"{name}: validation {task['metric']} (lower is better), "
        f"target {_num(summary['target'])} = 2x best final"
    )


def render_tables(doc: dict[str, Any], console: Any = None) -> None:
    """Print one rich table per task, then the methods that could not run."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    summary = summarise(doc)
    for name, task in doc["tasks"].items():
        table = Table(title=_title(name, task, summary[name]), title_justify="left")
        for i, col in enumerate(COLUMNS):
            table.add_column(col, justify="left" if i < 3 else "right", no_wrap=i < 1)
        for method, row in summary[name]["rows"].items():
            style = "bold" if method.startswith("sven") else None
            table.add_row(*cells(method, row), style=style)
        console.print(table)
    missing = {m: d["reason"] for m, d in doc["methods"].items() if not d["available"]}
    for method, reason in missing.items():
        console.print(f"[dim]not yet available: {method}: {reason}[/dim]")


# ---------------------------------------------------------------------- plots
def _colors(methods: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def write_plots(doc: dict[str, Any], out_dir: str) -> list[str]:
    """One PNG per task: validation metric against epoch and against wall time (log y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    summary = summarise(doc)
    colors = _colors(list(doc["methods"]))
    runs = runs_of(doc)
    paths = []
    for name, task in doc["tasks"].items():
        metric = task["metric"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
        for method in summary[name]["rows"]:
            chosen = [r for r in runs if r.task == name and r.method == method and r.selected]
            for k, run in enumerate(chosen):
                values = run.val_curve(metric)
                for ax, key in zip(axes, ("epoch", "time"), strict=True):
                    xs = [p[key] for p in run.curve]
                    ax.plot(
                        xs,
                        values,
                        color=colors[method],
                        lw=2.2 if method.startswith("sven") else 1.3,
                        alpha=1.0 if k == 0 else 0.35,
                        label=method if k == 0 else None,
                    )
                    if run.diverged and xs:
                        ax.plot(xs[-1], values[-1], "x", color=colors[method], ms=9)
        target = summary[name]["target"]
        for ax, xlabel in zip(axes, ("epoch", "training wall time (s)"), strict=True):
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"validation {metric}")
            ax.grid(True, which="both", alpha=0.25)
            if math.isfinite(target) and target > 0:
                ax.axhline(target, color="k", ls=":", lw=1, label="target (2x best final)")
        axes[0].legend(fontsize=8, ncol=2)
        fig.suptitle(f"{name}: {task['summary']}", fontsize=10)
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------ markdown
def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def sven_versus_peers(doc: dict[str, Any]) -> list[list[str]]:
    """Per task: Sven's best val and time to target against the best peer's."""
    summary = summarise(doc)
    out = []
    for name, s in summary.items():
        rows = s["rows"]
        sven = rows.get("sven")
        peers = {m: r for m, r in rows.items() if not m.startswith("sven") and m != "lm"}
        if sven is None or not peers:
            continue
        best_peer = min(peers, key=lambda m: _key(peers[m]["best_val"]))
        fastest = min(peers, key=lambda m: peers[m]["to_target"])
        peer_time = peers[fastest]["to_target"]
        ratio = _ratio(peers[best_peer]["best_val"], sven["best_val"])
        t_ratio = _ratio(sven["to_target"], peer_time)
        out.append(
            [
                name,
                _num(sven["best_val"]),
                f"{best_peer} {_num(peers[best_peer]['best_val'])}",
                _num(ratio),
                "never" if not math.isfinite(sven["to_target"]) else _num(sven["to_target"]),
                f"{fastest} {_num(peer_time)}" if math.isfinite(peer_time) else "none reached",
                _num(t_ratio),
            ]
        )
    return out


def _ratio(a: float, b: float) -> float:
    """a / b, NaN where undefined (0/0, inf/inf, or b == 0)."""
    if b == 0 or not (math.isfinite(a) or math.isfinite(b)):
        return math.nan
    return a / b


def _key(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def write_markdown(doc: dict[str, Any], out_dir: str, plots: Sequence[str] = ()) -> str:
    """``report.md`` in ``out_dir``: environment, one table and plot per task."""
    os.makedirs(out_dir, exist_ok=True)
    env, config = doc["environment"], doc["config"]
    summary = summarise(doc)
    plot_of = {os.path.splitext(os.path.basename(p))[0]: os.path.basename(p) for p in plots}
    parts = [
        f"# torchsven bench: {config.get('size', '?')} suite",
        "",
        f"Command: `{config.get('command', 'torchsven bench')}`; seeds {config.get('seeds')}; "
        f"{env.get('torch_threads')} torch thread(s).",
        "",
        _md_table(
            ["environment", ""],
            [[k, str(v)] for k, v in env.items()],
        ),
        "",
        "How to read: each method tried every setting of its grid (the same number of "
        "settings per method) on the first seed; the setting with the lowest best validation "
        "metric won and ran on the other seeds. Values are medians over seeds of the winning "
        "setting. `train`/`val`: final metric; `best val`: lowest over the run; `wall s`: "
        "optimizer-step time only (evaluation excluded); `to target s`: wall time until the "
        "validation metric first reached twice the best final value of any method; `x SGD`: "
        "time per step relative to SGD on the same task (L-BFGS steps are full-batch "
        "iterations); `backend`: the Sven backend that ran the last step of the first "
        f"seed's run; `peak MiB`: {env.get('memory_measure', 'peak memory')}. Diverged runs "
        "(NaN/Inf, a step that raised, or an objective above "
        f"{config['blowup']:g} x its first value) are listed, never dropped.",
        "",
    ]
    versus = sven_versus_peers(doc)
    if versus:
        parts += [
            "## Sven against the best peer",
            "",
            _md_table(
                [
                    "task",
                    "Sven best val",
                    "best peer (best val)",
                    "peer / Sven",
                    "Sven to target s",
                    "fastest peer to target s",
                    "Sven / fastest",
                ],
                versus,
            ),
            "",
        ]
    for name, task in doc["tasks"].items():
        rows = [cells(m, r) for m, r in summary[name]["rows"].items()]
        parts += [
            f"## {name}",
            "",
            f"{task['summary']}. Metric: validation {task['metric']}; target "
            f"{_num(summary[name]['target'])}; {task['epochs']} epochs, batch "
            f"{task['batch_size'] or 'full'}.",
            "",
            _md_table(COLUMNS, rows),
            "",
        ]
        if name in plot_of:
            parts += [f"![{name}]({plot_of[name]})", ""]
    missing = [(m, d["reason"]) for m, d in doc["methods"].items() if not d["available"]]
    if missing:
        parts += ["## Not yet available", ""]
        parts += [f"- `{m}`: {why}" for m, why in missing]
        parts.append("")
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
