"""The training loop: one run (task, method, setting, seed) and a tuned suite.

A run trains from the task's seeded model on the task's seeded data, walks the
minibatches in the order a ``torch.Generator`` seeded with the run's seed gives
(the same for every method), evaluates train and validation metrics at epoch 0
and ``evals_per_epoch`` times per epoch, and times only the optimizer steps
(evaluation is outside the clock). A run whose objective turns NaN/Inf, blows
up by more than :data:`BLOWUP` over its first value, or whose step raises, is
recorded as diverged with the reason, never dropped.

A suite tunes every method on the first seed over its grid (best validation
metric wins; diverged settings lose) and runs the winner on the other seeds.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .methods import Method, Setting
from .tasks.base import Task, TaskData, to_device

__all__ = [
    "BLOWUP",
    "PeakMemory",
    "RunResult",
    "check_device",
    "run_one",
    "run_suite",
    "select_best",
]

#: An objective above ``BLOWUP`` times its first value counts as diverged.
BLOWUP = 1e6

#: ``callback(epoch_fraction, loss)`` for progress bars.
ProgressFn = Callable[[float, float], None]


def check_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)`` for the bench: ``cpu`` or ``cuda[:k]``, and it must exist.

    Raises ValueError naming ``device`` when the string is not a device, is another
    kind, or asks for CUDA where torch has none (no GPU, or a CPU-only build).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu' or 'cuda[:index]', got {device!r} ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:index]', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            )
            raise ValueError(
                f"device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                f"{build}, {torch.cuda.device_count()} GPU(s)); use device='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    return dev


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so host timers measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory during a block, above its start (MiB).

    CPU: the process's resident memory; Linux only: resets the kernel's
    high-water mark (``/proc/self/clear_refs``, value 5) and reads ``VmHWM``
    afterwards. Elsewhere ``mib`` stays None. CUDA: torch's peak allocated
    memory on the device above the allocation at the start.
    """

    method = "peak RSS above the run's start (VmHWM after resetting it via /proc/self/clear_refs)"
    cuda_method = (
        "peak CUDA memory allocated above the run's start (torch.cuda.max_memory_allocated)"
    )

    def __init__(self, device: torch.device | None = None) -> None:
        self.mib: float | None = None
        self._start: float | None = None
        self.device = device if device is not None else torch.device("cpu")

    @staticmethod
    def _status_kib(key: str) -> float | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return float(line.split()[1])
        except OSError:
            return None
        return None

    def __enter__(self) -> PeakMemory:
        # the young generations only: a full collection of the whole heap took ~1-2 s
        # per run under load, more than a curve-fitting run itself
        gc.collect(1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = float(torch.cuda.memory_allocated(self.device))
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._start = self._status_kib("VmRSS")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak_bytes = float(torch.cuda.max_memory_allocated(self.device))
            self.mib = max(0.0, peak_bytes - (self._start or 0.0)) / 2**20
            return
        peak = self._status_kib("VmHWM")
        if self._start is not None and peak is not None:
            self.mib = max(0.0, peak - self._start) / 1024.0


@dataclass
class RunResult:
    """Everything one run produced (JSON-ready through :meth:`to_dict`)."""

    task: str
    method: str
    setting: Setting
    seed: int
    status: str = "ok"  # "ok" or "diverged"
    message: str = ""
    curve: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    train_time: float = 0.0
    peak_mib: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    role: str = "tune"  # "tune" (grid on the first seed) or "repeat" (winner, other seeds)
    selected: bool = False

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        return cls(**d)

    @property
    def diverged(self) -> bool:
        return self.status != "ok"

    def val_curve(self, metric: str) -> list[float]:
        return [p["val"].get(metric, math.nan) for p in self.curve]

    def final(self, split: str, metric: str) -> float:
        """The metric at the last evaluation (NaN for a diverged run)."""
        if self.diverged or not self.curve:
            return math.nan
        return float(self.curve[-1][split].get(metric, math.nan))

    def best(self, metric: str) -> float:
        """The lowest validation metric after the first step (NaN when never finite)."""
        values = [v for v in self.val_curve(metric)[1:] if math.isfinite(v)]
        return min(values) if values else math.nan


def _jsonable(x: Any) -> Any:
    """NaN and Inf become None (strict JSON); containers recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _evaluate(task: Task, model: torch.nn.Module, data: TaskData) -> dict[str, dict[str, float]]:
    return {"train": task.evaluate(model, data.train), "val": task.evaluate(model, data.val)}


def _finite_params(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def run_one(
    task: Task,
    data: TaskData,
    method: Method,
    setting: Setting,
    seed: int,
    progress: ProgressFn | None = None,
    device: str | torch.device = "cpu",
) -> RunResult:
    """Train ``task.make_model(seed)`` with ``method`` at ``setting`` for ``task.num_epochs``.

    ``device``: where the model and the data live (``data`` is moved there when it is
    elsewhere); GPU work is synchronised before every clock reading.
    """
    dev = check_device(device)
    result = RunResult(task.name, method.name, dict(setting), seed)
    model = task.make_model(seed).to(dev)
    if data.train and data.train[0].device != dev:
        data = to_device(data, dev)
    per_epoch = task.steps_per_epoch(data)
    stepper = method.build(model, task, dict(setting), per_epoch)
    order = torch.Generator().manual_seed(seed)
    every = max(1, per_epoch // task.evals_per_epoch)
    epochs = task.num_epochs
    first_loss: float | None = None
    clock = 0.0

    def record(epoch: float, loss: float) -> None:
        point: dict[str, Any] = {"epoch": epoch, "step": stepper.steps, "time": clock, "loss": loss}
        point.update(_evaluate(task, model, data))
        result.curve.append(point)

    def diverge(why: str) -> None:
        result.status, result.message = "diverged", why

    record(0.0, math.nan)
    with PeakMemory(dev) as memory:
        for epoch in range(epochs):
            batches = [data.train] if method.full_batch else task.batches(data, order)
            n_batches = 1 if method.full_batch else per_epoch
            for i, batch in enumerate(batches):
                _synchronize(dev)
                start = time.perf_counter()
                try:
                    loss = stepper.step(batch)
                    _synchronize(dev)
                except (RuntimeError, ValueError, ArithmeticError) as e:
                    clock += time.perf_counter() - start
                    diverge(f"step raised {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    break
                clock += time.perf_counter() - start
                first_loss = loss if first_loss is None else first_loss
                if not math.isfinite(loss):
                    diverge(f"objective became {loss} at step {stepper.steps}")
                    break
                if loss > BLOWUP * max(first_loss, 1e-30):
                    diverge(f"objective blew up to {loss:.3g} (first {first_loss:.3g})")
                    break
                done = epoch + (i + 1) / n_batches
                if progress is not None:
                    progress(done, loss)
                last = i + 1 == n_batches
                due = (epoch + 1) % task.eval_every == 0 or epoch + 1 == epochs
                if (last and due) or (not last and (i + 1) % every == 0):
                    if not _finite_params(model):
                        diverge(f"parameters became non-finite at step {stepper.steps}")
                        break
                    record(done, loss)
                    if not math.isfinite(result.curve[-1]["val"][task.metric]):
                        diverge(f"validation {task.metric} became non-finite")
                        break
            if result.diverged:
                break
    result.steps = stepper.steps
    result.train_time = clock
    result.peak_mib = memory.mib
    notes = getattr(stepper, "notes", None)
    result.notes = notes() if callable(notes) else {}
    return result


def select_best(runs: Sequence[RunResult], metric: str) -> int:
    """Index of the run with the lowest best validation metric; diverged runs lose.

    Ties keep the earlier setting (the grid lists the default first).
    """
    scores = [
        math.inf if (r.diverged or not math.isfinite(r.best(metric))) else r.best(metric)
        for r in runs
    ]
    return min(range(len(runs)), key=lambda i: (scores[i], i))


@dataclass
class SuiteEvents:
    """Hooks the CLI uses to show progress; all optional."""

    run_started: Callable[[Task, Method, Setting, int], ProgressFn | None] | None = None
    run_finished: Callable[[RunResult], None] | None = None


def run_suite(
    tasks: Sequence[Task],
    methods: Sequence[Method],
    seeds: Sequence[int],
    events: SuiteEvents | None = None,
    device: str | torch.device = "cpu",
) -> list[RunResult]:
    """Tune every method on ``seeds[0]`` and run each winner on the other seeds.

    Methods that do not apply to a task (``method.applies``) are skipped there.
    """
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    dev = check_device(device)
    events = events or SuiteEvents()
    results: list[RunResult] = []

    def one(task: Task, data: TaskData, method: Method, setting: Setting, seed: int) -> RunResult:
        progress = events.run_started(task, method, setting, seed) if events.run_started else None
        result = run_one(task, data, method, setting, seed, progress, dev)
        if events.run_finished:
            events.run_finished(result)
        return result

    for task in tasks:
        data = {seed: to_device(task.make_data(seed), dev) for seed in seeds}
        for method in methods:
            if method.unavailable() is not None or not method.applies(task):
                continue
            tuned = [one(task, data[seeds[0]], method, s, seeds[0]) for s in method.grid(task.size)]
            best = select_best(tuned, task.metric)
            tuned[best].selected = True
            results.extend(tuned)
            for seed in seeds[1:]:
                repeat = one(task, data[seed], method, tuned[best].setting, seed)
                repeat.role, repeat.selected = "repeat", True
                results.append(repeat)
    return results


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """torch, Python, CPU (and GPU), threads, git commit, load and the time, for the JSON
    and the report."""
    import platform
    import subprocess

    import torchsven

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = None
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = (
            subprocess.run(
                ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if commit and dirty:
            commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    dev = torch.device(device)
    gpu: dict[str, Any] = {}
    if dev.type == "cuda" and torch.cuda.is_available():
        gpu = {"gpu": torch.cuda.get_device_name(dev), "cuda": torch.version.cuda}
    versions: dict[str, str] = {}
    for name in ("numpy", "scipy", "scikit-learn", "matplotlib", "rich"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return {
        "torch": torch.__version__,
        "torchsven": torchsven.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": commit,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": _load_average(),
        "device": str(dev),
        **gpu,
        "memory_measure": PeakMemory.cuda_method if dev.type == "cuda" else PeakMemory.method,
        **versions,
    }


def _load_average() -> str | None:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``), None where unreadable."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None
