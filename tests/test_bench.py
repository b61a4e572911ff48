"""Tests of ``torchsven bench``: tasks, methods, runner, JSON, report and plots (tiny sizes)."""

from __future__ import annotations

import math

import pytest
import torch

from torchsven.bench.tasks import SIZES, TASKS, Task, get_task, load_all, register

TASK_NAMES = list(load_all())


def test_registry_has_the_required_tasks() -> None:
    for name in ("regression-1d", "friedman1", "diabetes", "digits-label", "digits-ce"):
        assert name in TASKS
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="size must be one of"):
        get_task("regression-1d", "huge")
    with pytest.raises(TypeError, match="Task subclass"):
        register(int)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_builds_and_evaluates(name: str) -> None:
    task = get_task(name, "tiny")
    data = task.make_data(0)
    model = task.make_model(0)
    for split in (data.train, data.val):
        metrics = task.evaluate(model, split)
        assert task.metric in metrics
        assert all(math.isfinite(v) for v in metrics.values())
    batch = next(iter(task.batches(data, torch.Generator().manual_seed(0))))
    rows = task.residuals(model, batch)
    assert rows.requires_grad and rows.dtype == task.dtype
    loss = task.loss(model, batch)
    assert loss.dim() == 0 and loss.requires_grad
    # Sven's objective 0.5 ||r||^2 and the first-order loss agree up to a constant factor
    half_sq = 0.5 * float(rows.detach().square().sum()) / task.samples(batch)
    factor = 0.5 if name == "digits-ce" else 1.0
    assert half_sq == pytest.approx(factor * float(loss), rel=1e-5)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_is_deterministic_in_its_seed(name: str) -> None:
    task = get_task(name, "tiny")
    a, b, c = task.make_model(3), task.make_model(3), task.make_model(4)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert any(
        not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )
    d1, d2 = task.make_data(1), task.make_data(1)
    for t1, t2 in zip(d1.train + d1.val, d2.train + d2.val, strict=True):
        assert torch.equal(t1, t2)
    order1 = [b[0] for b in task.batches(d1, torch.Generator().manual_seed(5))]
    order2 = [b[0] for b in task.batches(d1, torch.Generator().manual_seed(5))]
    assert all(torch.equal(x, y) for x, y in zip(order1, order2, strict=True))
    # every training sample is visited once per epoch
    seen = sum(task.samples(b) for b in task.batches(d1, torch.Generator().manual_seed(5)))
    assert seen == task.samples(d1.train)
    assert len(order1) == task.steps_per_epoch(d1)


def test_task_sizes_and_epochs_are_declared() -> None:
    for cls in TASKS.values():
        assert issubclass(cls, Task)
        assert set(cls.epochs) == set(SIZES)
        assert cls.summary
