"""BERT language-model head on fused token features: masked-token (MLM) and next-token logits.

The same head serves the MLM loss and captioning. Its decoder either owns a (vocab, D) matrix, as
in GLIP checkpoints (`rpn.head.mlm_head.*`), or reuses the text encoder's word embeddings (tied),
which keeps a small model's file small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.modeling.config import LanguageConfig
from model_export.modeling.language import BertDenseNorm


class Glipv2LMHead(nn.Module):
    """transform (dense, GELU, LayerNorm) -> decoder -> (N, T, vocab) logits."""

    def __init__(self, config: LanguageConfig, tied: bool) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.transform = BertDenseNorm(hidden, hidden, config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder = None if tied else nn.Linear(hidden, config.vocab_size)
        if self.decoder is not None:
            self.decoder.bias = self.bias  # one bias under both reference names

    def forward(self, text: Tensor, word_embeddings: Tensor | None = None) -> Tensor:
        """text: (N, T, D) -> (N, T, vocab); `word_embeddings` (vocab, D) when tied."""
        hidden = self.transform.dense(text)
        hidden = self.transform.LayerNorm(F.gelu(hidden))
        if self.decoder is not None:
            return self.decoder(hidden)
        if word_embeddings is None:
            raise ValueError("a tied LM head needs the word embeddings")
        return F.linear(hidden, word_embeddings, self.bias)
