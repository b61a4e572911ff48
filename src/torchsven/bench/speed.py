"""``torchsven bench speed``: time and memory of one step, Sven against SGD.

For each case (model, batch of N rows) it measures one optimizer step of

* ``sgd``: forward, backward of the mean loss, ``torch.optim.SGD.step``;
* ``factored``: Sven with the factored Gram backend (``verify="auto"``);
* ``factored-verify``: the same with the coupling probe on every step;
* ``generic``: Sven with the materialised Jacobian (cheapest decomposition);
* ``svd``: materialise-and-SVD, the authors' first algorithm (full thin SVD of J);
* ``eigh``: a bare float64 ``eigh`` of an N x N matrix (a floor for any Gram method).

Times are medians over ``--steps`` steps after one warm-up step, interleaved
method by method within each repetition so that machine load hits all methods
alike; the parameters are reset (untimed) before every step, so every step
does the same work. A materialising method whose first step takes longer than
``--slow-seconds`` is timed by that one step instead (``single_step`` in the
JSON) and gets no memory run, so the benchmark stays within minutes. Peak
memory is measured in a fresh process per method: the peak resident set size
over two steps (after a warm-up step) minus the resident size before them.
Methods that materialise J run only where J takes at most
``--max-jacobian-gb`` (float64) and are marked skipped otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CASES", "main"]

METHODS = ("sgd", "factored", "factored-verify", "generic", "svd")
MATERIALISING = ("generic", "svd")


class _TinyTransformer(nn.Module):
    """Embedding + one pre-norm block (attention, MLP) + mean pool + Linear head."""

    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 2, seq: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, 1)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.embed(idx) + self.pos
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(dim=1))


@dataclass(frozen=True)
class SpeedCase:
    """A model and one batch; ``rows()`` are Sven's rows, ``loss()`` SGD's scalar."""

    name: str
    rows_n: int
    build: Callable[[int], tuple[nn.Module, Tensor, Tensor, str]]


def _mlp(d_in: int, width: int, depth: int, d_out: int):
    def build(n: int):
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.Tanh()]
            d = width
        layers.append(nn.Linear(d, d_out))
        x = torch.randn(n, d_in)
        if d_out == 1:
            return nn.Sequential(*layers), x, torch.randn(n, 1), "regression"
        return nn.Sequential(*layers), x, torch.randint(0, d_out, (n,)), "classification"

    return build


def _cnn(n: int):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    return model, torch.randn(n, 1, 16, 16), torch.randint(0, 10, (n,)), "classification"


def _transformer(n: int):
    torch.manual_seed(0)
    return _TinyTransformer(), torch.randint(0, 64, (n, 16)), torch.randn(n, 1), "regression"


def _cases() -> dict[str, SpeedCase]:
    out = {}
    for width in (64, 256, 1024):
        for n in (128, 512):
            name = f"mlp-w{width}-n{n}"
            out[name] = SpeedCase(name, n, _mlp(32, width, 3, 1))
    out["mlp-authors-n128"] = SpeedCase("mlp-authors-n128", 128, _mlp(64, 384, 8, 10))
    out["cnn-n128"] = SpeedCase("cnn-n128", 128, _cnn)
    out["transformer-n128"] = SpeedCase("transformer-n128", 128, _transformer)
    return out


#: name -> case (the default benchmark runs them all).
CASES = _cases()
#: A seconds-long subset for smoke tests.
QUICK = ("mlp-w64-n128", "cnn-n128", "transformer-n128")


def _rows_and_loss(model: nn.Module, x: Tensor, y: Tensor, task: str):
    def rows() -> Tensor:
        out = model(x)
        if task == "regression":
            return out - y
        # per-sample cross-entropy as rows (kappa = 1 on losses: r = sqrt(l))
        from ..residuals import from_losses

        return from_losses(F.cross_entropy(out, y, reduction="none"), kappa=1.0)

    def loss() -> Tensor:
        out = model(x)
        if task == "regression":
            return 0.5 * (out - y).square().mean()
        return F.cross_entropy(out, y)

    return rows, loss


def _stepper(method: str, model: nn.Module, rows, loss) -> Callable[[], None]:
    import torchsven

    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def sgd_step() -> None:
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()

        return sgd_step
    kwargs: dict[str, Any] = {"lr": 0.1}
    if method == "factored":
        kwargs["backend"] = "factored"
    elif method == "factored-verify":
        kwargs.update(backend="factored", verify="always")
    elif method == "generic":
        kwargs["backend"] = "generic"
    elif method == "svd":
        kwargs.update(backend="generic", solver="svd")
    else:
        raise ValueError(f"unknown method {method!r}")
    sven = torchsven.Sven(model, **kwargs)

    def sven_step() -> None:
        sven.step(rows)
        if method.startswith("factored") and sven.last_step.backend != "factored":
            raise RuntimeError(f"{method} fell back to {sven.last_step.backend}")

    return sven_step


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _jacobian_gb(case: SpeedCase, model: nn.Module, n_rows: int) -> float:
    return n_rows * _n_params(model) * 8 / 1e9


def _n_rows(model: nn.Module, rows) -> int:
    with torch.no_grad():
        return rows().numel()


def _reset(model: nn.Module, state: dict[str, Tensor]) -> None:
    model.load_state_dict(state)


def _time_case(case: SpeedCase, steps: int, max_gb: float, slow_s: float) -> dict[str, Any]:
    """Paired medians of every method's step time (ms) on one case."""
    model, x, y, task = case.build(case.rows_n)
    rows, loss = _rows_and_loss(model, x, y, task)
    n_rows = _n_rows(model, rows)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    jac_gb = _jacobian_gb(case, model, n_rows)
    methods = [m for m in METHODS if m not in MATERIALISING or jac_gb <= max_gb]
    steppers = {}
    single: dict[str, float] = {}
    for m in methods:
        _reset(model, state)
        steppers[m] = _stepper(m, model, rows, loss)
        t0 = time.perf_counter()
        steppers[m]()  # warm-up (first factored step also runs the coupling probe)
        warm = time.perf_counter() - t0
        if m in MATERIALISING and warm > slow_s:
            single[m] = warm  # too slow to repeat: the warm-up step is the measurement
    repeated = [m for m in methods if m not in single]
    times: dict[str, list[float]] = {m: [] for m in repeated}
    eigh_times = []
    sym = torch.randn(n_rows, n_rows, dtype=torch.float64)
    sym = sym @ sym.T
    torch.linalg.eigh(sym)
    for _ in range(steps):
        for m in repeated:
            _reset(model, state)
            t0 = time.perf_counter()
            steppers[m]()
            times[m].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.linalg.eigh(sym)
        eigh_times.append(time.perf_counter() - t0)
    result = {
        "case": case.name,
        "rows": n_rows,
        "params": _n_params(model),
        "jacobian_gb": round(jac_gb, 3),
        "time_ms": {
            m: 1e3 * (single[m] if m in single else statistics.median(times[m])) for m in methods
        },
        "single_step": sorted(single),
        "eigh_ms": 1e3 * statistics.median(eigh_times),
        "skipped": {
            m: f"J would take {jac_gb:.2f} GB (> {max_gb} GB)"
            for m in MATERIALISING
            if m not in methods
        },
    }
    return result


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_worker(case_name: str, method: str) -> dict[str, float]:
    """In a fresh process: peak RSS over the RSS before a step (MB), after a warm-up step.

    The warm-up step maps the libraries' code and allocates persistent state
    (SGD momentum); the kernel's peak-RSS mark (VmHWM) is then reset through
    ``/proc/self/clear_refs`` so the peak covers two steps only.
    """
    case = CASES[case_name]
    model, x, y, task = case.build(case.rows_n)
    rows, loss = _rows_and_loss(model, x, y, task)
    step = _stepper(method, model, rows, loss)
    step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kb("VmRSS")
    step()
    step()
    peak = _status_kb("VmHWM")
    return {"peak_mb": max(0.0, (peak - before) * 1024 / 1e6)}


def _memory(case_name: str, method: str, threads: int) -> float | None:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchsven.bench.speed",
            "--memory-worker",
            case_name,
            method,
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if proc.returncode != 0:
        return None
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])


def _ratios(r: dict[str, Any]) -> dict[str, float]:
    t = r["time_ms"]
    out = {"factored/sgd": t["factored"] / t["sgd"]}
    out["factored/(sgd+eigh)"] = t["factored"] / (t["sgd"] + r["eigh_ms"])
    out["factored-verify/factored"] = t["factored-verify"] / t["factored"]
    if "generic" in t:
        out["generic/factored"] = t["generic"] / t["factored"]
    if "svd" in t:
        out["svd/factored"] = t["svd"] / t["factored"]
    mem = r.get("peak_mb", {})
    if mem.get("factored") and mem.get("sgd"):
        out["memory factored/sgd"] = mem["factored"] / mem["sgd"]
    return out


def _table(results: list[dict[str, Any]]) -> str:
    head = (
        "| case | N | P | SGD ms | factored ms | generic ms | SVD ms | eigh ms | "
        "factored/SGD | factored/(SGD+eigh) | generic/factored | SVD/factored | "
        "probe every step | peak MB SGD / factored / generic / SVD |"
    )
    lines = [head, "|" + "---|" * 14]

    def fmt(v: float | None, digits: int = 1) -> str:
        return "skipped" if v is None else f"{v:.{digits}f}"

    def ratio(v: float | None) -> str:
        return "skipped" if v is None else f"{v:.1f}x"

    for r in results:
        t, q, mem = r["time_ms"], r["ratios"], r.get("peak_mb", {})

        def star(m: str, r: dict[str, Any] = r) -> str:
            return "*" if m in r.get("single_step", ()) else ""

        mems = " / ".join(
            fmt(mem.get(m), 0) if m in t else "skipped"
            for m in ("sgd", "factored", "generic", "svd")
        )
        lines.append(
            f"| {r['case']} | {r['rows']} | {r['params']:,} | {fmt(t['sgd'])} | "
            f"{fmt(t['factored'])} | {fmt(t.get('generic'))}{star('generic')} | "
            f"{fmt(t.get('svd'))}{star('svd')} | "
            f"{fmt(r['eigh_ms'])} | {q['factored/sgd']:.2f}x | {q['factored/(sgd+eigh)']:.2f}x | "
            f"{ratio(q.get('generic/factored'))} | {ratio(q.get('svd/factored'))} | "
            f"{q['factored-verify/factored']:.2f}x | {mems} |"
        )
    lines.append("")
    lines.append(
        "`*`: one step (slower than --slow-seconds), not a median; its memory not measured."
    )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Where the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchsven bench speed", description=__doc__.split("\n")[0])
    p.add_argument(
        "--cases", nargs="*", default=None, help=f"case names (default: all): {', '.join(CASES)}"
    )
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, 5 steps")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (>= 5)")
    p.add_argument("--max-jacobian-gb", type=float, default=1.0)
    p.add_argument(
        "--slow-seconds",
        type=float,
        default=5.0,
        help="a materialising method whose first step takes longer is timed by that one "
        "step (flagged in the JSON as single_step; no memory run)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the per-process memory runs")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: stable timings on a shared, loaded CPU)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks"), help="folder for speed.json and speed.md"
    )
    p.add_argument("--memory-worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the speed benchmark; returns the exit status."""
    args = _parser().parse_args(argv)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous)


def _run(args: argparse.Namespace) -> int:
    if args.memory_worker:
        print(json.dumps(_memory_worker(*args.memory_worker)))
        return 0
    names = list(QUICK) if args.quick else (args.cases or list(CASES))
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; choose from {list(CASES)}", file=sys.stderr)
        return 2
    if args.steps < 1:
        print("--steps must be >= 1", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    started = time.perf_counter()
    results = []
    for name in names:
        r = _time_case(CASES[name], args.steps, args.max_jacobian_gb, args.slow_seconds)
        if not args.no_memory:
            r["peak_mb"] = {
                m: None if m in r["single_step"] else _memory(name, m, threads)
                for m in r["time_ms"]
            }
        r["ratios"] = _ratios(r)
        results.append(r)
        print(
            f"{name}: "
            + ", ".join(f"{m} {t:.1f} ms" for m, t in r["time_ms"].items())
            + f", eigh {r['eigh_ms']:.1f} ms",
            flush=True,
        )
    report = {
        "machine": machine(),
        "steps": args.steps,
        "seconds": round(time.perf_counter() - started, 1),
        "method": __doc__,
        "results": results,
    }
    table = _table(results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "speed.md").write_text(
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"torch {report['machine']['torch']} ({threads} threads); medians of {args.steps} "
        f"steps; total {report['seconds']} s.\n\n{table}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
