"""One fusion layer's text self-attention (`text_layer`): a BERT encoder layer with fp16 clamps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.modeling.config import LanguageConfig
from model_export.modeling.language import (
    BertDenseNorm,
    extended_attention_mask,
    merge_heads,
    split_heads,
)


class _BertSelfAttention(nn.Module):
    """The query, key and value projections under BertSelfAttention's names."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)


class _BertAttention(nn.Module):
    """BertAttention's parameters: the projections (`self`) and the output (`output`)."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.self = _BertSelfAttention(hidden)
        self.output = BertDenseNorm(hidden, hidden, eps)


class _BertIntermediate(nn.Module):
    """BertIntermediate's parameters: the feed-forward expansion (`dense`)."""

    def __init__(self, hidden: int, intermediate_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate_size)


class Glipv2TextLayer(nn.Module):
    """A BERT encoder layer on the tokens, with the reference's +-clamps against fp16 overflow.

    Submodule names follow `transformers`' BertLayer (`attention.self.query`, ...), as the
    reference does.
    """

    def __init__(self, config: LanguageConfig, clamp: float) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = hidden // config.num_heads
        self.clamp = clamp
        self.attention = _BertAttention(hidden, config.layer_norm_eps)
        self.intermediate = _BertIntermediate(hidden, config.intermediate_size)
        self.output = BertDenseNorm(config.intermediate_size, hidden, config.layer_norm_eps)
        self.dropout = nn.Dropout(0.1)

    def _clamp(self, x: Tensor) -> Tensor:
        return x.clamp(min=-self.clamp, max=self.clamp)

    def forward(self, hidden: Tensor, mask: Tensor, causal: bool = False) -> Tensor:
        """hidden: (N, T, D), mask: (N, T) -> (N, T, D); `causal` hides later tokens."""
        query, key, value = self.project(hidden)
        return self.attend(hidden, query, key, value,
                           extended_attention_mask(mask, hidden.dtype, causal))

    def project(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, T, D) -> self-attention queries, keys and values, (N, heads, T, D / heads) each;
        the keys and values are what a caption's key/value cache keeps of its tokens."""
        attn = self.attention.self
        return (split_heads(attn.query(hidden), self.num_heads),
                split_heads(attn.key(hidden), self.num_heads),
                split_heads(attn.value(hidden), self.num_heads))

    def attend(self, hidden: Tensor, query: Tensor, key: Tensor, value: Tensor,
               additive_mask: Tensor) -> Tensor:
        """Self-attention of `hidden` (N, T, D), its queries (N, heads, T, d), over keys and
        values (N, heads, S, d) with an additive mask broadcastable to (N, heads, T, S), then
        the feed-forward. `forward` passes its own tokens' keys; a caption step passes the
        cache's and its token's.
        """
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = self._clamp(scores) + additive_mask
        probs = self.dropout(scores.softmax(dim=-1))
        context = merge_heads(torch.matmul(probs, value))  # (N, T, D)
        out = self.attention.output
        attended = out.LayerNorm(self.dropout(out.dense(context)) + hidden)

        inner = self._clamp(F.gelu(self._clamp(self.intermediate.dense(attended))))
        projected = self._clamp(self.dropout(self.output.dense(inner)))
        return self._clamp(self.output.LayerNorm(projected + attended))
