"""Checkpoint and resume (bit for bit), determinism and bounded state of the robust steps."""

from __future__ import annotations

import copy
import gc
import io
import warnings

import pytest
import torch

import torchsven
from torchsven.backends import BACKENDS

from .cases import mlp

SETTINGS = {
    "plain": {},
    "adaptive": {"damping": "adaptive"},
    "adaptive-options": {"damping": torchsven.AdaptiveDamping(init=1e-6, accept=0.01)},
    "backtracking": {"line_search": "backtracking", "lr": 1.5},
    "skip": {"on_nonfinite": "skip", "damping": 1e-3},
    # with the options that compose (issue 9): the seeded mask generator, the
    # randomized solver's draws and the RMSProp "pre" state must resume too
    "adaptive-masked-randomized": {
        "damping": "adaptive",
        "param_fraction": 0.5,
        "randomized": True,
        "rank": 4,
        "seed": 3,
    },
    "backtracking-pre": {"line_search": "backtracking", "precondition": "pre"},
    "adaptive-tensor-mask": {
        "damping": "adaptive",
        "param_fraction": 0.5,
        "mask": "tensors",
        "seed": 5,
    },
}
#: option combinations that run on the generic backend only
GENERIC_ONLY = {"adaptive-masked-randomized", "backtracking-pre"}
EXACT_BACKENDS = [b for b in BACKENDS if b != "auto"]


def _batches(case, steps):
    """A fixed sequence of mini-batches (rows 0..N-1 subsets), one per step."""
    g = torch.Generator().manual_seed(11)
    n = case.inputs.shape[0]
    return [torch.randperm(n, generator=g)[: n - 2] for _ in range(steps)]


def _run(model, opt, case, batches, start, stop, nan_at=None):
    for k in range(start, stop):
        idx = batches[k]

        def closure(idx=idx, k=k):
            rows = model(case.inputs[idx]) - case.targets[idx]
            return rows * float("nan") if k == nan_at else rows

        opt.step(closure)


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("setting", "backend"),
    [
        (setting, backend)
        for backend in EXACT_BACKENDS
        for setting in SETTINGS
        if backend == "generic" or setting not in GENERIC_ONLY
    ],
)
def test_resume_is_bit_for_bit(setting, dtype, backend):
    steps, stop_at = 12, 5
    case = mlp(n=10, width=4, dtype=dtype)
    batches = _batches(case, steps)
    nan_at = 3 if setting == "skip" else None
    kwargs = {"backend": backend, **SETTINGS[setting]}

    model_a = copy.deepcopy(case.model)
    opt_a = torchsven.Sven(model_a, **kwargs)
    _run(model_a, opt_a, case, batches, 0, steps, nan_at)

    model_b = copy.deepcopy(case.model)
    opt_b = torchsven.Sven(model_b, **kwargs)
    _run(model_b, opt_b, case, batches, 0, stop_at, nan_at)
    checkpoint = _roundtrip({"model": model_b.state_dict(), "opt": opt_b.state_dict()})
    del model_b, opt_b

    model_c = copy.deepcopy(case.model)  # fresh objects, then load the checkpoint
    opt_c = torchsven.Sven(
        model_c, backend=backend, damping=0.0
    )  # options come from the checkpoint
    model_c.load_state_dict(checkpoint["model"])
    opt_c.load_state_dict(checkpoint["opt"])
    _run(model_c, opt_c, case, batches, stop_at, steps, nan_at)

    for a, c in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(a, c)
    assert opt_a.state_dict()["sven"] == opt_c.state_dict()["sven"]
    assert opt_a.last_step.extras == opt_c.last_step.extras
    assert opt_a.last_step.backend == opt_c.last_step.backend == backend  # no silent fallback
    if setting.startswith("adaptive"):
        counts = opt_a.state_dict()["sven"]["robust"]["counts"]
        assert counts["accepted"] + counts["rejected"] == steps
    if setting == "skip":
        assert opt_a.state_dict()["sven"]["robust"]["counts"]["skipped"] == 1


def test_state_dict_holds_the_adaptive_state():
    case = mlp(n=8, width=3)
    opt = torchsven.Sven(case.model, damping="adaptive")
    for _ in range(3):
        opt.step(case.residuals)
    sven = opt.state_dict()["sven"]
    assert sven["options"]["damping"] == {
        "init": 1e-3,
        "lower": 1e-30,
        "upper": 1e12,
        "accept": 1e-4,
    }
    assert sven["robust"]["damping"]["factor"] == opt.last_step.extras["damping_factor_after"]
    assert sven["robust"]["counts"]["closure_calls"] == 6
    assert sven["steps"] == 3


@pytest.mark.parametrize("setting", ["adaptive", "backtracking"])
def test_determinism_on_cpu(setting):
    results = []
    for _ in range(2):
        case = mlp(n=10, width=4, seed=5)
        opt = torchsven.Sven(case.model, **SETTINGS[setting])
        for _ in range(6):
            opt.step(case.residuals)
        results.append([p.detach().clone() for p in case.model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("setting", ["adaptive", "backtracking", "skip"])
def test_state_stays_bounded_over_a_long_run(setting):
    case = mlp(n=6, width=3)
    opt = torchsven.Sven(case.model, **SETTINGS[setting])
    layouts = []
    for k in range(60):
        opt.step(case.residuals)
        if k in (2, 59):
            layouts.append(_layout(opt.state_dict()))
    assert layouts[0] == layouts[1]
    assert all(len(s) == 0 for s in opt.state.values())


def _layout(obj):
    """The structure of a state_dict: keys, types and tensor shapes, not values."""
    if isinstance(obj, dict):
        return {k: _layout(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_layout(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype)
    return type(obj).__name__


@pytest.mark.parametrize("setting", ["adaptive", "backtracking", "skip"])
def test_live_tensors_do_not_grow_over_a_run(setting):
    # rejected steps restore from a copy; nothing of a step may stay referenced
    case = mlp(n=6, width=3)
    opt = torchsven.Sven(case.model, **SETTINGS[setting])

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    for _ in range(5):
        opt.step(case.residuals)
    before = live_tensors()
    for _ in range(30):
        opt.step(case.residuals)
    assert live_tensors() == before
