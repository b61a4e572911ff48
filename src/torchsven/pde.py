r"""PDE problems for physics-informed training: Poisson on the unit cube.

A :class:`PoissonProblem` is ``-Lap u = f`` on ``[0, 1]^d`` with ``u = g`` on
the boundary and a known exact solution. It gives the residual rows for Sven
(:meth:`PoissonProblem.rows`: weighted groups ``"pde"`` and ``"bc"`` built by
:func:`torchsven.residuals.stack`, Jacobian by :func:`torchsven.pinn.pointwise_rows`),
the same objective as a scalar for first-order optimizers
(:meth:`PoissonProblem.loss`), a seeded model and the relative L2 error on a
held-out grid.

float64 end to end is one switch: ``dtype`` of :meth:`PoissonProblem.make_model`
and of :class:`BoxSampler` (both default to float64); the points set the dtype
of everything else, and Sven solves in float64 anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from . import pinn
from .residuals import stack

__all__ = ["BoxSampler", "PoissonProblem", "grid_points", "poisson_2d", "poisson_5d"]


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
        """Sven rows: ``stack({"pde": ..., "bc": ...}, weights)`` with fast Jacobians."""
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
        """Scalar ``0.5 * sum_g w_g MSE_g`` (the Sven objective) for first-order optimizers."""
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
        dtype = next(model.parameters()).dtype
        x = self.grid(dtype) if points is None else points
        with torch.no_grad():
            u = model(x).reshape(-1)
            ref = self.exact(x)
            return float((u - ref).norm() / ref.norm())


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
