r"""Physics-informed residuals: input derivatives of a network on a batch of points.

Three ways to write a PDE residual for Sven, same numbers, different cost:

* **Forward jets** (fast; :mod:`torchsven.jets`): ``value, grad, lap =
  forward_laplacian(model, x)`` carries the value, the d first derivatives and
  the Laplacian through the model's own modules in one forward pass (also
  :func:`forward_hessian_diagonal`, :func:`forward_operator` for
  ``sum_ij A_ij d^2u/dx_i dx_j``). Rows built from it run on Sven's factored
  backend (exact Gram matrix, one backward per step) when the model is called
  once on all points (interior and boundary together; cut the result with
  ``.split``). Models: Linear layers, elementwise activations, sequential and
  residual containers.
* **Tensor helpers** (nested autograd; the general fallback, any model): ``x.requires_grad_(True)``,
  ``u = model(x)``, then ``laplacian(u, x)``, ``gradient(u, x)``, ... Every
  helper builds its graph with ``create_graph=True``, so the rows can be
  differentiated again with respect to the parameters (Sven's generic backend,
  Adam, L-BFGS). They assume that row ``i`` of ``u`` depends only on row ``i``
  of ``x`` (true for any pointwise network; not for BatchNorm in train mode).
* **Callable helpers** (``torch.func``): pass a function ``u(x)`` mapping
  (n, d) -> (n,) instead of a tensor; the derivative is taken point by point
  with ``vmap(jacfwd(jacrev(.)))``. These compose with further ``torch.func``
  transforms, which is what :func:`pointwise_rows` needs.

:func:`pointwise_rows` evaluates a pointwise residual ``residual(u, x)`` on all
points together with its Jacobian with respect to the model's parameters
(``vmap`` over points of ``jacrev``), and returns rows whose backward is a
product with that Jacobian. Sven's generic backend then gets its (N, P)
Jacobian from N cheap products instead of N backward passes through the
second-order graph. Measured on this project's 2-core CPU, one thread (MLP
2-32-1 tanh, 920 rows, float64; ``benchmarks/pinn_derivatives.py``): rows by
nested autograd, Jacobian by the generic backend 3.2 s (batched) / 0.93 s
(per-row loop); the same rows and Jacobian by :func:`pointwise_rows` 73 ms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call, jacfwd, jacrev, vmap

from .jets import (
    HessianDiagonalJet,
    LaplacianJet,
    OperatorJet,
    Residual,
    Sin,
    forward_hessian_diagonal,
    forward_jet,
    forward_laplacian,
    forward_operator,
)

__all__ = [
    "HessianDiagonalJet",
    "LaplacianJet",
    "OperatorJet",
    "Residual",
    "Sin",
    "divergence",
    "forward_hessian_diagonal",
    "forward_jet",
    "forward_laplacian",
    "forward_operator",
    "gradient",
    "hessian",
    "hessian_diagonal",
    "laplacian",
    "pointwise_rows",
    "time_derivative",
]

Field = Tensor | Callable[[Tensor], Tensor]


# --------------------------------------------------------------------- checks
def _check_points(x: Any, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor of points (N, d), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be a 2-D tensor of points (N, d), got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _scalar_field(u: Tensor, x: Tensor) -> Tensor:
    """u as (N,) for a tensor of shape (N,) or (N, 1) computed from x (N, d)."""
    if u.dim() == 2 and u.shape[1] == 1:
        u = u.squeeze(1)
    if u.dim() != 1 or u.shape[0] != x.shape[0]:
        raise ValueError(
            f"u must have shape (N,) or (N, 1) with N = {x.shape[0]} points, got {tuple(u.shape)}"
        )
    return u


def _check_graph(u: Tensor, x: Tensor, name: str = "u") -> None:
    if not x.requires_grad:
        raise ValueError(
            "x must require grad (x.requires_grad_(True)) and "
            f"{name} must be computed from it, e.g. {name} = model(x)"
        )
    if not u.requires_grad:
        raise ValueError(f"{name} has no grad_fn: compute it from x with autograd enabled")


def _check_time_dim(time_dim: Any, d: int) -> int:
    if isinstance(time_dim, bool) or not isinstance(time_dim, int):
        raise TypeError(f"time_dim must be an int, got {type(time_dim).__name__}")
    if not -d <= time_dim < d:
        raise ValueError(f"time_dim must index one of the d = {d} coordinates, got {time_dim}")
    return time_dim % d


# ------------------------------------------------------- nested autograd path
def _grad(y: Tensor, x: Tensor) -> Tensor:
    """``d sum(y) / dx`` with create_graph; zeros where y does not depend on x."""
    if not y.requires_grad:  # y is constant in x (e.g. the gradient of a linear u)
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _autograd_hessian_rows(u: Tensor, x: Tensor, diagonal_only: bool) -> Tensor:
    g = _grad(u, x)
    rows = [_grad(g[:, i], x) for i in range(x.shape[1])]
    if diagonal_only:
        return torch.stack([row[:, i] for i, row in enumerate(rows)], dim=1)
    return torch.stack(rows, dim=1)


# --------------------------------------------------------------- torch.func path
def _point_scalar(u: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``z (d,) -> u(z[None])`` as a 0-dim tensor."""

    def scalar(z: Tensor) -> Tensor:
        out = u(z.unsqueeze(0))
        if out.numel() != 1:
            raise ValueError(
                "u must map points (n, d) to one value per point, (n,) or (n, 1); "
                f"for n = 1 it returned shape {tuple(out.shape)}"
            )
        return out.reshape(())

    return scalar


def _per_point(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn`` applied to every row of x (N, d), stacked; no vmap for a single point
    (the common case inside :func:`pointwise_rows`, which already maps over points)."""
    if x.shape[0] == 1:
        return fn(x[0]).unsqueeze(0)
    return vmap(fn)(x)


def _func_hessian(u: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    return _per_point(jacfwd(jacrev(_point_scalar(u))), x)


# ------------------------------------------------------------------ helpers
def gradient(u: Field, x: Tensor) -> Tensor:
    r"""``grad_x u`` at every point: (N, d).

    Args:
        u: values (N,) or (N, 1) computed from ``x`` (which requires grad), or a
            callable mapping points (n, d) to (n,) or (n, 1).
        x: points (N, d).
    """
    x = _check_points(x)
    if callable(u) and not isinstance(u, Tensor):
        return _per_point(jacrev(_point_scalar(u)), x)
    u = _scalar_field(_as_tensor(u), x)
    _check_graph(u, x)
    return _grad(u, x)


def hessian(u: Field, x: Tensor) -> Tensor:
    r"""Hessian ``d^2 u / dx_i dx_j`` at every point: (N, d, d)."""
    x = _check_points(x)
    if callable(u) and not isinstance(u, Tensor):
        return _func_hessian(u, x)
    u = _scalar_field(_as_tensor(u), x)
    _check_graph(u, x)
    return _autograd_hessian_rows(u, x, diagonal_only=False)


def hessian_diagonal(u: Field, x: Tensor) -> Tensor:
    r"""``d^2 u / dx_i^2`` for every coordinate i at every point: (N, d)."""
    x = _check_points(x)
    if callable(u) and not isinstance(u, Tensor):
        return _func_hessian(u, x).diagonal(dim1=1, dim2=2)
    u = _scalar_field(_as_tensor(u), x)
    _check_graph(u, x)
    return _autograd_hessian_rows(u, x, diagonal_only=True)


def laplacian(u: Field, x: Tensor) -> Tensor:
    r"""``Lap u = sum_i d^2 u / dx_i^2`` at every point: (N,)."""
    return hessian_diagonal(u, x).sum(dim=1)


def divergence(v: Field, x: Tensor) -> Tensor:
    r"""``div v = sum_i d v_i / dx_i`` of a vector field at every point: (N,).

    Args:
        v: values (N, d) computed from ``x``, or a callable (n, d) -> (n, d).
        x: points (N, d).
    """
    x = _check_points(x)
    n, d = x.shape
    if callable(v) and not isinstance(v, Tensor):

        def field(z: Tensor) -> Tensor:
            out = v(z.unsqueeze(0))
            if out.numel() != d:
                raise ValueError(
                    f"v must map points (n, {d}) to vectors (n, {d}); for n = 1 it "
                    f"returned shape {tuple(out.shape)}"
                )
            return out.reshape(d)

        return _per_point(jacfwd(field), x).diagonal(dim1=1, dim2=2).sum(dim=1)
    v = _as_tensor(v, "v")
    if tuple(v.shape) != (n, d):
        raise ValueError(f"v must have shape (N, d) = {(n, d)}, got {tuple(v.shape)}")
    _check_graph(v, x, "v")
    return torch.stack([_grad(v[:, i], x)[:, i] for i in range(d)], dim=1).sum(dim=1)


def time_derivative(u: Field, x: Tensor, time_dim: int = -1) -> Tensor:
    r"""``du/dt`` at every point, t being coordinate ``time_dim`` of x: (N,)."""
    x = _check_points(x)
    return gradient(u, x)[:, _check_time_dim(time_dim, x.shape[1])]


def _as_tensor(u: Any, name: str = "u") -> Tensor:
    if not isinstance(u, Tensor):
        raise TypeError(f"{name} must be a tensor or a callable, got {type(u).__name__}")
    if not u.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {u.dtype}")
    return u


# --------------------------------------------------------- pointwise rows
def pointwise_rows(
    model: nn.Module,
    residual: Callable[..., Tensor],
    points: Tensor,
    *data: Tensor,
) -> Tensor:
    r"""Residual rows of a pointwise residual, with a fast parameter Jacobian.

    ``residual(u, x, *data)`` gets the network as a callable ``u`` (points
    (n, d) -> its output, e.g. (n, 1)), points ``x`` (n, d) and the matching
    slices of ``data`` (each (n, ...)), and returns the residual (n,) or
    (n, m). Write it with the callable helpers of this module, e.g.
    ``lambda u, x: -laplacian(u, x) - source(x)``. Row ``i`` must depend only
    on point ``i``.

    Returns ``residual(model, points, *data)`` as a tensor (N,) or (N, m)
    that depends on the model's trainable parameters (``requires_grad``)
    through their exact Jacobian, computed here by ``vmap`` over points of
    ``jacrev``. Its backward (``J^T g``) is what Sven, Adam or L-BFGS need;
    second derivatives with respect to the parameters are not available
    through it (use the tensor helpers for those). ``points`` and ``data``
    are treated as constants. The model is called through
    ``torch.func.functional_call``; it is neither changed nor wrapped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(residual):
        raise TypeError(f"residual must be callable, got {type(residual).__name__}")
    points = _check_points(points, "points")
    n = points.shape[0]
    for k, item in enumerate(data):
        if not isinstance(item, Tensor):
            raise TypeError(f"data[{k}] must be a tensor, got {type(item).__name__}")
        if item.dim() == 0 or item.shape[0] != n:
            raise ValueError(
                f"data[{k}] must have one entry per point (leading dimension {n}), "
                f"got shape {tuple(item.shape)}"
            )
    named = dict(model.named_parameters())
    trainable = {k: p for k, p in named.items() if p.requires_grad}
    frozen = {k: p.detach() for k, p in named.items() if not p.requires_grad}
    for p in trainable.values():
        if p.dtype != points.dtype or p.device != points.device:
            raise ValueError(
                f"points must have the parameters' dtype and device ({p.dtype}, {p.device}), "
                f"got ({points.dtype}, {points.device}); e.g. points.to(model_dtype)"
            )
    buffers = dict(model.named_buffers())
    names = list(trainable)

    def rows_at(theta: dict[str, Tensor], x: Tensor, *d: Tensor) -> Tensor:
        state = {**frozen, **theta, **buffers}

        def u(z: Tensor) -> Tensor:
            return functional_call(model, state, (z,))

        out = residual(u, x.unsqueeze(0), *(t.unsqueeze(0) for t in d))
        if not isinstance(out, Tensor):
            raise TypeError(f"residual must return a tensor, got {type(out).__name__}")
        if out.dim() == 0 or out.shape[0] != 1:
            raise ValueError(
                "residual(u, x, *data) must return one entry per point, shape (n,) or "
                f"(n, m); for n = 1 it returned shape {tuple(out.shape)}"
            )
        return out.squeeze(0)

    # A snapshot of the parameters: the Jacobian is computed lazily, on the first
    # backward, and must belong to the parameters these values came from.
    theta = {k: trainable[k].detach().clone() for k in names}
    in_dims = (None, 0, *[0] * len(data))
    with torch.no_grad():
        values = vmap(rows_at, in_dims=in_dims)(theta, points, *data)
    if not trainable or not torch.is_grad_enabled():
        return values

    def jacobians() -> tuple[Tensor, ...]:
        with torch.no_grad():
            jac = vmap(jacrev(rows_at), in_dims=in_dims)(theta, points, *data)
        return tuple(jac[k] for k in names)

    return _JacobianRows.apply(values, jacobians, *(trainable[k] for k in names))


class _JacobianRows(torch.autograd.Function):
    """Rows whose backward is a product with their Jacobian: ``g -> sum_rows g * J_p``.

    ``jacobians()`` returns, per parameter, J_p of shape ``values.shape +
    params[k].shape``; it is called on the first backward only (a step that
    merely evaluates the rows, e.g. an adaptive-damping trial, never pays for it).
    """

    @staticmethod
    def forward(
        ctx: Any,
        values: Tensor,
        jacobians: Callable[[], tuple[Tensor, ...]],
        *params: Tensor,
    ) -> Tensor:
        ctx.make_jacobians = jacobians
        ctx.jacobians = None
        ctx.rows = values.numel()
        ctx.shapes = [p.shape for p in params]
        return values.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.jacobians is None:
            ctx.jacobians = ctx.make_jacobians()
        g = grad_rows.reshape(1, ctx.rows)
        grads = [
            (g @ jac.reshape(ctx.rows, -1)).reshape(shape)
            for jac, shape in zip(ctx.jacobians, ctx.shapes, strict=True)
        ]
        return (None, None, *grads)
