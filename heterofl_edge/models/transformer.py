"""The paper's Transformer for masked language modelling on WikiText2 (Table 6).

Token and positional embeddings, four post-norm encoder layers (8 heads,
embedding 256, feed-forward 512, GELU, dropout 0.2) and a decoder (linear ->
GELU -> LayerNorm -> linear to the vocabulary), with a Scaler after each
parametric layer as in the official HeteroFL code. The vocabulary has one
extra row for the mask token. Attention projections are sliced per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from heterofl_edge.levels import scaled_width
from heterofl_edge.models.architecture import Architecture
from heterofl_edge.models.interface import TaskKind
from heterofl_edge.models.layers import Scaler
from heterofl_edge.models.registry import register_architecture
from heterofl_edge.slicing import Dim, SlicingSpec, TensorRule

__all__ = ["TRANSFORMER_DEFAULTS", "MaskedLanguageTransformer", "transformer_spec"]

TRANSFORMER_DEFAULTS = {
    # WikiText2 has 33,278 words (paper section 4); the official code adds its own
    # "<ukn>" symbol, so the model the paper counts in Table 9 has 33,279 tokens.
    "num_tokens": 33279,
    "embedding_size": 256,
    "num_heads": 8,
    "hidden_size": 512,
    "num_layers": 4,
    "sequence_length": 64,
    "dropout": 0.2,
}


class MultiheadAttention(nn.Module):
    def __init__(self, width: int, attention_width: int, num_heads: int, scaler: Scaler) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.linear_q = nn.Linear(width, attention_width)
        self.linear_k = nn.Linear(width, attention_width)
        self.linear_v = nn.Linear(width, attention_width)
        self.linear_o = nn.Linear(attention_width, width)
        self.scaler = scaler

    def _split(self, x: torch.Tensor, sequence_length: int) -> torch.Tensor:
        head_width = x.shape[-1] // self.num_heads
        return x.reshape(-1, sequence_length, self.num_heads, head_width).transpose(1, 2)

    def forward(self, x: torch.Tensor, sequence_length: int) -> torch.Tensor:
        """``x`` holds the tokens of all sequences as rows: [N * S, width]."""
        q = self._split(self.scaler(self.linear_q(x)), sequence_length)
        k = self._split(self.scaler(self.linear_k(x)), sequence_length)
        v = self._split(self.scaler(self.linear_v(x)), sequence_length)
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        out = (F.softmax(scores, dim=-1) @ v).transpose(1, 2)
        return self.scaler(self.linear_o(out.reshape(x.shape[0], -1)))


class EncoderLayer(nn.Module):
    def __init__(
        self,
        width: int,
        attention_width: int,
        hidden: int,
        num_heads: int,
        dropout: float,
        scaler_rate: float,
    ) -> None:
        super().__init__()
        self.scaler = Scaler(scaler_rate)
        self.mha = MultiheadAttention(width, attention_width, num_heads, self.scaler)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(width)
        self.linear1 = nn.Linear(width, hidden)
        self.dropout1 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(hidden, width)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(width)
        nn.init.normal_(self.linear1.weight, std=0.02)
        nn.init.normal_(self.linear2.weight, std=0.02)

    def forward(self, x: torch.Tensor, sequence_length: int) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.mha(x, sequence_length)))
        hidden = self.dropout1(F.gelu(self.scaler(self.linear1(x))))
        return self.norm2(x + self.dropout2(self.scaler(self.linear2(hidden))))


class MaskedLanguageTransformer(nn.Module):
    """Width-scalable Transformer; input token ids [N, S], output logits [N, S, V]."""

    def __init__(
        self,
        width: float = 1.0,
        scaler_rate: float | None = None,
        num_tokens: int = TRANSFORMER_DEFAULTS["num_tokens"],  # type: ignore[assignment]
        embedding_size: int = 256,
        num_heads: int = 8,
        hidden_size: int = 512,
        num_layers: int = 4,
        sequence_length: int = 64,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        scaler_rate = width if scaler_rate is None else scaler_rate
        emb = scaled_width(embedding_size, width)
        attention = num_heads * scaled_width(embedding_size // num_heads, width)
        hidden = scaled_width(hidden_size, width)
        self.num_tokens = num_tokens
        self.scaler = Scaler(scaler_rate)
        self.embedding = nn.Embedding(num_tokens + 1, emb)
        self.positional_embedding = nn.Embedding(sequence_length, emb)
        self.embedding_norm = nn.LayerNorm(emb)
        self.embedding_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(emb, attention, hidden, num_heads, dropout, scaler_rate)
            for _ in range(num_layers)
        )
        self.decoder_linear1 = nn.Linear(emb, emb)
        self.decoder_norm = nn.LayerNorm(emb)
        self.decoder_linear2 = nn.Linear(emb, num_tokens)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # The token stream is kept as rows [N * S, width] (attention reshapes it per
        # sequence): the same arithmetic, and export can keep the batch size symbolic.
        sequence_length = tokens.shape[1]
        positions = torch.arange(sequence_length, device=tokens.device)
        x = self.scaler(self.embedding(tokens)) + self.scaler(self.positional_embedding(positions))
        x = self.embedding_dropout(self.embedding_norm(x.reshape(-1, x.shape[-1])))
        for layer in self.layers:
            x = layer(x, sequence_length)
        x = self.decoder_norm(F.gelu(self.scaler(self.decoder_linear1(x))))
        return self.decoder_linear2(x).reshape(-1, sequence_length, self.num_tokens)


def transformer_spec(
    num_tokens: int = 33279,
    embedding_size: int = 256,
    num_heads: int = 8,
    hidden_size: int = 512,
    num_layers: int = 4,
    sequence_length: int = 64,
) -> SlicingSpec:
    emb = Dim.width(embedding_size)
    att = Dim.per_head(embedding_size, num_heads)
    hid = Dim.width(hidden_size)

    def linear(prefix: str, out: Dim, inp: Dim) -> dict[str, TensorRule]:
        return {f"{prefix}.weight": TensorRule((out, inp)), f"{prefix}.bias": TensorRule((out,))}

    def norm(prefix: str) -> dict[str, TensorRule]:
        return {f"{prefix}.weight": TensorRule((emb,)), f"{prefix}.bias": TensorRule((emb,))}

    spec: dict[str, TensorRule] = {
        "embedding.weight": TensorRule((Dim.labels(num_tokens + 1), emb)),
        "positional_embedding.weight": TensorRule((Dim.fixed(sequence_length), emb)),
        **norm("embedding_norm"),
    }
    for i in range(num_layers):
        p = f"layers.{i}"
        for proj in ("q", "k", "v"):
            spec.update(linear(f"{p}.mha.linear_{proj}", att, emb))
        spec.update(linear(f"{p}.mha.linear_o", emb, att))
        spec.update(norm(f"{p}.norm1"))
        spec.update(linear(f"{p}.linear1", hid, emb))
        spec.update(linear(f"{p}.linear2", emb, hid))
        spec.update(norm(f"{p}.norm2"))
    spec.update(linear("decoder_linear1", emb, emb))
    spec.update(norm("decoder_norm"))
    spec["decoder_linear2.weight"] = TensorRule((Dim.labels(num_tokens), emb))
    spec["decoder_linear2.bias"] = TensorRule((Dim.labels(num_tokens),))
    return spec


register_architecture(
    Architecture(
        "transformer",
        "masked-LM Transformer for WikiText2 (paper Table 9)",
        lambda w, s: MaskedLanguageTransformer(w, s),
        transformer_spec(int(TRANSFORMER_DEFAULTS["num_tokens"])),
        (int(TRANSFORMER_DEFAULTS["sequence_length"]),),
        torch.long,
        int(TRANSFORMER_DEFAULTS["num_tokens"]),
        TaskKind.language_model,
    )
)
