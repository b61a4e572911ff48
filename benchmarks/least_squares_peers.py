"""torchsven.least_squares against torch-levenberg-marquardt and pypose's LM.

Each peer on its own documented example, run as documented; torchsven solves
the same least-squares problem from the same start with default arguments:

* torch-levenberg-marquardt 1.2.3, ``examples/sinc_curve_fitting.py``: an MLP
  1-20-1 (tanh, 61 parameters, float32) fits ``y = sinc(10 x)`` on 20000 points
  in [-1, 1]; ``LevenbergMarquardtModule(loss_fn=MSELoss(), learning_rate=1.0,
  attempts_per_step=10, solve_method='solve')`` with ``utils.fit`` for 50
  epochs of batches of 1000. torchsven fits all 20000 rows at once (the
  residual ``model(x) - y`` as a function of the flat parameter vector, through
  ``torch.func.functional_call``).
* pypose 0.9, the ``pp.optim.LM`` docstring example: pose inversion, a (2, 2)
  batch of se3 parameters, ``residual = (pose.Exp() @ input).Log()``,
  ``strategy.Adaptive(damping=1e-6)``, up to 10 steps, stopping once the loss is
  below 1e-5. torchsven: the same residual as a function of the se3 numbers.

Final loss: the example's own metric, computed the same way for both sides
(MSE over all 20000 points; sum of squared residuals for the poses). Wall time:
median of ``--repeats`` runs of the whole fit, after one untimed warm-up run
each. Same seed, same initial parameters on both sides. torchsven runs with
default arguments and a callback that stops it once its loss is at or below
the peer's final loss, or once it has used the peer's wall time (then the
table shows the loss it had reached by then).

Run in a scratch environment that has the peers (never a torchsven dependency):

    python -m venv /tmp/lmpeers
    /tmp/lmpeers/bin/pip install -c constraints.txt torch==2.13.0 \\
        torch-levenberg-marquardt==1.2.3 "pypose==0.9.*"
    PYTHONPATH=src /tmp/lmpeers/bin/python benchmarks/least_squares_peers.py

Writes benchmarks/least_squares_peers.json and .md, and the table into
docs/readme/least_squares.md between its markers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch

import torchsven

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ sinc (tlm)
def _sinc_data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(-1, 1, 20000, dtype=torch.float32).unsqueeze(1)
    return x, torch.sinc(10 * x)


def _sinc_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1))


def sinc_peer(seed: int) -> dict:
    import torch_levenberg_marquardt as tlm
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _sinc_data()
    model = _sinc_model(seed)
    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=1000, shuffle=True)
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        tlm.utils.fit(
            tlm.training.LevenbergMarquardtModule(
                model=model,
                loss_fn=tlm.loss.MSELoss(),
                learning_rate=1.0,
                attempts_per_step=10,
                solve_method="solve",
            ),
            loader,
            epochs=50,
        )
    seconds = time.perf_counter() - start
    with torch.no_grad():
        loss = float((model(x) - y).square().mean())
    return {"loss": loss, "seconds": seconds, "work": "50 epochs x 20 batches"}


def sinc_torchsven(seed: int, goal: float, budget: float) -> dict:
    x, y = _sinc_data()
    model = _sinc_model(seed)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    start = time.perf_counter()
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def residuals(theta: torch.Tensor) -> torch.Tensor:
        params = {
            n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes, strict=True)
        }
        return torch.func.functional_call(model, params, (x,)) - y

    def stop(intermediate_result: dict) -> bool:
        mse = 2 * intermediate_result["cost"] / y.numel()
        return mse <= goal or time.perf_counter() - start > budget

    res = torchsven.least_squares(residuals, x0, callback=stop)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        loss = float(residuals(res.x).square().mean())
    return {
        "loss": loss,
        "seconds": seconds,
        "work": f"nfev {res.nfev}, njev {res.njev}, status {res.status}",
    }


# ------------------------------------------------------------- poses (pypose)
def _pose_problem(seed: int):
    import pypose as pp

    torch.manual_seed(seed)
    pose0 = pp.randn_se3(2, 2)
    target = pp.randn_SE3(2, 2)
    return pose0, target


def pose_peer(seed: int) -> dict:
    import pypose as pp
    from torch import nn

    pose0, target = _pose_problem(seed)

    class PoseInv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pose = pp.Parameter(pose0.clone())

        def forward(self, input):
            return (self.pose.Exp() @ input).Log()

    model = PoseInv()
    start = time.perf_counter()
    optimizer = pp.optim.LM(model, strategy=pp.optim.strategy.Adaptive(damping=1e-6))
    steps = 0
    for _ in range(10):
        loss = optimizer.step(target)
        steps += 1
        if loss < 1e-5:
            break
    seconds = time.perf_counter() - start
    with torch.no_grad():
        final = float(model(target).tensor().square().sum())
    return {"loss": final, "seconds": seconds, "work": f"{steps} steps"}


def pose_torchsven(seed: int, goal: float, budget: float) -> dict:
    import pypose as pp

    pose0, target = _pose_problem(seed)

    def residuals(x: torch.Tensor) -> torch.Tensor:
        return (pp.se3(x).Exp() @ target).Log().tensor()

    start = time.perf_counter()

    def stop(intermediate_result: dict) -> bool:
        loss = 2 * intermediate_result["cost"]
        return loss <= goal or time.perf_counter() - start > budget

    res = torchsven.least_squares(residuals, pose0.tensor(), callback=stop)
    seconds = time.perf_counter() - start
    final = float(residuals(res.x).square().sum())
    return {
        "loss": final,
        "seconds": seconds,
        "work": f"nfev {res.nfev}, njev {res.njev}, status {res.status}",
    }


# --------------------------------------------------------------------- driver
def _median_run(fn: Callable[..., dict], repeats: int, *args: object) -> dict:
    fn(*args)  # warm-up (imports, first-call costs)
    runs = [fn(*args) for _ in range(repeats)]
    out = dict(runs[-1])
    out["seconds"] = statistics.median(r["seconds"] for r in runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for example, peer_name, peer, ours in (
        ("sinc MLP fit (tlm example)", "torch-levenberg-marquardt", sinc_peer, sinc_torchsven),
        ("pose inversion (pypose LM docstring)", "pypose", pose_peer, pose_torchsven),
    ):
        p = _median_run(peer, args.repeats, args.seed)
        o = _median_run(ours, args.repeats, args.seed, p["loss"], p["seconds"])
        rows.append({"example": example, "peer": peer_name, "peer_run": p, "torchsven": o})
        print(example, p, o, flush=True)
    meta = {
        "command": "PYTHONPATH=src python benchmarks/least_squares_peers.py "
        f"--repeats {args.repeats}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 torch thread",
        "load": os.getloadavg(),
        "torch": torch.__version__,
        "torch-levenberg-marquardt": version("torch-levenberg-marquardt"),
        "pypose": version("pypose"),
    }
    table = _markdown(rows, meta)
    print(table)
    (ROOT / "benchmarks" / "least_squares_peers.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n"
    )
    (ROOT / "benchmarks" / "least_squares_peers.md").write_text(table)
    doc = ROOT / "docs" / "readme" / "least_squares.md"
    start, end = "<!-- lsq-peers:start -->", "<!-- lsq-peers:end -->"
    head, rest = doc.read_text().split(start, 1)
    doc.write_text(f"{head}{start}\n{table}{end}{rest.split(end, 1)[1]}")


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "| example | peer | peer final loss | peer s | peer work | torchsven final loss | "
        "torchsven s | torchsven work | time ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, o = r["peer_run"], r["torchsven"]
        lines.append(
            f"| {r['example']} | {r['peer']} | {p['loss']:.3e} | {p['seconds']:.3f} | "
            f"{p['work']} | {o['loss']:.3e} | {o['seconds']:.3f} | {o['work']} | "
            f"{o['seconds'] / p['seconds']:.2f} |"
        )
    lines += [
        "",
        f"Measured with `{meta['command']}` on {meta['machine']}, load {meta['load'][0]:.1f}, "
        f"torch {meta['torch']}, torch-levenberg-marquardt "
        f"{meta['torch-levenberg-marquardt']}, pypose {meta['pypose']}. Time ratio: "
        "torchsven / peer (median wall time of the whole fit).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
