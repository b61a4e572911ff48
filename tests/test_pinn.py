"""torchsven.pinn / torchsven.pde / residuals.stack: derivatives, rows, Sven on a PDE."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import torchsven
from torchsven import pinn
from torchsven.backends.generic import jacobian
from torchsven.pde import BoxSampler, grid_points, poisson_2d, poisson_5d
from torchsven.residuals import groups_of, stack

from .reference import dense_jacobian, flat, reference_step, rel_err

F64 = torch.float64


# ---------------------------------------------------------------- fixtures
def closed_u(x: Tensor) -> Tensor:
    """u = sin(x0) exp(x1) + x0^2 x1^3 + x2 x0 (d = 3)."""
    x0, x1, x2 = x.unbind(1)
    return torch.sin(x0) * torch.exp(x1) + x0**2 * x1**3 + x2 * x0


def closed_grad(x: Tensor) -> Tensor:
    x0, x1, x2 = x.unbind(1)
    return torch.stack(
        [
            torch.cos(x0) * torch.exp(x1) + 2 * x0 * x1**3 + x2,
            torch.sin(x0) * torch.exp(x1) + 3 * x0**2 * x1**2,
            x0,
        ],
        dim=1,
    )


def closed_hessian(x: Tensor) -> Tensor:
    x0, x1, _ = x.unbind(1)
    h = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype)
    h[:, 0, 0] = -torch.sin(x0) * torch.exp(x1) + 2 * x1**3
    h[:, 1, 1] = torch.sin(x0) * torch.exp(x1) + 6 * x0**2 * x1
    h[:, 0, 1] = h[:, 1, 0] = torch.cos(x0) * torch.exp(x1) + 6 * x0 * x1**2
    h[:, 0, 2] = h[:, 2, 0] = 1.0
    return h


def closed_v(x: Tensor) -> Tensor:
    """v = (x0^2 x1, sin(x1) x2, x0 x2^3); div v = 2 x0 x1 + cos(x1) x2 + 3 x0 x2^2."""
    x0, x1, x2 = x.unbind(1)
    return torch.stack([x0**2 * x1, torch.sin(x1) * x2, x0 * x2**3], dim=1)


def closed_div(x: Tensor) -> Tensor:
    x0, x1, x2 = x.unbind(1)
    return 2 * x0 * x1 + torch.cos(x1) * x2 + 3 * x0 * x2**2


def points(n: int = 7, d: int = 3, seed: int = 0) -> Tensor:
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 - 1


def mlp(d: int = 3, width: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    ).to(F64)


def both_paths(helper, fn, x: Tensor, **kw) -> tuple[Tensor, Tensor]:
    """(helper on a tensor computed from x, helper on the callable)."""
    xg = x.clone().requires_grad_(True)
    return helper(fn(xg), xg, **kw), helper(fn, x, **kw)


HELPERS_CLOSED = [
    (pinn.gradient, closed_grad),
    (pinn.hessian, closed_hessian),
    (pinn.hessian_diagonal, lambda x: closed_hessian(x).diagonal(dim1=1, dim2=2)),
    (pinn.laplacian, lambda x: closed_hessian(x).diagonal(dim1=1, dim2=2).sum(1)),
    (pinn.time_derivative, lambda x: closed_grad(x)[:, -1]),
]


# -------------------------------------------------------- closed forms
@pytest.mark.parametrize(("helper", "expected"), HELPERS_CLOSED, ids=lambda h: h.__name__)
def test_helpers_match_closed_form(helper, expected) -> None:
    x = points()
    tensor_path, func_path = both_paths(helper, closed_u, x)
    assert rel_err(tensor_path.detach(), expected(x)) < 1e-13
    assert rel_err(func_path, expected(x)) < 1e-13


def test_divergence_matches_closed_form() -> None:
    x = points()
    tensor_path, func_path = both_paths(pinn.divergence, closed_v, x)
    assert rel_err(tensor_path.detach(), closed_div(x)) < 1e-13
    assert rel_err(func_path, closed_div(x)) < 1e-13


def test_time_derivative_picks_the_named_coordinate() -> None:
    x = points()
    for dim in (0, 1, -2):
        got = pinn.time_derivative(closed_u, x, time_dim=dim)
        assert rel_err(got, closed_grad(x)[:, dim]) < 1e-13


def test_tensor_path_handles_functions_linear_in_x() -> None:
    # Second derivatives of a linear function do not exist in the graph: zeros, not errors.
    x = points().requires_grad_(True)
    u = (x * torch.tensor([1.0, 2.0, 3.0], dtype=F64)).sum(1)
    assert torch.equal(pinn.laplacian(u, x), torch.zeros(7, dtype=F64))


# -------------------------------------------------- finite differences
def central_differences(f, x: Tensor, h: float) -> tuple[Tensor, Tensor]:
    """(gradient (N, d), Hessian diagonal (N, d)) of a scalar field by central differences."""
    n, d = x.shape
    grad, diag = torch.zeros(n, d, dtype=F64), torch.zeros(n, d, dtype=F64)
    f0 = f(x)
    for i in range(d):
        e = torch.zeros(d, dtype=F64)
        e[i] = h
        fp, fm = f(x + e), f(x - e)
        grad[:, i] = (fp - fm) / (2 * h)
        diag[:, i] = (fp - 2 * f0 + fm) / h**2
    return grad, diag


@pytest.mark.parametrize("path", ["tensor", "callable"])
def test_helpers_match_finite_differences_on_an_mlp(path: str) -> None:
    model = mlp()
    x = points(9)

    def u(z: Tensor) -> Tensor:
        return model(z).squeeze(1)

    with torch.no_grad():
        fd_grad, _ = central_differences(u, x, 1e-5)
        _, fd_diag = central_differences(u, x, 1e-3)
    if path == "tensor":
        xg = x.clone().requires_grad_(True)
        grad = pinn.gradient(model(xg), xg)
        diag = pinn.hessian_diagonal(model(xg), xg)
        lap = pinn.laplacian(model(xg), xg)
    else:
        grad, diag, lap = (
            h(model, x) for h in (pinn.gradient, pinn.hessian_diagonal, pinn.laplacian)
        )
    # Truncation error: O(h^2) with h = 1e-5 (gradient) and 1e-3 (second derivatives).
    assert rel_err(grad.detach(), fd_grad) < 1e-8
    assert rel_err(diag.detach(), fd_diag) < 1e-5
    assert rel_err(lap.detach(), fd_diag.sum(1)) < 1e-5


def test_divergence_matches_finite_differences() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    x = points(6)
    h = 1e-5
    fd = torch.zeros(6, dtype=F64)
    with torch.no_grad():
        for i in range(3):
            e = torch.zeros(3, dtype=F64)
            e[i] = h
            fd += (net(x + e)[:, i] - net(x - e)[:, i]) / (2 * h)
    xg = x.clone().requires_grad_(True)
    assert rel_err(pinn.divergence(net(xg), xg).detach(), fd) < 1e-8
    assert rel_err(pinn.divergence(net, x), fd) < 1e-8


def test_tensor_helpers_build_graphs_for_parameter_derivatives() -> None:
    # d/dtheta of the Laplacian (create_graph) equals finite differences in theta.
    model = mlp(2, 5)
    x = points(5, 2)
    w = model[0].weight

    def lap_sum() -> Tensor:
        xg = x.clone().requires_grad_(True)
        return pinn.laplacian(model(xg), xg).sum()

    (g,) = torch.autograd.grad(lap_sum(), [w])
    h = 1e-6
    original = w.detach().clone()
    values = []
    for shift in (h, -h):
        with torch.no_grad():
            w.copy_(original)
            w[0, 1] += shift
        values.append(float(lap_sum().detach()))
    with torch.no_grad():
        w.copy_(original)
    up, down = values
    assert abs(float(g[0, 1]) - (up - down) / (2 * h)) < 1e-7 * max(1.0, abs(float(g[0, 1])))


# ------------------------------------------------------- pointwise rows
def laplace_residual(u, x: Tensor) -> Tensor:
    return -pinn.laplacian(u, x) - torch.sin(x).sum(1)


def autograd_rows(model: nn.Module, x: Tensor) -> Tensor:
    xg = x.clone().requires_grad_(True)
    return laplace_residual(model(xg), xg)


@pytest.mark.parametrize("mode", ["batched", "loop"])
def test_pointwise_rows_values_and_jacobian_match_the_reference(mode: str) -> None:
    model = mlp(2, 5)
    x = points(11, 2)
    params = list(model.parameters())
    rows = pinn.pointwise_rows(model, laplace_residual, x)
    ref_jac, ref_rows = dense_jacobian(lambda: autograd_rows(model, x), params)
    assert rel_err(rows.detach(), ref_rows) < 1e-13
    got = jacobian(rows, params, mode=mode)
    assert rel_err(got, ref_jac) < 1e-12
    # The generic backend also runs the nested-autograd graph of the tensor helpers.
    assert rel_err(jacobian(autograd_rows(model, x), params, mode=mode), ref_jac) < 1e-12


def test_pointwise_rows_with_data_and_vector_residuals() -> None:
    model = mlp(2, 4)
    x = points(5, 2)
    y = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(1))

    def residual(u, z: Tensor, target: Tensor) -> Tensor:
        return torch.stack([u(z).squeeze(1), pinn.laplacian(u, z)], dim=1) - target

    rows = pinn.pointwise_rows(model, residual, x, y)
    params = list(model.parameters())

    def reference() -> Tensor:
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        return torch.stack([out.squeeze(1), pinn.laplacian(out, xg)], dim=1) - y

    ref_jac, ref_rows = dense_jacobian(reference, params)
    assert rows.shape == (5, 2)
    assert rel_err(rows.detach().reshape(-1), ref_rows) < 1e-13
    assert rel_err(jacobian(rows, params), ref_jac) < 1e-12


def test_pointwise_rows_jacobian_belongs_to_the_parameters_of_the_forward() -> None:
    # The Jacobian is computed lazily; changing the parameters in between must not leak in.
    model = mlp(2, 4)
    x = points(6, 2)
    params = list(model.parameters())
    ref_jac, _ = dense_jacobian(lambda: autograd_rows(model, x), params)
    rows = pinn.pointwise_rows(model, laplace_residual, x)
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    assert rel_err(jacobian(rows, params), ref_jac) < 1e-12


def test_pointwise_rows_leaves_frozen_parameters_out() -> None:
    model = mlp(2, 4)
    model[0].weight.requires_grad_(False)
    x = points(6, 2)
    rows = pinn.pointwise_rows(model, laplace_residual, x)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ref_jac, _ = dense_jacobian(lambda: autograd_rows(model, x), trainable)
    assert rel_err(jacobian(rows, trainable), ref_jac) < 1e-12
    with torch.no_grad():
        assert not pinn.pointwise_rows(model, laplace_residual, x).requires_grad


# ---------------------------------------------------------- Sven update
@pytest.mark.parametrize("fast", [True, False], ids=["pointwise_rows", "nested_autograd"])
def test_sven_step_on_a_pde_closure_equals_the_dense_reference(fast: bool) -> None:
    problem = poisson_2d(width=6)
    model = problem.make_model(seed=1)
    interior, boundary = BoxSampler(2, 16, 8, seed=2).sample(0)
    params = list(model.parameters())
    ref_jac, ref_rows = dense_jacobian(
        lambda: problem.rows_autograd(model, interior, boundary), params
    )
    ref, kept, _ = reference_step(ref_jac, ref_rows, rtol=1e-6)
    before = flat(params)
    opt = torchsven.Sven(model, lr=0.5, rtol=1e-6, backend="generic", solver="svd", damping=0.0)
    rows_fn = problem.rows if fast else problem.rows_autograd
    opt.step(lambda: rows_fn(model, interior, boundary))
    assert opt.last_step.kept == kept
    assert rel_err(before - flat(params), 0.5 * ref) < 1e-10


# ----------------------------------------------------- residual groups
def test_stack_weights_rows_and_reports_group_norms() -> None:
    gen = torch.Generator().manual_seed(0)
    r1 = torch.randn(8, dtype=F64, generator=gen)
    r2 = torch.randn(3, 2, dtype=F64, generator=gen)
    rows = stack({"pde": r1, "bc": r2}, weights={"bc": 10.0})
    assert rows.shape == (14,)
    assert torch.allclose(rows[:8], r1 / math.sqrt(8), rtol=0, atol=1e-15)
    assert torch.allclose(rows[8:], r2.reshape(-1) * math.sqrt(10 / 6), rtol=0, atol=1e-15)
    mse1, mse2 = float(r1.square().mean()), float(r2.square().mean())
    assert math.isclose(0.5 * float(rows.square().sum()), 0.5 * (mse1 + 10 * mse2), rel_tol=1e-13)
    report = groups_of(rows).report()
    assert list(report) == ["pde", "bc"]
    assert math.isclose(report["bc"]["mse"], mse2, rel_tol=1e-13)
    assert math.isclose(report["bc"]["rms"], math.sqrt(mse2), rel_tol=1e-13)
    assert math.isclose(report["bc"]["loss"], 0.5 * 10 * mse2, rel_tol=1e-13)
    assert report["pde"]["weight"] == 1.0 and report["bc"]["rows"] == 6
    assert groups_of(rows * 1.0) is None


def test_sven_reports_group_norms_in_last_step() -> None:
    problem = poisson_2d(width=5)
    model = problem.make_model(seed=0)
    interior, boundary = BoxSampler(2, 20, 8, seed=0).sample(0)
    opt = torchsven.Sven(model, lr=0.5, damping=0.0)
    opt.step(lambda: problem.rows(model, interior, boundary))
    groups = opt.last_step.extras["groups"]
    assert set(groups) == {"pde", "bc"}
    assert math.isclose(
        groups["pde"]["loss"] + groups["bc"]["loss"], opt.last_step.loss, rel_tol=1e-12
    )
    ref_pde = float(problem.pde_residual(model, interior).detach().square().mean())
    assert groups["pde"]["mse"] != ref_pde  # measured before the step, not after
    # Robust steps report groups too.
    opt = torchsven.Sven(model, damping="adaptive")
    opt.step(lambda: problem.rows(model, interior, boundary))
    assert set(opt.last_step.extras["groups"]) == {"pde", "bc"}
    assert "gain_ratio" in opt.last_step.extras


@pytest.mark.parametrize(
    ("groups", "weights", "error", "match"),
    [
        ([torch.ones(2)], None, TypeError, "groups must be a mapping"),
        ({}, None, ValueError, "at least one"),
        ({"a": torch.ones(2)}, {"b": 1.0}, ValueError, "do not exist"),
        ({"a": torch.ones(2)}, {"a": -1.0}, ValueError, r"weights\['a'\]"),
        ({"a": torch.ones(2)}, {"a": "x"}, TypeError, r"weights\['a'\]"),
        ({"a": torch.ones(2)}, [1.0], TypeError, "weights must be a mapping"),
        ({"a": torch.tensor(1.0)}, None, ValueError, r"groups\['a'\]"),
        ({"a": torch.ones(2, dtype=torch.long)}, None, TypeError, r"groups\['a'\]"),
        ({"a": torch.ones(2), "b": torch.ones(2, dtype=F64)}, None, ValueError, "dtype"),
        ({3: torch.ones(2)}, None, TypeError, "group names"),
    ],
)
def test_stack_bad_input(groups, weights, error, match) -> None:
    with pytest.raises(error, match=match):
        stack(groups, weights=weights)


# ------------------------------------------------------------ bad input
def test_helpers_bad_input() -> None:
    x = points()
    with pytest.raises(ValueError, match="x must require grad"):
        pinn.laplacian(closed_u(x), x)
    with pytest.raises(ValueError, match="x must be a 2-D"):
        pinn.gradient(closed_u, x[0])
    with pytest.raises(TypeError, match="x must be a tensor"):
        pinn.gradient(closed_u, [[0.0]])
    xg = x.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"u must have shape \(N,\) or \(N, 1\)"):
        pinn.laplacian(torch.stack([closed_u(xg)] * 2, 1), xg)
    with pytest.raises(ValueError, match="one value per point"):
        pinn.laplacian(lambda z: torch.stack([z.sum(1)] * 2, 1), x)
    with pytest.raises(ValueError, match="time_dim"):
        pinn.time_derivative(closed_u, x, time_dim=3)
    with pytest.raises(ValueError, match=r"v must have shape \(N, d\)"):
        pinn.divergence(closed_u(xg), xg)


def test_pointwise_rows_bad_input_leaves_the_optimizer_untouched() -> None:
    model = mlp(2, 4)
    x = points(5, 2)
    with pytest.raises(ValueError, match="points must have the parameters' dtype"):
        pinn.pointwise_rows(model, laplace_residual, x.float())
    with pytest.raises(ValueError, match=r"data\[0\] must have one entry per point"):
        pinn.pointwise_rows(model, laplace_residual, x, torch.ones(4))
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        pinn.pointwise_rows(lambda z: z, laplace_residual, x)
    before = flat(model.parameters())
    opt = torchsven.Sven(model, damping=0.0)
    with pytest.raises(ValueError, match="one entry per point"):
        opt.step(lambda: pinn.pointwise_rows(model, lambda u, z: u(z).sum(), x))
    assert torch.equal(flat(model.parameters()), before) and opt.last_step is None


# --------------------------------------------------- problems, sampler
def test_sampler_is_reproducible_per_step_and_on_the_boundary() -> None:
    a = BoxSampler(3, 10, 12, seed=5)
    b = BoxSampler(3, 10, 12, seed=5)
    i3, b3 = a.sample(3)
    b.sample(0)
    j3, c3 = b.sample(3)
    assert torch.equal(i3, j3) and torch.equal(b3, c3)
    assert not torch.equal(a.sample(4)[0], i3)
    assert not torch.equal(BoxSampler(3, 10, 12, seed=6).sample(3)[0], i3)
    assert i3.dtype == F64 and ((i3 >= 0) & (i3 <= 1)).all()
    on_face = ((b3 == 0) | (b3 == 1)).any(dim=1)
    assert on_face.all()
    assert BoxSampler(2, 4, 4, dtype=torch.float32).sample(0)[0].dtype == torch.float32
    with pytest.raises(ValueError, match="n_interior"):
        BoxSampler(2, 0, 4)
    with pytest.raises(TypeError, match="dtype"):
        BoxSampler(2, 4, 4, dtype=torch.long)


@pytest.mark.parametrize("make", [poisson_2d, poisson_5d])
def test_exact_solutions_solve_the_problems(make) -> None:
    problem = make()
    x = BoxSampler(problem.dim, 16, 16, seed=0).sample(0)[0]
    res = problem.pde_residual(problem.exact, x)
    assert float(res.abs().max()) < 1e-11
    assert grid_points(problem.dim, 3).shape == (3**problem.dim, problem.dim)


@pytest.mark.slow
def test_poisson_2d_smoke_reaches_1e_3_in_50_steps() -> None:
    problem = poisson_2d()
    model = problem.make_model(seed=0)
    interior, boundary = BoxSampler(2, 800, 120, seed=0).sample(0)
    opt = torchsven.Sven(model, damping=torchsven.AdaptiveDamping(init=1e-2))
    first = problem.relative_l2(model)
    for _ in range(50):
        opt.step(lambda: problem.rows(model, interior, boundary))
    assert first > 0.1
    assert problem.relative_l2(model) < 1e-3
