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
    """Training seconds until the validation metric first reaches ``target`` at an
    evaluation after a step (inf: never; a diverged run never does)."""
    if run.diverged:
        return math.inf
    for point in run.curve[1:]:
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
        _setting(row["setting"]) or "defaults",
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
    """One PNG per task (not for family tasks, which share a table): validation metric
    against epoch and against wall time (log y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    summary = summarise(doc)
    colors = _colors(list(doc["methods"]))
    runs = runs_of(doc)
    paths = []
    for name, task in doc["tasks"].items():
        if task.get("family"):
            continue
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


def is_sven(method: str) -> bool:
    """Sven's own methods (``sven*`` and ``lm``); every other method is a peer."""
    return method.startswith("sven") or method == "lm"


def is_plain_sven(doc: dict[str, Any], method: str) -> bool:
    """Sven without damping or line search (the paper's algorithm), as the document says."""
    info = doc["methods"].get(method, {})
    if "plain" in info:
        return bool(info["plain"])
    return method in ("sven-paper", "sven-svd")


def _best_of(rows: dict[str, Any], names: Sequence[str], key: str = "best_val") -> str | None:
    finite = [m for m in names if math.isfinite(rows[m][key])]
    return min(finite, key=lambda m: rows[m][key]) if finite else None


def _family_solved(doc: dict[str, Any], family: str) -> dict[str, tuple[int, int]]:
    """method -> (runs that reached the published minimum, runs) over a family's tasks."""
    names = {n for n, t in doc["tasks"].items() if t.get("family") == family}
    out: dict[str, list[int]] = {}
    for run in runs_of(doc):
        if run.task in names and run.selected:
            hit = any(p["val"].get("solved", 0.0) == 1.0 for p in run.curve[1:])
            counts = out.setdefault(run.method, [0, 0])
            counts[0] += int(hit and not run.diverged)
            counts[1] += 1
    return {m: (c[0], c[1]) for m, c in out.items()}


def families(doc: dict[str, Any]) -> dict[str, list[str]]:
    """family -> its task names, in the document's order."""
    out: dict[str, list[str]] = {}
    for name, task in doc["tasks"].items():
        if task.get("family"):
            out.setdefault(task["family"], []).append(name)
    return out


HEADLINE = [
    "task (metric)",
    "`sven` (defaults)",
    "best Sven variant",
    "best peer",
    "peer / Sven",
    "Sven to target s",
    "fastest peer to target s",
    "verdict",
]


def sven_versus_peers(doc: dict[str, Any]) -> list[list[str]]:
    """The headline: per task, Sven's defaults and best variant against the best peer.

    Best = lowest median (over seeds) best validation metric of the winning setting;
    a method with a diverged seed is marked. ``peer / Sven`` > 1: Sven is better. For a
    family of curve-fitting tasks, one row: runs that reached the published minimum.
    """
    summary = summarise(doc)
    out = []
    for name, s in summary.items():
        if doc["tasks"][name].get("family"):
            continue
        rows = s["rows"]
        svens = [m for m in rows if is_sven(m)]
        peers = [m for m in rows if not is_sven(m)]
        if not svens or not peers:
            continue
        best_sven, best_peer = _best_of(rows, svens), _best_of(rows, peers)
        fastest = min(peers, key=lambda m: rows[m]["to_target"])
        sven_fastest = min(svens, key=lambda m: rows[m]["to_target"])

        def shown(m: str | None, rows: dict[str, Any] = rows) -> str:
            if m is None:
                return "all diverged"
            r = rows[m]
            flag = f" (diverged {r['diverged']}/{r['runs']})" if r["diverged"] else ""
            return f"{m} {_num(r['best_val'])}{flag}"

        default = rows.get("sven")
        default_text = "-" if default is None else shown("sven").removeprefix("sven ")
        ratio = (
            _ratio(rows[best_peer]["best_val"], rows[best_sven]["best_val"])
            if best_sven and best_peer
            else math.nan
        )
        verdict = "-"
        if math.isfinite(ratio):
            verdict = (
                f"Sven {_num(ratio)}x better"
                if ratio > 1
                else f"**Sven loses** ({_num(1 / ratio) if ratio > 0 else 'inf'}x worse)"
            )
        t_sven, t_peer = rows[sven_fastest]["to_target"], rows[fastest]["to_target"]
        out.append(
            [
                f"{name} ({s['metric']})",
                default_text,
                shown(best_sven),
                shown(best_peer),
                _num(ratio),
                "never" if not math.isfinite(t_sven) else f"{sven_fastest} {_num(t_sven)}",
                "never" if not math.isfinite(t_peer) else f"{fastest} {_num(t_peer)}",
                verdict,
            ]
        )
    for family, names in families(doc).items():
        solved = _family_solved(doc, family)
        svens = [m for m in solved if is_sven(m)]
        peers = [m for m in solved if not is_sven(m)]
        if not svens or not peers:
            continue
        best_sven = max(svens, key=lambda m: solved[m][0])
        best_peer = max(peers, key=lambda m: solved[m][0])
        a, b = solved[best_sven][0], solved[best_peer][0]
        default = solved.get("sven")
        out.append(
            [
                f"{family}: {len(names)} curve fits x starts (runs at the published minimum)",
                "-" if default is None else f"{default[0]}/{default[1]}",
                f"{best_sven} {a}/{solved[best_sven][1]}",
                f"{best_peer} {b}/{solved[best_peer][1]}",
                "-",
                "-",
                "-",
                "Sven solves more" if a > b else ("tie" if a == b else "**Sven loses**"),
            ]
        )
    return out


def where_sven_loses(doc: dict[str, Any]) -> list[str]:
    """Sentences, one per finding, where a peer beats every Sven variant, where Sven's
    validation metric ends well above its best (overfitting on noisy data), and what a
    Sven step costs against SGD's."""
    summary = summarise(doc)
    lines = []
    for name, s in summary.items():
        if doc["tasks"][name].get("family"):
            continue
        rows, metric = s["rows"], s["metric"]
        svens = [m for m in rows if is_sven(m)]
        peers = [m for m in rows if not is_sven(m)]
        best_sven, best_peer = _best_of(rows, svens), _best_of(rows, peers)
        if best_sven and best_peer and rows[best_peer]["best_val"] < rows[best_sven]["best_val"]:
            lines.append(
                f"`{name}`: {best_peer} reaches a best validation {metric} of "
                f"{_num(rows[best_peer]['best_val'])}, every Sven variant stays above it "
                f"(best: {best_sven} {_num(rows[best_sven]['best_val'])})."
            )
        final_sven = _best_of(rows, svens, "val")
        final_peer = _best_of(rows, peers, "val")
        if final_sven and final_peer and rows[final_peer]["val"] < rows[final_sven]["val"]:
            lines.append(
                f"`{name}`, final (not best) validation {metric}: {final_peer} "
                f"{_num(rows[final_peer]['val'])} against the best Sven variant's "
                f"{_num(rows[final_sven]['val'])} ({final_sven})."
            )
        for m in svens:
            r = rows[m]
            if (
                math.isfinite(r["val"])
                and math.isfinite(r["best_val"])
                and r["best_val"] > 0
                and r["val"] > 1.5 * r["best_val"]
                and math.isfinite(r["train"])
                and r["train"] < r["best_val"]
            ):
                lines.append(
                    f"`{name}`, {m}: validation {metric} rose from its best "
                    f"{_num(r['best_val'])} to {_num(r['val'])} at the end while training "
                    f"{metric} is {_num(r['train'])} (overfits without early stopping)."
                )
        for m in svens:
            if rows[m]["diverged"]:
                lines.append(
                    f"`{name}`, {m}: {rows[m]['diverged']} of {rows[m]['runs']} seeds "
                    f"diverged with the winning setting."
                )
        costs = [rows[m]["x_sgd"] for m in svens if math.isfinite(rows[m]["x_sgd"])]
        if costs:
            lines.append(
                f"`{name}`: a Sven step costs {_num(min(costs))}x to {_num(max(costs))}x "
                f"an SGD step."
            )
    for family in families(doc):
        solved = _family_solved(doc, family)
        svens = {m: v for m, v in solved.items() if is_sven(m)}
        peers = {m: v for m, v in solved.items() if not is_sven(m)}
        if svens and peers:
            bs = max(svens, key=lambda m: svens[m][0])
            bp = max(peers, key=lambda m: peers[m][0])
            if peers[bp][0] > svens[bs][0]:
                lines.append(
                    f"`{family}`: {bp} reaches the published minimum in {peers[bp][0]}/"
                    f"{peers[bp][1]} runs, the best Sven variant ({bs}) in {svens[bs][0]}/"
                    f"{svens[bs][1]}."
                )
    return lines


def paper_goals(doc: dict[str, Any], task: str = "regression-1d") -> list[list[str]]:
    """The issue's goals on the paper's 1-D task, measured from the document.

    * LM's median best validation MSE >= 100x below Adam's;
    * the best plain-Sven variant (no damping, no line search) >= 3x below Adam's, with
      no diverged seed;
    * LM reaches L-BFGS's best in <= 0.5x L-BFGS's wall time: per seed, LM's training
      time until its validation MSE first reaches L-BFGS's best of that seed, divided
      by L-BFGS's training time until it reached that best; median over seeds.
    """
    if task not in doc["tasks"]:
        return []
    rows = summarise(doc)[task]["rows"]
    out: list[list[str]] = []
    adam = rows.get("adam")
    lm = rows.get("lm")
    if adam and lm:
        ratio = _ratio(adam["best_val"], lm["best_val"])
        out.append(
            [
                "LM >= 100x below Adam (median best val MSE)",
                f"lm {_num(lm['best_val'])} vs adam {_num(adam['best_val'])}: {_num(ratio)}x",
                "yes" if ratio >= 100 and not lm["diverged"] else "no",
            ]
        )
    plain = [m for m in rows if is_sven(m) and is_plain_sven(doc, m)]
    if adam and plain:
        ok = [m for m in plain if not rows[m]["diverged"]]
        best = _best_of(rows, ok) if ok else None
        if best is None:
            lost = ", ".join(
                f"{m} {_num(rows[m]['best_val'])} "
                f"(diverged {rows[m]['diverged']}/{rows[m]['runs']})"
                for m in plain
            )
            out.append(
                [
                    "best plain Sven >= 3x below Adam, no diverged seed",
                    f"every plain variant lost a seed: {lost}",
                    "no",
                ]
            )
        else:
            ratio = _ratio(adam["best_val"], rows[best]["best_val"])
            others = ", ".join(
                f"{m} {_num(rows[m]['best_val'])}"
                + (
                    f" (diverged {rows[m]['diverged']}/{rows[m]['runs']})"
                    if rows[m]["diverged"]
                    else ""
                )
                for m in plain
                if m != best
            )
            out.append(
                [
                    "best plain Sven >= 3x below Adam, no diverged seed",
                    f"{best} ({_setting(rows[best]['setting'])}) {_num(rows[best]['best_val'])} "
                    f"vs adam {_num(adam['best_val'])}: {_num(ratio)}x"
                    + (f"; also {others}" if others else ""),
                    "yes" if ratio >= 3 else "no",
                ]
            )
    if lm and "lbfgs" in rows:
        runs = [r for r in runs_of(doc) if r.task == task and r.selected]
        ratios, details = [], []
        for lb in [r for r in runs if r.method == "lbfgs" and not r.diverged]:
            lm_runs = [r for r in runs if r.method == "lm" and r.seed == lb.seed]
            if not lm_runs:
                continue
            best = lb.best(task_metric := doc["tasks"][task]["metric"])
            t_lb = time_to_target(lb, task_metric, best)
            t_lm = time_to_target(lm_runs[0], task_metric, best)
            ratios.append(_ratio(t_lm, t_lb))
            details.append(f"seed {lb.seed}: {_num(t_lm)} s vs {_num(t_lb)} s")
        if ratios:
            med = statistics.median(ratios)
            out.append(
                [
                    "LM reaches L-BFGS's best in <= 0.5x L-BFGS's wall time",
                    f"median ratio {_num(med)} ({'; '.join(details)})",
                    "yes" if med <= 0.5 else "no",
                ]
            )
    return out


def family_table(doc: dict[str, Any], family: str) -> tuple[list[str], list[list[str]]]:
    """One row per task of the family, one column per method: median final cost over
    seeds and how many seeds reached the published minimum; a totals row."""
    names = families(doc)[family]
    summary = summarise(doc)
    solved = _family_solved(doc, family)
    methods = [m for m in doc["methods"] if m in solved]
    runs = [r for r in runs_of(doc) if r.task in names and r.selected]
    header = ["task", *methods]
    rows = []
    for name in names:
        cells = [name]
        for m in methods:
            row = summary[name]["rows"].get(m)
            if row is None:
                cells.append("")
                continue
            mine = [r for r in runs if r.task == name and r.method == m]
            hits = sum(
                any(p["val"].get("solved", 0.0) == 1.0 for p in r.curve[1:]) and not r.diverged
                for r in mine
            )
            text = f"{_num(row['val'])} ({hits}/{len(mine)})"
            if row["diverged"]:
                text += f" D{row['diverged']}"
            cells.append(text)
        rows.append(cells)
    rows.append(["**solved**", *[f"**{solved[m][0]}/{solved[m][1]}**" for m in methods]])
    return header, rows


def _ratio(a: float, b: float) -> float:
    """a / b, NaN where undefined (0/0, inf/inf, or b == 0)."""
    if b == 0 or not (math.isfinite(a) or math.isfinite(b)):
        return math.nan
    return a / b


def _key(x: float) -> float:
    return x if math.isfinite(x) else math.inf


HEADLINE_MARKERS = ("<!-- bench-headline:start -->", "<!-- bench-headline:end -->")


def headline_markdown(doc: dict[str, Any]) -> list[str]:
    """Markdown lines: the headline table, the paper's 1-D goals, where Sven loses."""
    parts: list[str] = []
    versus = sven_versus_peers(doc)
    if versus:
        parts += [
            "## Sven against the best peer",
            "",
            "Median over seeds of the winning setting's best validation metric. Sven "
            "variants: `sven` (the library's defaults, `Sven(model)`), `sven-paper`, "
            "`sven-svd`, `lm`, `sven-lsq`; peers: every other method. `peer / Sven` > 1 "
            "means Sven's best variant is better. Time to target: training seconds until "
            "the validation metric first reaches twice the best final value of any method.",
            "",
            _md_table(HEADLINE, versus),
            "",
        ]
    goals = paper_goals(doc)
    if goals:
        parts += [
            "### The paper's 1-D task (regression-1d): goals",
            "",
            _md_table(["goal", "measured", "met"], goals),
            "",
        ]
    loses = where_sven_loses(doc)
    if loses:
        parts += ["### Where Sven loses", ""] + [f"- {line}" for line in loses] + [""]
    return parts


def write_readme_section(doc: dict[str, Any], path: str, source: str) -> None:
    """Replace the text between :data:`HEADLINE_MARKERS` in ``path`` with the headline.

    ``source`` names the results the table came from (a path, shown under it).
    Raises ValueError when the file lacks the markers (nothing is written).
    """
    with open(path) as f:
        text = f.read()
    start, end = HEADLINE_MARKERS
    if start not in text or end not in text or text.index(start) > text.index(end):
        raise ValueError(f"{path} has no {start} ... {end} markers")
    env, config = doc["environment"], doc["config"]
    body = headline_markdown(doc)
    body = [
        line.replace("## Sven against", "#### Sven against", 1) if line.startswith("## ") else line
        for line in body
    ]
    body = [line.replace("### ", "#### ", 1) if line.startswith("### ") else line for line in body]
    note = (
        f"Generated by `torchsven bench report ... --readme` from `{source}` (commit "
        f"{env.get('git_commit')}, {env.get('cpu')}, device {env.get('device', 'cpu')}, "
        f"{env.get('torch_threads')} thread(s), seeds {config.get('seeds')}, load average "
        f"{env.get('load_average')})."
    )
    new = "\n".join([start, "", note, "", *body, end])
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(before + new + after)


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
    parts += headline_markdown(doc)
    for family in families(doc):
        header, rows = family_table(doc, family)
        parts += [
            f"## {family}: curve fitting",
            "",
            "Moré-Garbow-Hillstrom data-fitting problems; seed s starts from 10^s x the "
            "standard start. Each cell: median final cost 0.5 sum f_i^2 over seeds, then "
            "(seeds whose run reached the published minimum, within 1e-4 relative); "
            "`D k`: k seeds diverged. Solvers (`scipy`, `sven-lsq`) run the whole solve in "
            "their first step with at most 2 x epochs residual evaluations. Per-task "
            "tables and curves are in the JSON.",
            "",
            _md_table(header, rows),
            "",
        ]
    for name, task in doc["tasks"].items():
        if task.get("family"):
            continue
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
