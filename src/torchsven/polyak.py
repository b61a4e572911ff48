"""``torchsven.PolyakSGD``: SGD with the Polyak step size, the paper's baseline.

    eta = clamp((f - f_star) / (||g||^2 + eps), 0, max_lr),   theta <- theta - eta * g

with ``f`` the loss the closure returns, ``g`` the gradient of all parameters
(``.grad``, filled by the closure's ``backward()`` as for ``torch.optim.LBFGS``)
and ``||g||^2`` summed over every param group. ``max_lr`` may differ per group
(each group's step is capped by its own ``max_lr``); ``f_star`` and ``eps`` are
global. ``f <= f_star`` gives no step (the authors' code would step uphill).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["PolyakSGD", "polyak_step_size"]


def polyak_step_size(loss: float, f_star: float, grad_sq_norm: float, eps: float) -> float:
    """``max(0, (loss - f_star) / (grad_sq_norm + eps))`` (before the ``max_lr`` cap)."""
    return max(0.0, (loss - f_star) / (grad_sq_norm + eps))


def _real(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        what = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


class PolyakSGD(torch.optim.Optimizer):
    """SGD with Polyak step sizes (no learning rate to tune, needs ``f_star``).

    Args:
        params: parameters or param groups; a group may set ``max_lr``.
        f_star: estimate of the smallest reachable loss (0 for interpolation).
        max_lr: cap on the step size (per group).
        eps: added to ``||g||^2``.

    ``step(closure)``: the closure zeroes the gradients, computes the loss (a
    scalar tensor), calls ``backward()`` and returns the loss; ``step`` returns
    it. ``opt.last_step_size`` is the Polyak value ``eta`` before the caps
    (each group moved by ``min(eta, max_lr)``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        f_star: float = 0.0,
        max_lr: float = 1.0,
        eps: float = 1e-8,
    ) -> None:
        self.f_star = _real("f_star", f_star, positive=False)
        self.eps = _real("eps", eps, positive=True)
        self.last_step_size: float | None = None
        super().__init__(params, {"max_lr": _real("max_lr", max_lr, positive=True)})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in ("f_star", "eps"):
            if key in param_group:
                raise ValueError(f"param group sets {key!r}, which is global in PolyakSGD")
        if "max_lr" in param_group:
            _real("max_lr", param_group["max_lr"], positive=True)
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["polyak"] = {"f_star": self.f_star, "eps": self.eps}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        polyak = state_dict.pop("polyak", None)
        super().load_state_dict(state_dict)
        if polyak is not None:
            self.f_star = float(polyak["f_star"])
            self.eps = float(polyak["eps"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One Polyak step; ``closure`` must call ``backward()`` and return the loss."""
        if closure is None or not callable(closure):
            raise TypeError(
                "PolyakSGD.step needs a closure that calls backward() and returns the loss"
            )
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError("the closure must return the loss as a one-element tensor")
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            raise ValueError("no parameter has a .grad: the closure must call loss.backward()")
        sq = torch.stack([gr.detach().to(torch.float64).square().sum() for gr in grads]).sum()
        f, sq = float(loss.detach()), float(sq)
        if not (math.isfinite(f) and math.isfinite(sq)):
            raise ValueError(f"non-finite loss ({f}) or gradient norm; the step was not taken")
        eta = polyak_step_size(f, self.f_star, sq, self.eps)
        for group in self.param_groups:
            lr = min(eta, group["max_lr"])
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
        self.last_step_size = eta
        return loss
