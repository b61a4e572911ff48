"""Sven on the generic backend: each step equals the dense float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchsven
from torchsven.backends.generic import jacobian

from .cases import CASES, Case, mlp
from .reference import dense_jacobian, flat, reference_step, rel_err


def _gap_cut(s: torch.Tensor, lo: int = 1) -> float:
    """A relative cut in the middle (geometric) of the widest gap of ``s[lo:]``.

    Picking the cut inside a clear gap makes keep/drop unambiguous.
    """
    s = s[s > 1e-12 * s[0]]
    ratios = s[lo:-1] / s[lo + 1 :]
    i = int(torch.argmax(ratios)) + lo
    return float(torch.sqrt(s[i] * s[i + 1]) / s[0])


def _step_and_reference(case: Case, lr: float = 1.0, **options):
    """Take one Sven step; return (actual change, reference change, kept, ref kept).

    Undamped unless ``damping`` is given (the library's default is adaptive)."""
    options.setdefault("damping", 0.0)
    params = case.params()
    jac, rows = dense_jacobian(case.residuals, params)
    filt = {k: options[k] for k in ("rank", "rtol", "atol", "damping") if k in options}
    expected, kept, _ = reference_step(jac, rows, **filt)
    before = flat(params)
    opt = torchsven.Sven(case.model, lr=lr, backend="generic", **options)
    opt.step(case.residuals)
    return flat(params) - before, -lr * expected, opt.last_step, kept


@pytest.mark.parametrize("name", sorted(CASES))
def test_default_step_matches_reference(name):
    case = CASES[name]()
    s = torch.linalg.svdvals(dense_jacobian(case.residuals, case.params())[0])
    rtol = _gap_cut(s)
    change, expected, info, kept = _step_and_reference(case, lr=0.7, rtol=rtol)
    assert info.kept == kept
    assert info.rows == case.targets.numel()
    assert info.backend == "generic"
    assert rel_err(change, expected) <= 1e-10


@pytest.mark.parametrize("which", ["rank", "rtol", "atol", "damping", "all"])
@pytest.mark.parametrize("name", ["mlp-wide", "mlp-tall", "convnet", "mlp-multi-output"])
def test_each_filter_matches_reference(name, which):
    case = CASES[name]()
    s = torch.linalg.svdvals(dense_jacobian(case.residuals, case.params())[0])
    cut = _gap_cut(s, lo=2)
    options = {
        "rank": {"rank": 3, "rtol": 0.0, "atol": 1e-12},
        "rtol": {"rtol": cut, "atol": 0.0},
        "atol": {"rtol": 0.0, "atol": cut * float(s[0])},
        "damping": {"damping": float(s[1]) ** 2, "rtol": _gap_cut(s)},
        "all": {"rank": 4, "rtol": cut, "atol": 1e-9, "damping": 0.1 * float(s[2]) ** 2},
    }[which]
    change, expected, info, kept = _step_and_reference(case, **options)
    assert info.kept == kept > 0
    assert info.damping == options.get("damping", 0.0)
    assert rel_err(change, expected) <= 1e-10


def test_rank_deficient_jacobian_keeps_its_rank():
    case = CASES["rank-deficient"]()
    change, expected, info, kept = _step_and_reference(case)
    assert info.kept == kept == 3
    assert rel_err(change, expected) <= 1e-10


def test_float32_model_matches_upcast_reference():
    case = mlp(n=10, width=6, dtype=torch.float32)
    params = case.params()
    jac, rows = dense_jacobian(case.residuals, params)  # float32 J, upcast
    s = torch.linalg.svdvals(jac)
    rtol = _gap_cut(s)
    expected, kept, _ = reference_step(jac, rows, rtol=rtol)
    before = flat(params)
    opt = torchsven.Sven(case.model, lr=1.0, rtol=rtol, damping=0.0)
    opt.step(case.residuals)
    assert opt.last_step.kept == kept
    assert params[0].dtype == torch.float32
    assert rel_err(flat(params) - before, -expected) <= 1e-4


def test_per_group_lr_scales_slices_of_one_solve():
    case = CASES["mlp-wide"]()
    params = case.params()
    jac, rows = dense_jacobian(case.residuals, params)
    expected, _, _ = reference_step(jac, rows, rtol=0.0, atol=1e-12)
    lrs = [0.5] * 2 + [0.25] * (len(params) - 2)
    scale = torch.cat(
        [
            torch.full((p.numel(),), lr, dtype=torch.float64)
            for p, lr in zip(params, lrs, strict=True)
        ]
    )
    before = flat(params)
    groups = [{"params": params[:2], "lr": 0.5}, {"params": params[2:], "lr": 0.25}]
    opt = torchsven.Sven(groups, rtol=0.0, atol=1e-12, damping=0.0)
    opt.step(case.residuals)
    assert rel_err(flat(params) - before, -scale * expected) <= 1e-10


@pytest.mark.parametrize("how", ["requires_grad", "lr0"])
def test_frozen_parameters_are_left_out_of_the_jacobian(how):
    case = CASES["mlp-wide"]()
    model = case.model
    first = model[0]
    if how == "requires_grad":
        first.requires_grad_(False)
        opt = torchsven.Sven(model, rtol=0.0, atol=1e-12, backend="generic", damping=0.0)
    else:
        rest = [p for n, p in model.named_parameters() if not n.startswith("0.")]
        opt = torchsven.Sven(
            [{"params": list(first.parameters()), "lr": 0.0}, {"params": rest}],
            rtol=0.0,
            atol=1e-12,
            damping=0.0,
        )
    trainable = [p for n, p in model.named_parameters() if not n.startswith("0.")]
    jac, rows = dense_jacobian(case.residuals, trainable)
    expected, kept, _ = reference_step(jac, rows, rtol=0.0, atol=1e-12)
    frozen_before = flat(first.parameters())
    before = flat(trainable)
    opt.step(case.residuals)
    assert torch.equal(flat(first.parameters()), frozen_before)
    # J over trainable parameters only: a J with frozen columns would differ
    assert opt.last_step.kept == kept
    assert rel_err(flat(trainable) - before, -expected) <= 1e-10


def poisson_1d_residuals(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of -u'' = pi^2 sin(pi x) on (0, 1), u(0) = u(1) = 0 (input derivatives)."""
    x = x.clone().requires_grad_(True)
    u = model(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
    interior = -d2u - math.pi**2 * torch.sin(math.pi * x)
    boundary = model(torch.tensor([[0.0], [1.0]], dtype=x.dtype))
    return torch.cat([interior.reshape(-1), 10.0 * boundary.reshape(-1)])


@pytest.mark.parametrize("mode", ["batched", "loop"])
def test_closure_with_input_derivatives_matches_reference(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 1)).double()
    x = torch.linspace(0.05, 0.95, 15, dtype=torch.float64).unsqueeze(1)
    params = list(model.parameters())
    # The output bias does not enter -u'': its column is zero except boundary rows.
    jac, rows = dense_jacobian(lambda: poisson_1d_residuals(model, x), params)
    dense_by_backend = jacobian(poisson_1d_residuals(model, x), params, mode=mode)
    assert rel_err(dense_by_backend, jac) <= 1e-12
    s = torch.linalg.svdvals(jac)
    rtol = _gap_cut(s)
    expected, kept, _ = reference_step(jac, rows, rtol=rtol)
    before = flat(params)
    opt = torchsven.Sven(model, lr=1.0, rtol=rtol, damping=0.0)
    opt.step(lambda: poisson_1d_residuals(model, x))
    assert opt.last_step.kept == kept
    assert rel_err(flat(params) - before, -expected) <= 1e-10


def test_jacobian_chunks_and_modes_agree():
    case = CASES["convnet"]()
    params = case.params()
    reference, _ = dense_jacobian(case.residuals, params)
    for mode, chunk_bytes in [("batched", 1 << 30), ("batched", 1), ("loop", 1 << 30)]:
        jac = jacobian(case.residuals(), params, chunk_bytes=chunk_bytes, mode=mode)
        assert rel_err(jac, reference) <= 1e-13, (mode, chunk_bytes)


def test_unused_parameter_gives_zero_column():
    torch.manual_seed(0)
    used = nn.Parameter(torch.randn(3, dtype=torch.float64))
    unused = nn.Parameter(torch.randn(2, dtype=torch.float64))
    jac = jacobian(used * 2.0, [used, unused])
    assert torch.equal(jac[:, 3:], torch.zeros(3, 2, dtype=torch.float64))
    assert torch.equal(jac[:, :3], 2.0 * torch.eye(3, dtype=torch.float64))


def test_step_never_touches_grad_and_returns_the_closure_value():
    case = CASES["mlp-wide"]()
    for p in case.params():
        p.grad = torch.full_like(p, 7.0)
    opt = torchsven.Sven(case.model, damping=0.0)
    calls = []

    def closure():
        out = case.residuals()
        calls.append(out)
        return out

    returned = opt.step(closure)
    assert returned is calls[0] and len(calls) == 1
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in case.params())


def test_model_is_not_mutated():
    case = CASES["convnet"]()
    model = case.model
    attrs = set(vars(model))
    hooks = [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    ]
    opt = torchsven.Sven(model, damping=0.0)
    opt.step(case.residuals)
    assert set(vars(model)) == attrs
    assert hooks == [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    ]
    assert type(model) is nn.Sequential
