"""The torch.optim contract of Sven: groups, state, schedulers, bad input."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import torchsven
from torchsven import NonFiniteError, StepInfo

from .cases import CASES, mlp
from .reference import flat


def _snapshot(opt: torchsven.Sven, params) -> tuple:
    return (
        [p.detach().clone() for p in params],
        copy.deepcopy(opt.state_dict()),
        opt.last_step,
    )


def _assert_unchanged(opt: torchsven.Sven, params, snapshot) -> None:
    values, state, last = snapshot
    assert all(torch.equal(p, v) for p, v in zip(params, values, strict=True))
    assert _state_equal(opt.state_dict(), state)
    assert opt.last_step is last


def _state_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


# ---------------------------------------------------------------- bad input
def _trained_opt():
    """An optimizer that has already taken a step (so state and last_step exist)."""
    case = CASES["mlp-wide"]()
    opt = torchsven.Sven(case.model, lr=0.5, damping=0.0)
    opt.step(case.residuals)
    return case, opt


def _bad_closures(case):
    x = case.inputs
    return {
        "non-tensor": (lambda: 1.0, TypeError, "closure must return a tensor"),
        "tuple": (lambda: (case.residuals(),), TypeError, "closure must return a tensor"),
        "0-dim": (lambda: case.residuals().sum(), ValueError, "0-dim"),
        "integer": (lambda: torch.ones(3, dtype=torch.long), TypeError, "floating-point"),
        "empty": (lambda: case.residuals()[:0], ValueError, "no elements"),
        "no grad_fn": (lambda: case.residuals().detach(), ValueError, "without a grad_fn"),
        "under no_grad": (_no_grad(case), ValueError, "without a grad_fn"),
        "nan rows": (
            lambda: case.residuals() * torch.tensor(float("nan")),
            NonFiniteError,
            "residual rows",
        ),
        "inf rows": (
            lambda: case.residuals() + torch.tensor(float("inf")),
            NonFiniteError,
            "residual rows",
        ),
        # finite rows, infinite Jacobian: sqrt at 0 has an infinite derivative
        "inf jacobian": (
            lambda: torch.sqrt(case.model(x) * 0.0).reshape(-1),
            NonFiniteError,
            "Jacobian",
        ),
    }


def _no_grad(case):
    def closure():
        with torch.no_grad():
            return case.residuals()

    return closure


@pytest.mark.parametrize(
    "kind",
    [
        "non-tensor",
        "tuple",
        "0-dim",
        "integer",
        "empty",
        "no grad_fn",
        "under no_grad",
        "nan rows",
        "inf rows",
        "inf jacobian",
    ],
)
def test_bad_closure_raises_and_changes_nothing(kind):
    case, opt = _trained_opt()
    closure, error, message = _bad_closures(case)[kind]
    params = case.params()
    snapshot = _snapshot(opt, params)
    with pytest.raises(error, match=message):
        opt.step(closure)
    _assert_unchanged(opt, params, snapshot)


def test_nonfinite_error_is_a_value_error():
    assert issubclass(NonFiniteError, ValueError)


@pytest.mark.parametrize("closure", [None, 3])
def test_step_needs_a_callable_closure(closure):
    case, opt = _trained_opt()
    snapshot = _snapshot(opt, case.params())
    with pytest.raises(TypeError, match="closure"):
        opt.step(closure)
    _assert_unchanged(opt, case.params(), snapshot)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr": -0.1}, ValueError, "lr must be a finite number >= 0"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"lr": "1"}, TypeError, "lr must be a real number"),
        ({"rtol": -1e-3}, ValueError, "rtol"),
        ({"atol": -1.0}, ValueError, "atol"),
        ({"damping": -1e-4}, ValueError, "damping"),
        ({"damping": float("inf")}, ValueError, "damping"),
        ({"rank": 0}, ValueError, "rank must be None or an int >= 1"),
        ({"rank": -2}, ValueError, "rank"),
        ({"rank": 2.5}, TypeError, "rank"),
        ({"rank": True}, TypeError, "rank"),
        ({"backend": "fast"}, ValueError, "backend must be one of"),
        ({"solver": "qr"}, ValueError, "solver must be one of"),
        ({"chunk_bytes": 0}, ValueError, "chunk_bytes"),
    ],
)
def test_bad_options_raise(kwargs, error, message):
    case = CASES["mlp-wide"]()
    with pytest.raises(error, match=message):
        torchsven.Sven(case.model, **kwargs)


def test_mixed_dtypes_and_devices_are_rejected():
    a = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(2, dtype=torch.float32))
    with pytest.raises(ValueError, match="one dtype"):
        torchsven.Sven([a, b], damping=0.0)
    meta = nn.Parameter(torch.zeros(2, dtype=torch.float64, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        torchsven.Sven([a, meta], damping=0.0)
    opt = torchsven.Sven([a], damping=0.0)
    with pytest.raises(ValueError, match="one dtype"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError, match="floating-point"):
        torchsven.Sven([torch.zeros(2, dtype=torch.long)], damping=0.0)


@pytest.mark.parametrize("key", ["rank", "rtol", "atol", "damping", "backend", "solver"])
def test_param_group_may_not_set_global_options(key):
    case = CASES["mlp-wide"]()
    params = case.params()
    with pytest.raises(ValueError, match=f"param group sets '{key}'"):
        torchsven.Sven([{"params": params, key: 1}], damping=0.0)
    opt = torchsven.Sven(params[:2], damping=0.0)
    with pytest.raises(ValueError, match=f"param group sets '{key}'"):
        opt.add_param_group({"params": params[2:], key: 1})
    assert len(opt.param_groups) == 1


def test_negative_group_lr_set_later_raises_at_step_and_changes_nothing():
    case, opt = _trained_opt()
    opt.param_groups[0]["lr"] = -1.0
    snapshot = _snapshot(opt, case.params())
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        opt.step(case.residuals)
    _assert_unchanged(opt, case.params(), snapshot)


def test_all_zero_jacobian_is_a_no_op_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU is dead
        model[2].weight.zero_()
        model[2].bias.zero_()
    x = torch.randn(5, 3, dtype=torch.float64)
    opt = torchsven.Sven(model, damping=0.0)
    before = flat(model.parameters())
    out = opt.step(lambda: model(x).relu() * 0.0 + model[0](x).relu().sum(1, keepdim=True))
    assert torch.equal(flat(model.parameters()), before)
    assert opt.last_step.kept == 0
    assert torch.equal(
        opt.last_step.singular_values, torch.zeros_like(opt.last_step.singular_values)
    )
    assert out.shape == (5, 1)


def test_no_trainable_parameters_is_a_no_op_step():
    case = CASES["mlp-wide"]()
    case.model.requires_grad_(False)
    x = nn.Parameter(torch.ones(2, dtype=torch.float64))  # rows need a grad_fn
    opt = torchsven.Sven(case.model, damping=0.0)
    before = flat(case.model.parameters())
    opt.step(lambda: x * 2.0)
    assert torch.equal(flat(case.model.parameters()), before)
    assert opt.last_step.kept == 0


# ---------------------------------------------------------------- contract
def test_step_info_fields():
    case = mlp(n=9, width=5, d_out=2)
    opt = torchsven.Sven(case.model, rtol=1e-3, damping=0.0)
    assert opt.last_step is None
    rows = case.residuals().detach()
    opt.step(case.residuals)
    info = opt.last_step
    assert isinstance(info, StepInfo)
    assert info.loss == pytest.approx(0.5 * float(rows.square().sum()), rel=1e-14)
    assert info.residual_norm == pytest.approx(float(rows.norm()), rel=1e-14)
    s = info.singular_values
    assert s.dtype == torch.float64 and s.device.type == "cpu" and s.dim() == 1
    assert torch.all(s[:-1] >= s[1:])
    assert isinstance(info.kept, int) and 0 < info.kept <= s.numel()
    assert (
        info.rows == 18 and info.backend == "factored" and info.solver in ("svd", "gram", "normal")
    )
    assert info.damping == 0.0
    with pytest.raises(AttributeError):
        info.loss = 0.0  # frozen


def test_closure_runs_under_enable_grad():
    case = CASES["mlp-wide"]()
    opt = torchsven.Sven(case.model, damping=0.0)
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        return case.residuals()

    with torch.no_grad():
        opt.step(closure)
    assert seen == [True]


def test_zero_grad_is_harmless():
    a, b = CASES["mlp-wide"](), CASES["mlp-wide"]()
    opt_a, opt_b = (
        torchsven.Sven(a.model, lr=0.5, damping=0.0),
        torchsven.Sven(b.model, lr=0.5, damping=0.0),
    )
    for _ in range(2):
        opt_a.zero_grad()
        opt_a.step(a.residuals)
        opt_b.step(b.residuals)
    assert torch.equal(flat(a.model.parameters()), flat(b.model.parameters()))


def test_model_keyword_with_param_groups():
    case = CASES["mlp-wide"]()
    groups = [{"params": case.params()[:2], "lr": 0.1}, {"params": case.params()[2:]}]
    opt = torchsven.Sven(groups, model=case.model, damping=0.0)
    assert opt.model is case.model
    opt.step(case.residuals)
    with pytest.raises(ValueError, match="model= must be the same module"):
        torchsven.Sven(case.model, model=nn.Linear(1, 1), damping=0.0)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        torchsven.Sven(case.params(), model="net", damping=0.0)


def test_add_param_group_joins_the_solve():
    case = CASES["mlp-wide"]()
    params = case.params()
    opt = torchsven.Sven(params[:2], lr=0.5, damping=0.0)
    opt.add_param_group({"params": params[2:], "lr": 0.25})
    assert opt.param_groups[1]["lr"] == 0.25
    before = flat(params[2:])
    opt.step(case.residuals)
    assert not torch.equal(flat(params[2:]), before)


def _run(case, steps: int, opt=None, dtype_check=None):
    opt = opt or torchsven.Sven(case.model, lr=0.6, rtol=1e-4, damping=0.0)
    for _ in range(steps):
        opt.step(case.residuals)
    return opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_state_dict_resume_is_bit_for_bit(dtype):
    full = mlp(n=16, width=6, dtype=dtype)
    _run(full, 6)
    first = mlp(n=16, width=6, dtype=dtype)
    opt = _run(first, 3)
    buffer = io.BytesIO()
    torch.save({"model": first.model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = mlp(n=16, width=6, dtype=dtype, seed=99)  # different init, overwritten
    resumed.model.load_state_dict(saved["model"])
    resumed.inputs, resumed.targets = first.inputs, first.targets
    opt2 = torchsven.Sven(resumed.model, lr=123.0, rtol=0.5, damping=0.0)  # overwritten by the load
    opt2.load_state_dict(saved["opt"])
    assert opt2.options["rtol"] == 1e-4 and opt2.param_groups[0]["lr"] == 0.6
    _run(resumed, 3, opt2)
    assert torch.equal(flat(resumed.model.parameters()), flat(full.model.parameters()))


def test_load_state_dict_validates_options():
    case, opt = _trained_opt()
    state = opt.state_dict()
    state["sven"]["options"]["rtol"] = -1.0
    snapshot = _snapshot(opt, case.params())
    with pytest.raises(ValueError, match="rtol"):
        opt.load_state_dict(state)
    _assert_unchanged(opt, case.params(), snapshot)


def test_lr_schedulers_drive_sven():
    case = CASES["mlp-wide"]()
    opt = torchsven.Sven(case.model, lr=1.0, damping=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        opt.step(case.residuals)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)

    plateau_case = CASES["mlp-wide"]()
    opt = torchsven.Sven(plateau_case.model, lr=1.0, damping=0.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=0)
    x = plateau_case.inputs
    constant = nn.Parameter(torch.ones(1, dtype=torch.float64))
    for _ in range(3):  # the objective cannot decrease: the plateau cuts lr
        opt.step(lambda: plateau_case.model(x) * 0.0 + constant)
        plateau.step(opt.last_step.loss)
    assert opt.param_groups[0]["lr"] < 1.0
    assert math.isclose(opt.last_step.loss, 0.5 * 12)
