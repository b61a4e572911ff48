"""Module calls broadcast over the batch: per-sample output gradients from their consumers.

A module called on an input without the samples' dimension (GPT-2's position
embedding on ids of shape (1, T), a learned table, an attention-bias module)
gives one output ``y`` for all samples, of shape (1, *D) or (*D). A later op
broadcasts it against batched tensors, and autograd hands ``y`` only the sum
over samples of its gradients, from which no per-sample factor follows.

The per-sample gradients are read one node later, at each *consumer* of ``y``
(the autograd node that takes ``y`` as an input), whose output ``c`` is
batched (S, ...). For an elementwise consumer ``c = u + a y``, ``u - a y`` or
``u * y`` (``u`` batched, ``a`` a constant), sample ``s``'s rows depend on
``c[s]`` only (samples are independent: the backend's probe checks it), so
with ``dc`` the gradient of ``sum(rows)`` (one backward pass) at ``c``:

    dy_s = sum_{broadcast dims of y} (dc[s] * dc/dy[s])     (S, *D)

with ``dc/dy = a``, ``-a`` or ``u`` (or the mask of ``where(mask, u, y)``).
Between ``y`` and that op there may be layout ops (permute, unsqueeze, view,
expand, slice, ...: single-input, sample-independent, linear): their exact
vjps (the autograd nodes themselves) map each sample's gradient back to ``y``;
so do ``+``, ``-``, ``*`` and ``where`` with another shared (unbatched) tensor.
Summed over consumers, ``sum_s dy_s`` is autograd's gradient of ``y`` (the
guard compares the parameters' sums). The call then counts as a batched call
on its input expanded to the S samples (``x[None]`` or ``x`` with dim 0 of
size 1 expanded), with output gradients ``dy_s``: every layer rule (Linear,
Embedding, LayerNorm, torch.func) applies unchanged.

Other uses (a matmul, a nonlinearity before the batch) raise
:class:`FallbackRequired` naming the module and the op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten

from .base import FallbackRequired

__all__ = ["BroadcastLeaf", "is_broadcast_call", "per_sample_call", "watch_consumers"]

#: consumer ops whose derivative in the broadcast operand is known per sample
CONSUMERS = ("AddBackward0", "SubBackward0", "MulBackward0", "WhereBackward0")


@dataclass
class BroadcastLeaf:
    """One broadcast output ``y`` of a call: its per-sample gradients per backward pass."""

    call: Any  # factored.Call
    index: int  # position among the call's out_leaves
    shape: tuple[int, ...]  # y's shape
    batch_dim_kept: bool  # y has a leading dim of size 1 (True) or none (False)
    grads: list[Tensor | None] = field(default_factory=list)  # [pass] (S, *per-sample shape)

    def per_sample_shape(self, samples: int) -> tuple[int, ...]:
        rest = self.shape[1:] if self.batch_dim_kept else self.shape
        return (samples, *rest)


def is_broadcast_call(kind: str, args: tuple, kwargs: dict, samples: int) -> bool:
    """True when no input of the call is batch-first with ``samples`` entries.

    For the layer rules (``kind != "generic"``) the input is ``args[0]``; for
    torch.func calls any tensor argument.
    """
    if kind != "generic":
        x = args[0] if args else None
        return isinstance(x, Tensor) and not (x.dim() >= 1 and x.shape[0] == samples)
    leaves, _ = tree_flatten((args, kwargs))
    return not any(isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == samples for t in leaves)


def _local_gradient(node: Any, slot: int, grad: Tensor) -> Tensor:
    """``dc * dc/dy`` for the consumer ``node`` whose input ``slot`` is ``y``."""
    name = node.name()
    if name == "AddBackward0":
        alpha = node._saved_alpha if slot == 1 else 1
        return grad if alpha == 1 else grad * alpha
    if name == "SubBackward0":
        return grad if slot == 0 else grad * (-node._saved_alpha)
    if name == "MulBackward0":
        return grad * (node._saved_other if slot == 0 else node._saved_self)
    if name == "MulBackward1":  # tensor * Python number
        return grad * node._saved_other
    if name == "WhereBackward0":  # where(condition, self, other)
        keep = node._saved_condition if slot == 0 else ~node._saved_condition
        return grad * keep
    raise AssertionError(name)  # filtered by watch_consumers


def _check_shapes(out: tuple[int, ...], shape: tuple[int, ...], samples: int, what: str) -> None:
    """The consumer's output (S, ...) broadcasts a tensor of ``shape`` over dim 0."""
    pad = len(out) - len(shape)
    if pad < 0 or not out or out[0] != samples or (pad == 0 and shape[0] != 1):
        raise FallbackRequired(
            f"{what} meets other tensors in an op with output shape {out}: neither batch-first "
            f"with the {samples} samples (dim 0 of the closure's output) nor broadcast over them"
        )


def _reduce_to_samples(local: Tensor, shape: tuple[int, ...], samples: int, what: str) -> Tensor:
    """Consumer-shaped (S, ...) local gradient -> per-sample gradients (S, *shape)."""
    pad = local.dim() - len(shape)
    if pad == 0:
        return local.sum_to_size((samples, *shape[1:])).reshape(samples, *shape)
    target = (samples,) + (1,) * (pad - 1) + shape
    return local.sum_to_size(target).reshape(samples, *shape)


#: single-input ops that only move, select or scale entries: a broadcast output may pass
#: through them before it meets the batch (T5's bias table is permuted, then unsqueezed)
LAYOUT_OPS = (
    "PermuteBackward0",
    "UnsqueezeBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "SqueezeBackward2",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "TransposeBackward0",
    "TransposeBackward1",
    "TBackward0",
    "ExpandBackward0",
    "SliceBackward0",
    "SelectBackward0",
    "CloneBackward0",
    "ToCopyBackward0",
    "AliasBackward0",
    "NegBackward0",
    "AddBackward1",
    "SubBackward1",
    "RsubBackward1",
    "MulBackward1",
    "DivBackward1",
)
_MAX_CHAIN = 8

#: a consumer that meets the batch: (node, input slot, chain of layout ops (node, slot)
#: from y to that input, shape of that input)
_Use = tuple[Any, int, tuple[tuple[Any, int], ...], tuple[int, ...]]


def _uses(
    edge: tuple[int, int],
    shape: tuple[int, ...],
    consumers_of: dict[tuple[int, int], list[tuple[Any, int]]],
    what: str,
    samples: int,
    chain: tuple[tuple[Any, int], ...] = (),
) -> list[_Use]:
    """The ops where a broadcast tensor (edge, shape) meets the batch, through layout ops."""
    out: list[_Use] = []
    for node, slot in consumers_of.get(edge, []):
        name = node.name()
        metadata = getattr(node, "_input_metadata", None)
        result = tuple(metadata[0].shape) if metadata else None
        if name in CONSUMERS and result is not None and _meets_batch(result, shape, samples):
            out.append((node, slot, chain, shape))
        elif (name in LAYOUT_OPS or name in CONSUMERS) and result is not None:
            # still one tensor for all samples: follow it (its vjp is sample independent)
            if len(chain) >= _MAX_CHAIN:
                raise FallbackRequired(f"{what} passes through too many ops before the batch")
            step = (*chain, (node, slot))
            out += _uses((id(node), 0), result, consumers_of, what, samples, step)
        else:
            raise FallbackRequired(
                f"{what} is not batch-first with the {samples} samples (dim 0 of the "
                f"closure's output) and is used by {name}; a call broadcast over the "
                "batch needs +, - or * with a batched tensor (or pass batch-first inputs, "
                "e.g. position_ids of shape (batch, T))"
            )
    return out


def _meets_batch(result: tuple[int, ...], shape: tuple[int, ...], samples: int) -> bool:
    """An op's output ``result`` is batched while its input of ``shape`` broadcasts."""
    pad = len(result) - len(shape)
    return pad >= 0 and bool(result) and result[0] == samples and (pad > 0 or shape[0] == 1)


def watch_consumers(
    rows: Tensor,
    leaves: Sequence[tuple[Any, int, Tensor, str]],
    samples: int,
    passes: int,
    recording: Callable[[], int | None],
) -> tuple[list[BroadcastLeaf], list[Any]]:
    """Find where each broadcast output meets the batch and hook those ops.

    Args:
        rows: the residual rows (their autograd graph is walked once).
        leaves: (call, out-leaf index, y, module name) of each broadcast output.
        samples: S.
        passes: backward passes of the capture (rows per sample).
        recording: returns the current pass index while the capture backward
            runs, None otherwise (probe and other backwards are not recorded).

    Returns:
        the per-leaf records (filled during the capture backward) and the hook
        handles (the caller removes them).
    """
    consumers_of: dict[tuple[int, int], list[tuple[Any, int]]] = {}
    root = rows.grad_fn
    seen: dict[int, Any] = {} if root is None else {id(root): root}  # keeps ids unique
    stack = [] if root is None else [root]
    while stack:
        node = stack.pop()
        for slot, (nxt, nr) in enumerate(node.next_functions):
            if nxt is None:
                continue
            consumers_of.setdefault((id(nxt), nr), []).append((node, slot))
            if id(nxt) not in seen:
                seen[id(nxt)] = nxt
                stack.append(nxt)
    records: list[BroadcastLeaf] = []
    handles: list[Any] = []
    for call, index, y, name in leaves:
        edge = get_gradient_edge(y)
        kept = y.dim() >= 1 and y.shape[0] == 1
        record = BroadcastLeaf(call, index, tuple(y.shape), kept, [None] * passes)
        records.append(record)
        what = f"the output of module '{name}' (shape {record.shape})"
        uses = _uses((id(edge.node), edge.output_nr), record.shape, consumers_of, what, samples)
        for node, _slot, _chain, shape in uses:
            metadata = getattr(node, "_input_metadata", None)
            if metadata:
                _check_shapes(tuple(metadata[0].shape), shape, samples, what)
        for node, slot, chain, shape in uses:
            handles.append(
                node.register_prehook(
                    _prehook(node, slot, chain, shape, record, samples, what, recording)
                )
            )
    del seen
    return records, handles


def _prehook(
    node: Any,
    slot: int,
    chain: tuple[tuple[Any, int], ...],
    shape: tuple[int, ...],
    record: BroadcastLeaf,
    samples: int,
    what: str,
    recording: Callable[[], int | None],
) -> Callable[[tuple[Tensor, ...]], None]:
    def hook(grad_outputs: tuple[Tensor, ...]) -> None:
        index = recording()
        grad = grad_outputs[0]
        if index is None or grad is None:
            return
        local = _local_gradient(node, slot, grad)
        _check_shapes(tuple(local.shape), shape, samples, what)
        per_sample = _reduce_to_samples(local, shape, samples, what)
        if chain:  # back through the layout ops, one sample at a time (exact vjps)
            back = []
            for s in range(samples):
                g = per_sample[s]
                for layout_node, layout_slot in reversed(chain):
                    out = layout_node(g)
                    g = out if isinstance(out, Tensor) else out[layout_slot]
                back.append(g)
            per_sample = torch.stack(back)
        per_sample = per_sample.reshape(record.per_sample_shape(samples))
        previous = record.grads[index]
        record.grads[index] = per_sample if previous is None else previous + per_sample

    return hook


def per_sample_call(kind: str, args: tuple, record: BroadcastLeaf, samples: int) -> tuple:
    """The call's arguments with the layer input expanded to the samples (layer rules).

    ``x`` with dim 0 of size 1 (y kept it): ``x.expand(S, ...)``; otherwise
    ``x[None].expand(S, ...)``. torch.func calls keep their arguments.
    """
    if kind == "generic":
        return args
    x = args[0]
    if record.batch_dim_kept:
        if x.dim() < 1 or x.shape[0] != 1:
            raise FallbackRequired(
                f"input of shape {tuple(x.shape)} gives an output of shape {record.shape}: "
                "not a broadcast over the batch"
            )
        x = x.expand(samples, *x.shape[1:])
    else:
        x = x.unsqueeze(0).expand(samples, *x.shape)
    return (x, *args[1:])


def sample_like(record: BroadcastLeaf, y: Tensor, samples: int) -> Tensor:
    """A (S, *per-sample shape) view of ``y`` (shape reference for missing gradients)."""
    if record.batch_dim_kept:
        return y.expand(samples, *y.shape[1:])
    return y.unsqueeze(0).expand(samples, *y.shape)
