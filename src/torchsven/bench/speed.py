"""``torchsven bench speed``: time and memory of one step, Sven against SGD.

For each case (model, batch of N rows) it measures one optimizer step of

* ``sgd``: forward, backward of the mean loss, ``torch.optim.SGD.step``;
* ``adam``: the same with ``torch.optim.Adam``;
* ``factored``: Sven with the factored Gram backend (``verify="auto"``);
* ``factored-verify``: the same with the coupling probe on every step;
* ``generic``: Sven with the materialised Jacobian (cheapest decomposition);
* ``svd``: materialise-and-SVD, the authors' first algorithm (full thin SVD of J);
* ``eigh``: a bare float64 ``eigh`` of an N x N matrix (a floor for any Gram method);
* ``authors``: the authors' Gram path (``GramSvenWrapper`` + ``SvenGram`` of
  sambt/sven, same rows, rtol 1e-3, k = N) on the MLP cases, only when their
  package is importable (it is not a dependency; see
  ``benchmarks/authors_gram_compare.py``).

Times are medians over ``--steps`` steps after one warm-up step, interleaved
method by method within each repetition so that machine load hits all methods
alike; the parameters are reset (untimed) before every step, so every step
does the same work. A materialising method whose first step takes longer than
``--slow-seconds`` is timed by that one step instead (``single_step`` in the
JSON) and gets no memory run, so the benchmark stays within minutes. Peak
memory is measured in a fresh process per method: one step on a 2-row batch
loads the libraries' code, then the peak resident set size over the first two
steps of a new optimizer on the case's batch minus the resident size before
them (so persistent state such as SGD's momentum counts, library code does not).
Methods that materialise J run only where J takes at most
``--max-jacobian-gb`` (float64) and are marked skipped otherwise.
"""

from __future__ import annotations

import argparse
import copy
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

METHODS = ("sgd", "adam", "factored", "factored-verify", "generic", "svd")
MATERIALISING = ("generic", "svd")
#: Timed only where available (their package importable, an MLP case).
OPTIONAL = ("authors",)


class _EncoderRegressor(nn.Module):
    """``nn.TransformerEncoderLayer`` (batch-first, no dropout), mean over tokens, Linear."""

    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(d, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).mean(dim=1))


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
    """A model and one batch; ``rows()`` are Sven's rows, ``loss()`` SGD's scalar.

    ``authors``: the authors' Gram path can run it (a plain MLP).
    """

    name: str
    rows_n: int
    build: Callable[[int], tuple[nn.Module, Tensor, Tensor, str]]
    authors: bool = False


def _mlp(
    d_in: int, width: int, depth: int, d_out: int, act: type[nn.Module] = nn.Tanh, grid=False
):
    def build(n: int):
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), act()]
            d = width
        layers.append(nn.Linear(d, d_out))
        x = torch.linspace(-1, 1, n).unsqueeze(1) if grid else torch.randn(n, d_in)
        if grid:
            return nn.Sequential(*layers), x, torch.sin(3 * x), "regression"
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


def _encoder(n: int):
    torch.manual_seed(0)
    return _EncoderRegressor(), torch.randn(n, 16, 64), torch.randn(n, 1), "regression"


def _cases() -> dict[str, SpeedCase]:
    out = {}
    for width in (64, 256, 1024):
        for n in (128, 512):
            name = f"mlp-w{width}-n{n}"
            out[name] = SpeedCase(name, n, _mlp(32, width, 3, 1))
    # the authors' cases (docs/design.md, "Speed"): a, b, c
    out["authors-a"] = SpeedCase("authors-a", 128, _mlp(64, 384, 8, 10, nn.ReLU), authors=True)
    out["authors-b"] = SpeedCase("authors-b", 512, _mlp(32, 256, 3, 1, nn.GELU), authors=True)
    out["authors-c"] = SpeedCase("authors-c", 512, _mlp(32, 1024, 3, 1, nn.GELU), authors=True)
    # the paper's own model: 1 -> 16 -> 16 -> 16 -> 1 (GELU), 32 points of sin(3x)
    out["paper-n32"] = SpeedCase("paper-n32", 32, _mlp(1, 16, 3, 1, nn.GELU, grid=True))
    out["cnn-n128"] = SpeedCase("cnn-n128", 128, _cnn)
    out["transformer-n128"] = SpeedCase("transformer-n128", 128, _transformer)
    out["encoder-n128"] = SpeedCase("encoder-n128", 128, _encoder)
    return out


#: name -> case (the default benchmark runs them all).
CASES = _cases()
#: A seconds-long subset for smoke tests.
QUICK = ("mlp-w64-n128", "cnn-n128", "transformer-n128")


def authors_available() -> bool:
    """Whether the authors' package (``sven.nn.GramSvenWrapper``) is importable."""
    try:
        from sven.nn import GramSvenWrapper  # noqa: F401
        from sven.opt import SvenGram  # noqa: F401
    except ImportError:
        return False
    return True


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


def _authors_stepper(model: nn.Module, x: Tensor, y: Tensor, task: str) -> Callable[[], None]:
    """One step of the authors' Gram path on the same rows as Sven's (see ``_rows_and_loss``)."""
    from sven.nn import GramSvenWrapper
    from sven.opt import SvenGram

    if task == "regression":
        wrapper = GramSvenWrapper(
            model,
            lambda pred, t: (pred - t).square().reshape(-1),
            "cpu",
            kappa=1.0,
            residual_fn=lambda pred, t: (pred - t).reshape(-1),
        )
    else:  # rows sqrt(l): kappa = 1 on the per-sample losses
        wrapper = GramSvenWrapper(
            model, lambda pred, t: F.cross_entropy(pred, t, reduction="none"), "cpu", kappa=1.0
        )
    opt = SvenGram(wrapper, lr=0.1, k=x.shape[0], rtol=1e-3)

    def authors_step() -> None:
        wrapper.loss_and_grad((x, y))
        opt.step()

    return authors_step


def _stepper(method: str, model: nn.Module, rows, loss) -> Callable[[], None]:
    import torchsven

    if method in ("sgd", "adam"):
        opt: torch.optim.Optimizer = (
            torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            if method == "sgd"
            else torch.optim.Adam(model.parameters(), lr=1e-3)
        )

        def first_order_step() -> None:
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()

        return first_order_step
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
    if case.authors and authors_available():
        methods.append("authors")
    # the authors' wrapper rebinds its model's parameters: it gets its own copy
    models = {m: copy.deepcopy(model) if m == "authors" else model for m in methods}
    steppers = {}
    single: dict[str, float] = {}
    for m in methods:
        _reset(models[m], state)
        steppers[m] = (
            _authors_stepper(models[m], x, y, task)
            if m == "authors"
            else _stepper(m, model, rows, loss)
        )
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
            _reset(models[m], state)
            t0 = time.perf_counter()
            steppers[m]()
            times[m].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.linalg.eigh(sym)
        eigh_times.append(time.perf_counter() - t0)
    result = {
        "case": case.name,
        "load_average": os.getloadavg()[0],
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
    """In a fresh process: peak RSS of a method's first two steps over the RSS before (MB).

    One step of the method on a 2-row batch first maps the libraries' code (not
    counted); then a new optimizer takes two steps on the case's batch (each from
    the case's start, as in the timing), and the
    kernel's peak-RSS mark (VmHWM, reset through ``/proc/self/clear_refs`` just
    before) minus the resident size before them is the method's memory: its
    persistent state (SGD's momentum) and its largest transient peak.
    """
    case = CASES[case_name]
    model, x, y, task = case.build(case.rows_n)
    tiny = copy.deepcopy(model)
    tiny_rows, tiny_loss = _rows_and_loss(tiny, x[:2], y[:2], task)
    try:  # only maps the code: a failure on two rows (a singular step) does not matter
        if method == "authors":
            _authors_stepper(tiny, x[:2], y[:2], task)()
        else:
            _stepper(method, tiny, tiny_rows, tiny_loss)()
    except Exception:
        pass
    del tiny, tiny_rows, tiny_loss
    rows, loss = _rows_and_loss(model, x, y, task)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kb("VmRSS")
    if method == "authors":
        step = _authors_stepper(model, x, y, task)
    else:
        step = _stepper(method, model, rows, loss)
    for _ in range(2):  # the same step twice, as in the timing (from the same start)
        _reset(model, state)
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
    out["factored/adam"] = t["factored"] / t["adam"]
    out["factored/(adam+eigh)"] = t["factored"] / (t["adam"] + r["eigh_ms"])
    out["factored-verify/factored"] = t["factored-verify"] / t["factored"]
    if "authors" in t:
        out["authors/factored"] = t["authors"] / t["factored"]
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
        "| case | N | P | load | SGD ms | Adam ms | factored ms | authors ms | generic ms | "
        "SVD ms | eigh ms | factored/SGD | factored/(SGD+eigh) | factored/(Adam+eigh) | "
        "authors/factored | generic/factored | SVD/factored | probe every step | "
        "peak MB SGD / factored / authors | memory factored/SGD |"
    )
    lines = [head, "|" + "---|" * 20]

    def fmt(v: float | None, digits: int = 1) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    def ratio(v: float | None, digits: int = 1) -> str:
        return "-" if v is None else f"{v:.{digits}f}x"

    for r in results:
        t, q, mem = r["time_ms"], r["ratios"], r.get("peak_mb", {})

        def star(m: str, r: dict[str, Any] = r) -> str:
            return "*" if m in r.get("single_step", ()) else ""

        mems = " / ".join(fmt(mem.get(m), 0) for m in ("sgd", "factored", "authors"))
        lines.append(
            f"| {r['case']} | {r['rows']} | {r['params']:,} | {r.get('load_average', 0):.1f} | "
            f"{fmt(t['sgd'])} | {fmt(t['adam'])} | {fmt(t['factored'])} | "
            f"{fmt(t.get('authors'))} | {fmt(t.get('generic'))}{star('generic')} | "
            f"{fmt(t.get('svd'))}{star('svd')} | {fmt(r['eigh_ms'])} | "
            f"{ratio(q['factored/sgd'], 2)} | {ratio(q['factored/(sgd+eigh)'], 2)} | "
            f"{ratio(q['factored/(adam+eigh)'], 2)} | {ratio(q.get('authors/factored'), 2)} | "
            f"{ratio(q.get('generic/factored'))} | {ratio(q.get('svd/factored'))} | "
            f"{ratio(q['factored-verify/factored'], 2)} | {mems} | "
            f"{ratio(q.get('memory factored/sgd'), 2)} |"
        )
    lines.append("")
    lines.append(
        "`*`: one step (slower than --slow-seconds), not a median; its memory not measured. "
        "`-`: not run (J over --max-jacobian-gb; the authors' package absent or not an MLP). "
        "load: the 1-minute load average when the case was timed."
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
