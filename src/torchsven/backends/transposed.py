"""Linear layers that store the transposed weight (``y = x W + b``, W (d_in, d_out)).

``transformers``' ``Conv1D`` (GPT-2's attention and MLP projections) is a
Linear with W stored as (d_in, d_out). Its per-row gradients are those of
:class:`~torchsven.backends.layers.LinearLikeTerm` (inputs A, output gradients
G, ``W_r = A_r^T G_r``) in the transposed layout, so the same ghost or
materialised Gram applies instead of per-row ``torch.func`` gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .layers import LinearLikeTerm

__all__ = ["TransposedLinearTerm", "is_transposed_linear"]


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (exact class, its own forward ``addmm(b, x, W)``)."""
    t = type(module)
    return (
        t.__name__ == "Conv1D"
        and t.__module__.startswith("transformers.")
        and isinstance(getattr(module, "weight", None), Tensor)
        and module.weight.dim() == 2
    )


class TransposedLinearTerm(LinearLikeTerm):
    """:class:`LinearLikeTerm` for a weight stored as (d_in, d_out)."""

    weight_transposed = True

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
        shaped = dict(params)
        if weight_name is not None:  # the parent reshapes to (d_out, d_in)
            shaped[weight_name] = params[weight_name].detach().mT
        super().__init__(a, g, shaped, weight_name, bias_name, ghost, outputs)

    def per_row(self, names: Sequence[str]) -> dict[str, Tensor]:
        out = super().per_row(names)
        if self.weight_name in out:
            out[self.weight_name] = out[self.weight_name].transpose(1, 2)
        return out

    def weighted(self, names: Sequence[str], w: Tensor) -> dict[str, Tensor]:
        out = super().weighted(names, w)
        if self.weight_name in out:
            out[self.weight_name] = out[self.weight_name].mT
        return out

    def project(self, name: str, autograd_grad: Tensor, probe: Tensor | None) -> Tensor:
        if name == self.weight_name:
            autograd_grad = autograd_grad.mT
        return super().project(name, autograd_grad, probe)
