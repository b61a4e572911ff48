"""Matrix-free block products with several rows per sample (per-token rows).

With m > 1 rows per sample the Linear-like terms keep their input factor per
sample (S, T, q, dk) and never build the m times larger row form in the block
products. Everything is compared with the dense float64 Jacobian
(tests/reference.py) and, per term, with the same products on the row form
(the input repeated for each of the sample's rows, one row per "sample"), whose
code is the column-by-column path of the ordinary case.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

import torchsven
from torchsven.backends import layers
from torchsven.backends.factored import FactoredBackend, FactoredJacobian
from torchsven.backends.layers import (
    EmbeddingTerm,
    LinearLikeTerm,
    block_j,
    block_jt,
    block_sketch,
)

from .cases import tiny_gpt2
from .reference import dense_jacobian, flat, reference_step, rel_err

TOL = 1e-10
_F64 = torch.float64
transformers.logging.set_verbosity_error()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gpt2(seed: int = 0) -> tuple[nn.Module, object]:
    """Tiny float64 GPT-2 (Conv1D projections, tied head); rows (B, T): one per token."""
    model = tiny_gpt2(seed, vocab=11, positions=8, width=4, layers=1)
    ids = torch.randint(0, 11, (2, 5), generator=_gen(seed + 1))

    def rows() -> Tensor:  # (2, 4): N = 8 rows, 4 per sequence
        logits = model(input_ids=ids[:, :-1]).logits
        losses = F.cross_entropy(logits.reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="none")
        return torchsven.from_losses(losses).reshape(2, 4)

    return model, rows


class _ConvLinear(nn.Module):
    """Conv1d, grouped Conv1d, then a Linear per position: (S, 3, 5) -> (S, 5 x 2) rows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.grouped = nn.Conv1d(4, 4, 3, padding=1, groups=2, bias=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.grouped(torch.tanh(self.conv(x))))
        return self.head(h.transpose(1, 2)).reshape(x.shape[0], -1)


def _convlinear(seed: int = 0) -> tuple[nn.Module, object]:
    torch.manual_seed(seed)
    model = _ConvLinear().double()
    x = torch.randn(3, 3, 5, generator=_gen(seed + 1), dtype=_F64)
    y = torch.randn(3, 10, generator=_gen(seed + 2), dtype=_F64)
    return model, lambda: model(x) - y


def _conv2d(seed: int = 0) -> tuple[nn.Module, object]:
    """Conv2d (padded), strided grouped Conv2d: (S, 2, 4, 4) -> (S, 2 x 2 x 2) rows."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 2, stride=2, groups=2)
    ).double()
    x = torch.randn(3, 2, 4, 4, generator=_gen(seed + 1), dtype=_F64)
    y = torch.randn(3, 8, generator=_gen(seed + 2), dtype=_F64)
    return model, lambda: model(x).reshape(3, 8) - y


CASES = {"gpt2": _gpt2, "convlinear": _convlinear, "conv2d": _conv2d}


def _with_operator(model: nn.Module, rows_fn, use):
    """``use(op, params, terms)`` on the factored backend's checked factors of one step."""
    params = [p for p in model.parameters() if p.requires_grad]
    backend = FactoredBackend(model)
    with backend.capture(params) as captured, torch.enable_grad():
        out = rows_fn()

    def inner(rows, params, contributions, layout):
        assert layout.outputs == out.shape[1] > 1
        terms = {id(t): t for c in contributions.values() for t, _, _ in c}
        linear = [t for t in terms.values() if isinstance(t, LinearLikeTerm)]
        assert all(t.outputs == layout.outputs for t in linear)
        return use(FactoredJacobian(params, contributions, layout), params, linear, terms)

    return backend._with_factors(out.reshape(-1), params, captured, out, inner)


def _blocks(z: Tensor, params: list[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for p in params:
        out.append(z[:, offset : offset + p.numel()].reshape(z.shape[0], *p.shape))
        offset += p.numel()
    return out


@pytest.mark.parametrize("kind", sorted(CASES))
def test_block_products_with_several_rows_per_sample_match_dense_jacobian(kind):
    model, rows_fn = CASES[kind]()
    params = [p for p in model.parameters() if p.requires_grad]
    jac, _ = dense_jacobian(rows_fn, params)
    n, p = jac.shape
    v = torch.randn(n, 3, generator=_gen(4), dtype=_F64)
    z = torch.randn(3, p, generator=_gen(5), dtype=_F64)

    def use(op, params, linear, terms):
        jt = torch.cat([t.reshape(3, -1).to(_F64) for t in op.jt(v)], dim=1)
        jz = op.j(_blocks(z, params))
        sk = op.sketch(6, _gen(6))
        # the products never built the m times larger row form of the inputs
        built = [t for t in linear if t._a_rows is not None]
        return jt, jz, sk, len(linear), built

    jt, jz, sk, n_linear, built = _with_operator(model, rows_fn, use)
    assert n_linear >= 2 and not built
    assert rel_err(jt, v.T @ jac) < TOL
    assert rel_err(jz, jac @ z.T) < TOL
    u, s, _ = torch.linalg.svd(jac, full_matrices=False)
    u = u[:, s > 1e-10 * s[0]]
    assert rel_err(u @ (u.T @ sk), sk) < TOL and float(sk.norm()) > 0


def _row_form(term: LinearLikeTerm) -> LinearLikeTerm:
    """The same term with the input repeated per row and one row per sample."""
    twin = object.__new__(type(term))
    twin.__dict__.update(term.__dict__)
    twin.a_samples = twin._a_rows = term.a  # builds the row form
    twin.outputs = 1
    twin._materialised = None
    return twin


@pytest.mark.parametrize("kind", sorted(CASES))
def test_per_sample_products_equal_the_row_form_term_by_term(kind):
    """Per term: jt, j, the Kronecker sketch (same draws) and ``weighted`` of the per-sample
    form equal those of the row form (the column-by-column path)."""
    model, rows_fn = CASES[kind]()

    def use(op, params, linear, terms):
        worst = 0.0
        for term in linear:
            names = [n for n in (term.weight_name, term.bias_name) if n is not None]
            rows = term.g.shape[0]
            v = torch.randn(rows, 4, generator=_gen(7), dtype=_F64)
            z = {
                n: torch.randn(4, *term.params[n].shape, generator=_gen(8), dtype=_F64)
                for n in names
            }
            if term.weight_transposed:  # Z in the stored (d_in, d_out) layout
                z[term.weight_name] = z[term.weight_name].mT.contiguous()
            got_jt = block_jt(term, names, v)
            got_j = block_j(term, names, z)
            got_sk = block_sketch(term, names, 5, _gen(9))
            got_w = term.weighted(names, v[:, 0])
            assert term._a_rows is None
            twin = _row_form(term)
            assert twin.a.shape[0] == rows == term.a_samples.shape[0] * term.outputs
            ref_jt = block_jt(twin, names, v)
            for n in names:
                worst = max(worst, rel_err(got_jt[n], ref_jt[n]))
            worst = max(worst, rel_err(got_j, block_j(twin, names, z)))
            worst = max(worst, rel_err(got_sk, block_sketch(twin, names, 5, _gen(9))))
            ref_w = twin.weighted(names, v[:, 0])
            for n in names:
                worst = max(worst, rel_err(got_w[n], ref_w[n]))
        embeddings = 0
        for term in terms.values():  # embeddings: J^T V summed per sample before the scatter
            if isinstance(term, EmbeddingTerm) and term.outputs > 1:
                embeddings += 1
                v = torch.randn(term.g.shape[0], 4, generator=_gen(10), dtype=_F64)
                twin = object.__new__(EmbeddingTerm)
                twin.__dict__.update(term.__dict__, outputs=1)
                got = block_jt(term, [term.name], v)[term.name]
                worst = max(worst, rel_err(got, block_jt(twin, [term.name], v)[term.name]))
        return worst, len(linear), embeddings

    worst, n_linear, embeddings = _with_operator(model, rows_fn, use)
    assert n_linear >= 2 and worst < 1e-12
    assert embeddings == (2 if kind == "gpt2" else 0)  # token and position embeddings


def test_per_sample_products_in_chunks_of_one_sample(monkeypatch):
    """Chunks of one sample (all its rows) give the same products."""
    model, rows_fn = _gpt2()
    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(8, 3, generator=_gen(10), dtype=_F64)
    z = torch.randn(3, sum(p.numel() for p in params), generator=_gen(11), dtype=_F64)

    def use(op, params, linear, terms):
        jt = torch.cat([t.reshape(3, -1) for t in op.jt(v)], dim=1)
        return jt, op.j(_blocks(z, params)), op.sketch(5, _gen(12))

    full = _with_operator(model, rows_fn, use)
    monkeypatch.setattr(layers, "BLOCK_CHUNK_ELEMS", 1)
    chunked = _with_operator(model, rows_fn, use)
    for a, b in zip(chunked, full, strict=True):
        assert rel_err(a, b) < 1e-13


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_matfree_step_with_several_rows_per_sample_equals_exact(kind, damping):
    """Columns >= rank(J): the factored matrix-free step is the exact filtered step."""
    model, rows_fn = CASES[kind]()
    ref_model, ref_rows = CASES[kind]()
    ref_params = [p for p in ref_model.parameters() if p.requires_grad]
    jac, r = dense_jacobian(ref_rows, ref_params)
    rank = min(jac.shape)
    expected, kept, _ = reference_step(jac, r, rank=rank, damping=damping)
    opt = torchsven.Sven(model, lr=1.0, rank=rank, randomized=True, oversample=4, damping=damping)
    before = flat(list(model.parameters()))
    opt.step(rows_fn)
    info = opt.last_step
    assert info.backend == "factored" and info.solver == "matfree"
    assert info.kept == kept
    assert rel_err(before - flat(list(model.parameters())), expected) < TOL


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("ghost", [True, False])
def test_gram_step_with_several_rows_per_sample_equals_exact(kind, ghost):
    """The Gram path on the same terms (ghost form on the row form of A; materialised
    per-row gradients from the per-sample form) still gives the exact step."""
    from torchsven.solve import SpectralFilter

    model, rows_fn = CASES[kind]()
    params = [p for p in model.parameters() if p.requires_grad]
    jac, r = dense_jacobian(rows_fn, params)
    expected, kept, _ = reference_step(jac, r, damping=1e-3)
    backend = FactoredBackend(model, ghost=ghost)
    with backend.capture(params) as captured, torch.enable_grad():
        out = rows_fn()
    direction = backend.direction(
        out.reshape(-1), params, SpectralFilter(damping=1e-3), captured, out
    )
    assert rel_err(flat(direction.step), expected) < TOL
    assert direction.solution.kept == kept


def test_passes_stacked_from_one_buffer_without_a_copy():
    """The recorder's buffer (S, m, ...) of the m passes is the stacked gradient itself."""
    layout = layers.RowLayout(samples=3, rows=6, outputs=2)
    like = torch.zeros(3, 4, 5, dtype=_F64)
    buf = torch.randn(3, 2, 4, 5, generator=_gen(13), dtype=_F64)
    got = layout.grads_to_rows([buf[:, 0], buf[:, 1]], like)
    expected = torch.stack([buf[:, 0].clone(), buf[:, 1].clone()], dim=1).reshape(6, 1, 4, 5)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, expected)
    # passes out of order, separate tensors or a missing pass: stacked by a copy
    for parts in ([buf[:, 1], buf[:, 0]], [buf[:, 0].clone(), buf[:, 1]], [None, buf[:, 1]]):
        got = layout.grads_to_rows(parts, like)
        filled = [torch.zeros_like(like) if p is None else p for p in parts]
        assert got.data_ptr() != buf.data_ptr()
        assert torch.equal(got, torch.stack(filled, dim=1).reshape(6, 1, 4, 5))


def test_channel_bias_term_per_sample_equals_row_form():
    """A jets-style Linear (bias on some channels) with m = 3 rows per sample: products,
    ``weighted``, per-row gradients and the Gram block equal those of the row form."""
    from torchsven.backends.layers import ChannelBiasLinearTerm

    samples, m, channels, d_in, d_out = 4, 3, 5, 3, 2
    a = torch.randn(samples, channels, 1, d_in, generator=_gen(14), dtype=_F64)
    g = torch.randn(samples * m, channels, 1, d_out, generator=_gen(15), dtype=_F64)
    params = {"weight": torch.zeros(d_out, d_in, dtype=_F64), "bias": torch.zeros(d_out)}
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=_F64)
    names = ["weight", "bias"]
    term = ChannelBiasLinearTerm(a, g, params, "weight", "bias", mask, outputs=m)
    twin = ChannelBiasLinearTerm(a.repeat_interleave(m, 0), g, params, "weight", "bias", mask)
    v = torch.randn(samples * m, 4, generator=_gen(16), dtype=_F64)
    z = {n: torch.randn(4, *t.shape, generator=_gen(17), dtype=_F64) for n, t in params.items()}
    got, ref = block_jt(term, names, v), block_jt(twin, names, v)
    assert all(rel_err(got[n], ref[n]) < 1e-13 for n in names)
    assert rel_err(block_j(term, names, z), block_j(twin, names, z)) < 1e-13
    got, ref = term.weighted(names, v[:, 1]), twin.weighted(names, v[:, 1])
    assert all(rel_err(got[n], ref[n]) < 1e-13 for n in names)
    assert term._a_rows is None  # none of the above built the row form
    got, ref = term.per_row(names), twin.per_row(names)
    assert all(rel_err(got[n], ref[n]) < 1e-13 for n in names)
    assert rel_err(term.gram(names), twin.gram(names)) < 1e-13
