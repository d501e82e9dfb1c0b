"""One fusion layer's text self-attention (`text_layer`): a BERT encoder layer with fp16 clamps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.modeling.config import LanguageConfig
from model_export.modeling.language import BertDenseNorm, extended_attention_mask


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

    def _heads(self, x: Tensor) -> Tensor:
        # (N, T, D) -> (N, heads, T, D / heads)
        n, length, _ = x.shape
        return x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _clamp(self, x: Tensor) -> Tensor:
        return x.clamp(min=-self.clamp, max=self.clamp)

    def forward(self, hidden: Tensor, mask: Tensor, causal: bool = False) -> Tensor:
        """hidden: (N, T, D), mask: (N, T) -> (N, T, D); `causal` hides later tokens."""
        attn = self.attention.self
        query, key, value = (self._heads(proj(hidden))
                             for proj in (attn.query, attn.key, attn.value))
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = self._clamp(scores) + extended_attention_mask(mask, scores.dtype, causal)
        probs = self.dropout(scores.softmax(dim=-1))
        context = torch.matmul(probs, value).transpose(1, 2)  # (N, T, heads, d)
        context = context.reshape(hidden.shape)
        out = self.attention.output
        attended = out.LayerNorm(self.dropout(out.dense(context)) + hidden)

        inner = self._clamp(F.gelu(self._clamp(self.intermediate.dense(attended))))
        projected = self._clamp(self.dropout(self.output.dense(inner)))
        return self._clamp(self.output.LayerNorm(projected + attended))
