r"""Forward-mode jets: value, input gradient and second-order operators in one pass.

For points ``x`` (N, d) and a network ``u`` made of Linear layers, elementwise
activations and sequential / residual containers, :func:`forward_jet` computes
in one forward pass, for every point,

* the value ``u(x)``                                   (N, m),
* the first derivatives ``du/dx_k``                    (N, m, d),
* q constant-coefficient second-order operators
  ``L_k u = sum_ij A_kij d^2u / dx_i dx_j``            (N, m, q)

(the Laplacian over some coordinates, the Hessian diagonal, or any constant
matrix A), by carrying C = 1 + d + q *channels* per point through the model's
own modules (docs/design.md, "PDE residuals: forward-Laplacian jets"):

* Linear ``h -> W h + b``:  value ``W h + b``, derivative channels ``W J``,
  operator channels ``W L``: one call of the module on the (N, C, d_in)
  channels with the bias on the value channel only;
* elementwise activation ``s``:  value ``s(h)``, ``J -> s'(h) J``,
  ``L_k -> s'(h) L_k + s''(h) sum_ij A_kij J_i J_j``
  (the chain rule for ``d^2 s(h) / dx_i dx_j = s' h_ij + s'' h_i h_j``).

Every Linear is thereby a weight-shared Linear over C positions per point with
its bias on position 0 only; the call is marked for the factored backend
(:func:`torchsven.backends.layers.bias_on_channels`), whose Gram matrix is then
exact (its guard still compares with autograd), so PDE residual rows built
from a jet run on the factored backend: no derivative of the network inside
autograd's graph, one backward per step.

Supported modules: ``nn.Linear``; ``nn.Tanh``, ``nn.Sigmoid``, ``nn.GELU``
(exact and ``approximate="tanh"``), ``nn.SiLU``, ``nn.Softplus`` (beta,
threshold: linear above it, as torch), ``nn.ELU``, :class:`Sin`; the piecewise
linear ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.Hardtanh`` / ``nn.ReLU6`` (second
derivative taken as 0: exact away from the kinks, where autograd agrees, but a
ReLU network's Laplacian misses the kinks' delta terms, so ReLU is a poor PINN
activation); ``nn.Identity``, ``nn.Dropout`` in eval mode or with p = 0;
``nn.Sequential``, :class:`Residual`; and any module that defines
``forward_jet(channels, propagate)`` (see :func:`forward_jet`). Anything else
is a ValueError naming the module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .backends.layers import bias_on_channels

__all__ = [
    "HessianDiagonalJet",
    "LaplacianJet",
    "OperatorJet",
    "Residual",
    "Sin",
    "forward_hessian_diagonal",
    "forward_jet",
    "forward_laplacian",
    "forward_operator",
]

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_K = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


# ----------------------------------------------------------------------- modules
class Sin(nn.Module):
    r"""Elementwise ``sin(frequency * x)`` (SIREN-style activation), jet-aware."""

    def __init__(self, frequency: float = 1.0) -> None:
        super().__init__()
        if isinstance(frequency, bool) or not isinstance(frequency, (int, float)):
            raise TypeError(f"frequency must be a real number, got {type(frequency).__name__}")
        if not math.isfinite(frequency):
            raise ValueError(f"frequency must be finite, got {frequency}")
        self.frequency = float(frequency)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.frequency * x) if self.frequency != 1.0 else torch.sin(x)

    def extra_repr(self) -> str:
        return f"frequency={self.frequency}"


class Residual(nn.Module):
    r"""``x -> body(x) + shortcut(x)`` (shortcut: identity by default), jet-aware.

    Args:
        body: the residual branch.
        shortcut: a module for the skip path (e.g. a Linear when widths differ),
            or None for the identity.
    """

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(body, nn.Module):
            raise TypeError(f"body must be an nn.Module, got {type(body).__name__}")
        if shortcut is not None and not isinstance(shortcut, nn.Module):
            raise TypeError(f"shortcut must be an nn.Module or None, got {type(shortcut).__name__}")
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.body(x) + skip

    def forward_jet(self, channels: Tensor, propagate: Callable[[nn.Module, Tensor], Tensor]):
        """Jets add: both branches are propagated and summed channel by channel."""
        skip = channels if self.shortcut is None else propagate(self.shortcut, channels)
        return propagate(self.body, channels) + skip


# ------------------------------------------------------------------ activations
#: (s(h), s'(h), s''(h)) of an elementwise activation module at pre-activation h.
Derivatives = tuple[Tensor, Tensor, Tensor]


def _tanh(module: nn.Module, h: Tensor) -> Derivatives:
    t = torch.tanh(h)
    d1 = 1.0 - t * t
    return t, d1, -2.0 * t * d1


def _sigmoid(module: nn.Module, h: Tensor) -> Derivatives:
    s = torch.sigmoid(h)
    d1 = s * (1.0 - s)
    return s, d1, d1 * (1.0 - 2.0 * s)


def _silu(module: nn.Module, h: Tensor) -> Derivatives:
    s = torch.sigmoid(h)
    ds = s * (1.0 - s)
    return F.silu(h), s + h * ds, ds * (2.0 + h * (1.0 - 2.0 * s))


def _gelu(module: nn.Module, h: Tensor) -> Derivatives:
    assert isinstance(module, nn.GELU)
    if module.approximate == "tanh":
        # s = h/2 (1 + tanh(u)), u = k (h + c h^3)
        u = _GELU_TANH_K * (h + _GELU_TANH_C * h**3)
        du = _GELU_TANH_K * (1.0 + 3.0 * _GELU_TANH_C * h * h)
        d2u = 6.0 * _GELU_TANH_K * _GELU_TANH_C * h
        t = torch.tanh(u)
        sech2 = 1.0 - t * t
        d1 = 0.5 * (1.0 + t) + 0.5 * h * sech2 * du
        d2 = sech2 * (du + 0.5 * h * (d2u - 2.0 * t * du * du))
        return F.gelu(h, approximate="tanh"), d1, d2
    # s = h Phi(h): s' = Phi + h phi, s'' = phi (2 - h^2)
    phi = _INV_SQRT_2PI * torch.exp(-0.5 * h * h)
    cdf = 0.5 * (1.0 + torch.erf(h / _SQRT_2))
    return F.gelu(h), cdf + h * phi, phi * (2.0 - h * h)


def _softplus(module: nn.Module, h: Tensor) -> Derivatives:
    assert isinstance(module, nn.Softplus)
    beta, threshold = module.beta, module.threshold
    z = beta * h
    linear = z > threshold  # torch's softplus is the identity there
    s = torch.sigmoid(z)
    d1 = torch.where(linear, torch.ones_like(h), s)
    d2 = torch.where(linear, torch.zeros_like(h), beta * s * (1.0 - s))
    return F.softplus(h, beta, threshold), d1, d2


def _elu(module: nn.Module, h: Tensor) -> Derivatives:
    assert isinstance(module, nn.ELU)
    negative = module.alpha * torch.exp(torch.clamp(h, max=0.0))
    positive = h > 0
    d1 = torch.where(positive, torch.ones_like(h), negative)
    d2 = torch.where(positive, torch.zeros_like(h), negative)
    return F.elu(h, module.alpha), d1, d2


def _sin(module: nn.Module, h: Tensor) -> Derivatives:
    assert isinstance(module, Sin)
    w = module.frequency
    s, c = torch.sin(w * h), torch.cos(w * h)
    return s, w * c, -(w * w) * s


def _relu(module: nn.Module, h: Tensor) -> Derivatives:
    d1 = (h > 0).to(h.dtype)
    return torch.relu(h), d1, torch.zeros_like(h)


def _leaky_relu(module: nn.Module, h: Tensor) -> Derivatives:
    assert isinstance(module, nn.LeakyReLU)
    slope = module.negative_slope
    d1 = torch.where(h > 0, torch.ones_like(h), torch.full_like(h, slope))
    return F.leaky_relu(h, slope), d1, torch.zeros_like(h)


def _hardtanh(module: nn.Module, h: Tensor) -> Derivatives:
    assert isinstance(module, nn.Hardtanh)
    lo, hi = module.min_val, module.max_val
    d1 = ((h > lo) & (h < hi)).to(h.dtype)
    return F.hardtanh(h, lo, hi), d1, torch.zeros_like(h)


#: Elementwise activations by exact type (subclasses may change forward).
ACTIVATIONS: dict[type[nn.Module], Callable[[nn.Module, Tensor], Derivatives]] = {
    nn.Tanh: _tanh,
    nn.Sigmoid: _sigmoid,
    nn.SiLU: _silu,
    nn.GELU: _gelu,
    nn.Softplus: _softplus,
    nn.ELU: _elu,
    Sin: _sin,
    nn.ReLU: _relu,
    nn.LeakyReLU: _leaky_relu,
    nn.Hardtanh: _hardtanh,
    nn.ReLU6: _hardtanh,
}


# --------------------------------------------------------------- propagation
class _Operators:
    """The q second-order operators: ``quad(J) = sum_ij A_kij J_i J_j`` (N, q, f).

    Diagonal operators (Laplacian over dims, Hessian diagonal) use the squares
    of the derivative channels only.
    """

    def __init__(self, coefficients: Tensor) -> None:
        self.coefficients = coefficients  # (q, d, d)
        off = coefficients - torch.diag_embed(coefficients.diagonal(dim1=1, dim2=2))
        self.diagonal = None if bool(off.any()) else coefficients.diagonal(dim1=1, dim2=2)
        #: one operator, the full Laplacian: the sum of all squares
        self.laplacian = (
            self.diagonal is not None
            and self.diagonal.shape[0] == 1
            and bool((self.diagonal == 1).all())
        )
        self._cast: dict[torch.dtype, Tensor] = {}

    def _as(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        if dtype not in self._cast:
            self._cast[dtype] = t.to(dtype)
        return self._cast[dtype]

    def quad(self, first: Tensor) -> Tensor:
        """``first`` (N, d, *f) -> (N, q, *f)."""
        if self.diagonal is not None:
            sq = first * first
            if self.laplacian:
                return sq.sum(dim=1, keepdim=True)
            return torch.einsum("kd,nd...->nk...", self._as(self.diagonal, first.dtype), sq)
        a = self._as(self.coefficients, first.dtype)
        return torch.einsum("ni...,kij,nj...->nk...", first, a, first)


class _Propagator:
    """Carries the channels (N, C, *f) = [value, d derivatives, q operators] through modules."""

    def __init__(self, d: int, operators: _Operators) -> None:
        self.d = d
        self.operators = operators
        self.channels = 1 + d + operators.coefficients.shape[0]
        self.mask = (True,) + (False,) * (self.channels - 1)

    def __call__(self, module: nn.Module, z: Tensor, path: str = "") -> Tensor:
        return self.propagate(module, z, path)

    def propagate(self, module: nn.Module, z: Tensor, path: str) -> Tensor:
        kind = type(module)
        if kind is nn.Sequential:
            # _modules, not named_children(): a module may appear twice (shared)
            for name, child in module._modules.items():
                if child is None:
                    continue
                z = self.propagate(child, z, f"{path}.{name}" if path else name)
            return z
        if kind is nn.Linear or (
            isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
        ):
            return self._linear(module, z)
        if kind in ACTIVATIONS:
            return self._activation(module, ACTIVATIONS[kind], z)
        if kind is nn.Identity:
            return z
        if isinstance(module, nn.Dropout) and type(module).forward is nn.Dropout.forward:
            if module.training and module.p > 0:
                raise ValueError(
                    f"cannot propagate jets through module '{path or '<model>'}' (Dropout in "
                    "training mode draws a random mask); call .eval() on it or use p=0"
                )
            return z
        hook = getattr(module, "forward_jet", None)
        if callable(hook):

            def child(sub: nn.Module, channels: Tensor) -> Tensor:
                sub_path = next(
                    (f"{path}.{n}" if path else n for n, m in module.named_children() if m is sub),
                    path,
                )
                return self.propagate(sub, channels, sub_path)

            out = hook(z, child)
            if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[:2] != z.shape[:2]:
                raise ValueError(
                    f"forward_jet of module '{path or '<model>'}' ({kind.__name__}) must return "
                    f"channels of shape ({z.shape[0]}, {z.shape[1]}, ...), got "
                    f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
                )
            return out
        raise ValueError(
            f"cannot propagate jets through module '{path or '<model>'}' ({kind.__name__}): "
            "supported are nn.Linear, elementwise activations ("
            + ", ".join(sorted(t.__name__ for t in ACTIVATIONS))
            + "), nn.Identity, nn.Dropout (eval), nn.Sequential, torchsven.jets.Residual, and "
            "modules that define forward_jet(channels, propagate); for anything else use "
            "the autograd helpers (torchsven.pinn.laplacian) and the generic backend"
        )

    def _linear(self, module: nn.Linear, z: Tensor) -> Tensor:
        if z.dim() != 3 or z.shape[-1] != module.in_features:
            raise ValueError(
                f"Linear({module.in_features}, {module.out_features}) got channels of shape "
                f"{tuple(z.shape)}; jets need features (N, C, {module.in_features})"
            )
        with bias_on_channels(self.mask):
            if module.bias is None:
                return module(z)
            # The module's own call without its bias (hooks see W z on all channels),
            # then the bias on the value channel only.
            out = functional_call(module, {"bias": None}, (z,))
        value, rest = torch.split(out, [1, self.channels - 1], dim=1)
        return torch.cat([value + module.bias, rest], dim=1)

    def _parts(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(value (N, 1, *f), first (N, d, *f), operators (N, q, *f)) of channels z.

        ``torch.split``, not slicing: the backward of a slice allocates and fills a
        zero tensor of z's size per slice (measured: 30% of a jet forward + backward).
        """
        return torch.split(z, [1, self.d, self.channels - 1 - self.d], dim=1)

    def _activation(self, module: nn.Module, rule: Callable, z: Tensor) -> Tensor:
        h, first, second = self._parts(z)
        value, d1, d2 = rule(module, h.squeeze(1))
        d1 = d1.unsqueeze(1)
        new_first = d1 * first
        new_second = d1 * second + d2.unsqueeze(1) * self.operators.quad(first)
        return torch.cat([value.unsqueeze(1), new_first, new_second], dim=1)


# --------------------------------------------------------------------- public
class OperatorJet(NamedTuple):
    """``forward_operator``'s result: value (N, m), gradient (N, m, d), operators (N, m, q)."""

    value: Tensor
    gradient: Tensor
    operators: Tensor


class LaplacianJet(NamedTuple):
    """``forward_laplacian``'s result: value (N, m), gradient (N, m, d), laplacian (N, m).

    ``split(sizes)`` cuts it into jets of consecutive point sets (e.g. interior
    and boundary points evaluated in one call).
    """

    value: Tensor
    gradient: Tensor
    laplacian: Tensor

    def split(self, sizes: Sequence[int]) -> list[LaplacianJet]:
        """Jets of the consecutive point sets of ``sizes`` points each (sum = N)."""
        return [
            LaplacianJet(*parts) for parts in zip(*(_split(t, sizes) for t in self), strict=True)
        ]


class HessianDiagonalJet(NamedTuple):
    """``forward_hessian_diagonal``'s result: value (N, m), gradient (N, m, d),
    hessian_diagonal (N, m, k) for the k chosen coordinates."""

    value: Tensor
    gradient: Tensor
    hessian_diagonal: Tensor

    def split(self, sizes: Sequence[int]) -> list[HessianDiagonalJet]:
        """Jets of the consecutive point sets of ``sizes`` points each (sum = N)."""
        return [
            HessianDiagonalJet(*parts)
            for parts in zip(*(_split(t, sizes) for t in self), strict=True)
        ]


def _split(t: Tensor, sizes: Sequence[int]) -> tuple[Tensor, ...]:
    sizes = list(sizes)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes):
        raise TypeError(f"sizes must be non-negative ints, got {sizes}")
    if sum(sizes) != t.shape[0]:
        raise ValueError(f"sizes must add up to the {t.shape[0]} points, got {sizes}")
    return torch.split(t, sizes)


def _check_inputs(model: object, x: object) -> tuple[nn.Module, Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor of points (N, d), got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"x must be a 2-D tensor of points (N, d), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    return model, x


def _check_dims(dims: object, d: int) -> list[int]:
    """``dims`` (None: all) as a list of distinct coordinates in [0, d)."""
    if dims is None:
        return list(range(d))
    if isinstance(dims, (int, bool)) or not isinstance(dims, Sequence):
        raise TypeError(f"dims must be a sequence of coordinate indices or None, got {dims!r}")
    out = []
    for k in dims:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"dims must hold ints, got {k!r}")
        if not -d <= k < d:
            raise ValueError(f"dims must index the d = {d} coordinates, got {k}")
        out.append(k % d)
    if not out:
        raise ValueError("dims must name at least one coordinate")
    if len(set(out)) != len(out):
        raise ValueError(f"dims must not repeat a coordinate, got {list(dims)}")
    return out


def forward_jet(model: nn.Module, x: Tensor, coefficients: Tensor) -> OperatorJet:
    r"""Value, gradient and q operators ``sum_ij A_kij d^2u/dx_i dx_j`` in one forward pass.

    Args:
        model: the network (see the module docstring for supported modules);
            called module by module, never as a whole; its parameters stay in
            autograd's graph (rows built from the result are differentiable).
        x: points (N, d); treated as constants (no gradient flows to x).
        coefficients: A, (q, d, d) (or (d, d) for q = 1), constant.

    Returns:
        :class:`OperatorJet` (value (N, m), gradient (N, m, d), operators
        (N, m, q)) for a model with outputs (N, m).

    A module the propagation does not know may define
    ``forward_jet(channels, propagate) -> channels``: ``channels`` is (N, C, *f)
    with C = 1 + d + q (value, the d first derivatives, the q operators, in
    that order along dim 1) and ``propagate(child, channels)`` runs a child
    module; see :class:`Residual`.
    """
    model, x = _check_inputs(model, x)
    if not isinstance(coefficients, Tensor) or not coefficients.is_floating_point():
        raise TypeError("coefficients must be a floating-point tensor (q, d, d) or (d, d)")
    n, d = x.shape
    a = coefficients.detach().to(device=x.device, dtype=torch.float64)
    if a.dim() == 2:
        a = a.unsqueeze(0)
    if a.dim() != 3 or a.shape[1:] != (d, d) or a.shape[0] == 0:
        raise ValueError(
            f"coefficients must have shape (q, {d}, {d}) or ({d}, {d}) for d = {d} "
            f"coordinates, got {tuple(coefficients.shape)}"
        )
    if not bool(torch.isfinite(a).all()):
        raise ValueError("coefficients must be finite")
    prop = _Propagator(d, _Operators(a))
    x = x.detach()
    eye = torch.eye(d, dtype=x.dtype, device=x.device).expand(n, d, d)
    zeros = x.new_zeros(n, a.shape[0], d)
    z = prop(model, torch.cat([x.unsqueeze(1), eye, zeros], dim=1))
    if z.dim() != 3:
        raise ValueError(
            f"the model's output channels have shape {tuple(z.shape)}; jets need (N, C, m)"
        )
    value, first, ops = prop._parts(z)
    value = value.squeeze(1)
    gradient = first.transpose(1, 2)
    operators = ops.transpose(1, 2)
    return OperatorJet(value, gradient, operators)


def forward_laplacian(
    model: nn.Module, x: Tensor, dims: Sequence[int] | None = None
) -> LaplacianJet:
    r"""Value, gradient and Laplacian ``sum_{k in dims} d^2u/dx_k^2`` in one forward pass.

    Args:
        model: the network, outputs (N, m); see :func:`forward_jet`.
        x: points (N, d).
        dims: coordinates of the Laplacian (default: all d), e.g. ``[0]`` for
            the spatial part of ``(x, t)`` points.

    Returns:
        :class:`LaplacianJet` ``(value (N, m), gradient (N, m, d), laplacian (N, m))``;
        the gradient is over all d coordinates.

    Rows built from it (e.g. ``-lap[:, 0] - f(x)``) run on Sven's factored
    backend (exact Gram matrix, no fallback) when the model is called once on
    all points: put interior and boundary points in one ``x`` and cut the
    result with :meth:`LaplacianJet.split`.
    """
    model, x = _check_inputs(model, x)
    d = x.shape[1]
    diag = torch.zeros(1, d, d, dtype=torch.float64)
    diag[0, _check_dims(dims, d), _check_dims(dims, d)] = 1.0
    value, gradient, ops = forward_jet(model, x, diag)
    return LaplacianJet(value, gradient, ops[..., 0])


def forward_hessian_diagonal(
    model: nn.Module, x: Tensor, dims: Sequence[int] | None = None
) -> HessianDiagonalJet:
    r"""Value, gradient and ``d^2u/dx_k^2`` for each k in ``dims`` (default all), one pass.

    Returns :class:`HessianDiagonalJet` ``(value (N, m), gradient (N, m, d),
    hessian_diagonal (N, m, len(dims)))``.
    """
    model, x = _check_inputs(model, x)
    d = x.shape[1]
    chosen = _check_dims(dims, d)
    a = torch.zeros(len(chosen), d, d, dtype=torch.float64)
    for k, dim in enumerate(chosen):
        a[k, dim, dim] = 1.0
    value, gradient, ops = forward_jet(model, x, a)
    return HessianDiagonalJet(value, gradient, ops)


def forward_operator(model: nn.Module, x: Tensor, coefficients: Tensor) -> OperatorJet:
    r"""Value, gradient and ``sum_ij A_ij d^2u/dx_i dx_j`` for constant A (d, d) or (q, d, d).

    Returns :class:`OperatorJet` ``(value (N, m), gradient (N, m, d),
    operators)`` with operators (N, m) for A (d, d), (N, m, q) for (q, d, d).
    """
    if isinstance(coefficients, Tensor) and coefficients.dim() == 2:
        value, gradient, ops = forward_jet(model, x, coefficients)
        return OperatorJet(value, gradient, ops[..., 0])
    return forward_jet(model, x, coefficients)
