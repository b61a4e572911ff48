"""Parameter fraction: which parameters one Sven step updates (seeded masks).

Three ways to pick a fraction ``f`` of the P trainable entries, drawn afresh
each step from a ``torch.Generator``:

* ``"entries"``: ``max(1, round(f P))`` entries uniformly without replacement.
  J is still computed for every entry (autograd cannot skip single entries),
  then restricted to the chosen columns: the solve shrinks, the Jacobian does not.
* ``"tensors"``: whole parameter tensors, in a random order, until they hold at
  least ``f P`` entries. J is taken only w.r.t. those tensors.
* ``"rows"``: for every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (groups = 1) whose
  weight is trainable, ``max(1, round(f d_out))`` output rows (weight rows and
  bias entries); other trainable tensors are kept whole. While the closure
  runs, a forward hook recomputes the chosen rows as a separate op on new leaf
  tensors ``W[S]``, ``b[S]`` and writes them into the layer's output; J is taken
  w.r.t. those leaves, so autograd's per-row work and J shrink with ``f``. The
  user's modules are never modified and the hooks are removed after the call.

A :class:`Selection` maps the solved-for columns back to the flat vector of all
trainable parameters (in order, each flattened).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MASKS",
    "MaskableLayer",
    "Selection",
    "entry_selection",
    "maskable_layers",
    "n_selected",
    "row_selection",
    "select",
    "tensor_selection",
]

#: Values of ``Sven(mask=...)``.
MASKS = ("entries", "tensors", "rows")

_ROW_MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def n_selected(total: int, fraction: float) -> int:
    """``max(1, round(fraction * total))``, at most ``total``."""
    return min(total, max(1, round(fraction * total)))


def entry_selection(total: int, fraction: float, generator: torch.Generator) -> Tensor:
    """Sorted indices (k,) of ``n_selected(total, fraction)`` distinct entries."""
    perm = torch.randperm(total, generator=generator)
    return perm[: n_selected(total, fraction)].sort().values


def tensor_selection(
    numels: Sequence[int], fraction: float, generator: torch.Generator
) -> list[int]:
    """Sorted indices of whole tensors, taken in random order until ``>= fraction * sum``."""
    target = fraction * sum(numels)
    chosen, held = [], 0
    for i in torch.randperm(len(numels), generator=generator).tolist():
        chosen.append(i)
        held += numels[i]
        if held >= target:
            break
    return sorted(chosen)


def row_selection(rows: int, fraction: float, generator: torch.Generator) -> Tensor:
    """Sorted indices (k,) of ``n_selected(rows, fraction)`` distinct output rows."""
    return entry_selection(rows, fraction, generator)


@dataclass(frozen=True)
class MaskableLayer:
    """A layer whose output rows can be masked: ``y[..., S] = op(x; W[S], b[S])``."""

    module: nn.Module
    weight: Tensor
    bias: Tensor | None
    channel_dim: int  # dim of the output that indexes weight rows: -1 Linear, 1 conv


def maskable_layers(model: nn.Module, trainable: Sequence[Tensor]) -> list[MaskableLayer]:
    """Linear / ConvNd (groups = 1, exact type) layers with a trainable weight used once."""
    trainable_ids = {id(p) for p in trainable}
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    layers = []
    for module in model.modules():
        if type(module) not in _ROW_MASKABLE:
            continue
        if getattr(module, "groups", 1) != 1:
            continue
        weight = module.weight
        if id(weight) not in trainable_ids or owners[id(weight)] != 1:
            continue
        bias = module.bias
        if bias is not None and owners[id(bias)] != 1:
            continue
        layers.append(MaskableLayer(module, weight, bias, -1 if type(module) is nn.Linear else 1))
    return layers


def _offsets(params: Sequence[Tensor]) -> dict[int, int]:
    out, offset = {}, 0
    for p in params:
        out[id(p)] = offset
        offset += p.numel()
    return out


@dataclass
class Selection:
    """What one step solves for.

    Attributes:
        solve_params: tensors the Jacobian is taken with respect to.
        index: (P_s,) positions of the solved-for entries in the flat vector of
            all trainable parameters; None when they are all of them, in order.
        columns: (P_s,) columns of J over ``solve_params`` to keep ("entries"),
            or None for all.
        row_layers: layers whose output rows are recomputed from leaf tensors.
        row_leaves: per layer, the leaves ``(W[S], b[S] or None)``.
        row_index: per layer, the chosen rows S.
    """

    solve_params: list[Tensor]
    index: Tensor | None = None
    columns: Tensor | None = None
    row_layers: list[MaskableLayer] = field(default_factory=list)
    row_leaves: list[tuple[Tensor, Tensor | None]] = field(default_factory=list)
    row_index: list[Tensor] = field(default_factory=list)

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Forward hooks that route the chosen rows of each layer through the leaves."""
        handles = []
        try:
            for layer, leaves, rows in zip(
                self.row_layers, self.row_leaves, self.row_index, strict=True
            ):
                hook = _row_hook(layer, leaves, rows)
                handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def to_full(self, flat: Tensor, total: int) -> Tensor:
        """Scatter a solve-space vector (P_s,) into the trainable flat vector (total,)."""
        if self.index is None:
            return flat
        out = torch.zeros(total, dtype=flat.dtype, device=flat.device)
        out[self.index.to(flat.device)] = flat
        return out


def _row_hook(layer: MaskableLayer, leaves: tuple[Tensor, Tensor | None], rows: Tensor):
    weight_rows, bias_rows = leaves
    bias_const = None
    if layer.bias is not None and bias_rows is None:
        bias_const = layer.bias.detach()[rows.to(layer.bias.device)]

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        bias = bias_rows if bias_rows is not None else bias_const
        x = args[0] if args else kwargs["input"]
        if type(module) is nn.Linear:
            part = F.linear(x, weight_rows, bias)
        else:
            part = module._conv_forward(x, weight_rows, bias)  # type: ignore[operator]
        dim = layer.channel_dim % output.dim()
        return output.index_copy(dim, rows.to(output.device), part)

    return hook


def select(
    mask: str,
    fraction: float,
    params: Sequence[Tensor],
    model: nn.Module | None,
    generator: torch.Generator,
) -> Selection:
    """Draw this step's :class:`Selection` over the trainable ``params``."""
    if fraction >= 1.0 or not params:
        return Selection(list(params))
    numels = [p.numel() for p in params]
    total = sum(numels)
    if mask == "entries":
        cols = entry_selection(total, fraction, generator)
        return Selection(list(params), index=cols, columns=cols)
    offsets = _offsets(params)
    if mask == "tensors":
        chosen = [params[i] for i in tensor_selection(numels, fraction, generator)]
        index = torch.cat(
            [torch.arange(offsets[id(p)], offsets[id(p)] + p.numel()) for p in chosen]
        )
        return Selection(chosen, index=index)
    if mask != "rows":
        raise ValueError(f"mask must be one of {list(MASKS)}, got {mask!r}")
    if model is None:
        raise ValueError("mask='rows' needs the model: pass Sven(model, ...) or model=")
    layers = maskable_layers(model, params)
    in_layer = {id(t) for layer in layers for t in (layer.weight, layer.bias) if t is not None}
    trainable_ids = {id(p) for p in params}
    solve: list[Tensor] = []
    index: list[Tensor] = []
    leaves, row_index = [], []
    for layer in layers:
        rows = row_selection(layer.weight.shape[0], fraction, generator)
        w = layer.weight
        w_rows = w.detach()[rows.to(w.device)].clone().requires_grad_(True)
        per_row = w[0].numel()
        solve.append(w_rows)
        index.append(offsets[id(w)] + (rows[:, None] * per_row + torch.arange(per_row)).reshape(-1))
        b_rows = None
        b = layer.bias
        if b is not None and id(b) in trainable_ids:
            b_rows = b.detach()[rows.to(b.device)].clone().requires_grad_(True)
            solve.append(b_rows)
            index.append(offsets[id(b)] + rows)
        leaves.append((w_rows, b_rows))
        row_index.append(rows)
    for p in params:
        if id(p) not in in_layer:
            solve.append(p)
            index.append(torch.arange(offsets[id(p)], offsets[id(p)] + p.numel()))
    return Selection(
        solve, index=torch.cat(index), row_layers=layers, row_leaves=leaves, row_index=row_index
    )
