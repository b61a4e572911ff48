r"""PDE problems for physics-informed training: Poisson on the unit cube, heat in 1+1D.

A :class:`PoissonProblem` is ``-Lap u = f`` on ``[0, 1]^d`` with ``u = g`` on
the boundary and a known exact solution; a :class:`HeatProblem` is
``u_t = kappa u_xx`` on ``(x, t) in [0, 1]^2`` with initial and boundary
values. Each gives the residual rows for Sven (``rows``: weighted groups
built by :func:`torchsven.residuals.stack` from one forward-Laplacian jet
over all points, :func:`torchsven.pinn.forward_laplacian`, so the factored
backend computes the step), the same rows by nested autograd
(``rows_autograd``, the general route and the tests' reference), the same
objective as a scalar for first-order optimizers (``loss``), a seeded model
and the relative L2 error on a held-out grid.

float64 end to end is one switch: ``dtype`` of :meth:`PoissonProblem.make_model`
and of :class:`BoxSampler` (both default to float64); the points set the dtype
of everything else, and Sven solves in float64 anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from . import pinn
from .residuals import stack

__all__ = [
    "BoxSampler",
    "HeatProblem",
    "PoissonProblem",
    "grid_points",
    "heat_1d",
    "poisson_2d",
    "poisson_5d",
]


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


class BoxSampler:
    r"""Uniform points in ``[0, 1]^d`` and on its boundary, reproducible per step.

    ``sample(step)`` draws from a generator seeded by ``(seed, step)`` alone, so
    the points of step k are the same whatever was drawn before (a resumed run
    resamples exactly). Boundary points: a face chosen uniformly (all faces of
    the cube have the same area), then uniform on that face.

    Args:
        dim: d >= 1.
        n_interior, n_boundary: points per draw.
        seed: base seed.
        dtype: dtype of the points (float64 by default).
        device: device of the points.
    """

    def __init__(
        self,
        dim: int,
        n_interior: int,
        n_boundary: int,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        self.dim = _check_count("dim", dim)
        self.n_interior = _check_count("n_interior", n_interior)
        self.n_boundary = _check_count("n_boundary", n_boundary, 0)
        self.seed = _check_count("seed", seed, 0)
        self.dtype = _check_dtype(dtype)
        self.device = torch.device("cpu") if device is None else torch.device(device)

    def generator(self, step: int) -> torch.Generator:
        """The CPU generator of draw ``step`` (seeded from ``(seed, step)``)."""
        step = _check_count("step", step, 0)
        entropy = np.random.SeedSequence([self.seed, step]).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(int(entropy[0]) << 31 | int(entropy[1]) >> 1)

    def sample(self, step: int = 0) -> tuple[Tensor, Tensor]:
        """(interior (n_interior, d), boundary (n_boundary, d)) points of draw ``step``."""
        g = self.generator(step)
        d = self.dim
        interior = torch.rand(self.n_interior, d, generator=g, dtype=torch.float64)
        boundary = torch.rand(self.n_boundary, d, generator=g, dtype=torch.float64)
        face = torch.randint(0, 2 * d, (self.n_boundary,), generator=g)
        boundary[torch.arange(self.n_boundary), face % d] = (face // d).to(torch.float64)
        return (
            interior.to(self.device, self.dtype),
            boundary.to(self.device, self.dtype),
        )


def grid_points(dim: int, per_dim: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Tensor grid of ``per_dim^dim`` points in ``[0, 1]^dim`` (ends included): (M, dim)."""
    _check_count("dim", dim)
    _check_count("per_dim", per_dim, 2)
    axis = torch.linspace(0, 1, per_dim, dtype=_check_dtype(dtype))
    return torch.cartesian_prod(*[axis] * dim).reshape(-1, dim)


def relative_l2(
    model: nn.Module, exact: Callable[[Tensor], Tensor], points: Tensor | Callable[..., Tensor]
) -> float:
    """``||u_model - u_exact|| / ||u_exact||`` on ``points`` (or on ``points(dtype)``)."""
    dtype = next(model.parameters()).dtype
    x = points(dtype) if callable(points) else points
    with torch.no_grad():
        u = model(x).reshape(-1)
        ref = exact(x)
        return float((u - ref).norm() / ref.norm())


@dataclass(frozen=True)
class PoissonProblem:
    r"""``-Lap u = source`` on ``[0, 1]^dim``, ``u = exact`` on the boundary.

    Attributes:
        name: short name ("poisson-2d").
        dim: d.
        exact: exact solution, points (n, d) -> (n,).
        source: right-hand side ``f = -Lap exact``, (n, d) -> (n,).
        width: hidden width of the reference MLP d-width-1 tanh.
        weights: group weights ``{"pde": w, "bc": w}`` of the objective
            ``0.5 * (w_pde MSE_pde + w_bc MSE_bc)``.
        grid_per_dim: points per axis of the held-out evaluation grid.
    """

    name: str
    dim: int
    exact: Callable[[Tensor], Tensor]
    source: Callable[[Tensor], Tensor]
    width: int
    weights: Mapping[str, float]
    grid_per_dim: int

    # ----------------------------------------------------------- residuals
    def pde_residual(self, u: Callable[[Tensor], Tensor] | Tensor, x: Tensor) -> Tensor:
        """``-Lap u(x) - f(x)`` (n,); u a callable, or a tensor computed from x."""
        return -pinn.laplacian(u, x) - self.source(x)

    def bc_residual(self, u: Callable[[Tensor], Tensor] | Tensor, x: Tensor) -> Tensor:
        """``u(x) - g(x)`` (n,) on boundary points."""
        values = u(x) if callable(u) and not isinstance(u, Tensor) else u
        return values.reshape(x.shape[0]) - self.exact(x)

    def rows(self, model: nn.Module, interior: Tensor, boundary: Tensor) -> Tensor:
        """Sven rows ``stack({"pde": ..., "bc": ...}, weights)`` from one forward-Laplacian
        jet over interior and boundary points together (factored backend)."""
        jet = pinn.forward_laplacian(model, torch.cat([interior, boundary]))
        inner, edge = jet.split([interior.shape[0], boundary.shape[0]])
        return stack(
            {
                "pde": -inner.laplacian[:, 0] - self.source(interior),
                "bc": edge.value[:, 0] - self.exact(boundary),
            },
            weights=self.weights,
        )

    def rows_pointwise(self, model: nn.Module, interior: Tensor, boundary: Tensor) -> Tensor:
        """The same rows by :func:`torchsven.pinn.pointwise_rows` (torch.func Jacobians;
        any model torch.func can run, generic backend)."""
        return stack(
            {
                "pde": pinn.pointwise_rows(model, self.pde_residual, interior),
                "bc": pinn.pointwise_rows(model, self.bc_residual, boundary),
            },
            weights=self.weights,
        )

    def rows_autograd(self, model: nn.Module, interior: Tensor, boundary: Tensor) -> Tensor:
        """The same rows by nested autograd (the tensor helpers; slower for Sven)."""
        x = interior.detach().requires_grad_(True)
        return stack(
            {
                "pde": self.pde_residual(model(x), x),
                "bc": self.bc_residual(model(boundary), boundary),
            },
            weights=self.weights,
        )

    def loss(self, model: nn.Module, interior: Tensor, boundary: Tensor) -> Tensor:
        """Scalar ``0.5 * sum_g w_g MSE_g`` (the Sven objective) for first-order optimizers,
        by nested autograd: its forward + backward measured ~2x faster than the jets'
        (Poisson 2D 8-10 vs 18-19 ms, 5D 36-48 vs 93-96 ms at load 10)."""
        return 0.5 * self.rows_autograd(model, interior, boundary).square().sum()

    # -------------------------------------------------------------- model
    def make_model(self, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
        """MLP ``d-width-1`` tanh, Xavier-normal weights, zero biases, from ``seed``."""
        g = torch.Generator().manual_seed(_check_count("seed", seed, 0))
        model = nn.Sequential(nn.Linear(self.dim, self.width), nn.Tanh(), nn.Linear(self.width, 1))
        with torch.no_grad():
            for layer in (model[0], model[2]):
                std = math.sqrt(2.0 / (layer.in_features + layer.out_features))
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * std)
                layer.bias.zero_()
        return model.to(_check_dtype(dtype))

    # ---------------------------------------------------------- evaluation
    def grid(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The held-out evaluation grid (grid_per_dim^dim points)."""
        return grid_points(self.dim, self.grid_per_dim, dtype=dtype)

    def relative_l2(self, model: nn.Module, points: Tensor | None = None) -> float:
        """``||u_model - u_exact|| / ||u_exact||`` on ``points`` (default: the grid)."""
        return relative_l2(model, self.exact, self.grid if points is None else points)


def _sin_product(x: Tensor) -> Tensor:
    return torch.sin(math.pi * x).prod(dim=1)


def _sin_sum(x: Tensor) -> Tensor:
    return torch.sin(math.pi * x).sum(dim=1)


def poisson_2d(width: int = 32) -> PoissonProblem:
    r"""``-Lap u = 2 pi^2 sin(pi x) sin(pi y)`` on ``[0,1]^2``, ``u = 0`` on the boundary;
    exact ``u = sin(pi x) sin(pi y)``; MLP 2-32-1 tanh; 101 x 101 evaluation grid.
    Boundary weight 10: with weight 1 the error is dominated by the boundary
    (seed 0, 200 Sven steps: 1.8e-5 with weight 1, 4.4e-6 with weight 10)."""
    return PoissonProblem(
        name="poisson-2d",
        dim=2,
        exact=_sin_product,
        source=lambda x: 2 * math.pi**2 * _sin_product(x),
        width=_check_count("width", width),
        weights={"pde": 1.0, "bc": 10.0},
        grid_per_dim=101,
    )


def poisson_5d(width: int = 64) -> PoissonProblem:
    r"""``-Lap u = pi^2 sum_i sin(pi x_i)`` on ``[0,1]^5``, ``u = sum_i sin(pi x_i)``
    on the boundary (the exact solution); MLP 5-64-1 tanh; 9^5 evaluation grid."""
    return PoissonProblem(
        name="poisson-5d",
        dim=5,
        exact=_sin_sum,
        source=lambda x: math.pi**2 * _sin_sum(x),
        width=_check_count("width", width),
        weights={"pde": 1.0, "bc": 1.0},
        grid_per_dim=9,
    )


# --------------------------------------------------------------------------- heat
@dataclass(frozen=True)
class HeatProblem:
    r"""``u_t = kappa u_xx`` on ``(x, t) in [0, 1]^2``, ``u(x, 0) = sin(pi x)``, ``u = 0`` at
    ``x = 0, 1``; exact ``u = exp(-kappa pi^2 t) sin(pi x)``. Points are ``(x, t)``.

    Attributes:
        name: short name ("heat-1d").
        diffusivity: kappa.
        width: hidden width of the MLP 2-width-width-1 tanh.
        weights: group weights ``{"pde", "initial", "boundary"}`` of the objective
            ``0.5 * sum_g w_g MSE_g``.
        grid_per_dim: points per axis of the held-out evaluation grid.
    """

    name: str = "heat-1d"
    diffusivity: float = 0.25
    width: int = 32
    weights: Mapping[str, float] = field(
        default_factory=lambda: {"pde": 1.0, "initial": 1.0, "boundary": 1.0}
    )
    grid_per_dim: int = 101

    def exact(self, x: Tensor) -> Tensor:
        """``exp(-kappa pi^2 t) sin(pi x)`` at points (n, 2) -> (n,)."""
        return torch.exp(-self.diffusivity * math.pi**2 * x[:, 1]) * torch.sin(math.pi * x[:, 0])

    def sample(
        self,
        n_interior: int,
        n_initial: int,
        n_boundary: int,
        *,
        seed: int = 0,
        step: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(interior (n_i, 2), initial (n_0, 2) at t = 0, boundary (n_b, 2) at x = 0 or 1),
        uniform, from ``(seed, step)`` alone (as :class:`BoxSampler`)."""
        for name, value in (("n_interior", n_interior), ("n_initial", n_initial)):
            _check_count(name, value)
        _check_count("n_boundary", n_boundary)
        g = BoxSampler(2, 1, 0, seed=seed).generator(step)
        interior = torch.rand(n_interior, 2, generator=g, dtype=torch.float64)
        initial = torch.rand(n_initial, 2, generator=g, dtype=torch.float64)
        initial[:, 1] = 0.0
        boundary = torch.rand(n_boundary, 2, generator=g, dtype=torch.float64)
        boundary[:, 0] = (torch.arange(n_boundary) % 2).to(torch.float64)
        dtype = _check_dtype(dtype)
        return interior.to(dtype), initial.to(dtype), boundary.to(dtype)

    def _groups(self, jet: pinn.LaplacianJet, points: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        inner, start, edge = jet.split([p.shape[0] for p in points])
        return stack(
            {
                # u_t - kappa u_xx
                "pde": inner.gradient[:, 0, 1] - self.diffusivity * inner.laplacian[:, 0],
                "initial": start.value[:, 0] - self.exact(points[1]),
                "boundary": edge.value[:, 0],
            },
            weights=self.weights,
        )

    def rows(self, model: nn.Module, interior: Tensor, initial: Tensor, boundary: Tensor) -> Tensor:
        """Sven rows ``stack({"pde", "initial", "boundary"})`` from one forward-Laplacian jet
        (Laplacian over x only) over all points (factored backend)."""
        points = (interior, initial, boundary)
        jet = pinn.forward_laplacian(model, torch.cat(points), dims=[0])
        return self._groups(jet, points)

    def rows_autograd(
        self, model: nn.Module, interior: Tensor, initial: Tensor, boundary: Tensor
    ) -> Tensor:
        """The same rows by nested autograd (the natural closure; generic backend)."""
        x = interior.detach().requires_grad_(True)
        u = model(x)
        grad = pinn.gradient(u, x)
        u_xx = pinn.hessian_diagonal(u, x)[:, 0]
        return stack(
            {
                "pde": grad[:, 1] - self.diffusivity * u_xx,
                "initial": model(initial)[:, 0] - self.exact(initial),
                "boundary": model(boundary)[:, 0],
            },
            weights=self.weights,
        )

    def rows_pointwise(
        self, model: nn.Module, interior: Tensor, initial: Tensor, boundary: Tensor
    ) -> Tensor:
        """The same rows by :func:`torchsven.pinn.pointwise_rows` (torch.func Jacobians;
        the fast route on the generic backend)."""
        kappa = self.diffusivity

        def pde(u, x: Tensor) -> Tensor:
            return pinn.time_derivative(u, x) - kappa * pinn.hessian_diagonal(u, x)[:, 0]

        def start(u, x: Tensor) -> Tensor:
            return u(x)[:, 0] - self.exact(x)

        def edge(u, x: Tensor) -> Tensor:
            return u(x)[:, 0]

        return stack(
            {
                "pde": pinn.pointwise_rows(model, pde, interior),
                "initial": pinn.pointwise_rows(model, start, initial),
                "boundary": pinn.pointwise_rows(model, edge, boundary),
            },
            weights=self.weights,
        )

    def loss(self, model: nn.Module, interior: Tensor, initial: Tensor, boundary: Tensor) -> Tensor:
        """Scalar ``0.5 * sum_g w_g MSE_g`` (the Sven objective) for first-order optimizers,
        by nested autograd (forward + backward ~1.5x faster than the jets' here)."""
        return 0.5 * self.rows_autograd(model, interior, initial, boundary).square().sum()

    def make_model(self, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
        """MLP ``2-width-width-1`` tanh, Xavier-normal weights, zero biases, from ``seed``."""
        g = torch.Generator().manual_seed(_check_count("seed", seed, 0))
        w = _check_count("width", self.width)
        model = nn.Sequential(
            nn.Linear(2, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 1)
        )
        with torch.no_grad():
            for layer in (model[0], model[2], model[4]):
                std = math.sqrt(2.0 / (layer.in_features + layer.out_features))
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * std)
                layer.bias.zero_()
        return model.to(_check_dtype(dtype))

    def grid(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The held-out evaluation grid (grid_per_dim^2 points (x, t))."""
        return grid_points(2, self.grid_per_dim, dtype=dtype)

    def relative_l2(self, model: nn.Module, points: Tensor | None = None) -> float:
        """``||u_model - u_exact|| / ||u_exact||`` on ``points`` (default: the grid)."""
        return relative_l2(model, self.exact, self.grid if points is None else points)


def heat_1d(width: int = 32, diffusivity: float = 0.25) -> HeatProblem:
    r"""``u_t = u_xx / 4`` on ``[0, 1]^2`` (points (x, t)), ``u(x, 0) = sin(pi x)``,
    ``u(0, t) = u(1, t) = 0``; exact ``exp(-pi^2 t / 4) sin(pi x)``; MLP 2-32-32-1 tanh;
    101 x 101 evaluation grid."""
    if isinstance(diffusivity, bool) or not isinstance(diffusivity, (int, float)):
        raise TypeError(f"diffusivity must be a real number, got {type(diffusivity).__name__}")
    if not (math.isfinite(diffusivity) and diffusivity > 0):
        raise ValueError(f"diffusivity must be a finite number > 0, got {diffusivity}")
    return HeatProblem(width=_check_count("width", width), diffusivity=float(diffusivity))
