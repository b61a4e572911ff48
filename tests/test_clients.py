"""Real clients called the plain way run on the factored backend, exactly.

Tiny models built from configs (no network, no downloads): GPT-2 causal LM
with one row per sequence and one row per token, a BERT-style classifier and
``nn.Transformer`` models. The factored step must equal the generic
backend's (float64, same spectral filter) to 1e-10.
"""

from __future__ import annotations

import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

import torchsven
from torchsven.backends import FactoredBackend, GenericBackend
from torchsven.errors import SvenFallbackWarning
from torchsven.solve import SpectralFilter

from .cases import tiny_gpt2
from .reference import flat, rel_err

TOL = 1e-10
transformers.logging.set_verbosity_error()


def _factored_equals_generic(model: nn.Module, closure) -> None:
    """K-based step of the factored backend (plain hooks) == the generic backend's."""
    params = [p for p in model.parameters() if p.requires_grad]
    backend = FactoredBackend(model)
    with backend.capture(params) as rec:
        out = closure()
    direction = backend.direction(out.reshape(-1), params, SpectralFilter(), rec, out)
    ref = GenericBackend(solver="gram").direction(closure().reshape(-1), params, SpectralFilter())
    assert flat(ref.step).abs().sum() > 0
    assert rel_err(flat(direction.step), flat(ref.step)) <= TOL
    assert direction.solution.kept == ref.solution.kept


def _token_losses(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token cross-entropy per token (B, T - 1), from the plain call."""
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def test_gpt2_per_sequence_rows_factored_equals_generic():
    model = tiny_gpt2()
    ids = torch.randint(0, 23, (5, 6), generator=torch.Generator().manual_seed(1))

    def closure() -> Tensor:
        return torchsven.from_losses(_token_losses(model, ids).mean(dim=1))

    _factored_equals_generic(model, closure)


def test_gpt2_per_token_rows_factored_equals_generic():
    model = tiny_gpt2(seed=2)
    ids = torch.randint(0, 23, (3, 5), generator=torch.Generator().manual_seed(3))

    def closure() -> Tensor:  # (B, T - 1): N = B (T - 1) rows, T - 1 per sequence
        losses = _token_losses(model, ids)
        return torchsven.from_losses(losses.reshape(-1)).reshape(losses.shape)

    _factored_equals_generic(model, closure)


def test_gpt2_plain_call_steps_on_the_factored_backend_as_generic_does():
    ids = torch.randint(0, 23, (6, 8), generator=torch.Generator().manual_seed(5))
    losses = {}
    for backend in ("factored", "generic"):
        model = tiny_gpt2(seed=4).float()
        opt = torchsven.Sven(model, lr=0.3, backend=backend, damping=0.0)

        def closure(model: nn.Module = model) -> Tensor:
            return torchsven.from_losses(_token_losses(model, ids).mean(dim=1))

        with warnings.catch_warnings():
            warnings.simplefilter("error", SvenFallbackWarning)
            for _ in range(3):
                opt.step(closure)
                assert opt.last_step.backend == backend
        losses[backend] = float(closure().pow(2).sum())
    assert abs(losses["factored"] - losses["generic"]) <= 1e-3 * losses["generic"]


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=19,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).double()


def test_bert_classifier_factored_equals_generic():
    model = tiny_bert()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 19, (5, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # a padded sequence
    labels = torch.randint(0, 3, (5,), generator=g)

    def closure() -> Tensor:
        logits = model(input_ids=ids, attention_mask=mask).logits
        return logits - F.one_hot(labels, 3).double()

    _factored_equals_generic(model, closure)


class EncoderClassifier(nn.Module):
    """Token embedding + learned positions (a plain parameter) + nn.TransformerEncoder."""

    def __init__(self, vocab: int = 13, d: int = 8, length: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.positions = nn.Parameter(0.1 * torch.randn(length, d))
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids) + self.positions[: ids.shape[1]]
        return self.head(self.encoder(h).mean(dim=1))


class Seq2Seq(nn.Module):
    """nn.Transformer with shared embeddings and a learned position table module."""

    def __init__(self, vocab: int = 11, d: int = 8, length: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(length, d)
        self.core = nn.Transformer(d, 2, 1, 1, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        pos_src = self.positions(torch.arange(src.shape[1]))  # (T, d): broadcast
        pos_tgt = self.positions(torch.arange(tgt.shape[1]))
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=torch.float64)
        h = self.core(self.embed(src) + pos_src, self.embed(tgt) + pos_tgt, tgt_mask=mask)
        return self.head(h)


@pytest.mark.parametrize("kind", ["encoder", "seq2seq"])
def test_nn_transformer_models_factored_equals_generic(kind):
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(8)
    if kind == "encoder":
        model = EncoderClassifier().double()
        ids = torch.randint(0, 13, (5, 6), generator=g)
        y = torch.randn(5, 2, generator=g, dtype=torch.float64)

        def closure() -> Tensor:
            return model(ids) - y
    else:
        model = Seq2Seq().double()
        src = torch.randint(0, 11, (4, 5), generator=g)
        tgt = torch.randint(0, 11, (4, 4), generator=g)

        def closure() -> Tensor:
            logits = model(src, tgt[:, :-1])
            return torchsven.from_losses(
                F.cross_entropy(logits.transpose(1, 2), tgt[:, 1:], reduction="none").mean(1)
            )

    _factored_equals_generic(model, closure)


def _tiny_llama_or_t5(kind: str) -> nn.Module:
    torch.manual_seed(9)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=23,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        return transformers.LlamaForCausalLM(config)
    config = transformers.T5Config(
        vocab_size=23,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(config)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_llama_and_t5_float32_plain_calls_step_factored_as_generic(kind):
    """RoPE (Llama) and T5's permuted relative-bias table (broadcast, then masked).

    Their RMSNorms compute in float32 whatever the parameters' dtype, so the
    comparison is in float32 (in float64 the guard sees float32 rounding and
    falls back).
    """
    ids = torch.randint(0, 23, (6, 8), generator=torch.Generator().manual_seed(10))
    steps = {}
    for backend in ("factored", "generic"):
        model = _tiny_llama_or_t5(kind)
        params = [p for p in model.parameters() if p.requires_grad]
        before = flat(params)

        def closure(model: nn.Module = model) -> Tensor:
            if kind == "t5":
                logits = model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
                targets = ids[:, 1:5]
            else:
                logits, targets = model(input_ids=ids).logits[:, :-1], ids[:, 1:]
            ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            return torchsven.from_losses(ce.mean(dim=1))

        opt = torchsven.Sven(model, lr=0.1, backend=backend, damping=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", SvenFallbackWarning)
            opt.step(closure)
        assert opt.last_step.backend == backend
        steps[backend] = flat(params) - before
    assert steps["generic"].abs().sum() > 0
    assert rel_err(steps["factored"], steps["generic"]) <= 1e-3
