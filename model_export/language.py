"""BERT-style language backbone (Enc_L), built from a config with `transformers`, no hub access."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel

from model_export.config import LanguageConfig


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

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """input_ids, attention_mask: (N, T) int64 -> TextFeatures with (N, T, D) tensors."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        embedded = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
        return TextFeatures(hidden=hidden, embedded=embedded, mask=attention_mask)


def extended_attention_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, T) 0/1 mask -> (N, 1, 1, T) additive mask: 0 where attended, dtype-min where padded."""
    mask = mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min
