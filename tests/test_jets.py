"""Forward-Laplacian jets (torchsven.jets): against nested autograd and closed forms, and
their rows on the factored backend against the dense float64 reference."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor, nn

import torchsven
from torchsven import jets, pinn
from torchsven.backends import FactoredBackend, GenericBackend
from torchsven.backends.layers import (
    ChannelBiasLinearTerm,
    LinearLikeTerm,
    RowLayout,
    bias_on_channels,
    channel_bias_mask,
)
from torchsven.errors import SvenFallbackWarning
from torchsven.microbatch import group_rows
from torchsven.pde import BoxSampler, heat_1d, poisson_2d
from torchsven.residuals import stack
from torchsven.solve import SpectralFilter

from .reference import dense_jacobian, flat, reference_step, rel_err

F64 = torch.float64
TOL = 1e-12

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "gelu-tanh": lambda: nn.GELU(approximate="tanh"),
    "softplus": lambda: nn.Softplus(beta=2.0, threshold=1.0),
    "elu": lambda: nn.ELU(alpha=0.7),
    "sin": lambda: jets.Sin(1.5),
    "relu": nn.ReLU,
    "leaky-relu": lambda: nn.LeakyReLU(0.1),
    "hardtanh": lambda: nn.Hardtanh(-0.5, 0.5),
}


def points(n: int = 9, d: int = 3, seed: int = 0) -> Tensor:
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 - 1


def mlp(act, d: int = 3, width: int = 6, out: int = 2, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    shared = act()  # the same module object twice (Sequential may repeat a module)
    return nn.Sequential(
        nn.Linear(d, width), shared, nn.Linear(width, width), shared, nn.Linear(width, out)
    ).to(F64)


def autograd_derivatives(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(value (N, m), gradient (N, m, d), Hessian (N, m, d, d)) by nested autograd."""
    xg = x.clone().requires_grad_(True)
    u = model(xg)
    grads = [pinn.gradient(u[:, k], xg) for k in range(u.shape[1])]
    hess = [pinn.hessian(u[:, k], xg) for k in range(u.shape[1])]
    return u, torch.stack(grads, dim=1), torch.stack(hess, dim=1)


# --------------------------------------------------------------- derivatives
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_jets_equal_nested_autograd(name: str) -> None:
    model = mlp(ACTIVATIONS[name])
    x = points()
    u, grad, hess = autograd_derivatives(model, x)
    value, gradient, lap = jets.forward_laplacian(model, x)
    assert rel_err(value, u) <= TOL
    assert rel_err(gradient, grad) <= TOL
    assert (lap - hess.diagonal(dim1=2, dim2=3).sum(-1)).abs().max() <= TOL * hess.abs().max()
    _, _, diag = jets.forward_hessian_diagonal(model, x, dims=[2, 0])
    assert (diag - hess.diagonal(dim1=2, dim2=3)[..., [2, 0]]).abs().max() <= TOL
    a = torch.tensor([[1.0, 0.3, -0.2], [0.5, 2.0, 0.0], [0.1, -0.7, 0.4]], dtype=F64)
    _, _, op = jets.forward_operator(model, x, a)
    assert (op - torch.einsum("nmij,ij->nm", hess, a)).abs().max() <= TOL * hess.abs().max()


def test_laplacian_over_some_dims_and_several_operators() -> None:
    model = mlp(nn.Tanh)
    x = points()
    _, _, hess = autograd_derivatives(model, x)
    lap01 = jets.forward_laplacian(model, x, dims=[0, -2]).laplacian
    assert (lap01 - hess[..., 0, 0] - hess[..., 1, 1]).abs().max() <= TOL
    a = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    ops = jets.forward_operator(model, x, a).operators
    assert ops.shape == (9, 2, 4)
    assert (ops - torch.einsum("nmij,qij->nmq", hess, a)).abs().max() <= TOL * 10


def test_closed_forms() -> None:
    # one tanh unit: u = tanh(w.x + b), grad = (1 - t^2) w, Lap = -2 t (1 - t^2) |w|^2
    w = torch.tensor([[0.7, -1.3, 0.4]], dtype=F64)
    model = nn.Sequential(nn.Linear(3, 1), nn.Tanh()).to(F64)
    with torch.no_grad():
        model[0].weight.copy_(w)
        model[0].bias.fill_(0.2)
    x = points()
    t = torch.tanh(x @ w.T + 0.2)
    value, gradient, lap = jets.forward_laplacian(model, x)
    assert rel_err(value, t) <= TOL
    assert rel_err(gradient, ((1 - t * t) * w).unsqueeze(1)) <= TOL
    assert rel_err(lap, -2 * t * (1 - t * t) * w.square().sum()) <= TOL
    # sin(2 x0): Lap = -4 sin(2 x0); affine models: Lap = 0, gradient = W
    sine = nn.Sequential(nn.Linear(3, 1, bias=False), jets.Sin(2.0)).to(F64)
    with torch.no_grad():
        sine[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
    sine_lap = jets.forward_laplacian(sine, x).laplacian[:, 0]
    assert rel_err(sine_lap, -4 * torch.sin(2 * x[:, 0])) <= TOL
    affine = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(F64)
    _, gradient, lap = jets.forward_laplacian(affine, x)
    assert torch.equal(lap, torch.zeros_like(lap))
    weight = affine[1].weight @ affine[0].weight
    assert rel_err(gradient, weight.expand(9, 2, 3)) <= TOL


def test_residual_containers_identity_and_dropout_in_eval() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(2, 5),
        nn.GELU(),
        jets.Residual(nn.Sequential(nn.Linear(5, 5), nn.Tanh())),
        jets.Residual(nn.Sequential(nn.Linear(5, 3), nn.SiLU()), shortcut=nn.Linear(5, 3)),
        nn.Dropout(0.5),
        nn.Identity(),
        nn.Linear(3, 1),
    ).to(F64)
    model.eval()
    x = points(d=2)
    u, grad, hess = autograd_derivatives(model, x)
    value, gradient, lap = jets.forward_laplacian(model, x)
    assert rel_err(value, u) <= TOL and rel_err(gradient, grad) <= TOL
    assert rel_err(lap, hess.diagonal(dim1=2, dim2=3).sum(-1)) <= 1e-11


def test_split_cuts_consecutive_point_sets() -> None:
    model = mlp(nn.Tanh)
    jet = jets.forward_laplacian(model, points(n=7))
    first, second = jet.split([3, 4])
    assert torch.equal(first.value, jet.value[:3]) and torch.equal(
        second.laplacian, jet.laplacian[3:]
    )
    assert isinstance(first, jets.LaplacianJet)
    with pytest.raises(ValueError, match="add up"):
        jet.split([3, 3])


def test_unsupported_modules_and_bad_input_raise() -> None:
    x = points()
    model = nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=1), nn.Linear(4, 1)).to(F64)
    with pytest.raises(ValueError, match=r"module '1' \(Softmax\)"):
        jets.forward_laplacian(model, x)
    nested = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Tanh(), nn.LayerNorm(4))).to(F64)
    with pytest.raises(ValueError, match=r"module '1.1' \(LayerNorm\)"):
        jets.forward_laplacian(nested, x)
    dropout = nn.Sequential(nn.Linear(3, 1), nn.Dropout(0.2)).to(F64)
    with pytest.raises(ValueError, match="Dropout in training mode"):
        jets.forward_laplacian(dropout, x)

    class Custom(nn.Linear):
        def forward(self, z: Tensor) -> Tensor:
            return super().forward(z) * 2

    with pytest.raises(ValueError, match=r"\(Custom\)"):
        jets.forward_laplacian(Custom(3, 1).to(F64), x)
    model = mlp(nn.Tanh)
    with pytest.raises(TypeError, match="model"):
        jets.forward_laplacian(lambda z: z, x)
    with pytest.raises(ValueError, match="2-D"):
        jets.forward_laplacian(model, x[0])
    with pytest.raises(TypeError, match="floating"):
        jets.forward_laplacian(model, x.long())
    with pytest.raises(ValueError, match="dims must index"):
        jets.forward_laplacian(model, x, dims=[3])
    with pytest.raises(ValueError, match="repeat"):
        jets.forward_laplacian(model, x, dims=[0, -3])
    with pytest.raises(TypeError, match="dims"):
        jets.forward_laplacian(model, x, dims=1)
    with pytest.raises(ValueError, match="coefficients must have shape"):
        jets.forward_operator(model, x, torch.eye(2, dtype=F64))


def test_jet_rows_are_differentiable_in_the_parameters() -> None:
    model = mlp(nn.Tanh, out=1)
    x = points()
    params = list(model.parameters())
    lap_jet = jets.forward_laplacian(model, x).laplacian.sum()
    xg = x.clone().requires_grad_(True)
    lap_ref = pinn.laplacian(model(xg), xg).sum()
    g1 = torch.autograd.grad(lap_jet, params, allow_unused=True)
    g2 = torch.autograd.grad(lap_ref, params, allow_unused=True)

    def filled(grads):
        return flat(
            [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
        )

    assert rel_err(filled(g1), filled(g2)) <= TOL


# ------------------------------------------------------- factored backend
def jet_rows(model: nn.Module, interior: Tensor, boundary: Tensor) -> Tensor:
    jet = pinn.forward_laplacian(model, torch.cat([interior, boundary]))
    inner, edge = jet.split([interior.shape[0], boundary.shape[0]])
    source = torch.sin(interior).sum(1)
    return stack(
        {"pde": -inner.laplacian[:, 0] - source, "bc": edge.value[:, 0]}, weights={"bc": 10.0}
    )


@pytest.mark.parametrize(
    "width,n_interior", [(8, 10), (5, 60)], ids=["gram-route-N<P", "jacobian-route-N>P"]
)
@pytest.mark.parametrize("ghost", ["auto", True, False])
def test_factored_gram_and_step_on_jet_rows_equal_the_dense_reference(
    width: int, n_interior: int, ghost
) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1)
    ).to(F64)
    interior, boundary = BoxSampler(2, n_interior, 6, seed=2).sample(0)
    params = list(model.parameters())
    closure = lambda: jet_rows(model, interior, boundary)  # noqa: E731
    jac, rows = dense_jacobian(closure, params)
    backend = FactoredBackend(model, ghost=ghost)
    with backend.capture(params) as rec:
        out = closure()
    gram = backend.gram_matrix(out, params, rec, out)
    assert rel_err(gram, jac @ jac.T) <= 1e-10
    s_max = float(torch.linalg.svdvals(jac)[0])
    # a cut in a clear spectral gap, and the damped filter of damping="adaptive" (no cut):
    # the Gram route's intrinsic accuracy is ~eps cond^2 of what it keeps (docs/design.md)
    for filt, kwargs in (
        (SpectralFilter(rtol=1e-2), {"rtol": 1e-2}),
        (
            SpectralFilter(rtol=0.0, relative_damping=1e-4),
            {"rtol": 0.0, "damping": 1e-4 * s_max**2},
        ),
    ):
        with backend.capture(params) as rec:
            out = closure()
        direction = backend.direction(out, params, filt, rec, out)
        expected, kept, _ = reference_step(jac, rows, **kwargs)
        assert direction.solution.kept == kept
        assert rel_err(flat(direction.step), expected) <= 1e-10
        assert rel_err(direction.row_change, jac @ flat(direction.step)) <= 1e-10
        n_params = sum(p.numel() for p in params)
        assert (direction.solution.solver == "gram") == (n_params >= rows.numel())


def test_sven_on_jet_rows_runs_factored_without_fallback_and_matches_generic() -> None:
    problem = heat_1d(width=6)
    interior, initial, boundary = problem.sample(12, 5, 6, seed=1)
    results = []
    for backend in ("factored", "generic"):
        model = problem.make_model(seed=3)
        # solver="gram": the generic backend decomposes the same K as the factored one
        opt = torchsven.Sven(model, damping="adaptive", backend=backend, solver="gram")
        with warnings.catch_warnings():
            warnings.simplefilter("error", SvenFallbackWarning)
            for _ in range(3):
                opt.step(lambda m=model: problem.rows(m, interior, initial, boundary))
        assert opt.last_step.backend == backend
        results.append(flat(model.parameters()))
    assert rel_err(results[0], results[1]) <= 1e-10


def test_multi_output_jet_rows_and_microbatches_on_the_factored_backend() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 2)).to(F64)
    x = points(n=10, d=2)
    params = list(model.parameters())

    def two_rows() -> Tensor:  # (N, 2): two rows per point, Laplacian and value
        value, _, lap = jets.forward_laplacian(model, x)
        return torch.stack([lap[:, 0] - 1.0, value[:, 1] + value[:, 0]], dim=1)

    jac, _ = dense_jacobian(two_rows, params)
    backend = FactoredBackend(model)
    with backend.capture(params) as rec:
        out = two_rows()
    assert rel_err(backend.gram_matrix(out.reshape(-1), params, rec, out), jac @ jac.T) <= 1e-10

    def lap_rows() -> Tensor:
        return jets.forward_laplacian(model, x).laplacian[:, 0] - 1.0

    expected, _, _ = reference_step(
        *dense_jacobian(lambda: group_rows(lap_rows(), 2), params)  # row = norm of 2 samples
    )
    opt = torchsven.Sven(model, backend="factored", microbatch_size=2)
    before = flat(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SvenFallbackWarning)
        opt.step(lap_rows)
    assert opt.last_step.backend == "factored" and opt.last_step.rows == 5
    assert rel_err(before - flat(params), expected) <= 1e-10


def test_guard_rejects_a_wrong_channel_mark() -> None:
    """A Linear marked 'bias on channel 0 only' that adds its bias everywhere: the guard
    sees the bias gradient disagree and the step falls back to the exact generic one."""
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(F64)
    x = points(n=6, d=2)

    def rows() -> Tensor:
        z = torch.stack([x, x.flip(1), 2 * x], dim=1)  # (N, 3, 2) channels
        with bias_on_channels((True, False, False)):
            h = model[0](z)  # the bias enters all three channels, not only the first
        return model[2](torch.tanh(h)).sum(dim=(1, 2))

    params = list(model.parameters())
    reference = GenericBackend().direction(rows(), params, SpectralFilter())
    opt = torchsven.Sven(model, backend="factored")
    before = flat(params)
    with pytest.warns(SvenFallbackWarning, match="'0'"):
        opt.step(rows)
    assert opt.last_step.backend == "generic"
    assert rel_err(before - flat(params), flat(reference.step)) <= 1e-10


def test_channel_bias_mark_is_scoped() -> None:
    assert channel_bias_mask() is None
    with bias_on_channels([1, 0]):
        assert channel_bias_mask() == (True, False)
        with bias_on_channels([0, 1, 1]):
            assert channel_bias_mask() == (False, True, True)
        assert channel_bias_mask() == (True, False)
    assert channel_bias_mask() is None


def test_channel_bias_term_matches_explicit_per_row_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    rows, positions, dk, do = 5, 6, 3, 2
    a = torch.randn(rows, positions, 1, dk, generator=gen, dtype=F64)
    g = torch.randn(rows, positions, 1, do, generator=gen, dtype=F64)
    mask = torch.tensor([1.0, 0, 0, 1, 0, 0], dtype=F64)  # two samples of 3 channels
    params = {"weight": torch.zeros(do, dk, dtype=F64), "bias": torch.zeros(do, dtype=F64)}
    term = ChannelBiasLinearTerm(a, g, params, "weight", "bias", mask)
    weight_rows = torch.einsum("rto,rtk->rok", g[:, :, 0], a[:, :, 0]).reshape(rows, -1)
    bias_rows = (g[:, :, 0] * mask[None, :, None]).sum(1)
    per_row = torch.cat([weight_rows, bias_rows], dim=1)
    assert rel_err(term.gram(["weight", "bias"]), per_row @ per_row.T) <= TOL
    w = torch.randn(rows, generator=gen, dtype=F64)
    weighted = term.weighted(["weight", "bias"], w)
    assert rel_err(weighted["bias"], w @ bias_rows) <= TOL
    assert rel_err(weighted["weight"].reshape(-1), w @ weight_rows) <= TOL
    assert rel_err(term.per_row(["bias"])["bias"], bias_rows) <= TOL
    plain = LinearLikeTerm(a, g, params, "weight", "bias")
    assert rel_err(term.gram(["weight"]), plain.gram(["weight"])) <= TOL
    assert RowLayout(10, 5, group=2).to_rows(torch.zeros(10, 3, 1)).shape == (5, 2, 3, 1)


# ------------------------------------------------------------- problems
def test_problem_rows_by_jets_equal_the_natural_autograd_rows() -> None:
    problem = poisson_2d(width=7)
    model = problem.make_model(seed=1)
    interior, boundary = BoxSampler(2, 20, 8, seed=1).sample(0)
    fast = problem.rows(model, interior, boundary)
    assert rel_err(fast, problem.rows_autograd(model, interior, boundary)) <= TOL
    assert rel_err(fast, problem.rows_pointwise(model, interior, boundary)) <= TOL
    heat = heat_1d(width=5)
    model = heat.make_model(seed=2)
    pts = heat.sample(15, 4, 6, seed=3)
    assert rel_err(heat.rows(model, *pts), heat.rows_autograd(model, *pts)) <= TOL
    assert rel_err(heat.rows(model, *pts), heat.rows_pointwise(model, *pts)) <= TOL
    assert torch.equal(pts[1][:, 1], torch.zeros(4, dtype=F64))
    assert set(pts[2][:, 0].tolist()) == {0.0, 1.0}


def test_heat_exact_solution_solves_the_problem() -> None:
    heat = heat_1d()
    x = torch.rand(30, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    xg = x.clone().requires_grad_(True)
    u = heat.exact(xg)
    residual = pinn.gradient(u, xg)[:, 1] - heat.diffusivity * pinn.hessian_diagonal(u, xg)[:, 0]
    assert residual.abs().max() < 1e-12
    assert heat.exact(torch.tensor([[0.5, 0.0]], dtype=F64)).item() == pytest.approx(1.0)
    assert heat.exact(torch.tensor([[0.5, 1.0]], dtype=F64)).item() == pytest.approx(
        math.exp(-0.25 * math.pi**2)
    )
    with pytest.raises(ValueError, match="diffusivity"):
        heat_1d(diffusivity=0.0)


def test_heat_smoke_converges_on_the_factored_backend() -> None:
    heat = heat_1d(width=12)
    model = heat.make_model(seed=0)
    pts = heat.sample(60, 15, 16, seed=0)
    opt = torchsven.Sven(model, damping="adaptive", backend="factored")
    start = heat.relative_l2(model)
    for _ in range(25):
        opt.step(lambda: heat.rows(model, *pts))
    assert opt.last_step.backend == "factored"
    assert heat.relative_l2(model) < 1e-2 < start


def test_matrix_free_step_on_jet_rows_equals_the_exact_step() -> None:
    """The rank-k path (block products from the factors) honours the value-channel bias."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).to(F64)
    interior, boundary = BoxSampler(2, 8, 4, seed=3).sample(0)
    params = list(model.parameters())
    jac, rows = dense_jacobian(lambda: jet_rows(model, interior, boundary), params)
    rank = min(jac.shape)
    expected, kept, _ = reference_step(jac, rows, rank=rank)
    opt = torchsven.Sven(model, rank=rank, randomized=True, oversample=4, backend="factored")
    before = flat(params)
    opt.step(lambda: jet_rows(model, interior, boundary))
    assert opt.last_step.backend == "factored" and opt.last_step.solver == "matfree"
    assert opt.last_step.kept == kept
    assert rel_err(before - flat(params), expected) <= 1e-10


@pytest.mark.parametrize("name", ["poisson-2d", "poisson-5d", "heat-1d"])
def test_bench_pde_tasks_run_on_the_factored_backend(name: str) -> None:
    from torchsven.bench.tasks import get_task

    task = get_task(name, "tiny")
    data = task.make_data(0)
    model = task.make_model(0)
    opt = torchsven.Sven(model, damping="adaptive")  # backend="auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error", SvenFallbackWarning)
        opt.step(lambda: task.residuals(model, data.train))
    assert opt.last_step.backend == "factored"


def test_bench_gives_the_generic_backend_pointwise_rows() -> None:
    from torchsven.bench.tasks import get_task

    task = get_task("heat-1d", "tiny")
    data = task.make_data(0)
    model = task.make_model(0)
    jet = task.sven_residuals(model, data.train, "auto")
    pointwise = task.sven_residuals(model, data.train, "generic")
    assert rel_err(pointwise, jet) <= TOL

    def graph_names(t: Tensor) -> set[str]:
        names, stack_ = set(), [t.grad_fn]
        while stack_:
            fn = stack_.pop()
            if fn is not None and type(fn).__name__ not in names:
                names.add(type(fn).__name__)
                stack_ += [f for f, _ in fn.next_functions]
        return names

    assert "_JacobianRowsBackward" in graph_names(pointwise)
    assert "_JacobianRowsBackward" not in graph_names(jet)
