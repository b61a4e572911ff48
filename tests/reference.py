"""Slow, obviously correct twins of every numerical path (float64, dense).

Nothing here imports torchsven's solver code: the reference filter is written
out again from DESIGN.md section 1 so that tests compare two implementations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def dense_jacobian(
    rows_fn: Callable[[], Tensor], params: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """(J (N, P) float64, r (N,) float64) by one plain autograd backward per row."""
    rows = rows_fn().reshape(-1)
    jac = []
    for i in range(rows.numel()):
        grads = torch.autograd.grad(rows[i], params, retain_graph=True, allow_unused=True)
        jac.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1).to(torch.float64)
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    return torch.stack(jac), rows.detach().to(torch.float64)


def reference_filter(
    s: Tensor,
    rank: int | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-10,
    damping: float = 0.0,
) -> Tensor:
    """phi(s) (k,): 1/s or s/(s^2+mu) on kept values, 0 elsewhere (explicit loop)."""
    phi = torch.zeros_like(s)
    if s.numel() == 0:
        return phi
    threshold = max(rtol * float(s[0]), atol)
    for i, value in enumerate(s.tolist()):
        if rank is not None and i >= rank:
            break
        if value > threshold:
            phi[i] = value / (value * value + damping) if damping > 0 else 1.0 / value
    return phi


def reference_step(jac: Tensor, rows: Tensor, **filter_kwargs) -> tuple[Tensor, int, Tensor]:
    """``J^+_k r`` (P,), kept count and singular values, by a full float64 SVD."""
    jac = jac.to(torch.float64)
    u, s, vh = torch.linalg.svd(jac, full_matrices=False)
    phi = reference_filter(s, **filter_kwargs)
    step = vh.T @ (phi * (u.T @ rows.to(torch.float64)))
    return step, int((phi != 0).sum()), s


def reference_pinv_step(jac: Tensor, rows: Tensor, rcond: float) -> Tensor:
    """``pinv(J) r`` by ``torch.linalg.pinv`` (relative cut only)."""
    return torch.linalg.pinv(jac.to(torch.float64), rtol=rcond) @ rows.to(torch.float64)


def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
