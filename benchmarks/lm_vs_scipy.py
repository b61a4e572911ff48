"""Sven with adaptive damping against scipy's Levenberg-Marquardt on the MGH set.

For each of the 35 Moré-Garbow-Hillstrom problems (torchsven.problems), from the
standard start, in float64:

* Sven: ``torchsven.Sven([x], damping="adaptive")``, default settings, stepped
  until converged (stop rule below) or 2000 steps;
* scipy: ``scipy.optimize.least_squares(method="lm")`` (MINPACK lmder, its
  default Jacobian column scaling), exact Jacobian from torch autograd,
  ``ftol = xtol = gtol = 1e-15``, ``max_nfev = 20000``.

Both evaluate the same torch residual function. Success ("matches scipy"):
``cost_sven <= (1 + 1e-8) cost_scipy + 1e-24`` with ``cost = 0.5 sum f_i^2``
(the absolute 1e-24 only matters on zero-residual problems, where both reach
round-off). "Published": the cost is within 1e-5 (the paper prints 6 digits)
of half the minimum Moré, Garbow and Hillstrom list, or below it. Closure calls:
Sven's closure calls (each step: one call with its Jacobian, one trial call);
scipy's ``nfev`` residual and ``njev`` Jacobian evaluations. Wall time: the
whole solve, each method run in turn in one process, median of ``--repeats``.

Sven's stop rule (MINPACK-like, from ``opt.last_step``): the cost is 0; or
the predicted and actual reductions are both <= 1e-15 of the cost; or a no-op
step (nothing left to take); or an accepted step changes x by <= 1e-15 (||x|| +
1e-15); or the damping factor sits at its upper bound.

    python benchmarks/lm_vs_scipy.py [--repeats 3] [--problems rosenbrock,meyer]

Writes benchmarks/lm_vs_scipy.json and .md, and the table into
docs/readme/robust.md between its markers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import scipy
import scipy.optimize
import torch

import torchsven
from torchsven.problems import PROBLEMS, Problem

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-15
REL = 1e-8
ABS_FLOOR = 1e-24
MAX_STEPS = 2000


def run_sven(problem: Problem) -> dict:
    x = problem.start()
    opt = torchsven.Sven([x], damping="adaptive")
    upper = opt.options["damping"].upper
    steps, reason = 0, "max steps"
    while steps < MAX_STEPS:
        before = x.detach().clone()
        opt.step(lambda: problem.residuals(x))
        steps += 1
        info = opt.last_step
        e = info.extras
        moved = float((x.detach() - before).norm())
        if info.loss == 0.0:
            reason = "zero cost"
            break
        if math.isnan(e["gain_ratio"]):
            reason = "no-op step"
            break
        if e["predicted_reduction"] <= TOL * info.loss and abs(e["actual_reduction"]) <= (
            TOL * info.loss
        ):
            reason = "ftol"
            break
        if e["accepted"] and moved <= TOL * (float(x.detach().norm()) + TOL):
            reason = "xtol"
            break
        if e["damping_factor_after"] >= upper:
            reason = "damping at upper bound"
            break
    cost = 0.5 * float(problem.residuals(x.detach()).square().sum())
    counts = opt.state_dict()["sven"]["robust"]["counts"]
    return {
        "cost": cost,
        "steps": steps,
        "closure_calls": counts["closure_calls"],
        "rejected": counts["rejected"],
        "stop": reason,
    }


def run_scipy(problem: Problem) -> dict:
    def fun(v):
        return problem.residuals(torch.from_numpy(v)).numpy()

    def jac(v):
        return torch.autograd.functional.jacobian(problem.residuals, torch.from_numpy(v)).numpy()

    res = scipy.optimize.least_squares(
        fun,
        np.array(problem.x0, dtype=np.float64),
        jac=jac,
        method="lm",
        ftol=TOL,
        xtol=TOL,
        gtol=TOL,
        max_nfev=20000,
    )
    cost = 0.5 * float(np.sum(fun(res.x) ** 2))
    return {"cost": cost, "nfev": int(res.nfev), "njev": int(res.njev), "status": int(res.status)}


def _timed(fn, problem: Problem, repeats: int) -> tuple[dict, float]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(problem)
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def _ok(cost: float, reference: float) -> bool:
    return cost <= (1 + REL) * reference + ABS_FLOOR


def _published(cost: float, published: float | None) -> bool:
    return published is not None and cost <= published * (1 + 1e-5) + 1e-20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--problems", default="")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--render", action="store_true", help="only redo the tables from the JSON")
    args = parser.parse_args()
    if args.render:
        data = json.loads((ROOT / "benchmarks" / "lm_vs_scipy.json").read_text())
        for row in data["rows"]:
            for key in ("sven", "scipy"):
                row[key]["published"] = _published(row[key]["cost"], row["published_cost"])
        _write(data["rows"], data["meta"])
        return
    torch.set_num_threads(1)  # tiny matrices: threads only add contention (MINPACK is serial)
    names = [n for n in args.problems.split(",") if n] or list(PROBLEMS)
    rows = []
    for name in names:
        problem = PROBLEMS[name]
        sven, sven_s = _timed(run_sven, problem, args.repeats)
        ref, ref_s = _timed(run_scipy, problem, args.repeats)
        published = None if problem.fmin is None else 0.5 * problem.fmin
        row = {
            "number": problem.number,
            "problem": name,
            "n": problem.n,
            "m": problem.m,
            "published_cost": published,
            "sven": {**sven, "seconds": sven_s, "published": _published(sven["cost"], published)},
            "scipy": {**ref, "seconds": ref_s, "published": _published(ref["cost"], published)},
            "matches_scipy": _ok(sven["cost"], ref["cost"]),
        }
        rows.append(row)
        print(
            f"{problem.number:2d} {name:27s} sven {sven['cost']:.10e} "
            f"({sven['closure_calls']} calls, {sven_s * 1e3:.1f} ms, {sven['stop']})  "
            f"scipy {ref['cost']:.10e} "
            f"({ref['nfev']}+{ref['njev']}, {ref_s * 1e3:.1f} ms)  match={row['matches_scipy']}",
            flush=True,
        )
    meta = {
        "command": f"python benchmarks/lm_vs_scipy.py --repeats {args.repeats}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"{platform.processor() or 'cpu'}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "scipy": scipy.__version__,
        "torchsven": torchsven.__version__,
        "criterion": f"cost_sven <= (1 + {REL}) cost_scipy + {ABS_FLOOR}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    }
    print(_markdown(rows, meta))
    if not (args.no_write or args.problems):
        _write(rows, meta)


def _write(rows: list[dict], meta: dict) -> None:
    table = _markdown(rows, meta)
    (ROOT / "benchmarks" / "lm_vs_scipy.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n"
    )
    (ROOT / "benchmarks" / "lm_vs_scipy.md").write_text(table)
    doc = ROOT / "docs" / "readme" / "robust.md"
    text = doc.read_text()
    start, end = "<!-- lm-table:start -->", "<!-- lm-table:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        doc.write_text(f"{head}{start}\n{table}{end}{tail}")


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "| # | problem | n | m | published | Sven cost | scipy LM cost | match | "
        "Sven calls (steps) | scipy nfev + njev | Sven ms | scipy ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, c = r["sven"], r["scipy"]
        mark = "yes" if r["matches_scipy"] else "**no**"
        lines.append(
            f"| {r['number']} | {r['problem']} | {r['n']} | {r['m']} | "
            f"{_fmt(r['published_cost'])} | {s['cost']:.6e} | "
            f"{c['cost']:.6e} | {mark} | {s['closure_calls']} ({s['steps']}) | "
            f"{c['nfev']} + {c['njev']} | {s['seconds'] * 1e3:.1f} | {c['seconds'] * 1e3:.1f} |"
        )
    matched = sum(r["matches_scipy"] for r in rows)
    sven_pub = sum(r["sven"]["published"] for r in rows)
    scipy_pub = sum(r["scipy"]["published"] for r in rows)
    ratio = statistics.median(r["sven"]["seconds"] / r["scipy"]["seconds"] for r in rows)
    lines += [
        "",
        f"Sven matches scipy's cost (`{meta['criterion']}`) on **{matched} of {len(rows)}** "
        f"problems. Published minimum (to its 6 printed digits) reached: Sven {sven_pub}, "
        f"scipy {scipy_pub} of {len(rows)}; the others are the same other local minimum for "
        f"both methods. Median wall-time ratio Sven / scipy: {ratio:.1f}x.",
        f"Measured with `{meta['command']}` on {meta['machine']} (2-core CPU, load average "
        f"{meta.get('load', 'not recorded')} at the end), {meta.get('date', 'date not recorded')}"
        f", torch {meta['torch']}, scipy {meta['scipy']}.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


if __name__ == "__main__":
    main()
