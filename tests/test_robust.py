"""Adaptive damping, backtracking and non-finite handling against dense references."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

import torchsven
from torchsven.damping import AdaptiveDamping, DampingState, gain_ratio, nielsen_update

from .cases import linear_rank_deficient, mlp
from .reference import dense_jacobian, flat, reference_step, rel_err


def rosenbrock_rows(x):
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def atan_rows(x):
    # Gauss-Newton overshoots on atan far from 0: from x = 2 the full step goes to
    # x = -3.5 with |atan(-3.5)| > atan(2), so an undamped step increases the objective.
    return torch.atan(x)


def _snapshot(opt):
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    return params, copy.deepcopy(opt.state_dict()), opt.last_step


def _assert_unchanged(opt, snap):
    params, state, last = snap
    now = [p for g in opt.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(params, now, strict=True))
    assert opt.state_dict()["sven"] == state["sven"]
    assert opt.last_step is last


# ------------------------------------------------------------------ pure rules
def test_nielsen_update_rule():
    opts = AdaptiveDamping()
    # rho = 1 (linear model exact): factor / 3, nu reset to 2
    state, ok = nielsen_update(DampingState(3e-3, 8.0), 1.0, opts)
    assert ok and state.factor == pytest.approx(1e-3, rel=1e-15) and state.nu == 2.0
    # rho = 0.5: factor * (1 - 0) = unchanged
    state, ok = nielsen_update(DampingState(1e-3, 2.0), 0.5, opts)
    assert ok and state.factor == 1e-3
    # rho = 0.25: 1 - (-0.5)^3 = 1.125
    state, ok = nielsen_update(DampingState(1e-3, 2.0), 0.25, opts)
    assert ok and state.factor == pytest.approx(1.125e-3, rel=1e-15)
    # rejection: factor * nu, nu doubles
    state, ok = nielsen_update(DampingState(1e-3, 4.0), -2.0, opts)
    assert not ok and state.factor == 4e-3 and state.nu == 8.0
    # bounds
    state, _ = nielsen_update(DampingState(1e12, 2.0), -1.0, opts)
    assert state.factor == 1e12
    state, _ = nielsen_update(DampingState(1e-30, 2.0), 1.0, opts)
    assert state.factor == 1e-30 == opts.lower


def test_gain_ratio_edge_cases():
    assert gain_ratio(1.0, 2.0) == 0.5
    assert gain_ratio(math.nan, 1.0) == -math.inf
    assert gain_ratio(-math.inf, 1.0) == -math.inf
    assert gain_ratio(1.0, 0.0) == -math.inf
    assert gain_ratio(1.0, -1.0) == -math.inf


# ------------------------------------------------------------- adaptive steps
def test_first_adaptive_step_is_the_damped_reference_step():
    case = mlp(n=10, width=5)
    params = case.params()
    opt = torchsven.Sven(case.model, damping="adaptive", rtol=0.0)
    jac, rows = dense_jacobian(case.residuals, params)
    before = flat(params)
    s1 = float(torch.linalg.svdvals(jac)[0])
    mu = 1e-3 * s1**2
    expected, _, _ = reference_step(jac, rows, rtol=0.0, damping=mu)
    trial_model = copy.deepcopy(case.model)
    with torch.no_grad():
        offset = 0
        for p in trial_model.parameters():
            p -= expected[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        trial = 0.5 * float((trial_model(case.inputs) - case.targets).square().sum())
    opt.step(case.residuals)
    info = opt.last_step
    assert info.damping == pytest.approx(mu, rel=1e-10)
    assert info.extras["damping_factor_before"] == 1e-3
    # the gain ratio from the dense linear model and one more evaluation
    jh = jac @ expected
    predicted = float(rows @ jh) - 0.5 * float(jh @ jh)
    assert info.extras["predicted_reduction"] == pytest.approx(predicted, rel=1e-10)
    assert info.extras["trial_loss"] == pytest.approx(trial, rel=1e-12)
    rho = (info.loss - trial) / predicted
    assert info.extras["gain_ratio"] == pytest.approx(rho, rel=1e-9)
    assert info.extras["accepted"] == (rho > 1e-4)
    expected_change = expected if rho > 1e-4 else torch.zeros_like(expected)
    assert rel_err(before - flat(params), expected_change) <= 1e-10 or not info.extras["accepted"]
    if not info.extras["accepted"]:
        assert torch.equal(before, flat(params))
    assert info.extras["closure_calls"] == 2


def test_adaptive_converges_on_rosenbrock():
    x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    opt = torchsven.Sven([x], damping="adaptive")
    for _ in range(40):
        opt.step(lambda: rosenbrock_rows(x))
    assert torch.allclose(x.detach(), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    counts = opt.state_dict()["sven"]["robust"]["counts"]
    assert counts["rejected"] > 0  # the valley forces some rejections
    assert counts["accepted"] + counts["rejected"] == 40


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rejected_step_restores_parameters_bitwise(dtype):
    x = torch.tensor([2.0, -3.0], dtype=dtype, requires_grad=True)
    before = x.detach().clone()
    opt = torchsven.Sven([x], damping=AdaptiveDamping(init=1e-12, lower=1e-12))
    opt.step(lambda: atan_rows(x))
    info = opt.last_step
    assert not info.extras["accepted"]
    assert info.extras["trial_loss"] > info.loss
    assert info.extras["gain_ratio"] < 0
    assert torch.equal(x.detach(), before)
    # Nielsen: rejected -> factor * nu (2), then * 4
    assert info.extras["damping_factor_after"] == 2e-12
    opt.step(lambda: atan_rows(x))
    assert opt.last_step.extras["damping_factor_before"] == 2e-12
    assert opt.last_step.extras["damping_factor_after"] == 8e-12
    assert torch.equal(x.detach(), before)
    for _ in range(60):
        opt.step(lambda: atan_rows(x))
    assert float(x.detach().abs().max()) < 1e-6


def test_adaptive_with_per_group_lrs_predicts_with_the_scaled_step():
    case = mlp(n=8, width=4)
    layers = [m for m in case.model if isinstance(m, torch.nn.Linear)]
    groups = [
        {"params": list(layers[0].parameters()), "lr": 0.5},
        {"params": [p for m in layers[1:] for p in m.parameters()], "lr": 1.0},
    ]
    opt = torchsven.Sven(groups, damping="adaptive", rtol=0.0)
    params = [p for g in groups for p in g["params"]]
    jac, rows = dense_jacobian(case.residuals, params)
    s1 = float(torch.linalg.svdvals(jac)[0])
    step, _, _ = reference_step(jac, rows, rtol=0.0, damping=1e-3 * s1**2)
    n0 = sum(p.numel() for p in groups[0]["params"])
    scaled = torch.cat([0.5 * step[:n0], step[n0:]])
    jh = jac @ scaled
    predicted = float(rows @ jh) - 0.5 * float(jh @ jh)
    opt.step(case.residuals)
    assert opt.last_step.extras["predicted_reduction"] == pytest.approx(predicted, rel=1e-10)


def test_adaptive_zero_jacobian_is_a_noop_without_trial():
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torchsven.Sven([x], damping="adaptive")
    opt.step(lambda: 0.0 * x + 1.0)
    info = opt.last_step
    assert info.kept == 0 and info.extras["accepted"] and info.extras["closure_calls"] == 1
    assert math.isnan(info.extras["gain_ratio"])
    assert torch.equal(x.detach(), torch.zeros(3, dtype=torch.float64))


def test_trial_with_other_rows_raises_and_restores():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    opt = torchsven.Sven([x], damping="adaptive")
    calls = []

    def closure():
        calls.append(1)
        return x * 2 if len(calls) == 1 else torch.cat([x, x])

    snap = _snapshot(opt)
    with pytest.raises(ValueError, match="trial call"):
        opt.step(closure)
    _assert_unchanged(opt, snap)


def test_trial_that_raises_restores_parameters():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    opt = torchsven.Sven([x], damping="adaptive")
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("user error in the trial")
        return x - 3

    snap = _snapshot(opt)
    with pytest.raises(RuntimeError, match="user error"):
        opt.step(closure)
    _assert_unchanged(opt, snap)


def test_nan_trial_is_rejected_not_raised():
    # log(x) is NaN for x < 0: the undamped step from x = 3 goes to 3 - 3 log 3 < 0
    x = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    opt = torchsven.Sven([x], damping=AdaptiveDamping(init=1e-12, lower=1e-12), lr=1.0)
    opt.step(lambda: torch.log(x))
    info = opt.last_step
    assert math.isnan(info.extras["trial_loss"]) and not info.extras["accepted"]
    assert x.item() == 3.0


# ---------------------------------------------------------------- line search
def test_backtracking_takes_an_armijo_step():
    x = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    opt = torchsven.Sven([x], line_search="backtracking", damping=0.0)
    jac, rows = dense_jacobian(lambda: atan_rows(x), [x])
    full, _, _ = reference_step(jac, rows)
    f0 = 0.5 * float(rows @ rows)
    opt.step(lambda: atan_rows(x))
    info = opt.last_step
    alpha = info.extras["step_size"]
    assert info.extras["accepted"] and 0 < alpha < 1 and info.extras["trials"] >= 2
    assert x.item() == pytest.approx(2.0 - alpha * float(full[0]), rel=1e-12)
    slope = float(rows @ (jac @ full))
    assert info.extras["trial_loss"] <= f0 - 1e-4 * alpha * slope
    assert info.extras["trial_loss"] == pytest.approx(0.5 * math.atan(x.item()) ** 2, rel=1e-12)
    for _ in range(20):
        opt.step(lambda: atan_rows(x))
    assert abs(x.item()) < 1e-12


def test_backtracking_full_step_when_it_is_good():
    case = linear_rank_deficient()  # linear rows: the half step reduces f by 3/4 of f's part
    opt = torchsven.Sven(case.model, line_search=True, lr=0.5, damping=0.0)
    twin = copy.deepcopy(case.model)
    plain = torchsven.Sven(twin, lr=0.5, damping=0.0)
    opt.step(case.residuals)
    plain.step(lambda: twin(case.inputs) - case.targets)
    assert opt.last_step.extras["step_size"] == 1.0
    for a, b in zip(case.model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_backtracking_gives_up_and_restores():
    x = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    search = torchsven.BacktrackingLineSearch(max_trials=1)
    opt = torchsven.Sven([x], line_search=search, damping=0.0)
    opt.step(lambda: atan_rows(x))
    assert not opt.last_step.extras["accepted"] and opt.last_step.extras["trials"] == 1
    assert x.item() == 2.0
    assert opt.state_dict()["sven"]["robust"]["counts"]["rejected"] == 1


# ---------------------------------------------------------------- non-finite
def _nan_at(step_index):
    """A closure factory whose rows are NaN on the given call of the first evaluation."""
    case = mlp(n=6, width=3)
    state = {"step": 0}

    def closure():
        rows = case.residuals()
        return rows * math.nan if state["step"] == step_index else rows

    return case, state, closure


SETTINGS = [
    {},
    {"damping": "adaptive"},
    {"line_search": "backtracking"},
    {"damping": 0.1},
]


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_nan_mid_run_raises_and_changes_nothing(kwargs):
    case, state, closure = _nan_at(3)
    opt = torchsven.Sven(case.model, **kwargs)
    for i in range(3):
        state["step"] = i
        opt.step(closure)
    state["step"] = 3
    snap = _snapshot(opt)
    with pytest.raises(torchsven.NonFiniteError, match="NaN or Inf"):
        opt.step(closure)
    _assert_unchanged(opt, snap)
    state["step"] = 4
    opt.step(closure)  # a finite step goes on
    assert opt.last_step is not snap[2]


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_nan_mid_run_is_skipped_and_counted(kwargs):
    case, state, closure = _nan_at(3)
    opt = torchsven.Sven(case.model, on_nonfinite="skip", **kwargs)
    for i in range(3):
        state["step"] = i
        opt.step(closure)
    params_before = [p.detach().clone() for p in case.model.parameters()]
    sven_before = copy.deepcopy(opt.state_dict()["sven"])
    state["step"] = 3
    out = opt.step(closure)
    assert torch.isnan(out).all()
    info = opt.last_step
    assert info.extras["skipped"] and info.kept == 0 and math.isnan(info.loss)
    assert all(
        torch.equal(a, b) for a, b in zip(params_before, case.model.parameters(), strict=True)
    )
    sven_after = opt.state_dict()["sven"]
    assert sven_after["robust"]["counts"]["skipped"] == 1
    assert sven_after["robust"]["damping"] == sven_before["robust"]["damping"]
    assert sven_after["steps"] == sven_before["steps"] + 1
    state["step"] = 4
    loss_before = 0.5 * float(case.residuals().detach().square().sum())
    opt.step(closure)
    assert "skipped" not in opt.last_step.extras
    assert opt.last_step.loss == pytest.approx(loss_before, rel=1e-12)


def test_nonfinite_jacobian_is_skipped():
    # sqrt at 0: finite value, infinite derivative
    x = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    opt = torchsven.Sven([x], on_nonfinite="skip", damping=0.0)
    opt.step(lambda: torch.sqrt(x) - 2)
    assert opt.last_step.extras["skipped"] and "Jacobian" in opt.last_step.extras["reason"]
    assert opt.last_step.loss == pytest.approx(0.5 * (4 + 1), rel=1e-15)
    assert torch.equal(x.detach(), torch.tensor([0.0, 1.0], dtype=torch.float64))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"damping": "lm"}, ValueError, "damping must be"),
        ({"damping": -1.0}, ValueError, "damping must be a finite number >= 0"),
        ({"damping": math.inf}, ValueError, "damping"),
        ({"damping": [1.0]}, TypeError, "damping must be"),
        ({"damping": True}, TypeError, "damping"),
        ({"line_search": "armijo"}, ValueError, "line_search"),
        ({"line_search": 3}, TypeError, "line_search"),
        ({"line_search": True, "damping": "adaptive"}, ValueError, "line_search needs a fixed"),
        ({"on_nonfinite": "ignore"}, ValueError, "on_nonfinite"),
        ({"on_nonfinite": None}, ValueError, "on_nonfinite"),
    ],
)
def test_bad_options(kwargs, error, match):
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(error, match=match):
        torchsven.Sven([x], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"init": 0.0}, ValueError, "0 < lower <= init <= upper"),
        ({"init": 1.0, "upper": 0.5}, ValueError, "lower <= init <= upper"),
        ({"accept": 1.0}, ValueError, "accept"),
        ({"init": math.nan}, ValueError, "finite"),
        ({"init": "1e-3"}, TypeError, "init"),
    ],
)
def test_bad_adaptive_damping(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdaptiveDamping(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"armijo": 0.0}, ValueError),
        ({"max_trials": 0}, ValueError),
        ({"max_trials": 2.0}, TypeError),
        ({"shrink_min": 0.6, "shrink_max": 0.5}, ValueError),
    ],
)
def test_bad_line_search(kwargs, error):
    with pytest.raises(error, match="BacktrackingLineSearch"):
        torchsven.BacktrackingLineSearch(**kwargs)


@pytest.mark.parametrize("key", ["line_search", "on_nonfinite"])
def test_group_may_not_set_robust_options(key):
    x, y = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = torchsven.Sven([x], damping=0.0)
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": [y], key: "skip"})


def test_rtol_default_depends_on_the_damping():
    x = torch.zeros(2, requires_grad=True)
    assert torchsven.Sven([x], damping=0.0).options["rtol"] == 1e-3
    assert torchsven.Sven([x], damping=0.5).options["rtol"] == 1e-3
    assert torchsven.Sven([x], damping="adaptive").options["rtol"] == 0.0
    assert torchsven.Sven([x], damping="adaptive", rtol=1e-4).options["rtol"] == 1e-4


def _two_groups(case, lr0, lr1):
    layers = [m for m in case.model if isinstance(m, torch.nn.Linear)]
    return [
        {"params": list(layers[0].parameters()), "lr": lr0},
        {"params": [p for m in layers[1:] for p in m.parameters()], "lr": lr1},
    ]


@pytest.mark.parametrize(
    "options", [{}, {"param_fraction": 0.5}, {"param_fraction": 0.5, "mask": "tensors"}]
)
def test_gain_ratio_tends_to_one_for_small_steps(options):
    # the linear model is exact to first order: rho -> 1 as lr -> 0, mixed lrs included
    case = mlp(n=10, width=4)
    opt = torchsven.Sven(
        _two_groups(case, 0.5e-5, 1e-5), model=case.model, damping="adaptive", **options
    )
    for _ in range(3):
        opt.step(case.residuals)
        assert opt.last_step.extras["gain_ratio"] == pytest.approx(1.0, abs=1e-3)


def test_mixed_lrs_with_rows_outside_the_graph_raise_and_change_nothing():
    case = mlp(n=10, width=4)
    groups = _two_groups(case, 0.5, 1.0)
    opt = torchsven.Sven(
        groups, model=case.model, damping="adaptive", param_fraction=0.5, mask="rows"
    )
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match="different lr"):
        opt.step(case.residuals)
    _assert_unchanged(opt, snap)
    opt.param_groups[0]["lr"] = 1.0  # one lr: the backend's J step is used
    opt.step(case.residuals)
    assert opt.last_step is not snap[2] and math.isfinite(opt.last_step.extras["gain_ratio"])


def test_adaptive_never_increases_the_objective_where_plain_sven_does():
    # On a small tanh MLP the plain Sven step with a fine cut overshoots (6.9 -> 4e6)
    # and saturates the tanh units for good; with adaptive damping the objective is
    # monotone (a rejected step is undone) and the realisable fit is reached.
    def losses(**kwargs):
        case = mlp(n=16, width=6, seed=2)
        opt = torchsven.Sven(case.model, **kwargs)
        out = []
        for _ in range(30):
            opt.step(case.residuals)
            out.append(opt.last_step.loss)
        return out

    plain = losses(rtol=1e-6, damping=0.0)
    adaptive = losses(damping="adaptive")
    assert any(b > 1e3 * a for a, b in itertools.pairwise(plain))
    assert plain[-1] > 0.5 * plain[0]
    assert all(b <= a for a, b in itertools.pairwise(adaptive))
    assert adaptive[-1] < 1e-5 * adaptive[0]
