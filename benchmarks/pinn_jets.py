"""PINNs on the factored backend through forward-Laplacian jets (issue 15 goals).

Measures, in one process (float64, one thread unless OMP_NUM_THREADS says otherwise):

* exactness: jet rows against the natural nested-autograd rows (max relative
  error per problem); one factored Sven direction against the dense float64
  reference (autograd Jacobian row by row, full SVD, the same damped filter);
* step cost on heat 1+1D (540 rows): Sven factored (adaptive damping, trial
  included) against an Adam step on the same jet rows and on the natural
  autograd rows, and against Sven on the natural rows (generic backend),
  interleaved repeats, medians;
* convergence: heat 1+1D and Poisson 2D for 200 Sven steps, Poisson 5D until
  its goal or ``--steps-5d``, relative L2 and wall time along the way.

Writes ``<out>/pinn_jets.json`` and ``<out>/pinn_jets.md``; prints the table.

    OMP_NUM_THREADS=1 python benchmarks/pinn_jets.py --out benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

import torchsven
from torchsven.pde import BoxSampler, heat_1d, poisson_2d, poisson_5d
from torchsven.solve import SpectralFilter

F64 = torch.float64


def dense_jacobian(rows_fn: Callable[[], Tensor], params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(J (N, P), r (N,)) float64 by one plain backward per row (the slow twin)."""
    rows = rows_fn().reshape(-1)
    jac = torch.zeros(rows.numel(), sum(p.numel() for p in params), dtype=F64)
    for i in range(rows.numel()):
        grads = torch.autograd.grad(rows[i], params, retain_graph=True, allow_unused=True)
        jac[i] = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1).to(F64)
                for g, p in zip(grads, params, strict=True)
            ]
        )
    return jac, rows.detach().to(F64)


def reference_direction(jac: Tensor, rows: Tensor, damping: float, floor: int | None) -> Tensor:
    """``V diag(s / (s^2 + mu)) U^T r`` by a full float64 SVD, rtol 0.

    ``floor``: drop ``s <= sqrt(floor eps) s_1`` as an eigh of a (floor x floor) Gram
    matrix must (the factored routes' documented floor); None: keep everything.
    """
    u, s, vh = torch.linalg.svd(jac, full_matrices=False)
    phi = s / (s * s + damping)
    if floor is not None:
        phi = torch.where(s > (floor * torch.finfo(F64).eps) ** 0.5 * s[0], phi, 0.0)
    return vh.T @ (phi * (u.T @ rows))


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def problems() -> dict[str, tuple[object, tuple[Tensor, ...]]]:
    heat = heat_1d()
    p2, p5 = poisson_2d(), poisson_5d()
    return {
        "heat-1d": (heat, heat.sample(400, 60, 80, seed=0)),
        "poisson-2d": (p2, BoxSampler(2, 800, 120, seed=0).sample(0)),
        "poisson-5d": (p5, BoxSampler(5, 1000, 500, seed=0).sample(0)),
    }


# ------------------------------------------------------------------ exactness
def exactness(cases: dict) -> dict:
    out = {}
    for name, (problem, pts) in cases.items():
        model = problem.make_model(seed=1)
        jet_rows = problem.rows(model, *pts).detach()
        natural = problem.rows_autograd(model, *pts).detach()
        entry = {
            "rows_max_rel_err": float((jet_rows - natural).abs().max() / natural.abs().max()),
            "rows_rel_err": rel(jet_rows, natural),
        }
        if name != "poisson-5d":  # the dense twin needs N backward passes
            params = list(model.parameters())
            jac, rows = dense_jacobian(lambda m=model, q=problem, x=pts: q.rows(m, *x), params)
            s_max = float(torch.linalg.svdvals(jac)[0])
            lam = 1e-3
            backend = torchsven.backends.FactoredBackend(model)
            with backend.capture(params) as rec:
                out_rows = problem.rows(model, *pts)
            direction = backend.direction(
                out_rows, params, SpectralFilter(rtol=0.0, relative_damping=lam), rec, out_rows
            )
            got = torch.cat([d.reshape(-1) for d in direction.step])
            solver = direction.solution.solver
            floor = {"gram": rows.numel(), "normal": jac.shape[1]}.get(solver)
            expected = reference_direction(jac, rows, lam * s_max**2, floor)
            unfloored = reference_direction(jac, rows, lam * s_max**2, None)
            entry.update(
                factored_vs_dense_rel_err=rel(got, expected),
                factored_vs_unfloored_dense_rel_err=rel(got, unfloored),
                solver=solver,
                rows=rows.numel(),
                params=jac.shape[1],
                damping_factor=lam,
            )
        out[name] = entry
        print(name, entry, flush=True)
    return out


# ------------------------------------------------------------------ step cost
def step_costs(problem, pts, repeats: int, generic_repeats: int) -> dict:
    """Median seconds per step of each method on the same heat rows (interleaved)."""
    models = {k: problem.make_model(seed=0) for k in ("sven", "adam-jets", "adam-natural")}
    sven = torchsven.Sven(models["sven"], damping="adaptive", backend="factored")
    adams = {
        k: torch.optim.Adam(models[k].parameters(), lr=1e-3) for k in ("adam-jets", "adam-natural")
    }

    def sven_step() -> None:
        sven.step(lambda: problem.rows(models["sven"], *pts))

    def adam_step(key: str, rows_fn) -> Callable[[], None]:
        def run() -> None:
            opt = adams[key]
            opt.zero_grad(set_to_none=True)
            loss = 0.5 * rows_fn(models[key], *pts).square().sum()
            loss.backward()
            opt.step()

        return run

    steps = {
        "sven_factored": sven_step,
        "adam_jet_rows": adam_step("adam-jets", problem.rows),
        "adam_natural_rows": adam_step("adam-natural", problem.rows_autograd),
    }
    for fn in steps.values():  # warm-up (the factored probe runs on the first step)
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for key, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    generic_model = problem.make_model(seed=0)
    generic = torchsven.Sven(generic_model, damping="adaptive", backend="generic")
    generic_times = []
    for _ in range(generic_repeats):
        start = time.perf_counter()
        generic.step(lambda: problem.rows_autograd(generic_model, *pts))
        generic_times.append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["sven_generic_natural_rows"] = statistics.median(generic_times)
    return {
        "median_s": med,
        "ratio_sven_to_adam_jet_rows": med["sven_factored"] / med["adam_jet_rows"],
        "ratio_sven_to_adam_natural_rows": med["sven_factored"] / med["adam_natural_rows"],
        "speedup_over_generic_natural": med["sven_generic_natural_rows"] / med["sven_factored"],
        "repeats": repeats,
        "load_average": os.getloadavg(),
    }


def eigh_seconds(n: int, repeats: int = 5) -> float:
    a = torch.randn(n, n, dtype=F64)
    k = a @ a.T
    torch.linalg.eigh(k)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.linalg.eigh(k)
    return (time.perf_counter() - start) / repeats


# ---------------------------------------------------------------- convergence
def converge(problem, pts, steps: int, goal: float, every: int, stop_at_goal: bool) -> dict:
    model = problem.make_model(seed=0)
    opt = torchsven.Sven(model, damping="adaptive", backend="factored")
    curve: dict[str, list] = {"step": [], "time": [], "rel_l2": [], "loss": []}
    elapsed, reached = 0.0, None
    backends = set()
    for step in range(1, steps + 1):
        start = time.perf_counter()
        opt.step(lambda: problem.rows(model, *pts))
        elapsed += time.perf_counter() - start
        backends.add(opt.last_step.backend)
        check = step % every == 0 or step == steps
        if check or stop_at_goal:
            err = problem.relative_l2(model)
            if check:
                for k, v in (("step", step), ("time", elapsed), ("rel_l2", err)):
                    curve[k].append(v)
                curve["loss"].append(opt.last_step.loss)
            if reached is None and err <= goal:
                reached = {"step": step, "time_s": elapsed, "rel_l2": err}
                if stop_at_goal:
                    for k, v in (("step", step), ("time", elapsed), ("rel_l2", err)):
                        curve[k].append(v)
                    curve["loss"].append(opt.last_step.loss)
                    break
    return {
        "goal": goal,
        "final_rel_l2": curve["rel_l2"][-1],
        "steps": curve["step"][-1],
        "wall_s": elapsed,
        "reached_goal": reached,
        "backends": sorted(backends),
        "load_average_end": os.getloadavg(),
        "curve": curve,
    }


def markdown(doc: dict) -> str:
    lines = [
        "# PINNs through forward-Laplacian jets on the factored backend",
        "",
        f"Machine: {doc['machine']}, torch {doc['torch']}, threads {doc['threads']}; "
        f"load average at start {tuple(round(x, 1) for x in doc['load_average_start'])}.",
        "",
        "## Exactness (float64)",
        "",
        "| problem | jet rows vs autograd rows (max rel) | factored step vs dense SVD reference "
        "(same floor) | without the floor | route |",
        "|---|---|---|---|---|",
    ]
    for name, e in doc["exactness"].items():
        fact = e.get("factored_vs_dense_rel_err")
        raw = e.get("factored_vs_unfloored_dense_rel_err")
        lines.append(
            f"| {name} | {e['rows_max_rel_err']:.1e} | "
            f"{'-' if fact is None else f'{fact:.1e}'} | "
            f"{'-' if raw is None else f'{raw:.1e}'} | "
            f"{e.get('solver', '-')} ({e.get('rows', '-')} rows, {e.get('params', '-')} params) |"
        )
    c = doc["step_cost"]
    m = c["median_s"]
    lines += [
        "",
        "Damped filter s / (s^2 + 1e-3 s_1^2), no cut (as damping='adaptive' early on). The "
        "Gram/normal routes drop s <= sqrt(n eps) s_1 (what an eigh of an n x n Gram matrix "
        "resolves); the SVD route has no floor.",
        "",
        f"## Step cost, heat 1+1D (540 rows), medians of {c['repeats']} interleaved steps",
        "",
        "| method | ms / step |",
        "|---|---|",
        f"| Sven, factored backend, jet rows (adaptive damping, trial included) | "
        f"{1e3 * m['sven_factored']:.1f} |",
        f"| Adam, jet rows | {1e3 * m['adam_jet_rows']:.2f} |",
        f"| Adam, natural autograd rows | {1e3 * m['adam_natural_rows']:.2f} |",
        f"| Sven, generic backend, natural autograd rows | "
        f"{1e3 * m['sven_generic_natural_rows']:.0f} |",
        f"| (a bare float64 eigh of 540 x 540) | {1e3 * doc['eigh_540_s']:.1f} |",
        "",
        f"Sven factored / Adam on jet rows: **{c['ratio_sven_to_adam_jet_rows']:.1f}x**; "
        f"/ Adam on natural rows: {c['ratio_sven_to_adam_natural_rows']:.1f}x; "
        f"generic natural / factored jets: {c['speedup_over_generic_natural']:.1f}x. "
        f"Load average during the timing: "
        f"{tuple(round(x, 1) for x in c['load_average'])}.",
        "",
        "## Convergence (Sven, damping='adaptive', factored backend, seed 0)",
        "",
        "| problem | goal | relative L2 | steps | wall time | goal reached at |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in doc["convergence"].items():
        hit = r["reached_goal"]
        reached = "no" if hit is None else f"step {hit['step']} ({hit['time_s']:.1f} s)"
        lines.append(
            f"| {name} | {r['goal']:g} | {r['final_rel_l2']:.2e} | {r['steps']} | "
            f"{r['wall_s']:.1f} s | {reached} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--generic-repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--steps-5d", type=int, default=300)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    doc: dict = {
        "machine": f"{platform.platform()} {platform.processor()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
    }
    cases = problems()
    if "exactness" not in args.skip:
        doc["exactness"] = exactness(cases)
    heat, heat_pts = cases["heat-1d"]
    if "cost" not in args.skip:
        doc["step_cost"] = step_costs(heat, heat_pts, args.repeats, args.generic_repeats)
        doc["eigh_540_s"] = eigh_seconds(540)
        print(doc["step_cost"], flush=True)
    if "convergence" not in args.skip:
        doc["convergence"] = {}
        plan = [
            ("heat-1d", args.steps, 1e-5, False),
            ("poisson-2d", args.steps, 1e-6, False),
            ("poisson-5d", args.steps_5d, 1e-4, True),
        ]
        for name, steps, goal, stop in plan:
            problem, pts = cases[name]
            result = converge(problem, pts, steps, goal, args.every, stop)
            doc["convergence"][name] = result
            print(name, {k: v for k, v in result.items() if k != "curve"}, flush=True)
    doc["load_average_end"] = os.getloadavg()
    with open(os.path.join(args.out, "pinn_jets.json"), "w") as f:
        json.dump(doc, f, indent=1)
    if {"exactness", "step_cost", "convergence"} <= doc.keys():
        text = markdown(doc)
        with open(os.path.join(args.out, "pinn_jets.md"), "w") as f:
            f.write(text)
        print(text)


if __name__ == "__main__":
    main()
