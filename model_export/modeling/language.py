"""BERT-style language backbone (Enc_L), built from a config with `transformers`, no hub access."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel

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
        embedded = self.bert.embeddings(input_ids=input_ids)
        # The additive mask goes straight to the encoder: `BertModel`'s own mask building differs
        # across transformers versions (v5 rejects 3-D causal masks); this math is the same in all.
        additive = extended_attention_mask(attention_mask, embedded.dtype, causal)
        hidden = self.bert.encoder(embedded, attention_mask=additive).last_hidden_state
        embedded = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
        return TextFeatures(hidden=hidden, embedded=embedded, mask=attention_mask)


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
