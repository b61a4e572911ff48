"""Factored Gram backend: ``K = J J^T`` from per-layer hook factors, never J.

One step (docs/design.md, "Backends"):

1. ``capture``: forward hooks on the model's modules record each call's inputs
   and put a tensor hook on its outputs (robust to in-place ops after the layer).
   Hooks are removed when the closure returns; tensor hooks when the step ends.
2. One backward of ``sum(rows)`` (``m`` backwards for ``m`` rows per sample)
   through ``torch.autograd.grad`` gives each call's output gradients and, from
   the same pass, autograd's ``J^T 1``.
3. Per layer (:mod:`torchsven.backends.layers`) the factors give ``K_l`` (float64)
   and ``J_l^T w`` for any row weights ``w``.
4. Guard: the factors' ``J^T 1`` must equal autograd's (random projections of the
   weight gradients); on a new model structure (module calls, shapes, flags and
   the autograd graph of the rows, see :func:`graph_fingerprint`) or with
   ``verify="always"`` a probe with random row weights ``v`` compares ``J^T v``
   too, which sees coupling between samples. Any mismatch raises
   :class:`FallbackRequired`, so the optimizer runs the generic backend: never a
   silently wrong step. On a step whose structure already passed (same calls and
   the same graph, node for node), the capture backward asks autograd only for
   the parameters that force every hooked output gradient (a Linear/Conv
   layer's bias, not its weight: no weight-gradient products), and the check
   compares the parameters where the factors are not autograd's own reduction
   (read outside their calls, or by ``torch.func``; see
   :meth:`FactoredBackend._lean_inputs`).
5. ``c`` from the eigh of K (:func:`torchsven.solve.gram_coefficients`), the
   update ``J^T c`` from the factors (no second backward) and ``row_change = K c``.

Rows map to samples through dim 0 of the closure's output (S samples): ``m =
N / S`` rows per sample, or with micro-batches one row per ``b`` samples.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.utils._pytree import tree_flatten

from ..errors import NonFiniteError
from ..masks import Selection
from ..matfree import ParamBlock, rank_k_step
from ..solve import SpectralFilter, SpectralSolution, gram_coefficients, jacobian_step
from .assembly import GramAssembly
from .base import Backend, Direction, FallbackRequired, check_finite, flat_to_params
from .broadcast import (
    BroadcastLeaf,
    is_broadcast_call,
    per_sample_call,
    sample_like,
    watch_consumers,
)
from .layers import (
    ChannelBiasLinearTerm,
    EmbeddingTerm,
    GenericTerm,
    LinearLikeTerm,
    NormTerm,
    RowLayout,
    Term,
    TermError,
    block_j,
    block_jt,
    block_sketch,
    channel_bias_mask,
    conv_factors,
    dtype_tolerance,
    embedding_factors,
    linear_factors,
    normalized_input,
)
from .transposed import TransposedLinearTerm, is_transposed_linear

__all__ = ["VERIFY_MODES", "FactoredBackend"]

#: ``verify`` values: "auto" probes for cross-sample coupling on the first step
#: and whenever the model's structure (calls, shapes, train/eval flags) changes;
#: "always" probes on every step.
VERIFY_MODES = ("auto", "always")

_F64 = torch.float64
#: Width of the (cheap, Kronecker) sketch relative to the rank-k basis on the matrix-free
#: path: at N = 1024 (MLP 32-256-256-1, k = 64) factor 4 lifted the rank-64 step's
#: linearised decrease from 0.72x to 0.82-0.96x of the exact step's without power iterations.
SKETCH_FACTOR = 4.0
#: Structures remembered by one backend (verified or refused).
_MAX_VERIFIED = 64
_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _kind(module: nn.Module) -> str:
    """Which factor rule a module's own parameters use (exact types only)."""
    t = type(module)
    if t is nn.Linear:
        return "linear"
    if t in (nn.Conv1d, nn.Conv2d):
        return "conv"
    if t is nn.Embedding:
        return "embedding"
    if t in _NORMS:
        return "norm"
    if is_transposed_linear(module):
        return "linear_t"
    return "generic"


@dataclass
class Call:
    """One hooked module call: its inputs, its outputs and their gradients per pass."""

    module: nn.Module
    name: str
    kind: str
    args: tuple
    kwargs: dict
    covers: dict[str, Tensor]  # parameter name relative to module -> parameter
    versions: list[tuple[Tensor, int]]
    shapes: tuple = ()  # shapes of the tensor inputs (structure signature)
    out_leaves: list[Tensor] = field(default_factory=list)
    grads: list[list[Tensor | None]] = field(default_factory=list)  # [leaf][pass]
    #: Linear on channels (S, C, d_in) with its bias only where the mask (C,) holds
    #: (:func:`torchsven.backends.layers.bias_on_channels`); None: bias everywhere.
    bias_mask: tuple[bool, ...] | None = None
    #: the autocast dtype the call ran under (its Linear/Conv inputs are cast to it)
    autocast: torch.dtype | None = None
    #: output rows (Linear features / Conv channels) whose weight rows are solved for
    #: (``mask="rows"``: the covered tensors are the selection's leaves), or None
    out_rows: Tensor | None = None
    #: a Linear/Conv call whose output's autograd node reads its trainable bias (so a
    #: backward that asks for the bias passes through the output and its hook)
    bias_inside: bool = False

    def input(self) -> Any:
        """The first input as the module's kernel saw it (autocast's cast applied)."""
        x = self.args[0] if self.args else None
        if self.autocast is not None and isinstance(x, Tensor) and x.is_floating_point():
            return x.to(self.autocast)
        return x


@dataclass(frozen=True)
class _Plan:
    """What the hooks and checks need from the model, per (modules, trainable params).

    Built once and reused while the model's modules and the trainable
    parameters stay the same objects (see ``FactoredBackend._plan``).
    """

    modules: tuple[nn.Module, ...]
    names: dict[int, str]  # id(module) -> qualified name (modules with trainable params)
    owned: dict[int, dict[str, Tensor]]  # id(module) -> its own trainable params
    subtree: dict[int, dict[str, Tensor]]  # id(module) -> trainable params below it
    batchnorms: tuple[tuple[str, nn.Module], ...]
    marked: tuple[str, ...]  # names of modules marked as coupling samples
    param_names: dict[int, str]  # id(param) -> qualified name (messages)
    module_names: dict[int, str]  # id(module) -> qualified name (every module)

    @classmethod
    def build(
        cls, model: nn.Module, params: Sequence[Tensor], coupled: Sequence[type | nn.Module]
    ) -> _Plan:
        trainable = {id(p) for p in params}
        names: dict[int, str] = {}
        owned: dict[int, dict[str, Tensor]] = {}
        subtree: dict[int, dict[str, Tensor]] = {}
        module_names: dict[int, str] = {}
        batchnorms, marked, modules = [], [], []
        for name, module in model.named_modules():
            modules.append(module)
            module_names[id(module)] = name
            sub = {n: p for n, p in module.named_parameters() if id(p) in trainable}
            if sub:
                names[id(module)] = name
                subtree[id(module)] = sub
                owned[id(module)] = {
                    n: p for n, p in module.named_parameters(recurse=False) if id(p) in trainable
                }
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                batchnorms.append((name, module))
            if any(
                module is mark or (isinstance(mark, type) and isinstance(module, mark))
                for mark in coupled
            ):
                marked.append(name)
        param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        return cls(
            tuple(modules),
            names,
            owned,
            subtree,
            tuple(batchnorms),
            tuple(marked),
            param_names,
            module_names,
        )


class Recorder:
    """Hooks of one step: forward (pre-)hooks on modules, tensor hooks on outputs."""

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[Tensor],
        selection: Selection | None = None,
        plan: _Plan | None = None,
    ) -> None:
        self.model = model
        self.plan = _Plan.build(model, params, ()) if plan is None else plan
        self.calls: list[Call] = []
        self.errors: list[str] = []
        self.passes = 1
        self.pass_index = 0
        self.active = True
        #: tensor hooks store gradients only during the backend's own backward passes
        self.armed = False
        self._stack: list[int] = []
        self._module_handles: list[Any] = []
        self._tensor_handles: list[Any] = []
        #: (id(call), leaf index) -> (S, passes, ...) buffer of the passes' output gradients
        #: and the passes written into it so far (the others are zeroed at the end)
        self._pass_buffers: dict[tuple[int, int], tuple[Tensor, set[int]]] = {}
        self._names = self.plan.names
        self._owned = self.plan.owned
        self._subtree = self.plan.subtree
        # mask="rows": a masked layer's solved-for tensors are the leaves W[S], b[S]
        self._out_rows: dict[int, Tensor] = {}
        if selection is not None:  # per step: copies, the plan stays as it was
            self._names, self._owned = dict(self._names), dict(self._owned)
            self._subtree = dict(self._subtree)
            names = self.plan.module_names
            for layer, (weight, bias), out_rows in zip(
                selection.row_layers, selection.row_leaves, selection.row_index, strict=True
            ):
                key = id(layer.module)
                owned = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
                self._names[key] = names.get(key, "?")
                self._owned[key] = self._subtree[key] = owned
                self._out_rows[key] = out_rows

    # ------------------------------------------------------------- install
    def install(self) -> None:
        if _is_compiled(self.model):
            self.errors.append(
                "the model is torch.compile-d or scripted; pass the original module to Sven "
                "for the factored backend"
            )
            return
        try:
            for module in self.plan.modules:
                if id(module) not in self._subtree:
                    continue
                if isinstance(module, torch.jit.ScriptModule):
                    raise RuntimeError(f"module '{self._names[id(module)]}' is scripted")
                self._module_handles.append(module.register_forward_pre_hook(self._pre))
                self._module_handles.append(
                    module.register_forward_hook(self._post, with_kwargs=True)
                )
        except Exception as exc:  # scripted submodules refuse hooks
            self.remove_module_hooks()
            self.errors.append(f"cannot hook the model ({exc})")

    def remove_module_hooks(self) -> None:
        for h in self._module_handles:
            h.remove()
        self._module_handles.clear()

    def release(self) -> None:
        """Remove the tensor hooks and drop every reference to the step's tensors."""
        self.active = False
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles.clear()
        self._pass_buffers.clear()
        self.calls.clear()

    # --------------------------------------------------------------- hooks
    def _pre(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return
        self._stack.append(len(self.calls))

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if torch.compiler.is_compiling():  # traced by torch.compile: record nothing
            if not self.errors:
                self.errors.append(
                    f"module '{self._names.get(id(module))}' ran inside torch.compile-d code, "
                    "where the factored backend's hooks cannot record; call the uncompiled "
                    "model in the closure for the factored backend"
                )
            return
        try:
            start = self._stack.pop() if self._stack else len(self.calls)
            if not self.active:
                return
            key = id(module)
            kind = _kind(module)
            if kind != "generic":
                covers = dict(self._owned[key])
            else:
                within = {id(p) for c in self.calls[start:] for p in c.covers.values()}
                covers = {n: p for n, p in self._subtree[key].items() if id(p) not in within}
            if not covers:
                return
            leaves, _ = tree_flatten((args, kwargs))
            tensors = [t for t in leaves if isinstance(t, Tensor)]
            versions = [(t, t._version) for t in tensors]
            shapes = tuple(tuple(t.shape) for t in tensors)
            call = Call(module, self._names[key], kind, args, kwargs, covers, versions, shapes)
            call.out_rows = self._out_rows.get(key)
            device = next(iter(covers.values())).device.type
            if kind in ("linear", "conv") and torch.is_autocast_enabled(device):
                call.autocast = torch.get_autocast_dtype(device)
            if kind == "linear":
                call.bias_mask = channel_bias_mask()
            out_leaves, _ = tree_flatten(output)
            if kind in ("linear", "conv") and "bias" in covers:
                first = next((t for t in out_leaves if isinstance(t, Tensor)), None)
                call.bias_inside = first is not None and _reads(first.grad_fn, covers["bias"])
            for t in out_leaves:
                if isinstance(t, Tensor) and t.requires_grad:
                    index = len(call.out_leaves)
                    call.out_leaves.append(t)
                    call.grads.append([None] * self.passes)
                    self._tensor_handles.append(t.register_hook(self._grad_hook(call, index)))
            self.calls.append(call)
        except Exception as exc:  # never break the user's forward
            self.errors.append(f"hook failed on module '{self._names.get(id(module))}' ({exc})")

    def _grad_hook(self, call: Call, index: int):
        def hook(g: Tensor) -> None:
            if self.active and self.armed:
                slot = call.grads[index]
                if len(slot) < self.passes:
                    slot.extend([None] * (self.passes - len(slot)))
                j = self.pass_index
                if self.passes > 1 and self._into_buffer((id(call), index), slot, j, g):
                    return
                slot[j] = g if slot[j] is None else slot[j] + g

        return hook

    def _into_buffer(self, key: tuple[int, int], slot: list[Tensor | None], j: int, g: Tensor):
        """Add pass j's output gradient g (S, ...) into the leaf's (S, passes, ...) buffer,
        whose slices ``buf[:, k]`` are the slot's entries, so that the m passes are
        stacked without a copy (:meth:`RowLayout.grads_to_rows`); False (nothing
        stored) when the slot already holds tensors of its own."""
        entry = self._pass_buffers.get(key)
        if entry is None:
            if any(t is not None for t in slot):
                return False
            buf = g.new_empty(g.shape[0], len(slot), *g.shape[1:])
            entry = self._pass_buffers[key] = (buf, set())
            slot[:] = [buf[:, k] for k in range(len(slot))]
        target, written = slot[j], entry[1]
        fits = target is not None and target.shape == g.shape and target.dtype == g.dtype
        if j not in written:
            if fits:
                target.copy_(g)
            else:  # not the buffer's shape: the pass keeps its own tensor (stacked later)
                slot[j] = g
            written.add(j)
        elif fits and target._base is entry[0]:
            target.add_(g)
        else:
            slot[j] = target + g
        return True

    def close_buffers(self) -> None:
        """After the passes: zero the buffers' slices of passes that wrote nothing."""
        for buf, written in self._pass_buffers.values():
            for k in range(buf.shape[1]):
                if k not in written:
                    buf[:, k].zero_()
        self._pass_buffers.clear()


def _compile_note(model: nn.Module, rows: Tensor) -> str:
    """Why a fallback may come from torch.compile (empty when nothing shows it).

    Looks for compiled submodules (``OptimizedModule``) and for compiled autograd
    nodes (``CompiledFunctionBackward``) in the rows' graph; only on the fallback path.
    """
    for name, module in model.named_modules():
        if _is_compiled(module):
            return (
                f"module '{name}' is torch.compile-d; use the uncompiled module in the model "
                "for the factored backend"
            )
    seen: set[int] = set()
    nodes: list[Any] = [] if rows.grad_fn is None else [rows.grad_fn]
    keep: list[Any] = []
    while nodes:
        node = nodes.pop()
        keep.append(node)
        if node.name().startswith("CompiledFunction"):
            return (
                "the closure runs torch.compile-d code, whose layers the factored backend's "
                "hooks cannot see; call the uncompiled model in the closure for the factored "
                "backend"
            )
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                nodes.append(nxt)
    return ""


def graph_fingerprint(root: Any, params: Sequence[Tensor]) -> tuple[tuple, tuple[int, ...]]:
    """The structure of the autograd graph below ``root`` (the rows' ``grad_fn``).

    Nodes are numbered in breadth-first order from ``root``; each contributes
    its type, its edges (target number, input slot) and, for a leaf
    (``AccumulateGrad``), which trainable parameter it is (index in ``params``,
    -1 for any other leaf). Two graphs with equal fingerprints route every
    parameter to the rows through the same operations in the same wiring; what
    differs between them is only the values. Cost: a Python visit per node.

    Returns the fingerprint and, per parameter, the number of graph edges that
    read it (its uses: one per module call that reads it through a plain
    Linear, Conv or norm; more when the parameter is also read elsewhere).
    """
    uses = [0] * len(params)
    if root is None:
        return (), tuple(uses)
    index_of = {id(p): i for i, p in enumerate(params)}
    number: dict[Any, int] = {root: 0}
    queue = [root]
    out: list[tuple] = []
    head = 0
    while head < len(queue):
        node = queue[head]
        head += 1
        edges = []
        for child, slot in node.next_functions:
            if child is None:
                edges.append((-1, slot))
                continue
            k = number.get(child)
            if k is None:
                k = number[child] = len(queue)
                queue.append(child)
            edges.append((k, slot))
        variable = getattr(node, "variable", None)
        leaf = None
        if isinstance(variable, Tensor):
            leaf = index_of.get(id(variable), -1)
        out.append((type(node).__name__, leaf, tuple(edges)))
    # uses: edges into each parameter's leaf node
    leaf_of = {k: entry[1] for k, entry in enumerate(out) if entry[1] is not None}
    for entry in out:
        for k, _slot in entry[2]:
            i = leaf_of.get(k, -1)
            if i is not None and i >= 0:
                uses[i] += 1
    return tuple(out), tuple(uses)


def _reads(node: Any, target: Tensor, max_nodes: int = 16) -> bool:
    """Whether the autograd graph below ``node`` reads the leaf ``target`` within a few
    nodes (a Linear/Conv output's node and the bias it adds: one to three nodes)."""
    queue, head = [node], 0
    while head < len(queue) and head < max_nodes:
        current = queue[head]
        head += 1
        if current is None:
            continue
        if getattr(current, "variable", None) is target:
            return True
        queue.extend(child for child, _ in current.next_functions)
    return False


def _is_compiled(model: nn.Module) -> bool:
    if isinstance(model, torch.jit.ScriptModule):
        return True
    return type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod")


class FactoredBackend(Backend):
    """Exact Sven through the per-layer factored Gram matrix (needs the model).

    Args:
        model: the ``nn.Module`` whose parameters are optimised.
        microbatch_size: rows were grouped ``b`` samples per row
            (:func:`torchsven.microbatch.group_rows`); None: not grouped.
        verify: "auto" or "always" (see :data:`VERIFY_MODES`).
        ghost: "auto" (cheaper form per layer and step), True or False; for tests.
        coupled: module types or instances that couple samples; their presence
            sends the step to the generic backend.
    """

    name = "factored"
    provides_gram = True
    provides_matfree = True

    def __init__(
        self,
        model: nn.Module,
        *,
        microbatch_size: int | None = None,
        verify: str = "auto",
        ghost: str | bool = "auto",
        coupled: Sequence[type | nn.Module] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {list(VERIFY_MODES)}, got {verify!r}")
        self.model = model
        self.microbatch_size = microbatch_size
        self.verify = verify
        self.ghost = ghost
        self.coupled = tuple(coupled)
        #: (model structure signature, graph fingerprint) -> None (full check and probe
        #: passed) or the fallback reason; at most ``_MAX_VERIFIED`` entries (oldest dropped)
        self._verified: dict[tuple, str | None] = {}
        #: number of coupling probes run (diagnostics, benchmarks)
        self.probes = 0
        #: number of steps checked the lean way (structure already verified)
        self.lean_steps = 0
        self._plan_cache: tuple[tuple, _Plan] | None = None

    def _plan(self, params: Sequence[Tensor]) -> _Plan:
        """The model's :class:`_Plan`, rebuilt when its modules or the params change."""
        key = (tuple(map(id, self.model.modules())), tuple(map(id, params)))
        if self._plan_cache is None or self._plan_cache[0] != key:
            self._plan_cache = (key, _Plan.build(self.model, params, self.coupled))
        return self._plan_cache[1]

    @contextlib.contextmanager
    def capture(
        self, params: Sequence[Tensor], selection: Selection | None = None
    ) -> Iterator[Recorder]:
        recorder = Recorder(self.model, params, selection, self._plan(params))
        recorder.install()
        try:
            yield recorder
        finally:
            recorder.remove_module_hooks()

    def direction(
        self,
        rows: Tensor,
        params: Sequence[Tensor],
        filt: SpectralFilter,
        captured: Any = None,
        output: Tensor | None = None,
    ) -> Direction:
        return self._with_factors(
            rows, params, captured, output, lambda *f: self._solve(f[0], f[1], filt, *f[2:])
        )

    def gram_matrix(
        self,
        rows: Tensor,
        params: Sequence[Tensor],
        captured: Any,
        output: Tensor | None = None,
    ) -> Tensor:
        """K = J J^T (N, N) float64 of the rows, with the same hooks, guard and probe."""
        return self._with_factors(rows, params, captured, output, lambda *f: self._gram(*f)[0])

    def matfree_direction(
        self,
        rows: Tensor,
        params: Sequence[Tensor],
        filt: SpectralFilter,
        captured: Any,
        output: Tensor | None = None,
        *,
        columns: int,
        power_iters: int,
        generator: torch.Generator,
        probes: int = 4,
        sketch_factor: float = SKETCH_FACTOR,
    ) -> Direction:
        """Rank-k step touching ``K = J J^T`` only through block products from the factors.

        Randomized range finder on K with ``columns`` (rank + oversampling)
        columns and ``power_iters`` power iterations, then the filtered
        Rayleigh-Ritz step (:mod:`torchsven.matfree`); same hooks, guard and
        probe as :meth:`direction`. ``solver`` is "matfree"; the Ritz values are
        the singular values reported. The Kronecker sketch costs about a forward
        pass, so ``sketch_factor`` times wider sketch is drawn and its top
        singular vectors kept (:func:`torchsven.matfree.range_finder`).
        ``extras`` holds ``sketch_residual`` (estimated ``||(I - Q Q^T) J||_F /
        ||J||_F``), ``sketch_columns`` and ``block_products``.
        """

        def use(rows: Tensor, params: list[Tensor], contributions: Any, layout: RowLayout):
            op = FactoredJacobian(params, contributions, layout)
            found = rank_k_step(
                op, rows, params, filt, columns, power_iters, generator, probes, sketch_factor
            )
            solution = SpectralSolution(found.singular_values, found.kept, "matfree")
            return Direction(found.step, solution, found.row_change, found.extras)

        return self._with_factors(rows, params, captured, output, use)

    def _with_factors(
        self,
        rows: Tensor,
        params: Sequence[Tensor],
        captured: Any,
        output: Tensor | None,
        use: Callable[..., Any],
    ) -> Any:
        """``use(rows, params, contributions, layout)`` on this step's checked factors.

        Releases the recorder's stored tensors whatever happens.
        """
        if not isinstance(captured, Recorder):
            raise FallbackRequired("the closure ran without the factored backend's hooks")
        try:
            rows = rows.reshape(-1)
            params = list(params)
            try:
                contributions, layout = self._factors(rows, params, captured, output)
            except FallbackRequired as why:
                note = _compile_note(self.model, rows)
                if note and "torch.compile" not in why.reason:
                    raise FallbackRequired(f"{why.reason}; {note}") from why
                raise
            return use(rows, params, contributions, layout)
        finally:
            captured.release()

    # ----------------------------------------------------------------- steps
    def _layout(self, rows: Tensor, output: Tensor | None) -> RowLayout:
        n_rows = rows.numel()
        samples = output.shape[0] if output is not None and output.dim() >= 1 else n_rows
        b = self.microbatch_size
        if b is not None and b > 1:
            if math.ceil(samples / b) != n_rows:
                raise FallbackRequired(
                    f"{n_rows} rows do not match {samples} samples in micro-batches of {b}"
                )
            return RowLayout(samples, n_rows, group=b)
        if samples == 0 or n_rows % samples:
            raise FallbackRequired(f"{n_rows} rows are not a multiple of {samples} samples")
        return RowLayout(samples, n_rows, outputs=n_rows // samples)

    def _static_checks(self, recorder: Recorder, layout: RowLayout) -> None:
        if recorder.errors:
            raise FallbackRequired(recorder.errors[0])
        for name, module in recorder.plan.batchnorms:
            if module.training or not module.track_running_stats:
                raise FallbackRequired(
                    f"{type(module).__name__} '{name}' uses batch statistics, which couple "
                    "samples (call .eval() on it for the factored backend)"
                )
        for name in recorder.plan.marked:
            raise FallbackRequired(f"module '{name}' is marked as coupling samples")
        for call in recorder.calls:
            for t, version in call.versions:
                if t._version != version:
                    raise FallbackRequired(
                        f"an input of module '{call.name}' was modified in place after the call"
                    )
            if call.kind != "generic" and not (call.args and isinstance(call.args[0], Tensor)):
                raise FallbackRequired(f"module '{call.name}' was called without a tensor input")

    def _signature(self, recorder: Recorder, layout: RowLayout, params: list[Tensor]) -> tuple:
        calls = tuple(
            (c.name, c.kind, c.shapes, tuple(sorted(c.covers)), c.bias_mask) for c in recorder.calls
        )
        flags = tuple(m.training for m in recorder.plan.modules)
        return (layout, calls, flags, tuple(map(id, params)))

    def _watch_broadcast(
        self, rows: Tensor, recorder: Recorder, layout: RowLayout
    ) -> list[BroadcastLeaf]:
        """Hook the consumers of outputs of calls broadcast over the batch (broadcast.py)."""
        calls = [
            c for c in recorder.calls if is_broadcast_call(c.kind, c.args, c.kwargs, layout.samples)
        ]
        for call in calls:
            leaves, _ = tree_flatten((call.args, call.kwargs))
            if any(isinstance(t, Tensor) and is_functorch_wrapped_tensor(t) for t in leaves):
                raise FallbackRequired(
                    f"module '{call.name}' was called inside a torch.func transform"
                )
        leaves = [(c, index, y, c.name) for c in calls for index, y in enumerate(c.out_leaves)]
        if not leaves:
            return []

        def recording() -> int | None:
            return recorder.pass_index if recorder.armed else None

        try:
            records, handles = watch_consumers(
                rows, leaves, layout.samples, layout.outputs, recording
            )
        except FallbackRequired:
            raise
        except Exception as exc:  # an autograd graph the walk cannot read
            raise FallbackRequired(
                f"cannot follow a call broadcast over the batch ({exc})"
            ) from exc
        recorder._tensor_handles.extend(handles)
        return records

    def _backward(self, rows: Tensor, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        grads = torch.autograd.grad(
            rows, params, grad_outputs=weights, retain_graph=True, allow_unused=True
        )
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]

    def _capture_backward(
        self, rows: Tensor, params: list[Tensor], recorder: Recorder, layout: RowLayout
    ) -> list[Tensor]:
        """Output gradients into the recorder; returns autograd's ``J^T 1`` per input."""
        m = layout.outputs
        recorder.passes = m
        for call in recorder.calls:
            for slot in call.grads:
                slot.extend([None] * (m - len(slot)))
        total: list[Tensor] | None = None
        recorder.armed = True
        for j in range(m):
            recorder.pass_index = j
            if m == 1:
                weights = torch.ones_like(rows)
            else:
                weights = torch.zeros(layout.samples, m, dtype=rows.dtype, device=rows.device)
                weights[:, j] = 1
                weights = weights.reshape(-1)
            grads = self._backward(rows, params, weights)
            total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
        recorder.active = recorder.armed = False
        recorder.close_buffers()  # the slots hold the buffers' slices
        assert total is not None
        return total

    @staticmethod
    def _lean_inputs(
        recorder: Recorder, params: list[Tensor], uses: Sequence[int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """What a step of a verified structure asks autograd for, and what it compares.

        Asked: ``params`` less the weights that only Linear/Conv calls with a
        trainable bias read. Asking autograd for such a layer's bias still runs
        the backward through the layer's output (so its tensor hook sees the
        output gradient; checked when the call ran: the output's autograd node
        reads the bias), but skips the weight-gradient product ``G^T X``, the
        costliest part of a backward.

        Compared: the parameters whose ``J^T 1`` from the factors is not the
        same computation as autograd's: those the graph reads other than once
        per hooked call (``uses`` from :func:`graph_fingerprint`: a weight used
        outside its module, derivatives of the network in the rows; a path that
        was idle when the structure was verified, such as a zero gate, is caught
        when it starts to contribute), those no hooked call covers (must get no
        gradient) and those of modules read by ``torch.func``. For a parameter
        read exactly once per Linear, Conv, Embedding or norm call, the factors'
        ``J^T 1`` is autograd's own reduction of the same output gradients and
        inputs, so comparing it again on every step would check nothing new.
        """
        skippable: dict[int, bool] = {}
        calls_of: dict[int, int] = {}
        recomputed: set[int] = set()
        for c in recorder.calls:
            with_bias = c.kind in ("linear", "conv") and "bias" in c.covers and c.bias_inside
            for name, p in c.covers.items():
                ok = with_bias and name == "weight"
                skippable[id(p)] = skippable.get(id(p), True) and ok
                calls_of[id(p)] = calls_of.get(id(p), 0) + 1
                if c.kind == "generic":
                    recomputed.add(id(p))
        asked, compared = [], []
        for p, n_uses in zip(params, uses, strict=True):
            n_calls = calls_of.get(id(p), 0)
            read_in_calls = n_calls > 0 and n_uses == n_calls
            if skippable.get(id(p), False) and read_in_calls:
                continue
            asked.append(p)
            if not read_in_calls or id(p) in recomputed:
                compared.append(p)
        return asked, compared

    def _terms(
        self, recorder: Recorder, layout: RowLayout
    ) -> dict[int, list[tuple[Term, str, str]]]:
        """param id -> [(term, name in term, module name)] from the recorded calls."""
        groups: dict[tuple, list[Call]] = {}
        for call in recorder.calls:
            key = (id(call.module), tuple(sorted(call.covers)))
            groups.setdefault(key, []).append(call)
        contributions: dict[int, list[tuple[Term, str, str]]] = {}
        for calls in groups.values():
            first = calls[0]
            try:
                term = self._term(calls, layout)
            except TermError as exc:
                raise FallbackRequired(f"module '{first.name}': {exc}") from exc
            for call in calls:  # the term holds what it needs: drop the per-pass gradients
                call.grads = [[None] * len(slot) for slot in call.grads]
            for name, p in first.covers.items():
                contributions.setdefault(id(p), []).append((term, name, first.name))
        return contributions

    def _term(self, calls: list[Call], layout: RowLayout) -> Term:
        first = calls[0]
        module, covers = first.module, first.covers
        passes = [c.grads[0] if c.grads else [None] * layout.outputs for c in calls]
        outs = [c.out_leaves[0] if c.out_leaves else None for c in calls]
        if first.kind in ("linear", "linear_t", "conv", "embedding", "norm") and any(
            o is None for o in outs
        ):
            calls = [c for c, o in zip(calls, outs, strict=True) if o is not None]
            if not calls:
                raise TermError("its outputs do not require grad")
            passes = [c.grads[0] for c in calls]
            outs = [c.out_leaves[0] for c in calls]
        weight = "weight" if "weight" in covers else None
        bias = "bias" if "bias" in covers else None
        if first.kind == "linear_t":
            parts = [
                linear_factors(c.args[0], layout, gp, o)
                for c, gp, o in zip(calls, passes, outs, strict=True)
            ]
            a, g = _cat_parts(parts, 0), _cat_parts(parts, 1)
            return TransposedLinearTerm(a, g, covers, weight, bias, self.ghost, layout.outputs)
        if first.kind in ("linear", "conv"):
            parts = [
                linear_factors(c.input(), layout, gp, o)
                if first.kind == "linear"
                else conv_factors(module, c.input(), layout, gp, o)
                for c, gp, o in zip(calls, passes, outs, strict=True)
            ]
            a, g = _cat_parts(parts, 0), _cat_parts(parts, 1)
            if first.out_rows is not None:  # mask="rows": the chosen output rows only
                g = g[..., first.out_rows.to(g.device)]
            if bias is not None and any(c.bias_mask is not None for c in calls):
                mask = torch.cat(
                    [_bias_positions(c, p[0].shape[1]) for c, p in zip(calls, parts, strict=True)]
                ).to(a.device)
                return ChannelBiasLinearTerm(
                    a, g, covers, weight, bias, mask, self.ghost, layout.outputs
                )
            return LinearLikeTerm(a, g, covers, weight, bias, self.ghost, layout.outputs)
        if first.kind == "embedding":
            if module.scale_grad_by_freq:
                raise TermError("scale_grad_by_freq couples samples")
            parts = [
                embedding_factors(c.args[0], layout, gp, o)
                for c, gp, o in zip(calls, passes, outs, strict=True)
            ]
            idx, g = _cat_parts(parts, 0), _cat_parts(parts, 1)
            return EmbeddingTerm(idx, g, covers, "weight", module.padding_idx, layout.outputs)
        if first.kind == "norm":
            terms = []
            for c, gp, o in zip(calls, passes, outs, strict=True):
                xhat = layout.to_rows(normalized_input(module, c.args[0]))
                g = layout.grads_to_rows(gp, o)
                channel = None if isinstance(module, nn.LayerNorm) or _is_rms(module) else 2
                terms.append(NormTerm(xhat, g, covers, weight, bias, channel))
            return terms[0] if len(terms) == 1 else _SumTerm(terms, covers)
        return GenericTerm(
            module,
            [(c.args, c.kwargs, c.out_leaves, c.grads) for c in calls],
            covers,
            layout,
        )

    def _check(
        self,
        contributions: dict[int, list[tuple[Term, str, str]]],
        params: list[Tensor],
        names: dict[int, str],
        autograd_grads: list[Tensor],
        weights: Tensor,
        what: str,
        generator: torch.Generator,
        precision: torch.dtype,
    ) -> None:
        """Factors' ``J^T w`` against autograd's, per parameter; FallbackRequired on mismatch.

        Every parameter's comparison is reduced to three numbers (finite or not,
        error, scale) on the device and all of them come to the host at once.
        """
        stats: list[Tensor] = []
        labels: list[tuple[Tensor, str | None]] = []
        for p, ref in zip(params, autograd_grads, strict=True):
            contribs = contributions.get(id(p), [])
            if not contribs:
                labels.append((p, None))
                nonzero = ref.detach().any().to(_F64)
                stats.append(torch.stack([nonzero.new_ones(()), nonzero, nonzero.new_zeros(())]))
                continue
            if len(contribs) == 1:
                term, name, module_name = contribs[0]
                shape = term.probe_shape(name)
                probe = (
                    None
                    if shape is None
                    else torch.randn(shape, generator=generator, dtype=_F64).to(p.device)
                )
                sketch = term.sketch(name, weights, probe)
                value, bound = sketch.value, sketch.bound
                expected = term.project(name, ref, probe)
            else:
                module_name = ", ".join(sorted({c[2] for c in contribs}))
                value = sum(
                    t.weighted([n], weights)[n].to(_F64).reshape(-1) for t, n, _ in contribs
                )
                bound = value.abs().sum()
                expected = ref.to(_F64).reshape(-1)
            finite = (torch.isfinite(value).all() & torch.isfinite(expected).all()).to(_F64)
            err = (value - expected).norm()
            scale = torch.as_tensor(bound, dtype=_F64, device=err.device) + expected.norm()
            labels.append((p, module_name))
            stats.append(torch.stack([finite, err, scale]))
        if not stats:
            return
        for (p, module_name), (finite, err, scale) in zip(
            labels, torch.stack(stats).cpu().tolist(), strict=True
        ):
            if module_name is None:
                if err:
                    raise FallbackRequired(
                        f"parameter '{names.get(id(p), '?')}' gets gradient outside the hooked "
                        "module calls"
                    )
                continue
            if not finite:
                raise NonFiniteError(
                    "the Jacobian of the residual rows contains NaN or Inf; the step was not "
                    "taken and nothing was changed"
                )
            tol = dtype_tolerance(_least_precise(p.dtype, precision), weights.numel() * 64)
            if not err <= tol * scale:
                raise FallbackRequired(
                    f"{what}: the hooks on module '{module_name}' do not reproduce autograd's "
                    f"gradient of '{names.get(id(p), '?')}' "
                    f"(relative error {err / max(scale, 1e-300):.1e}"
                    "; a module used in a way the hooks cannot see, derivatives of the network "
                    "in the residual, or samples coupled)"
                )

    def _factors(
        self,
        rows: Tensor,
        params: list[Tensor],
        recorder: Recorder,
        output: Tensor | None,
    ) -> tuple[dict[int, list[tuple[Term, str, str]]], RowLayout]:
        """Backward(s), per-layer terms, guard and (when due) the coupling probe.

        A structure seen for the first time (or every step with ``verify="always"``)
        gets the full check (every parameter's ``J^T 1``) and the probe; a structure
        that passed them gets the lean check (:meth:`_lean_inputs`).
        """
        layout = self._layout(rows, output)
        self._static_checks(recorder, layout)
        graph, uses = graph_fingerprint(rows.grad_fn, params)
        signature = (self._signature(recorder, layout, params), graph)
        known = self._verified.get(signature, "new")
        if known not in ("new", None):
            raise FallbackRequired(known)
        full = known == "new" or self.verify == "always"
        names = recorder.plan.param_names
        try:
            if full:
                asked, compared = params, params
            else:
                asked, compared = self._lean_inputs(recorder, params, uses)
            self.lean_steps += not full
            broadcast = self._watch_broadcast(rows, recorder, layout)
            ones_grads = self._capture_backward(rows, asked, recorder, layout)
            if not full:
                by_id = {id(p): g for p, g in zip(asked, ones_grads, strict=True)}
                ones_grads = [by_id[id(p)] for p in compared]
            _to_samples(broadcast, layout.samples)
            contributions = self._terms(recorder, layout)
            generator = torch.Generator().manual_seed(0x5BE7)
            ones = torch.ones(layout.rows, dtype=_F64, device=rows.device)
            # the guard's tolerance: the least precise dtype the layers computed in
            precision = _least_precise(
                rows.dtype, *(c.autocast for c in recorder.calls if c.autocast is not None)
            )
            self._check(
                contributions, compared, names, ones_grads, ones, "J^T 1", generator, precision
            )
            if full:
                self.probes += 1
                v = torch.randn(layout.rows, generator=generator, dtype=_F64).to(rows.device)
                probe_grads = self._backward(rows, params, v.to(rows.dtype))
                self._check(
                    contributions,
                    params,
                    names,
                    probe_grads,
                    v,
                    "random probe J^T v",
                    generator,
                    precision,
                )
        except FallbackRequired as why:
            self._remember(signature, why.reason)
            raise
        self._remember(signature, None)
        return contributions, layout

    def _remember(self, signature: tuple, outcome: str | None) -> None:
        self._verified.pop(signature, None)
        self._verified[signature] = outcome
        while len(self._verified) > _MAX_VERIFIED:
            del self._verified[next(iter(self._verified))]

    def _gram(
        self,
        rows: Tensor,
        params: list[Tensor],
        contributions: dict[int, list[tuple[Term, str, str]]],
        layout: RowLayout,
    ) -> tuple[Tensor, GramAssembly]:
        """K (R, R) float64 and the assembly that formed it (for ``J^T c``)."""
        assembly = GramAssembly.of(contributions, params)
        gram = assembly.gram(layout.rows, rows.device)
        check_finite(gram, "the Jacobian of the residual rows (its Gram matrix)")
        return gram, assembly

    def _jacobian(
        self,
        params: list[Tensor],
        contributions: dict[int, list[tuple[Term, str, str]]],
        layout: RowLayout,
    ) -> Tensor:
        """J (R, P) float64 assembled from the terms' per-row gradients."""
        columns = []
        for p in params:
            contribs = contributions.get(id(p), [])
            if not contribs:
                columns.append(torch.zeros(layout.rows, p.numel(), dtype=_F64, device=p.device))
                continue
            per_row = sum(t.per_row([n])[n].to(_F64) for t, n, _ in contribs)
            columns.append(per_row.reshape(layout.rows, -1))
        jac = torch.cat(columns, dim=1)
        check_finite(jac, "the Jacobian of the residual rows")
        return jac

    def _solve(
        self,
        rows: Tensor,
        params: list[Tensor],
        filt: SpectralFilter,
        contributions: dict[int, list[tuple[Term, str, str]]],
        layout: RowLayout,
    ) -> Direction:
        n_params = sum(p.numel() for p in params)
        if n_params < layout.rows:
            # Fewer parameters than rows (small PINNs on many points): J itself is
            # smaller than K; materialise it from the factors. Solve by an SVD of J
            # while that is cheap, else by the eigh of J^T J (P x P): the same floor
            # sqrt(n eps) s_1 as the Gram route, on the short side (measured 7x
            # faster than the SVD at N=1500, P=449).
            jac = self._jacobian(params, contributions, layout)
            solver = "svd" if layout.rows * n_params * n_params <= 2e7 else "normal"
            flat, solution = jacobian_step(jac, rows.detach().to(_F64), filt, solver)
            return Direction(flat_to_params(flat, params), solution, row_change=jac @ flat)
        gram, assembly = self._gram(rows, params, contributions, layout)
        coeffs, solution = gram_coefficients(gram, rows.detach().to(_F64), filt)
        row_change = gram @ coeffs
        del gram  # (N, N) float64: not held while the step (P float64) is formed
        step = assembly.transpose_product(params, coeffs)
        return Direction(step, solution, row_change=row_change)


def _bias_positions(call: Call, positions: int) -> Tensor:
    """(positions,) 1/0: where a Linear call's bias enters, over its row-batched positions.

    A call marked with a channel mask (C,) on input (S, C, d_in) repeats the mask
    for each of the row's samples; an unmarked call has its bias everywhere.
    """
    if call.bias_mask is None:
        return torch.ones(positions, dtype=torch.float64)
    x = call.args[0]
    channels = len(call.bias_mask)
    if x.dim() != 3 or x.shape[1] != channels or positions % channels:
        raise TermError(
            f"marked with a bias mask over {channels} channels but called on input of "
            f"shape {tuple(x.shape)} (expected (samples, {channels}, features))"
        )
    return torch.tensor(call.bias_mask, dtype=torch.float64).repeat(positions // channels)


def _least_precise(*dtypes: torch.dtype) -> torch.dtype:
    """The floating dtype with the largest machine epsilon among ``dtypes``."""
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def _cat_parts(parts: list[tuple[Tensor, Tensor]], which: int) -> Tensor:
    """Factor ``which`` of every call side by side along the positions (dim 1); no copy
    for a single call."""
    if len(parts) == 1:
        return parts[0][which]
    return torch.cat([p[which] for p in parts], dim=1)


def _to_samples(records: list[BroadcastLeaf], samples: int) -> None:
    """Rewrite broadcast calls as batched calls: expanded input, per-sample output gradients.

    Layer rules get ``x`` expanded to the S samples and gradients (S, *per-sample
    shape); torch.func calls keep their arguments and get gradients (S, *y.shape).
    """
    for record in records:
        call = record.call
        y = call.out_leaves[record.index]
        if call.kind == "generic":
            call.grads[record.index] = [
                None if g is None else g.reshape(samples, *y.shape) for g in record.grads
            ]
            call.out_leaves[record.index] = y.unsqueeze(0).expand(samples, *y.shape)
        else:
            call.args = per_sample_call(call.kind, call.args, record, samples)
            call.grads[record.index] = list(record.grads)
            call.out_leaves[record.index] = sample_like(record, y, samples)


def _is_rms(module: nn.Module) -> bool:
    rms = getattr(nn, "RMSNorm", None)
    return rms is not None and isinstance(module, rms)


class _SumTerm(Term):
    """Several calls of one module whose terms only materialise: per-row gradients add."""

    def __init__(self, terms: list[Term], params: dict[str, Tensor]) -> None:
        self.terms, self.params = terms, params

    def per_row(self, names: Sequence[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for term in self.terms:
            for n, t in term.per_row(names).items():
                out[n] = t if n not in out else out[n] + t
        return out


class FactoredJacobian:
    """Block products with J from a step's checked per-layer factors (:mod:`torchsven.matfree`).

    Parameters reached by one term use its factor products
    (:func:`torchsven.backends.layers.block_jt` / ``block_j`` / ``block_sketch``);
    a parameter shared by several terms uses its summed per-row gradients (R, p).
    """

    def __init__(
        self,
        params: list[Tensor],
        contributions: dict[int, list[tuple[Term, str, str]]],
        layout: RowLayout,
    ) -> None:
        self.rows = layout.rows
        self.params = params
        self._by_term: dict[int, tuple[Term, list[str], list[int]]] = {}
        self._shared: list[tuple[int, Tensor]] = []
        for i, p in enumerate(params):
            contribs = contributions.get(id(p), [])
            if len(contribs) == 1:
                term, name, _ = contribs[0]
                entry = self._by_term.setdefault(id(term), (term, [], []))
                entry[1].append(name)
                entry[2].append(i)
            elif contribs:
                per_row = sum(t.per_row([n])[n] for t, n, _ in contribs)
                self._shared.append((i, per_row.reshape(layout.rows, -1)))

    def sketch(self, columns: int, generator: torch.Generator) -> Tensor:
        p0 = self.params[0]
        # the sketch only finds a basis: kept in the parameters' dtype (float32: half the memory)
        out = torch.zeros(self.rows, columns, dtype=p0.dtype, device=p0.device)
        for term, names, _ in self._by_term.values():
            part = block_sketch(term, names, columns, generator)
            if part is not None:
                out += part
        for _, per_row in self._shared:
            omega = torch.randn(per_row.shape[1], columns, generator=generator, dtype=_F64)
            out += per_row @ omega.to(per_row.device, per_row.dtype)
        return out

    def jt(self, v: Tensor) -> ParamBlock:
        b = v.shape[1]
        out: list[Tensor | None] = [None] * len(self.params)
        for term, names, indices in self._by_term.values():
            parts = block_jt(term, names, v)
            for name, i in zip(names, indices, strict=True):
                out[i] = parts[name]
        for i, per_row in self._shared:
            out[i] = (v.to(per_row.dtype).mT @ per_row).reshape(b, *self.params[i].shape)
        return [
            torch.zeros(b, *p.shape, dtype=p.dtype, device=p.device) if t is None else t
            for t, p in zip(out, self.params, strict=True)
        ]

    def j(self, z: ParamBlock) -> Tensor:
        b = z[0].shape[0]
        out = torch.zeros(self.rows, b, dtype=_F64, device=z[0].device)
        for term, names, indices in self._by_term.values():
            part = block_j(term, names, {n: z[i] for n, i in zip(names, indices, strict=True)})
            if part is not None:
                out += part
        for i, per_row in self._shared:
            out += (per_row @ z[i].reshape(b, -1).to(per_row.dtype).mT).to(_F64)
        return out
