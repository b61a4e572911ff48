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

with ``dc/dy = a``, ``-a`` or ``u``. Summed over consumers, ``sum_s dy_s`` is
autograd's gradient of ``y`` (the guard compares the parameters' sums). The
call then counts as a batched call on its input expanded to the S samples
(``x[None]`` or ``x`` with dim 0 of size 1 expanded), with outputs gradients
``dy_s``: every layer rule (Linear, Embedding, LayerNorm, torch.func) applies
unchanged.

Other consumers (a matmul, a reshape, an op on two broadcast tensors) raise
:class:`FallbackRequired` naming the module and the op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten

from .base import FallbackRequired

__all__ = ["BroadcastLeaf", "is_broadcast_call", "per_sample_call", "watch_consumers"]

#: consumer ops whose derivative in the broadcast operand is known per sample
CONSUMERS = ("AddBackward0", "SubBackward0", "MulBackward0", "MulBackward1")


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
    raise AssertionError(name)  # filtered by watch_consumers


def _check_shapes(out: tuple[int, ...], leaf: BroadcastLeaf, samples: int, what: str) -> None:
    """The consumer's output (S, ...) broadcasts y over dim 0, else FallbackRequired."""
    pad = len(out) - len(leaf.shape)
    if pad < 0 or not out or out[0] != samples or (pad == 0 and leaf.shape[0] != 1):
        raise FallbackRequired(
            f"{what} meets other tensors in an op with output shape {out}: neither batch-first "
            f"with the {samples} samples (dim 0 of the closure's output) nor broadcast over them"
        )


def _reduce_to_samples(local: Tensor, leaf: BroadcastLeaf, samples: int, what: str) -> Tensor:
    """Consumer-shaped (S, ...) local gradient -> per-sample gradients of y (S, *D)."""
    _check_shapes(tuple(local.shape), leaf, samples, what)
    pad = local.dim() - len(leaf.shape)
    if pad == 0:
        return local.sum_to_size((samples, *leaf.shape[1:]))
    target = (samples,) + (1,) * (pad - 1) + leaf.shape
    return local.sum_to_size(target).reshape(samples, *leaf.shape)


def watch_consumers(
    rows: Tensor,
    leaves: Sequence[tuple[Any, int, Tensor, str]],
    samples: int,
    passes: int,
    recording: Callable[[], int | None],
) -> tuple[list[BroadcastLeaf], list[Any]]:
    """Find the consumers of each broadcast output and hook them.

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
    targets: dict[tuple[int, int], BroadcastLeaf] = {}
    keep: list[Any] = []  # keeps node wrappers alive so that their ids stay unique
    records: list[BroadcastLeaf] = []
    for call, index, y, _name in leaves:
        edge = get_gradient_edge(y)
        keep.append(edge.node)
        kept = y.dim() >= 1 and y.shape[0] == 1
        record = BroadcastLeaf(call, index, tuple(y.shape), kept, [None] * passes)
        targets[(id(edge.node), edge.output_nr)] = record
        records.append(record)
    found: list[tuple[Any, int, BroadcastLeaf]] = []
    root = rows.grad_fn
    seen: dict[int, Any] = {} if root is None else {id(root): root}
    stack = [] if root is None else [root]
    while stack:
        node = stack.pop()
        for slot, (nxt, nr) in enumerate(node.next_functions):
            if nxt is None:
                continue
            record = targets.get((id(nxt), nr))
            if record is not None:
                found.append((node, slot, record))
            if id(nxt) not in seen:
                seen[id(nxt)] = nxt
                stack.append(nxt)
    names = {id(rec): name for rec, (_c, _i, _y, name) in zip(records, leaves, strict=True)}
    for node, _slot, record in found:
        what = f"the output of module '{names[id(record)]}' (shape {record.shape})"
        if node.name() not in CONSUMERS:
            raise FallbackRequired(
                f"{what} is not batch-first with the {samples} samples (dim 0 of the "
                f"closure's output) and is used by {node.name()}; a call broadcast over the "
                "batch needs +, - or * with a batched tensor (or pass batch-first inputs, "
                "e.g. position_ids of shape (batch, T))"
            )
        metadata = getattr(node, "_input_metadata", None)
        if metadata:
            _check_shapes(tuple(metadata[0].shape), record, samples, what)
    handles = []
    for node, slot, record in found:
        handles.append(
            node.register_prehook(
                _prehook(node, slot, record, samples, names[id(record)], recording)
            )
        )
    del keep, seen
    return records, handles


def _prehook(
    node: Any,
    slot: int,
    record: BroadcastLeaf,
    samples: int,
    name: str,
    recording: Callable[[], int | None],
) -> Callable[[tuple[Tensor, ...]], None]:
    what = f"the output of module '{name}' (shape {record.shape})"

    def hook(grad_outputs: tuple[Tensor, ...]) -> None:
        index = recording()
        grad = grad_outputs[0]
        if index is None or grad is None:
            return
        per_sample = _reduce_to_samples(_local_gradient(node, slot, grad), record, samples, what)
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
