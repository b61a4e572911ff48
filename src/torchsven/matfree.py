"""Matrix-free rank-k Sven steps: K = J J^T only through block products K V.

See docs/design.md, "Rank-k steps". A :class:`JacobianOperator` gives three
products of the Jacobian J (N, P) of the residual rows, never J or K themselves:

* ``sketch(l)``: ``J Omega`` (N, l) for a random test block ``Omega`` (P, l) of the
  operator's choosing (the factored backend uses Kronecker-structured columns
  ``u w^T`` per Linear weight, which costs about one forward pass with l columns);
* ``jt(V)``: ``J^T V`` for V (N, b), a *parameter block*: one tensor (b, *shape)
  per parameter;
* ``j(Z)``: ``J Z`` (N, b) for a parameter block Z.

So ``K V = j(jt(V))`` is one block product (two weight-gradient-sized GEMMs per
column for a Linear layer).

:func:`range_finder` is the randomized range finder of Halko, Martinsson and
Tropp (2011, alg. 4.3 / 4.4) on K in sample space:

    Y = J Omega,  Q = orth(Y);   q times:  Q <- orth(K Q);   B = J^T Q   (P, l)

optionally with a wide sketch (``f l`` columns, ``Q`` = top-l left singular
vectors of Y) where the sketch is cheap (about a forward pass on the factored
backend, whereas each ``jt`` / ``j`` costs about l backward passes);

and :func:`ritz_step` the Rayleigh-Ritz step on ``range(Q)``: with the small
Gram ``Q^T K Q = B^T B = W diag(e) W^T`` (l, l), the Ritz values ``e_i`` (the
estimated ``s_i^2``), the filter ``phi(s)/s = 1/(e + mu)`` on the kept ones and

    c = Q W diag(1/(e + mu)) W^T Q^T r   (N,),      step = J^T c = B W diag(..) W^T Q^T r,

so the update comes from the same block B with no further pass. When
``range(Q)`` contains ``range(J)`` (``l >= rank(J)``) the Ritz pairs are the exact
nonzero eigenpairs of K and the step equals the exact filtered step.

Memory is O((N + P) l): Q (N, l) float64, B (l, P) in the model's dtype.
The sketch's residual ``||(I - Q Q^T) J Omega'||_F / ||J Omega'||_F`` on a few
extra probe columns ``Omega'`` estimates ``||(I - Q Q^T) J||_F / ||J||_F`` (the
a-posteriori estimator of Halko et al., section 4.3).

Data parallel (rows split over ranks): ``J^T V`` is a sum over ranks of the
local ``J_r^T V_r`` (one all-reduce of the parameter block per ``jt``), ``j`` is
local, and the small reductions (``Q^T Y``, Gram matrices of local row blocks)
go through the same ``reduce`` callable; :func:`orthonormalize` uses Cholesky
QR (twice) then, so that each orthonormalisation is one all-reduce of an
(l, l) matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .solve import SpectralFilter, gram_floor

__all__ = [
    "JacobianOperator",
    "ProductFailed",
    "RangeSketch",
    "ReducedOperator",
    "RitzStep",
    "block_combine",
    "block_inner",
    "dense_operator",
    "gram_product",
    "orthonormalize",
    "range_finder",
    "ritz_step",
]

_F64 = torch.float64
#: A parameter block: one tensor (b, *shape) per parameter.
ParamBlock = list[Tensor]
Reduce = Callable[[Tensor], Tensor]
#: Elements of one float64 slice in :func:`block_inner`.
_SLICE_ELEMS = 1 << 20


class JacobianOperator(Protocol):
    """Products with the Jacobian J (N, P) of N residual rows (see the module docstring)."""

    rows: int

    def sketch(self, columns: int, generator: torch.Generator) -> Tensor:
        """``J Omega`` (N, columns) for a random test block Omega drawn from ``generator``."""
        ...

    def jt(self, v: Tensor) -> ParamBlock:
        """``J^T V`` per parameter (b, *shape) for V (N, b) float64."""
        ...

    def j(self, z: ParamBlock) -> Tensor:
        """``J Z`` (N, b) for a parameter block Z (b, *shape) per parameter."""
        ...


def block_inner(z: ParamBlock) -> Tensor:
    """``Z Z^T`` (b, b) float64 of a parameter block (summed over parameters).

    Accumulated in float64 over column slices of each parameter (bounded copies).
    """
    out: Tensor | None = None
    for t in z:
        flat = t.reshape(t.shape[0], -1)
        step = max(1, _SLICE_ELEMS // max(1, flat.shape[0]))
        for start in range(0, flat.shape[1], step):
            part = flat[:, start : start + step].to(_F64)
            g = part @ part.mT
            out = g if out is None else out + g
    if out is None:
        raise ValueError("block_inner needs at least one parameter")
    return out


def block_combine(z: ParamBlock, coeffs: Tensor) -> list[Tensor]:
    """``sum_j coeffs_j Z_j`` per parameter (shape of one column), float64; coeffs (b,).

    Summed in the block's dtype (as the exact factored update ``J^T c`` is), then float64.
    """
    return [torch.tensordot(coeffs.to(t.dtype), t, dims=1).to(_F64) for t in z]


def gram_product(op: JacobianOperator, v: Tensor) -> Tensor:
    """``K V = J (J^T V)`` (N, b) for V (N, b): one block product."""
    return op.j(op.jt(v))


def orthonormalize(y: Tensor, reduce: Reduce | None = None) -> Tensor:
    """Orthonormal basis Q (N, l) float64 with ``range(Y) <= range(Q)``.

    One process: Householder QR. Rows split over ranks (``reduce`` sums over
    ranks): shifted Cholesky QR twice, ``R^T R = Y^T Y + shift``, ``Q = Y R^{-1}``,
    one all-reduce of an (l, l) matrix each time.
    """
    y = y.to(_F64)
    if reduce is None:
        return torch.linalg.qr(y, mode="reduced").Q
    q = y
    for _ in range(2):
        gram = reduce(q.mT @ q)
        shift = 1e-14 * float(torch.trace(gram)) + 1e-300
        eye = torch.eye(gram.shape[0], dtype=_F64, device=gram.device)
        chol = torch.linalg.cholesky(gram + shift * eye)
        q = torch.linalg.solve_triangular(chol, q.mT, upper=False).mT
    return q


@dataclass(frozen=True)
class RangeSketch:
    """Outcome of :func:`range_finder`.

    Attributes:
        basis: Q (N, l) float64, orthonormal (over all ranks).
        image: ``B = J^T Q`` per parameter (l, *shape), the operator's dtype.
        residual: estimate of ``||(I - Q Q^T) J||_F / ||J||_F`` from the probes
            (nan without probes).
        products: number of ``jt`` / ``j`` block products used (sketch included).
    """

    basis: Tensor
    image: ParamBlock
    residual: float
    products: int


def range_finder(
    op: JacobianOperator,
    columns: int,
    power_iters: int,
    generator: torch.Generator,
    probes: int = 4,
    reduce: Reduce | None = None,
    sketch_factor: float = 1.0,
    total_rows: int | None = None,
) -> RangeSketch:
    """Randomized range finder with ``power_iters`` power iterations on K (module docstring).

    Args:
        op: the Jacobian products.
        columns: l, width of the sketch (rank + oversampling, at most N).
        power_iters: q >= 0; each costs one block product ``K Q``.
        generator: source of the test block (its state advances).
        probes: extra test columns for the residual estimate.
        reduce: sum over ranks for row-distributed Q (None: one process).
        sketch_factor: f >= 1: draw ``f l`` sketch columns and keep the top-l left
            singular vectors of the sketch (``Y Y^T / (f l)`` is a Monte Carlo
            estimate of K, better for larger f). Worth it when ``sketch`` is much
            cheaper than ``jt`` (Kronecker columns on the factored backend).
        total_rows: N over all ranks (None: ``op.rows``).
    """
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    rows = op.rows if total_rows is None else total_rows
    wide = max(columns, min(rows, round(columns * sketch_factor)))
    y = op.sketch(wide + probes, generator)
    probe = y[:, wide:].to(_F64)
    y = y[:, :wide]
    if wide > columns:  # the top-l left singular vectors of the wide sketch, without
        # an (N, f l) basis: the top-l eigenvectors V of Y^T Y, then Q = orth(Y V). In the
        # sketch's dtype: any V keeps range(Y V) inside range(Y) = range(J Omega), so the
        # precision of V changes the basis' quality, never the exactness when l >= rank(J)
        core = y.mT @ y
        if reduce is not None:
            core = reduce(core)
        core = core.to(_F64)
        _, vecs = torch.linalg.eigh(0.5 * (core + core.mT))
        y = y @ vecs[:, -columns:].to(y.dtype)
    q = orthonormalize(y, reduce)
    del y
    products = 1
    for _ in range(power_iters):
        q = orthonormalize(gram_product(op, q), reduce)
        products += 2
    image = op.jt(q)
    products += 1
    residual = float("nan")
    if probes:
        coef = q.mT @ probe
        if reduce is not None:
            coef = reduce(coef)
        rest = probe - q @ coef
        num, den = rest.square().sum(), probe.square().sum()
        if reduce is not None:
            both = reduce(torch.stack([num, den]))
            num, den = both[0], both[1]
        residual = float(torch.sqrt(num / den)) if float(den) > 0 else 0.0
    return RangeSketch(q, image, residual, products)


@dataclass(frozen=True)
class RitzStep:
    """Outcome of :func:`ritz_step`.

    Attributes:
        step: ``J^T c`` per parameter, float64, in each parameter's shape.
        coefficients: c (N,) float64 (local rows).
        singular_values: Ritz estimates ``sqrt(e_i)`` (l,) descending, float64 CPU.
        kept: number of Ritz directions used.
    """

    step: list[Tensor]
    coefficients: Tensor
    singular_values: Tensor
    kept: int


def ritz_step(
    sketch: RangeSketch,
    rows: Tensor,
    filt: SpectralFilter,
    reduce: Reduce | None = None,
) -> RitzStep:
    """Filtered Rayleigh-Ritz step on ``range(Q)`` (module docstring).

    ``rows`` r (N,); the filter's rank, rtol (relative to the largest Ritz
    value), atol and damping act on the Ritz values; the Gram floor is that
    of an (l, l) float64 eigh.
    """
    q, image = sketch.basis, sketch.image
    rows64 = rows.to(_F64).reshape(-1, 1)
    small = block_inner(image)  # Q^T K Q (l, l); J^T Q is already summed over ranks
    evals, vecs = torch.linalg.eigh(0.5 * (small + small.mT))
    evals, vecs = evals.flip(-1), vecs.flip(-1)
    s = torch.sqrt(torch.clamp(evals, min=0.0))
    weights, mask = filt.inverse_square(evals, gram_floor(evals.numel(), s[0]))
    qr = q.mT @ rows64
    if reduce is not None:
        qr = reduce(qr)
    coef_small = vecs @ (weights.unsqueeze(1) * (vecs.mT @ qr))  # (l, 1)
    coef_small = coef_small.reshape(-1)
    return RitzStep(
        block_combine(image, coef_small),
        q @ coef_small,
        s.cpu(),
        int(mask.sum()),
    )


@dataclass(frozen=True)
class RankKStep:
    """A matrix-free rank-k step as a backend reports it.

    Attributes:
        step: per parameter, in its shape (float64).
        row_change: ``J step`` (N,).
        singular_values, kept: the Ritz values (descending) and the kept count.
        extras: ``sketch_residual``, ``sketch_columns``, ``block_products``.
    """

    step: list[Tensor]
    row_change: Tensor
    singular_values: Tensor
    kept: int
    extras: dict[str, float | int]


def rank_k_step(
    op: JacobianOperator,
    rows: Tensor,
    params: Sequence[Tensor],
    filt: SpectralFilter,
    columns: int,
    power_iters: int,
    generator: torch.Generator,
    probes: int = 4,
    sketch_factor: float = 1.0,
    reduce: Reduce | None = None,
    total_rows: int | None = None,
) -> RankKStep:
    """Range finder (``columns`` wide, at most N) then the filtered Ritz step.

    Rows split over ranks: ``op`` is a :class:`ReducedOperator`, ``reduce`` sums
    over ranks and ``total_rows`` is the global N; ``rows`` and the returned
    ``row_change`` are this rank's (the step is the same on every rank).
    """
    rows_total = op.rows if total_rows is None else total_rows
    width = max(1, min(columns, rows_total))
    sketch = range_finder(
        op, width, power_iters, generator, probes, reduce, sketch_factor, rows_total
    )
    ritz = ritz_step(sketch, rows.detach(), filt, reduce)
    step = [s.reshape(p.shape) for s, p in zip(ritz.step, params, strict=True)]
    row_change = op.j([s.unsqueeze(0) for s in ritz.step]).reshape(-1)
    extras = {
        "sketch_residual": sketch.residual,
        "sketch_columns": width,
        "block_products": sketch.products,
    }
    return RankKStep(step, row_change, ritz.singular_values, ritz.kept, extras)


class ProductFailed(RuntimeError):
    """A rank's local block product raised: raised on every rank at the same ``jt``."""


class ReducedOperator:
    """A row-distributed J (each rank holds its rows' operator ``local``).

    ``jt`` sums the local ``J_r^T V_r`` over ranks with ONE ``reduce`` of the
    flattened parameter block; ``j`` and ``sketch`` are local (every rank must
    draw the same test block: equal generator states). Pass the same
    ``reduce`` to :func:`range_finder` and :func:`ritz_step`.

    A local product that raises must not leave the other ranks waiting in a
    reduce: its result is replaced by zeros, the exception kept in
    :attr:`error`, and the next ``jt`` reduce carries a failure count, after
    which every rank raises :class:`ProductFailed` at the same point.
    ``params`` (one tensor per parameter) give the block's shapes and dtypes.
    """

    def __init__(self, local: JacobianOperator, reduce: Reduce, params: Sequence[Tensor]) -> None:
        self.local = local
        self.reduce = reduce
        self.rows = local.rows
        self.params = list(params)
        self.error: Exception | None = None

    def _run(self, product: Callable[[], Tensor], zeros: Callable[[], Tensor]) -> Tensor:
        if self.error is None:
            try:
                return product()
            except Exception as exc:  # every rank learns of it at the next jt
                self.error = exc
        return zeros()

    def sketch(self, columns: int, generator: torch.Generator) -> Tensor:
        device = self.params[0].device
        return self._run(
            lambda: self.local.sketch(columns, generator),
            lambda: torch.zeros(self.rows, columns, dtype=_F64, device=device),
        )

    def jt(self, v: Tensor) -> ParamBlock:
        b = v.shape[1]
        zeros = [torch.zeros(b, *p.shape, dtype=p.dtype, device=p.device) for p in self.params]
        parts: ParamBlock = zeros
        if self.error is None:
            try:
                parts = self.local.jt(v)
            except Exception as exc:  # every rank learns of it below
                self.error = exc
        failed = torch.ones(1, dtype=parts[0].dtype, device=parts[0].device)
        summed = self.reduce(
            torch.cat([*(t.reshape(-1) for t in parts), failed * (self.error is not None)])
        )
        if float(summed[-1]) > 0:
            raise ProductFailed(f"{int(summed[-1])} rank(s) raised in a matrix-free block product")
        out, offset = [], 0
        for t in parts:
            out.append(summed[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        return out

    def j(self, z: ParamBlock) -> Tensor:
        b = z[0].shape[0]
        return self._run(
            lambda: self.local.j(z),
            lambda: torch.zeros(self.rows, b, dtype=_F64, device=z[0].device),
        )


def dense_operator(jac: Tensor) -> JacobianOperator:
    """A :class:`JacobianOperator` on an explicit J (N, P) (tests, small problems)."""
    return _DenseOperator(jac.to(_F64))


class _DenseOperator:
    def __init__(self, jac: Tensor) -> None:
        self.jac = jac
        self.rows = jac.shape[0]

    def sketch(self, columns: int, generator: torch.Generator) -> Tensor:
        omega = torch.randn(self.jac.shape[1], columns, generator=generator, dtype=_F64)
        return self.jac @ omega.to(self.jac.device)

    def jt(self, v: Tensor) -> ParamBlock:
        return [v.to(_F64).mT @ self.jac]

    def j(self, z: Sequence[Tensor]) -> Tensor:
        return self.jac @ z[0].mT
