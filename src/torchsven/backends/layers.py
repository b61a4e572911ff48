"""Per-layer factors of the factored Gram backend (docs/design.md, "Backends").

A *layer term* turns what hooks saw during one module's call(s) (inputs ``x``
and output gradients ``g`` of the backward of ``sum(rows)``) into

* ``gram()``: its contribution ``J_l J_l^T`` (R, R) float64 to ``K = J J^T``;
* ``weighted(w)``: ``J_l^T w`` per parameter (the update ``J^T c``, and the
  guard's ``J^T 1`` / probe ``J^T v``), without forming ``J_l``;
* ``per_row()``: the materialised per-row gradients (R, *shape) per parameter
  (used when one parameter is reached through several modules).

Row layout (:class:`RowLayout`): S samples (dim 0 of every hooked input), R
rows. A row holds ``b`` consecutive samples (micro-batches, ``b >= 1``) or a
sample gives ``m`` consecutive rows (multi-output, ``m >= 1``). Tensors
indexed by sample are brought to a *row-batched* layout (R, b, ...): the
per-row gradient is the sum over the row's ``b`` samples of the per-sample
terms (zero output gradient on the padding of a short last group).

Linear-like layers (Linear, Conv1d/Conv2d after im2col) share one core with
``A`` (R, T, groups, dk) inputs and ``G`` (R, T, groups, do) output gradients
over T positions; the per-row weight gradient of group ``q`` is
``sum_t G[r, t, q]^T A[r, t, q]`` and

* ghost form:        ``K_ij = sum_q sum_{t,s} (A_itq . A_jsq) (G_itq . G_jsq)``
  (T = 1: ``(A A^T) * (G G^T)``), cost ~ R^2 T^2 (dk + do);
* materialised form: ``W_r = G_r^T A_r``, ``K = W W^T``, cost ~ R T dk do + R^2 dk do;

the cheaper is chosen per layer and per step.

A Linear called on *channels* (input (S, C, d_in)) whose bias enters only some
of the C channels (forward-Laplacian jets, :mod:`torchsven.jets`: value,
derivatives, second-order channels; the bias is on the value channel only) is
marked by :func:`bias_on_channels` around the call; its term is
:class:`ChannelBiasLinearTerm`, whose per-row bias gradient is
``sum_t m_t G[r, t]`` over the marked positions only.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = [
    "ChannelBiasLinearTerm",
    "EmbeddingTerm",
    "GenericTerm",
    "LinearLikeTerm",
    "NormTerm",
    "RowLayout",
    "TermError",
    "bias_on_channels",
    "channel_bias_mask",
]

_F64 = torch.float64
#: Elements of one float64 block of the ghost form (R_block x R x T x T).
GHOST_BLOCK_ELEMS = 1 << 24


class TermError(Exception):
    """A layer term cannot represent this call exactly (becomes FallbackRequired)."""


@dataclass(frozen=True)
class RowLayout:
    """How rows map to samples: ``rows = samples * outputs`` or ``ceil(samples / group)``."""

    samples: int
    rows: int
    outputs: int = 1
    group: int = 1

    def to_rows(self, t: Tensor) -> Tensor:
        """Sample-indexed (S, ...) -> row-batched (R, b, ...); a short last group repeats its
        last sample (its output gradients are zero there)."""
        if self.outputs > 1:
            return t.repeat_interleave(self.outputs, dim=0).unsqueeze(1)
        if self.group > 1:
            pad = self.rows * self.group - self.samples
            if pad:
                t = torch.cat([t, t[-1:].expand(pad, *t.shape[1:])])
            return t.reshape(self.rows, self.group, *t.shape[1:])
        return t.unsqueeze(1)

    def grads_to_rows(self, per_pass: Sequence[Tensor | None], like: Tensor) -> Tensor:
        """Output gradients of the backward pass(es) (S, ...) each -> (R, b, ...).

        With m outputs per sample, pass j holds the gradients of rows ``j::m``.
        Missing gradients (the output did not reach the rows) are zeros.
        """
        filled = [torch.zeros_like(like) if g is None else g for g in per_pass]
        if self.outputs > 1:
            base = _stacked_base(filled)
            if base is None:
                base = torch.stack(filled, dim=1)
            return base.reshape(self.rows, 1, *like.shape[1:])
        g = filled[0]
        if self.group > 1:
            pad = self.rows * self.group - self.samples
            if pad:
                g = torch.cat([g, g.new_zeros(pad, *g.shape[1:])])
            return g.reshape(self.rows, self.group, *g.shape[1:])
        return g.unsqueeze(1)


def _stacked_base(parts: Sequence[Tensor]) -> Tensor | None:
    """The contiguous tensor B (S, m, ...) with ``parts[k] = B[:, k]`` (the recorder's
    buffer of the passes: ``torch.stack(parts, 1)`` without a copy), or None."""
    base = parts[0]._base
    if base is None or not base.is_contiguous() or base.dim() != parts[0].dim() + 1:
        return None
    if base.shape[1] != len(parts) or base.shape[0] != parts[0].shape[0]:
        return None
    for k, part in enumerate(parts):
        view = base[:, k]
        same = part.shape == view.shape and part.stride() == view.stride()
        if part._base is not base or not same or part.storage_offset() != view.storage_offset():
            return None
    return base


#: From this many rows on, ``M M^T`` is formed by row blocks below the diagonal only.
TRIANGULAR_MIN_ROWS = 256
#: Row blocks of the triangular product.
TRIANGULAR_BLOCKS = 4


def symmetric_product(mat: Tensor) -> Tensor:
    """``M M^T`` (R, R) of M (R, d), in M's dtype.

    For R >= ``TRIANGULAR_MIN_ROWS`` only the blocks on and below the diagonal
    are multiplied (``b (b + 1) / 2`` of ``b^2`` blocks, about 60% of the work
    for b = 4) and the blocks above are mirrored from below, as BLAS ``syrk``
    does; each entry is the same float64 dot product as in ``M @ M.T``.
    """
    rows = mat.shape[0]
    if rows < TRIANGULAR_MIN_ROWS:
        return mat @ mat.mT
    out = mat.new_empty(rows, rows)
    size = -(-rows // TRIANGULAR_BLOCKS)
    for start in range(0, rows, size):
        stop = min(start + size, rows)
        block = mat[start:stop] @ mat[:stop].mT  # (b, stop): this block row up to the diagonal
        out[start:stop, :stop] = block
        out[:start, start:stop] = block[:, :start].mT
    return out


def _gram(mat: Tensor) -> Tensor:
    """``M M^T`` (R, R) float64 of per-row vectors M (R, ...)."""
    return symmetric_product(mat.reshape(mat.shape[0], -1).to(_F64))


@dataclass(frozen=True)
class Sketch:
    """``J_p^T w`` projected on a random direction, with a scale for the tolerance.

    ``value`` approximates ``proj(J_p^T w)``; ``bound`` (0-dim float64 tensor)
    bounds the sum of absolute terms that made it (rounding-error scale).
    """

    value: Tensor
    bound: Tensor


class Term:
    """One module's contribution; see the module docstring."""

    #: param name (relative to the module) -> parameter tensor
    params: dict[str, Tensor]

    def gram(self, names: Sequence[str]) -> Tensor:
        per_row = self.per_row(names)
        out = None
        for t in per_row.values():
            g = _gram(t)
            out = g if out is None else out + g
        return out

    def per_row(self, names: Sequence[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def weighted(self, names: Sequence[str], w: Tensor) -> dict[str, Tensor]:
        """``J_p^T w`` per parameter, in the parameter's shape (w: (R,) float64)."""
        per_row = self.per_row(names)
        return {n: torch.tensordot(w.to(t.dtype), t, dims=1) for n, t in per_row.items()}

    def sketch(self, name: str, w: Tensor, probe: Tensor | None) -> Sketch:
        """``J_p^T w`` projected on ``probe`` (see ``probe_shape``); default: not projected."""
        full = self.weighted([name], w)[name].to(_F64)
        per_row = self.per_row([name])[name].to(_F64)
        bound = (w.abs() * per_row.reshape(per_row.shape[0], -1).norm(dim=1)).sum()
        return Sketch(full.reshape(-1), bound)

    def probe_shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of the random direction ``sketch`` projects on (None: no projection)."""
        return None

    def project(self, name: str, autograd_grad: Tensor, probe: Tensor | None) -> Tensor:
        """Autograd's gradient of ``name`` projected as ``sketch`` projects the factors'."""
        return autograd_grad.to(_F64).reshape(-1)


# --------------------------------------------------------------------------- linear-like
class LinearLikeTerm(Term):
    """Linear / Conv after im2col: A (R, T, q, dk), G (R, T, q, do).

    With ``outputs = m > 1`` rows per sample (R = S m, row ``(s, i)`` = ``s m + i``)
    the input factor is given per sample, ``a`` (S, T, q, dk) (:attr:`a_samples`):
    every row of a sample sees the same inputs. The block products
    (:func:`block_jt`, :func:`block_j`, :func:`block_sketch`) and ``weighted``
    use that form; the row form ``A`` (:attr:`a`, the sample's inputs repeated
    for each of its rows, m times larger) is built on first use only (the Gram
    forms and per-row gradients).

    Args:
        a: A (R, T, q, dk), or (S, T, q, dk) with ``outputs > 1``.
        g: G (R, T, q, do).
        params: parameter name -> tensor; the weight's shape (q do, dk...) in any grouping.
        weight_name, bias_name: parameter names (bias_name None: no trainable bias).
        ghost: "auto", True or False.
        outputs: m, rows per sample (1: ``a`` is already per row).
    """

    #: The weight is stored as (dk, do) (transformers' Conv1D): block products transpose.
    weight_transposed = False

    def __init__(
        self,
        a: Tensor,
        g: Tensor,
        params: dict[str, Tensor],
        weight_name: str | None,
        bias_name: str | None,
        ghost: str | bool = "auto",
        outputs: int = 1,
    ) -> None:
        # autocast: the input may be float32 while the output gradient is bfloat16
        dtype = torch.promote_types(a.dtype, g.dtype)
        self.a_samples, self.g = a.to(dtype), g.to(dtype)
        self.outputs = outputs
        if a.shape[0] * outputs != g.shape[0]:
            raise TermError(
                f"input factor of {a.shape[0]} samples x {outputs} outputs for {g.shape[0]} rows"
            )
        self._a_rows: Tensor | None = self.a_samples if outputs == 1 else None
        self.params = params
        self.weight_name, self.bias_name = weight_name, bias_name
        rows, (_, positions, groups, dk) = g.shape[0], a.shape
        do = g.shape[-1]
        if ghost == "auto":
            ghost_cost = rows * rows * positions * positions * groups * (dk + do)
            mat_cost = rows * positions * groups * dk * do + rows * rows * groups * dk * do
            ghost = positions == 1 or ghost_cost <= mat_cost
        self.ghost = bool(ghost)
        self._materialised: Tensor | None = None
        self._bias_rows: Tensor | None = None

    @property
    def a(self) -> Tensor:
        """A (R, T, q, dk): row ``(s, i)`` holds sample s's inputs (built once, on first use)."""
        if self._a_rows is None:
            self._a_rows = self.a_samples.repeat_interleave(self.outputs, dim=0)
        return self._a_rows

    def bias_rows(self) -> Tensor:
        """Per-row bias gradients (R, q do): ``sum_t G[r, t]`` in the factors' dtype
        (computed once)."""
        if self._bias_rows is None:
            self._bias_rows = self.g.sum(dim=1).reshape(self.g.shape[0], -1)
        return self._bias_rows

    def _weight_rows(self) -> Tensor:
        """Per-row weight gradients (R, q, do, dk) in the factors' dtype.

        With m > 1 rows per sample, per sample and group one bmm ``[G_1; ..; G_m]^T A_s``
        ((m do) x T) @ (T x dk) on the per-sample inputs (no row form of A).
        """
        if self._materialised is None:
            if self.outputs == 1:
                self._materialised = torch.einsum("rtqo,rtqk->rqok", self.g, self.a)
            else:
                self._materialised = _weight_rows_per_sample(self)
        return self._materialised

    def _ghost_gram(self, with_bias: bool = False) -> Tensor:
        """Weight part of K; with ``with_bias`` (one position, one group) also the bias part."""
        a, g = self.a.to(_F64), self.g.to(_F64)
        rows, positions, groups, _ = a.shape
        if positions == 1:
            a2, g2 = a[:, 0], g[:, 0]  # (R, q, d)
            if groups == 1:
                # K = (A A^T + 1) * (G G^T): the bias shares G G^T with the weight
                aa = symmetric_product(a2[:, 0])
                if with_bias:
                    aa += 1.0
                return aa.mul_(symmetric_product(g2[:, 0]))
            return (
                torch.einsum("iqk,jqk->ijq", a2, a2)
                .mul_(torch.einsum("iqo,jqo->ijq", g2, g2))
                .sum(-1)
            )
        out = a.new_zeros(rows, rows)
        block = max(1, GHOST_BLOCK_ELEMS // max(1, rows * positions * positions * groups))
        for start in range(0, rows, block):
            sl = slice(start, start + block)
            aa = torch.einsum("itqk,jsqk->ijqts", a[sl], a)
            gg = torch.einsum("itqo,jsqo->ijqts", g[sl], g)
            out[sl] = (aa * gg).sum(dim=(2, 3, 4))
        return out

    def gram(self, names: Sequence[str]) -> Tensor:
        fused = (
            self.ghost
            and self.weight_name in names
            and self.bias_name in names
            and self.a_samples.shape[1] == 1
            and self.a_samples.shape[2] == 1
        )
        if fused:
            return self._ghost_gram(with_bias=True)
        out = None
        if self.weight_name in names:
            out = self._ghost_gram() if self.ghost else _gram(self._weight_rows())
        if self.bias_name in names:
            bias = _gram(self.g.sum(dim=1))
            out = bias if out is None else out.add_(bias)
        if out is None:
            return self.g.new_zeros(self.g.shape[0], self.g.shape[0], dtype=_F64)
        return out

    def per_row(self, names: Sequence[str]) -> dict[str, Tensor]:
        rows = self.g.shape[0]
        out = {}
        if self.weight_name in names:
            shape = self.params[self.weight_name].shape
            out[self.weight_name] = self._weight_rows().reshape(rows, *shape)
        if self.bias_name in names:
            out[self.bias_name] = self.g.sum(dim=1).reshape(rows, -1)
        return out

    def weighted(self, names: Sequence[str], w: Tensor) -> dict[str, Tensor]:
        w = w.to(self.g.dtype)
        out = {}
        if self.weight_name in names:
            shape = self.params[self.weight_name].shape
            if self._materialised is not None:
                out[self.weight_name] = torch.tensordot(w, self._materialised, dims=1).reshape(
                    shape
                )
            elif self.outputs > 1:  # the per-sample form: the repeated A is never built
                out[self.weight_name] = _weight_jt(self, w[:, None])[0].reshape(shape)
            else:
                gw = self.g * w[:, None, None, None]
                out[self.weight_name] = torch.einsum("rtqo,rtqk->qok", gw, self.a).reshape(shape)
        if self.bias_name in names:
            out[self.bias_name] = torch.einsum("r,rtqo->qo", w, self.g).reshape(-1)
        return out

    def sketch(self, name: str, w: Tensor, probe: Tensor | None) -> Sketch:
        if name == self.bias_name:
            # bound over positions before their sum: a bias whose gradient cancels over
            # positions (a key bias under softmax) is rounding noise of this scale
            value = self.weighted([name], w)[name].to(_F64).reshape(-1)
            norms = self.g.to(_F64).norm(dim=-1).sum(dim=(1, 2))
            return Sketch(value, float((w.abs() * norms).sum()))
        if name != self.weight_name or probe is None:
            return super().sketch(name, w, probe)
        rows, (_, _, groups, dk) = self.g.shape[0], self.a_samples.shape
        u = probe.reshape(groups, dk).to(self.a_samples.dtype)
        au = torch.einsum("stqk,qk->stq", self.a_samples, u)  # (S, T, q)
        if self.outputs > 1:
            au = au.repeat_interleave(self.outputs, dim=0)  # (R, T, q)
        value = torch.einsum("r,rtqo,rtq->qo", w.to(self.g.dtype), self.g, au)
        bound = (
            w.abs()
            * self.g.reshape(rows, -1).norm(dim=1).to(_F64)
            * au.reshape(rows, -1).norm(dim=1).to(_F64)
        ).sum()
        return Sketch(value.to(_F64).reshape(-1), bound)

    def project(self, name: str, autograd_grad: Tensor, probe: Tensor | None) -> Tensor:
        if name != self.weight_name or probe is None:
            return super().project(name, autograd_grad, probe)
        _, _, groups, dk = self.a_samples.shape
        gw = autograd_grad.to(self.a_samples.dtype).reshape(groups, -1, dk)
        u = probe.reshape(groups, dk).to(self.a_samples.dtype)
        return torch.einsum("qok,qk->qo", gw, u).to(_F64).reshape(-1)

    def probe_shape(self, name: str) -> tuple[int, ...] | None:
        if name == self.weight_name:
            return (self.a_samples.shape[2] * self.a_samples.shape[3],)
        return None


def _weight_rows_per_sample(term: LinearLikeTerm) -> Tensor:
    """Per-row weight gradients (R, q, do, dk) from the per-sample inputs (m > 1 rows per
    sample): ``W_(s,i),q = G_(s,i),q^T A_s,q``, one bmm per chunk of samples and group."""
    a, g, m = term.a_samples, term.g, term.outputs
    _, positions, groups, dk = a.shape
    do = g.shape[-1]
    out = g.new_empty(g.shape[0], groups, do, dk)
    for ss, rs in _sample_chunks(term, m * positions * groups * do):
        c = a[ss].shape[0]
        for q in range(groups):
            gq = g[rs, :, q].reshape(c, m, positions, do).transpose(2, 3)
            prod = torch.bmm(gq.reshape(c, m * do, positions), a[ss, :, q])  # (c, m do, dk)
            out[rs, q] = prod.reshape(c * m, do, dk)
    return out


#: The channel mask of the Linear call running now (None outside bias_on_channels).
_CHANNEL_BIAS: ContextVar[tuple[bool, ...] | None] = ContextVar(
    "torchsven_channel_bias", default=None
)


@contextlib.contextmanager
def bias_on_channels(mask: Sequence[bool]) -> Iterator[None]:
    """Mark the Linear calls inside: input (S, C, d_in), bias only where ``mask`` (C,).

    The caller guarantees what it marks: the bias reaches channel c of every
    sample only where ``mask[c]``, added inside the call or straight onto its
    output (e.g. the call without its bias, then ``out[:, 0] + bias``): either
    way the per-row bias gradient is ``sum_c mask[c] g[:, c]`` with ``g`` the
    gradient at the call's output. The factored backend's guard still checks
    the result against autograd.
    """
    token = _CHANNEL_BIAS.set(tuple(bool(m) for m in mask))
    try:
        yield
    finally:
        _CHANNEL_BIAS.reset(token)


def channel_bias_mask() -> tuple[bool, ...] | None:
    """The mask set by the innermost :func:`bias_on_channels`, or None."""
    return _CHANNEL_BIAS.get()


class ChannelBiasLinearTerm(LinearLikeTerm):
    """A Linear over positions whose bias enters only the positions where ``bias_mask``.

    ``bias_mask`` (T,) float over the term's T positions (all calls, all the
    row's samples): the per-row bias gradient is ``sum_t m_t G[r, t]``; the
    weight part is that of :class:`LinearLikeTerm`.
    """

    def __init__(
        self,
        a: Tensor,
        g: Tensor,
        params: dict[str, Tensor],
        weight_name: str | None,
        bias_name: str | None,
        bias_mask: Tensor,
        ghost: str | bool = "auto",
        outputs: int = 1,
    ) -> None:
        if ghost == "auto":
            # Jets have a few positions (C = 1 + d + q) and narrow layers: the ghost
            # einsum over (t, s) pairs measured ~5x slower per flop than the one GEMM
            # of the materialised form (R=540, C=4, 32x32: 330 vs 56 ms), so the
            # ghost form must be 4x cheaper in flops to be chosen here.
            rows, (_, positions, groups, dk) = g.shape[0], a.shape
            do = g.shape[-1]
            ghost_cost = rows * rows * positions * positions * groups * (dk + do)
            mat_cost = rows * positions * groups * dk * do + rows * rows * groups * dk * do
            ghost = 4 * ghost_cost <= mat_cost
        super().__init__(a, g, params, weight_name, bias_name, ghost, outputs)
        if bias_mask.shape != (a.shape[1],):
            raise TermError(
                f"bias mask of {tuple(bias_mask.shape)} positions for {a.shape[1]} positions"
            )
        self.bias_mask = bias_mask.to(g.dtype)

    def bias_rows(self) -> Tensor:
        """Per-row bias gradients (R, q do) over the marked positions only."""
        return torch.einsum("rtqo,t->rqo", self.g, self.bias_mask).reshape(self.g.shape[0], -1)

    def _split(self, names: Sequence[str]) -> tuple[list[str], bool]:
        return [n for n in names if n != self.bias_name], self.bias_name in names

    def gram(self, names: Sequence[str]) -> Tensor:
        rest, with_bias = self._split(names)
        out = super().gram(rest)
        return out + _gram(self.bias_rows()) if with_bias else out

    def per_row(self, names: Sequence[str]) -> dict[str, Tensor]:
        rest, with_bias = self._split(names)
        out = super().per_row(rest)
        if with_bias:
            out[self.bias_name] = self.bias_rows()
        return out

    def weighted(self, names: Sequence[str], w: Tensor) -> dict[str, Tensor]:
        rest, with_bias = self._split(names)
        out = super().weighted(rest, w)
        if with_bias:
            out[self.bias_name] = w.to(self.g.dtype) @ self.bias_rows()
        return out


def linear_factors(
    x: Tensor, layout: RowLayout, g_passes: Sequence[Tensor | None], out_like: Tensor
) -> tuple[Tensor, Tensor]:
    """Linear on (S, *lead, d_in): A (R, b T, 1, d_in), G (R, b T, 1, d_out).

    With ``layout.outputs > 1`` A is per sample, (S, T, 1, d_in) (see :class:`LinearLikeTerm`).
    """
    g = layout.grads_to_rows(g_passes, out_like)
    rows = g.shape[0]
    g = g.reshape(rows, -1, 1, out_like.shape[-1])
    if layout.outputs > 1:
        return x.detach().reshape(x.shape[0], -1, 1, x.shape[-1]), g
    return layout.to_rows(x.detach()).reshape(rows, -1, 1, x.shape[-1]), g


def _explicit_conv_input(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple]:
    """Input padded as the convolution sees it (4-D) and the remaining zero padding."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel = (1, module.kernel_size[0])
        stride, dilation = (1, module.stride[0]), (1, module.dilation[0])
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    if module.padding_mode != "zeros":
        # nn.ConvNd pads explicitly with this mode, then convolves without padding.
        x = F.pad(
            x if spatial == 2 else x.squeeze(2),
            module._reversed_padding_repeated_twice,
            mode=module.padding_mode,
        )
        if spatial == 1:
            x = x.unsqueeze(2)
        padding: tuple[int, int] = (0, 0)
    elif isinstance(module.padding, str):
        if module.padding == "valid":
            padding = (0, 0)
        else:  # "same": total d (k - 1), the extra one on the right as torch does
            pads = []
            ks = module.kernel_size
            dl = module.dilation
            for d, k in zip(reversed(dl), reversed(ks), strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x if spatial == 2 else x.squeeze(2), pads)
            if spatial == 1:
                x = x.unsqueeze(2)
            padding = (0, 0)
    else:
        padding = (0, module.padding[0]) if spatial == 1 else tuple(module.padding)
    return x, (kernel, dilation, padding, stride)


def conv_factors(
    module: nn.Conv1d | nn.Conv2d,
    x: Tensor,
    layout: RowLayout,
    g_passes: Sequence[Tensor | None],
    out_like: Tensor,
) -> tuple[Tensor, Tensor]:
    """Conv1d/Conv2d by im2col: A (R, b L, q, C_in/q k), G (R, b L, q, C_out/q).

    With ``layout.outputs > 1`` A is per sample, (S, L, q, C_in/q k).
    """
    x4, (kernel, dilation, padding, stride) = _explicit_conv_input(module, x.detach())
    cols = F.unfold(x4, kernel, dilation=dilation, padding=padding, stride=stride)  # (S, Ck, L)
    groups = module.groups
    samples, ck, positions = cols.shape
    a = cols.transpose(1, 2).reshape(samples, positions, groups, ck // groups)
    g = layout.grads_to_rows(g_passes, out_like)  # (R, b, C_out, *spatial)
    rows, per_row = g.shape[0], g.shape[1]
    g = g.reshape(rows, per_row, module.out_channels, -1).transpose(2, 3)
    g = g.reshape(rows, per_row * positions, groups, module.out_channels // groups)
    if layout.outputs > 1:
        return a, g
    a = layout.to_rows(a).reshape(rows, per_row * positions, groups, ck // groups)
    return a, g


# --------------------------------------------------------------------------- embedding
class EmbeddingTerm(Term):
    """Embedding: indices (R, T), G (R, T, d); per-row gradient scatters G into rows of W.

    Ghost form ``K_ij = sum_{t,s} [idx_it == idx_js] (G_it . G_js)`` or the
    per-row gradient restricted to the used vocabulary, whichever is cheaper.
    With ``outputs = m > 1`` rows per sample the m rows of a sample share its
    indices (``J^T V`` sums their gradients per sample before the scatter).
    """

    def __init__(
        self,
        idx: Tensor,
        g: Tensor,
        params: dict[str, Tensor],
        name: str,
        padding_idx: int | None,
        outputs: int = 1,
    ) -> None:
        if padding_idx is not None:
            g = g * (idx != padding_idx).unsqueeze(-1).to(g.dtype)
        self.idx, self.g, self.params, self.name = idx, g, params, name
        self.outputs = outputs

    def _used_rows(self) -> tuple[Tensor, Tensor]:
        """Per-row gradients on the used vocabulary (R, U, d) and the used indices (U,)."""
        used, inverse = torch.unique(self.idx, return_inverse=True)
        rows = self.idx.shape[0]
        out = self.g.new_zeros(rows, used.numel(), self.g.shape[-1])
        out.scatter_add_(1, inverse.unsqueeze(-1).expand(-1, -1, self.g.shape[-1]), self.g)
        return out, used

    def gram(self, names: Sequence[str]) -> Tensor:
        rows, positions = self.idx.shape
        if self.name not in names:
            return self.g.new_zeros(rows, rows, dtype=_F64)
        d = self.g.shape[-1]
        used = int(torch.unique(self.idx).numel())
        ghost_cost = rows * rows * positions * positions * d
        mat_cost = rows * positions * d + rows * rows * used * d
        if ghost_cost <= mat_cost:
            g = self.g.to(_F64)
            out = g.new_zeros(rows, rows)
            block = max(1, GHOST_BLOCK_ELEMS // max(1, rows * positions * positions))
            for start in range(0, rows, block):
                sl = slice(start, start + block)
                same = self.idx[sl, None, :, None] == self.idx[None, :, None, :]
                gg = torch.einsum("itd,jsd->ijts", g[sl], g)
                out[sl] = (gg * same).sum(dim=(2, 3))
            return out
        return _gram(self._used_rows()[0])

    def per_row(self, names: Sequence[str]) -> dict[str, Tensor]:
        if self.name not in names:
            return {}
        weight = self.params[self.name]
        rows = self.idx.shape[0]
        out = self.g.new_zeros(rows, *weight.shape)
        out.scatter_add_(1, self.idx.unsqueeze(-1).expand(-1, -1, weight.shape[1]), self.g)
        return {self.name: out}

    def weighted(self, names: Sequence[str], w: Tensor) -> dict[str, Tensor]:
        if self.name not in names:
            return {}
        weight = self.params[self.name]
        gw = (self.g * w.to(self.g.dtype)[:, None, None]).reshape(-1, weight.shape[1])
        out = self.g.new_zeros(weight.shape)
        out.index_add_(0, self.idx.reshape(-1), gw)
        return {self.name: out}

    def sketch(self, name: str, w: Tensor, probe: Tensor | None) -> Sketch:
        value = self.weighted([name], w)[name].to(_F64).reshape(-1)
        norms = self.g.to(_F64).norm(dim=-1).sum(dim=1)
        return Sketch(value, (w.abs() * norms).sum())


def embedding_factors(
    idx: Tensor, layout: RowLayout, g_passes: Sequence[Tensor | None], out_like: Tensor
) -> tuple[Tensor, Tensor]:
    """Indices (R, b T) and output gradients (R, b T, d)."""
    i = layout.to_rows(idx)
    g = layout.grads_to_rows(g_passes, out_like)
    rows = i.shape[0]
    return i.reshape(rows, -1), g.reshape(rows, -1, out_like.shape[-1])


# --------------------------------------------------------------------------- norms
class NormTerm(Term):
    """Elementwise affine after normalisation: per-row grads materialised.

    ``xhat`` and ``g`` are row-batched (R, b, ...); ``reduce_dims`` the dims
    (after the row dim) summed to reach the parameter's shape, ``param_view``
    the shape the per-row (R, ...) result takes.
    """

    def __init__(
        self,
        xhat: Tensor,
        g: Tensor,
        params: dict[str, Tensor],
        weight_name: str | None,
        bias_name: str | None,
        channel_dim: int | None,
    ) -> None:
        self.params = params
        self.weight_name, self.bias_name = weight_name, bias_name
        rows = g.shape[0]
        self._rows: dict[str, Tensor] = {}
        if channel_dim is None:  # LayerNorm: parameter shape = trailing dims
            shape = next(iter(params.values())).shape
            lead = g.shape[: g.dim() - len(shape)]
            flat_g = g.reshape(rows, -1, *shape)
            if weight_name is not None:
                self._rows[weight_name] = (flat_g * xhat.reshape(rows, -1, *shape)).sum(1)
            if bias_name is not None:
                self._rows[bias_name] = flat_g.sum(1)
            del lead
        else:  # channels at dim channel_dim of the per-sample tensor (after R, b)
            c = g.shape[channel_dim]
            moved_g = g.movedim(channel_dim, -1).reshape(rows, -1, c)
            if weight_name is not None:
                moved_x = xhat.movedim(channel_dim, -1).reshape(rows, -1, c)
                self._rows[weight_name] = (moved_g * moved_x).sum(1)
            if bias_name is not None:
                self._rows[bias_name] = moved_g.sum(1)

    def per_row(self, names: Sequence[str]) -> dict[str, Tensor]:
        return {
            n: t.reshape(t.shape[0], *self.params[n].shape)
            for n, t in self._rows.items()
            if n in names
        }


def normalized_input(module: nn.Module, x: Tensor) -> Tensor:
    """``xhat`` of a LayerNorm / GroupNorm / BatchNorm (eval) call on x (S, ...)."""
    x = x.detach()
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.reshape(shape)
        var = module.running_var.reshape(shape)
        return (x - mean) * torch.rsqrt(var + module.eps)
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None and isinstance(module, rms):
        dims = tuple(range(-len(module.normalized_shape), 0))
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    raise TermError(f"no normalisation rule for {type(module).__name__}")


# --------------------------------------------------------------------------- generic
class GenericTerm(Term):
    """Any module: per-row gradients of the covered parameters by ``torch.func``.

    For each row, ``vjp`` of ``functional_call(module, params, args_r)`` with the
    row's output gradients, vmapped over rows (``args_r``: the row's samples,
    (b, ...)). Exact when the module treats samples independently (the
    backend's probe checks that).
    """

    def __init__(
        self,
        module: nn.Module,
        calls: Sequence[tuple[tuple, dict, list, list]],
        params: dict[str, Tensor],
        layout: RowLayout,
    ) -> None:
        self.params = params
        names = list(params)
        total: dict[str, Tensor] | None = None
        for args, kwargs, out_leaves, g_passes in calls:
            grads = _vmap_rows(module, names, params, args, kwargs, out_leaves, g_passes, layout)
            total = grads if total is None else {n: total[n] + grads[n] for n in names}
        self._rows = total or {}

    def per_row(self, names: Sequence[str]) -> dict[str, Tensor]:
        return {n: self._rows[n] for n in names if n in self._rows}


def _vmap_rows(
    module: nn.Module,
    names: list[str],
    params: dict[str, Tensor],
    args: tuple,
    kwargs: dict,
    out_leaves: list[Tensor],
    g_passes: list[list[Tensor | None]],
    layout: RowLayout,
) -> dict[str, Tensor]:
    leaves, spec = tree_flatten((args, kwargs))
    batched = [
        isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == layout.samples for t in leaves
    ]
    # No batched input: a call broadcast over the batch, whose output gradients the
    # backend read per sample (S, *y.shape) from the output's consumers (broadcast.py).
    broadcast = not any(batched)
    in_leaves = [
        layout.to_rows(t.detach()) if b else (t.detach() if isinstance(t, Tensor) else t)
        for t, b in zip(leaves, batched, strict=True)
    ]
    tensor_slots = [i for i, t in enumerate(in_leaves) if isinstance(t, Tensor)]
    tensors = [in_leaves[i] for i in tensor_slots]
    t_dims = [0 if batched[i] else None for i in tensor_slots]
    used = [k for k, gp in enumerate(g_passes) if any(g is not None for g in gp)]
    gs = [layout.grads_to_rows(g_passes[k], out_leaves[k]) for k in used]
    if broadcast:
        if any(g.shape[2:] != out_leaves[k].shape[1:] for k, g in zip(used, gs, strict=True)):
            raise TermError("no input has the batch (rows') size in dim 0")
        gs = [g.sum(dim=1) for g in gs]  # the row's samples share the one output
    n_out = len(out_leaves)
    pvals = {n: params[n].detach() for n in names}

    def row_loss(pv: dict[str, Tensor], tens: list[Tensor], gl: list[Tensor]) -> Tensor:
        leaves_r = list(in_leaves)
        for slot, t in zip(tensor_slots, tens, strict=True):
            leaves_r[slot] = t
        a, kw = tree_unflatten(leaves_r, spec)
        out, _ = tree_flatten(functional_call(module, pv, a, kw))
        outs = [o for o in out if isinstance(o, Tensor)]
        if len(outs) != n_out:
            raise TermError("the module's outputs changed between calls")
        total = outs[0].new_zeros(())
        for k, g in zip(used, gl, strict=True):
            total = total + (outs[k] * g).sum()
        return total

    try:
        with warnings.catch_warnings(), torch.no_grad():
            # vmap loops over ops without a batching rule: exact, only slower.
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            per_row = vmap(
                grad(row_loss), in_dims=(None, t_dims, [0] * len(gs)), randomness="error"
            )(pvals, tensors, gs)
        return {n: t.detach() for n, t in per_row.items()}
    except TermError:
        raise
    except Exception as exc:  # vmap cannot run this module per row
        raise TermError(
            f"per-row gradients by torch.func failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


def dtype_tolerance(dtype: torch.dtype, terms: int) -> float:
    """Relative tolerance of the guard for sums of ``terms`` products in ``dtype``."""
    eps = torch.finfo(dtype).eps
    return min(0.05, max(1e-11, 64 * eps * math.sqrt(terms + 1)))


# --------------------------------------------------------------------------- block products
# The matrix-free rank-k path (:mod:`torchsven.matfree`, docs/design.md "Rank-k steps") needs
# ``J_l^T V`` (V (R, b)) and ``J_l Z`` (Z (b, *shape) per parameter) of each term,
# computed from its factors in row chunks, never the per-row gradients of a Linear,
# Conv or Embedding layer. Terms without a factor rule here use their per-row
# gradients (norm layers, generic modules: small, already materialised).

#: Elements of one row chunk's temporary in the block products.
BLOCK_CHUNK_ELEMS = 1 << 22


#: Elements of the per-column temporaries of the column-by-column products (about 1 MB
#: in float32: they stay in cache between the scaling and the GEMM that reads them;
#: 10-15% faster than 16 MB chunks for MLP 32-256-256-1, N = 8192, b = 74, 1 and 2 threads).
COLUMN_CHUNK_ELEMS = 1 << 18


def _chunks(rows: int, per_row: int, elems: int = BLOCK_CHUNK_ELEMS) -> list[slice]:
    step = max(1, elems // max(1, per_row))
    return [slice(s, s + step) for s in range(0, rows, step)]


def _gaussian(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """Standard normal draws on the CPU in float64 (device-independent), cast like ``like``."""
    return torch.randn(shape, generator=generator, dtype=_F64).to(like.device, like.dtype)


def block_jt(term: Term, names: Sequence[str], v: Tensor) -> dict[str, Tensor]:
    """``J_p^T V`` (b, *shape) per parameter ``p`` of ``term`` for V (R, b), factors' dtype."""
    if isinstance(term, LinearLikeTerm):
        return _linear_jt(term, names, v)
    if isinstance(term, EmbeddingTerm):
        return _embedding_jt(term, names, v)
    out = {}
    for n, t in term.per_row(names).items():
        flat = t.reshape(t.shape[0], -1)
        out[n] = (v.to(flat.dtype).mT @ flat).reshape(v.shape[1], *term.params[n].shape)
    return out


def block_j(term: Term, names: Sequence[str], z: dict[str, Tensor]) -> Tensor | None:
    """``sum_p J_p Z_p`` (R, b) float64 over the parameters ``names`` of ``term``."""
    if isinstance(term, LinearLikeTerm):
        return _linear_j(term, names, z)
    if isinstance(term, EmbeddingTerm):
        return _embedding_j(term, names, z)
    out = None
    for n, t in term.per_row(names).items():
        flat = t.reshape(t.shape[0], -1)
        zn = z[n].reshape(z[n].shape[0], -1).to(flat.dtype)
        part = (flat @ zn.mT).to(_F64)
        out = part if out is None else out + part
    return out


def block_sketch(
    term: Term, names: Sequence[str], columns: int, generator: torch.Generator
) -> Tensor | None:
    """``sum_p J_p Omega_p`` (R, columns) for random test blocks ``Omega_p`` (the
    factors' dtype for Linear / Conv weights and embeddings, else float64).

    Linear/Conv weights and embeddings use Kronecker columns ``u w^T`` (cost of
    a forward pass with ``columns`` outputs); other parameters Gaussian columns.
    """
    if isinstance(term, LinearLikeTerm):
        return _linear_sketch(term, names, columns, generator)
    if isinstance(term, EmbeddingTerm):
        if term.name not in names:
            return None
        vocab, d = term.params[term.name].shape
        u = _gaussian((columns, vocab), generator, term.g)
        w = _gaussian((columns, d), generator, term.g)
        rows, positions = term.idx.shape
        out = term.g.new_zeros(rows, columns)
        for sl in _chunks(rows, positions * columns * 2):
            gw = term.g[sl] @ w.mT  # (c, T, l)
            out[sl] = (gw * u.mT[term.idx[sl]]).sum(1)
        return out
    z = {
        n: _gaussian((columns, *t.shape[1:]), generator, t) for n, t in term.per_row(names).items()
    }
    return block_j(term, names, z) if z else None


def _sample_chunks(term: LinearLikeTerm, per_sample: int) -> list[tuple[slice, slice]]:
    """(samples, rows) slices of chunks of whole samples (``per_sample`` elements each)."""
    m = term.outputs
    return [
        (sl, slice(sl.start * m, sl.stop * m))
        for sl in _chunks(term.a_samples.shape[0], per_sample)
    ]


def _weight_jt(term: LinearLikeTerm, v: Tensor) -> Tensor:
    """``J_W^T V`` (b, q, do, dk) of the weight for V (R, b), in the factors' dtype.

    Per chunk of samples: ``gv[s, t, q, :, j] = sum_i v[(s, i), j] g[(s, i), t, q]``
    (one bmm over the sample's m rows; a product for m = 1), then per group ONE GEMM
    ``gv^T A`` ((do b) x (c T)) @ ((c T) x dk) with the per-sample inputs A.
    """
    a, g, m = term.a_samples, term.g, term.outputs
    _, positions, groups, dk = a.shape
    do, b = g.shape[-1], v.shape[1]
    v = v.to(g.dtype)
    acc = g.new_zeros(groups, do * b, dk)
    for ss, rs in _sample_chunks(term, positions * groups * do * b):
        c = a[ss].shape[0]
        gc = g[rs].reshape(c, m, positions * groups * do)
        vc = v[rs].reshape(c, m, b)
        gv = gc.mT * vc if m == 1 else torch.bmm(gc.mT, vc)  # (c, T q do, b)
        gv = gv.reshape(c, positions, groups, do * b)
        for q in range(groups):
            acc[q].addmm_(
                gv[:, :, q].reshape(c * positions, do * b).mT,
                a[ss, :, q].reshape(c * positions, dk),
            )
    return acc.reshape(groups, do, b, dk).permute(2, 0, 1, 3)


def _weight_j(term: LinearLikeTerm, zw: Tensor) -> Tensor:
    """``J_W Z`` (R, b) float64 for weight columns Z (b, q, do, dk).

    Per chunk of samples and group: ONE GEMM ``A [Z_1^T .. Z_b^T]`` ((c T) x dk) @
    (dk x (do b)) with the per-sample inputs A, then per sample a bmm of its m rows'
    G (m, T do) with that (T do, b) block.
    """
    a, g, m = term.a_samples, term.g, term.outputs
    _, positions, groups, dk = a.shape
    do, b = g.shape[-1], zw.shape[0]
    zc = zw.to(a.dtype).permute(1, 3, 2, 0).reshape(groups, dk, do * b)
    out = g.new_empty(g.shape[0], b)
    for ss, rs in _sample_chunks(term, positions * groups * do * b):
        c = a[ss].shape[0]
        part = None
        for q in range(groups):
            az = a[ss, :, q].reshape(c * positions, dk) @ zc[q]  # (c T, do b)
            gq = g[rs, :, q].reshape(c, m, positions * do)
            prod = torch.bmm(gq, az.reshape(c, positions * do, b))  # (c, m, b)
            part = prod if part is None else part.add_(prod)
        out[rs] = part.reshape(c * m, b)
    return out.to(_F64)


def _weight_jt_columns(term: LinearLikeTerm, v: Tensor) -> Tensor:
    """``J_W^T V`` (b, q, do, dk) for one row per sample (m = 1), column by column:
    ``M_j = (G o v_j)^T A`` per group, one GEMM over a chunk of rows (inner dimension
    rows x positions), the narrower factor scaled.

    Measured against the one-GEMM form of :func:`_weight_jt` (MLP 32-256-256-1,
    N = 8192, b = 74, float32, 1 thread, two runs): 205 / 153 vs 470 / 229 ms for
    32 -> 256, 1015 / 1000 vs 1222 / 997 ms for 256 -> 256 (the GEMM form's chunks
    of b columns are b times shorter), 21-30 vs 5-7 ms for 256 -> 1; kept.
    """
    a, g = term.a_samples, term.g
    rows, positions, groups, dk = a.shape
    do = g.shape[-1]
    b = v.shape[1]
    v = v.to(g.dtype)
    acc = g.new_zeros(b, groups, do, dk)
    for sl in _chunks(rows, positions * min(do, dk), COLUMN_CHUNK_ELEMS):
        c = a[sl].shape[0]
        vc = v[sl]
        for q in range(groups):
            ac = a[sl, :, q]  # (c, T, dk)
            gc = g[sl, :, q]  # (c, T, do)
            for j in range(b):
                w = vc[:, j, None, None]
                if dk < do:  # scale the narrower factor
                    acc[j, q].addmm_(
                        gc.reshape(c * positions, do).mT, (ac * w).reshape(c * positions, dk)
                    )
                else:
                    acc[j, q].addmm_(
                        (gc * w).reshape(c * positions, do).mT, ac.reshape(c * positions, dk)
                    )
    return acc


def _weight_j_columns(term: LinearLikeTerm, zq: Tensor) -> Tensor:
    """``J_W Z`` (R, b) float64 for m = 1, column by column: ``(J Z_j)_r = sum_t g_rt .
    (Z_j a_rt)``, one GEMM per row chunk and column (within 10% of :func:`_weight_j`'s
    one GEMM on the MLP of :func:`_weight_jt_columns`: 376 / 343 vs 333 / 309 ms,
    1252 / 1120 vs 1227 / 1098 ms; kept, so the m = 1 path is unchanged)."""
    a, g = term.a_samples, term.g
    rows, positions, groups, dk = a.shape
    do = g.shape[-1]
    b = zq.shape[0]
    zq = zq.to(a.dtype)
    out = a.new_zeros(rows, b, dtype=_F64)
    for sl in _chunks(rows, positions * do, COLUMN_CHUNK_ELEMS):
        c = a[sl].shape[0]
        part = a.new_zeros(c, b)
        for q in range(groups):
            ac = a[sl, :, q].reshape(c * positions, dk)
            gc = g[sl, :, q].reshape(c, positions * do)
            for j in range(b):
                az = (ac @ zq[j, q].mT).reshape(c, positions * do)
                part[:, j] += (az * gc).sum(dim=1)
        out[sl] = part.to(_F64)
    return out


def _linear_jt(term: LinearLikeTerm, names: Sequence[str], v: Tensor) -> dict[str, Tensor]:
    """``J^T V`` per parameter (b, *shape) for V (R, b): the weight by
    :func:`_weight_jt_columns` (one row per sample) or :func:`_weight_jt` (m > 1)."""
    out: dict[str, Tensor] = {}
    if term.weight_name in names:
        acc = _weight_jt(term, v) if term.outputs > 1 else _weight_jt_columns(term, v)
        shape = term.params[term.weight_name].shape
        block = acc.reshape(v.shape[1], *shape)
        out[term.weight_name] = block.mT if term.weight_transposed else block
    if term.bias_name in names:
        gsum = term.bias_rows()  # (R, q do)
        out[term.bias_name] = v.to(gsum.dtype).mT @ gsum
    return out


def _linear_j(term: LinearLikeTerm, names: Sequence[str], z: dict[str, Tensor]) -> Tensor | None:
    """``J Z`` (R, b) float64 for a parameter block Z: the weight by
    :func:`_weight_j_columns` (one row per sample) or :func:`_weight_j` (m > 1)."""
    a, g = term.a_samples, term.g
    _, _, groups, dk = a.shape
    do = g.shape[-1]
    out = None
    if term.weight_name in names:
        zw = z[term.weight_name]
        if term.weight_transposed:
            zw = zw.mT
        zq = zw.reshape(zw.shape[0], groups, do, dk)
        out = _weight_j(term, zq) if term.outputs > 1 else _weight_j_columns(term, zq)
    if term.bias_name in names:
        zb = z[term.bias_name]
        gsum = term.bias_rows()  # (R, q do)
        part = (gsum @ zb.reshape(zb.shape[0], -1).to(g.dtype).mT).to(_F64)
        out = part if out is None else out + part
    return out


def _linear_sketch(
    term: LinearLikeTerm, names: Sequence[str], columns: int, generator: torch.Generator
) -> Tensor | None:
    """Kronecker columns ``Omega_j = u_j w_j^T`` per group: ``(J Omega_j)_r =
    sum_t (g_rt . u_j)(a_rt . w_j + c_j)``, two thin GEMMs per chunk (``a . w`` once per
    sample, shared by its m rows). A trainable bias is the weight of a constant input 1,
    so its test entries are ``c_j u_j`` (no extra product); a bias alone gets Gaussian
    columns."""
    a, g, m = term.a_samples, term.g, term.outputs
    rows = g.shape[0]
    _, positions, groups, dk = a.shape
    do = g.shape[-1]
    with_bias = term.bias_name in names
    if term.weight_name not in names:
        if not with_bias:
            return None
        zb = _gaussian((columns, groups * do), generator, g)
        gsum = g.sum(dim=1).reshape(rows, groups * do)
        return (gsum @ zb.mT).to(_F64)
    u = _gaussian((groups, do, columns), generator, g)
    w = _gaussian((groups, dk, columns), generator, a)
    shift = _gaussian((groups, 1, columns), generator, a) if with_bias else None
    out = g.new_zeros(rows, columns)
    for ss, rs in _sample_chunks(term, positions * (m * (2 * columns + do) + columns + dk)):
        c = a[ss].shape[0]
        part = g.new_zeros(c, m, columns)
        for q in range(groups):
            gu = g[rs, :, q].reshape(c * m * positions, do) @ u[q]
            aw = a[ss, :, q].reshape(c * positions, dk) @ w[q]
            if shift is not None:
                aw += shift[q]
            if m == positions == 1:  # one product per row: accumulate in place
                part.view(c, columns).addcmul_(gu, aw)
                continue
            gu = gu.reshape(c, m, positions, columns)
            part += (gu * aw.reshape(c, 1, positions, columns)).sum(dim=2)
        out[rs] = part.reshape(c * m, columns)
    return out


def _embedding_jt(term: EmbeddingTerm, names: Sequence[str], v: Tensor) -> dict[str, Tensor]:
    if term.name not in names:
        return {}
    vocab, d = term.params[term.name].shape
    rows, positions = term.idx.shape
    b = v.shape[1]
    v = v.to(term.g.dtype)
    acc = term.g.new_zeros(vocab, b * d)
    m = term.outputs
    if m > 1:  # per sample: gv[s, t, :, j] = sum_i v[(s, i), j] g[(s, i), t] (one bmm)
        samples = rows // m
        idx = term.idx.reshape(samples, m, positions)[:, 0]  # the sample's rows share it
        for sl in _chunks(samples, positions * b * d * 2):
            rs = slice(sl.start * m, sl.stop * m)
            c = idx[sl].shape[0]
            gc = term.g[rs].reshape(c, m, positions * d)
            gv = torch.bmm(gc.mT, v[rs].reshape(c, m, b)).reshape(c, positions, d, b)
            acc.index_add_(0, idx[sl].reshape(-1), gv.transpose(2, 3).reshape(-1, b * d))
    else:
        for sl in _chunks(rows, positions * b * d):
            gv = term.g[sl, :, None, :] * v[sl, None, :, None]  # (c, T, b, d)
            acc.index_add_(0, term.idx[sl].reshape(-1), gv.reshape(-1, b * d))
    return {term.name: acc.reshape(vocab, b, d).permute(1, 0, 2).contiguous()}


def _embedding_j(term: EmbeddingTerm, names: Sequence[str], z: dict[str, Tensor]) -> Tensor | None:
    if term.name not in names:
        return None
    zt = z[term.name].to(term.g.dtype).permute(1, 0, 2)  # (V, b, d)
    rows, positions = term.idx.shape
    b, d = zt.shape[1], zt.shape[2]
    out = term.g.new_zeros(rows, b, dtype=_F64)
    for sl in _chunks(rows, positions * b * d):
        out[sl] = (zt[term.idx[sl]] * term.g[sl, :, None, :]).sum(dim=(1, 3)).to(_F64)
    return out
