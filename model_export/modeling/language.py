"""BERT-style language backbone (Enc_L), built from a config with `transformers`, no hub access."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertLayer

from model_export.modeling.config import LanguageConfig


@dataclass
class TextFeatures:
    """Token features of a batch of prompts.

    hidden: (N, T, D) last-layer features of every slot, padding included (what fusion reads).
    embedded: (N, T, D) `hidden` with padded slots zeroed.
    mask: (N, T) int64, 1 for real tokens and 0 for padding.
    """

    hidden: Tensor
    embedded: Tensor
    mask: Tensor


def bert_config(config: LanguageConfig) -> BertConfig:
    """The `transformers` config of the text encoder; eager attention for exact, exportable math."""
    bert = BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps,
    )
    bert._attn_implementation = "eager"
    return bert


class Glipv2LanguageBackbone(nn.Module):
    """BERT without a pooler; returns last-layer token features (GLIP's `language_backbone`)."""

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(bert_config(config), add_pooling_layer=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, causal: bool = False
                ) -> TextFeatures:
        """input_ids, attention_mask: (N, T) int64 -> TextFeatures with (N, T, D) tensors.

        `causal` makes every token see only itself and earlier tokens (captioning's
        unidirectional language model).
        """
        return self._encode(input_ids, attention_mask, causal)[0]

    def encode_caption(self, input_ids: Tensor, attention_mask: Tensor
                       ) -> tuple[TextFeatures, Tensor, Tensor]:
        """The causal forward, plus every layer's self-attention keys and values, each
        (N, layers, heads, T, D / heads): a caption's key/value cache of these tokens."""
        text, layer_inputs = self._encode(input_ids, attention_mask, causal=True)
        heads = self.config.num_heads
        keys, values = [], []
        for layer, hidden in zip(self._layers(), layer_inputs, strict=True):
            attn = layer.attention.self
            keys.append(split_heads(attn.key(hidden), heads))
            values.append(split_heads(attn.value(hidden), heads))
        return text, torch.stack(keys, dim=1), torch.stack(values, dim=1)

    def step(self, input_ids: Tensor, positions: Tensor, past_mask: Tensor, past_keys: Tensor,
             past_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One new token per row, attending to a cache of earlier ones (`encode_caption`).

        input_ids, positions: (N, 1) the new tokens and their position ids; past_mask: (N, P)
        1 for real cached positions; past_keys, past_values: (N, layers, heads, P, d).
        -> the new tokens' last-layer features (N, 1, D), and their keys and values
        (N, layers, heads, 1, d). The math of BERT's eager layers, the cache in place of the
        earlier tokens' recomputation.
        """
        hidden = self.bert.embeddings(input_ids=input_ids, position_ids=positions)
        additive = step_attention_mask(past_mask, hidden.dtype)  # (N, 1, 1, P + 1)
        heads = self.config.num_heads
        keys, values = [], []
        for i, layer in enumerate(self._layers()):
            attn = layer.attention.self
            query, key, value = (split_heads(proj(hidden), heads)
                                 for proj in (attn.query, attn.key, attn.value))
            every_key = torch.cat([past_keys[:, i], key], dim=2)  # (N, h, P + 1, d)
            every_value = torch.cat([past_values[:, i], value], dim=2)
            scores = torch.matmul(query, every_key.transpose(-1, -2))
            scores = scores / math.sqrt(query.shape[-1]) + additive  # (N, h, 1, P + 1)
            probs = attn.dropout(scores.softmax(dim=-1))
            context = merge_heads(torch.matmul(probs, every_value))  # (N, 1, D)
            attended = layer.attention.output(context, hidden)
            hidden = layer.output(layer.intermediate(attended), attended)
            keys.append(key)
            values.append(value)
        return hidden, torch.stack(keys, dim=1), torch.stack(values, dim=1)

    def _layers(self) -> Sequence[BertLayer]:
        # nn.ModuleList types its items as plain modules.
        return cast(Sequence[BertLayer], self.bert.encoder.layer)

    def _encode(self, input_ids: Tensor, attention_mask: Tensor, causal: bool
                ) -> tuple[TextFeatures, tuple[Tensor, ...]]:
        """TextFeatures, and the input of every encoder layer (N, T, D) for its keys/values."""
        embedded = self.bert.embeddings(input_ids=input_ids)
        # The additive mask goes straight to the encoder: `BertModel`'s own mask building differs
        # across transformers versions (v5 rejects 3-D causal masks); this math is the same in all.
        additive = extended_attention_mask(attention_mask, embedded.dtype, causal)
        out = self.bert.encoder(embedded, attention_mask=additive, output_hidden_states=True)
        hidden = out.last_hidden_state
        embedded = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (TextFeatures(hidden=hidden, embedded=embedded, mask=attention_mask),
                out.hidden_states[:-1])


class BertDenseNorm(nn.Module):
    """A dense layer and a LayerNorm under `transformers`' BERT names (`dense`, `LayerNorm`).

    The parameter holder of BertSelfOutput, BertOutput and BertPredictionHeadTransform; each owner
    composes the two in its own forward.
    """

    def __init__(self, in_features: int, out_features: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)
        self.LayerNorm = nn.LayerNorm(out_features, eps=eps)


def causal_attention_mask(mask: Tensor) -> Tensor:
    """(N, T) 0/1 padding mask -> (N, T, T): query i may attend key j when j <= i and j is real."""
    length = mask.shape[1]
    lower = torch.ones(length, length, dtype=mask.dtype, device=mask.device).tril()
    return lower[None, :, :] * mask[:, None, :]


def extended_attention_mask(mask: Tensor, dtype: torch.dtype, causal: bool = False) -> Tensor:
    """(N, T) 0/1 mask -> additive mask, 0 where attended and dtype-min elsewhere.

    (N, 1, 1, T) normally; (N, 1, T, T) with `causal`.
    """
    if causal:
        allowed = causal_attention_mask(mask)[:, None, :, :].to(dtype)
    else:
        allowed = mask[:, None, None, :].to(dtype)
    return (1.0 - allowed) * torch.finfo(dtype).min


def step_attention_mask(past_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, P) 0/1 cache mask -> additive (N, 1, 1, P + 1): a caption step's new token attends
    to the real cached positions and to itself (the last key)."""
    itself = torch.ones_like(past_mask[:, :1])
    return extended_attention_mask(torch.cat([past_mask, itself], dim=1), dtype)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(N, T, D) -> (N, heads, T, D / heads)."""
    n, length, width = x.shape
    return x.view(n, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(N, heads, T, d) -> (N, T, heads * d), inverse of `split_heads`."""
    n, heads, length, width = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * width)
