"""torchsven.least_squares against scipy's MINPACK on the MGH set, More's protocol.

All 35 More-Garbow-Hillstrom problems (torchsven.problems), each from the
standard start x0, 10 x0 and 100 x0 (105 problem-starts), float64, default
arguments on both sides:

* torchsven: ``torchsven.least_squares(problem.residuals, x0)`` (method "trf",
  x_scale "jac", tolerances 1e-8, max_nfev 100 n);
* scipy: ``scipy.optimize.least_squares(fun, x0, jac=jac, method="lm")``
  (MINPACK lmder, x_scale "jac", tolerances 1e-8, max_nfev 100 n), with the
  exact Jacobian from torch autograd.

Solved: the final cost ``0.5 sum f_i^2`` is within ``1e-6`` relative (plus
``1e-12`` absolute, for the zero-residual problems) of ``f*``, the smaller of
half the published minimum and the lowest cost any run reached on that
problem from any start, or within ``1e-5`` of half the published minimum (the
paper prints 6 digits). A run that raises (non-finite residuals at the start)
is unsolved. nfev: residual evaluations (scipy's nfev, MINPACK's count; ours
counts the start and every trial; neither counts Jacobians). Wall time: the
whole solve, medians of ``--repeats``.

    python benchmarks/least_squares_mgh.py [--repeats 1] [--problems meyer,bard]

Writes benchmarks/least_squares_mgh.json and .md, and the summary into
docs/readme/least_squares.md between its markers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import scipy
import scipy.optimize
import torch

import torchsven
from torchsven.problems import PROBLEMS, Problem

ROOT = Path(__file__).resolve().parents[1]
MULTIPLIERS = (1, 10, 100)
REL, ABS = 1e-6, 1e-12
PUBLISHED_REL = 1e-5  # the paper prints 6 digits


def run_torchsven(problem: Problem, x0: torch.Tensor) -> dict:
    try:
        res = torchsven.least_squares(problem.residuals, x0)
    except ValueError as err:
        return {"cost": math.nan, "nfev": 0, "njev": 0, "status": None, "error": str(err)}
    return {"cost": res.cost, "nfev": res.nfev, "njev": res.njev, "status": res.status}


def run_scipy(problem: Problem, x0: torch.Tensor) -> dict:
    def fun(v):
        return problem.residuals(torch.from_numpy(v)).numpy()

    def jac(v):
        return torch.autograd.functional.jacobian(problem.residuals, torch.from_numpy(v)).numpy()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = scipy.optimize.least_squares(fun, x0.numpy(), jac=jac, method="lm")
    except ValueError as err:
        return {"cost": math.nan, "nfev": 0, "njev": 0, "status": None, "error": str(err)}
    cost = float(res.cost) if np.isfinite(res.cost) else math.inf
    return {"cost": cost, "nfev": int(res.nfev), "njev": int(res.njev), "status": int(res.status)}


def _timed(fn, problem: Problem, x0: torch.Tensor, repeats: int) -> dict:
    times, out = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(problem, x0)
        times.append(time.perf_counter() - start)
    return {**out, "seconds": statistics.median(times)}


def _solved(cost: float, best: float, published: float | None) -> bool:
    if not math.isfinite(cost):
        return False
    if published is not None and cost <= published * (1 + PUBLISHED_REL) + ABS:
        return True
    return cost <= best * (1 + REL) + ABS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--problems", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [n for n in args.problems.split(",") if n] or list(PROBLEMS)
    rows = []
    for name in names:
        problem = PROBLEMS[name]
        for mult in MULTIPLIERS:
            x0 = torch.tensor(problem.x0, dtype=torch.float64) * mult
            ours = _timed(run_torchsven, problem, x0, args.repeats)
            ref = _timed(run_scipy, problem, x0, args.repeats)
            rows.append(
                {
                    "number": problem.number,
                    "problem": name,
                    "n": problem.n,
                    "m": problem.m,
                    "start": f"{mult}x0",
                    "published_cost": None if problem.fmin is None else 0.5 * problem.fmin,
                    "torchsven": ours,
                    "scipy": ref,
                }
            )
            print(
                f"{problem.number:2d} {name:27s} {mult:3d}x0  torchsven {ours['cost']:.8e} "
                f"({ours['nfev']} nfev, status {ours['status']})  scipy {ref['cost']:.8e} "
                f"({ref['nfev']} nfev, status {ref['status']})",
                flush=True,
            )
    _score(rows)
    write(rows, args)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    meta = {
        "command": f"python benchmarks/least_squares_mgh.py --repeats {args.repeats}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 torch thread",
        "load": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "scipy": scipy.__version__,
        "torchsven": torchsven.__version__,
        "criterion": f"cost <= f* (1 + {REL}) + {ABS}, or within {PUBLISHED_REL} of the "
        "published minimum",
    }
    table = _markdown(rows, meta)
    print(table)
    if not args.problems:
        out = ROOT / "benchmarks"
        (out / "least_squares_mgh.json").write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n"
        )
        (out / "least_squares_mgh.md").write_text(table)
        _into_doc(table.split("\n\n", 1)[1].strip())


def _into_doc(text: str) -> None:
    """Put the summary paragraph into docs/readme/least_squares.md between its markers."""
    doc = ROOT / "docs" / "readme" / "least_squares.md"
    start, end = "<!-- lsq-mgh:start -->", "<!-- lsq-mgh:end -->"
    head, rest = doc.read_text().split(start, 1)
    tail = rest.split(end, 1)[1]
    text = text.replace("; bold: not solved", "")
    link = "Per problem-start: `benchmarks/least_squares_mgh.md`."
    doc.write_text(f"{head}{start}\n{text}\n{link}\n{end}{tail}")


def _score(rows: list[dict]) -> None:
    best: dict[str, float] = {}
    for r in rows:
        candidates = [r["torchsven"]["cost"], r["scipy"]["cost"]]
        if r["published_cost"] is not None:
            candidates.append(r["published_cost"])
        finite = [c for c in candidates if math.isfinite(c)]
        best[r["problem"]] = min([best.get(r["problem"], math.inf), *finite])
    for r in rows:
        r["best_cost"] = best[r["problem"]]
        for key in ("torchsven", "scipy"):
            r[key]["solved"] = _solved(r[key]["cost"], r["best_cost"], r["published_cost"])


def summary(rows: list[dict]) -> dict:
    ours = [r for r in rows if r["torchsven"]["solved"]]
    ref = [r for r in rows if r["scipy"]["solved"]]
    both = [r for r in rows if r["torchsven"]["solved"] and r["scipy"]["solved"]]
    only_scipy = [f"{r['problem']} {r['start']}" for r in ref if not r["torchsven"]["solved"]]
    only_ours = [f"{r['problem']} {r['start']}" for r in ours if not r["scipy"]["solved"]]
    return {
        "problem_starts": len(rows),
        "solved_torchsven": len(ours),
        "solved_scipy": len(ref),
        "success_torchsven": sum(r["torchsven"]["status"] in (1, 2, 3, 4) for r in rows),
        "success_scipy": sum(r["scipy"]["status"] in (1, 2, 3, 4) for r in rows),
        "solved_by_scipy_not_torchsven": only_scipy,
        "solved_by_torchsven_not_scipy": only_ours,
        "both": len(both),
        "median_nfev_torchsven": statistics.median(r["torchsven"]["nfev"] for r in both),
        "median_nfev_scipy": statistics.median(r["scipy"]["nfev"] for r in both),
        "median_nfev_ratio": statistics.median(
            r["torchsven"]["nfev"] / r["scipy"]["nfev"] for r in both
        ),
        "median_seconds_ratio": statistics.median(
            r["torchsven"]["seconds"] / r["scipy"]["seconds"] for r in both
        ),
    }


def _markdown(rows: list[dict], meta: dict) -> str:
    s = summary(rows)
    lines = [
        "| # | problem | start | f* | torchsven cost | nfev | scipy lm cost | nfev |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, c = r["torchsven"], r["scipy"]

        def cell(run: dict) -> str:
            text = "error" if "error" in run else f"{run['cost']:.6e}"
            return text if run["solved"] else f"**{text}**"

        lines.append(
            f"| {r['number']} | {r['problem']} | {r['start']} | {r['best_cost']:.6e} | "
            f"{cell(o)} | {o['nfev']} | {cell(c)} | {c['nfev']} |"
        )
    lines += [
        "",
        f"Solved (`{meta['criterion']}`; bold: not solved): torchsven **{s['solved_torchsven']}"
        f"** of {s['problem_starts']}, scipy MINPACK **{s['solved_scipy']}**. Solved by scipy "
        f"only: {', '.join(s['solved_by_scipy_not_torchsven']) or 'none'}. Solved by "
        f"torchsven only: {', '.join(s['solved_by_torchsven_not_scipy']) or 'none'}. "
        f"Stopped by a convergence test (status 1-4, often at another local minimum): "
        f"torchsven {s['success_torchsven']}, scipy {s['success_scipy']}.",
        f"On the {s['both']} problem-starts both solve: median nfev torchsven "
        f"{s['median_nfev_torchsven']:g}, scipy {s['median_nfev_scipy']:g}; median per-start "
        f"ratio {s['median_nfev_ratio']:.2f}; median wall-time ratio "
        f"{s['median_seconds_ratio']:.1f}x (torch autograd Jacobians on both sides).",
        f"Measured with `{meta['command']}` on {meta['machine']}, load "
        f"{meta['load'][0]:.1f}, torch {meta['torch']}, scipy {meta['scipy']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
