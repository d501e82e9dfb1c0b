"""L_mlm: masked-language modelling on the fused text features (BERT's 80/10/10 masking).

Reference: microsoft/GLIP `modeling/detector/generalized_vl_rcnn.py` (`random_word`). Where we
deliberately differ: masking never touches special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Label of tokens the MLM and captioning losses ignore (torch cross-entropy's default
# ignore_index).
MLM_IGNORE_INDEX = -100


@dataclass(frozen=True)
class SpecialTokenIds:
    """Token ids MLM masking needs: the [MASK] id and every id that must never be masked.

    Attributes:
        mask: id of the mask token ([MASK] in BERT's vocabulary: 103).
        special: ids never masked nor drawn as random replacements ([CLS], [SEP], [PAD],
            [UNK], [MASK], ...).
    """

    mask: int
    special: frozenset[int]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialTokenIds:
        """From a Hugging Face tokenizer (`mask_token_id`, `all_special_ids`)."""
        return cls(mask=int(tokenizer.mask_token_id),
                   special=frozenset(int(i) for i in tokenizer.all_special_ids))

    @classmethod
    def of(cls, mask: int, special: Iterable[int]) -> SpecialTokenIds:
        return cls(mask=mask, special=frozenset(special) | {mask})


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    tokenizer_specials: SpecialTokenIds,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking for the MLM loss: choose tokens, then 80% [MASK], 10% random, 10% kept.

    Each real, non-special token is chosen independently with `probability`. A chosen token is
    replaced by the mask id with probability 0.8, by a random non-special vocabulary id with
    0.1, and left unchanged with 0.1; its label is the original id. Every other position has
    label `MLM_IGNORE_INDEX`. Unlike the reference `random_word`, special tokens ([CLS], [SEP])
    are never chosen: predicting them teaches nothing and a masked [SEP] would change the text.

    Args:
        input_ids: (N, T) int64 token ids.
        attention_mask: (N, T), nonzero = real token (zero = padding, never chosen).
        tokenizer_specials: mask id and never-masked ids.
        vocab_size: size of the vocabulary random replacements are drawn from.
        probability: chance of choosing each eligible token.
        generator: torch generator for reproducible masks (on the ids' device).

    Returns:
        (masked_ids (N, T), labels (N, T) with `MLM_IGNORE_INDEX` where not chosen).
    """
    device = input_ids.device
    specials = torch.tensor(sorted(tokenizer_specials.special | {tokenizer_specials.mask}),
                            dtype=input_ids.dtype, device=device)
    eligible = (attention_mask > 0) & ~torch.isin(input_ids, specials)
    draws = torch.rand(input_ids.shape, generator=generator, device=device)
    chosen = eligible & (draws < probability)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, MLM_IGNORE_INDEX))

    action = torch.rand(input_ids.shape, generator=generator, device=device)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    allowed = torch.arange(vocab_size, dtype=input_ids.dtype, device=device)
    allowed = allowed[~torch.isin(allowed, specials)]
    random_ids = allowed[
        torch.randint(len(allowed), input_ids.shape, generator=generator, device=device)
    ]
    masked = torch.where(to_mask, torch.full_like(input_ids, tokenizer_specials.mask), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Masked-language-model cross-entropy, mean over chosen tokens (labels != MLM_IGNORE_INDEX).

    Args:
        logits: (N, T, V) vocabulary logits (`Glipv2Output.mlm_logits`).
        labels: (N, T) original ids of chosen tokens, `MLM_IGNORE_INDEX` elsewhere
            (`mask_tokens`).

    Returns:
        Scalar; 0 (connected to the graph) when no token was chosen, where a plain mean would
        be NaN.
    """
    if not bool((labels != MLM_IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    vocab = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1),
                           ignore_index=MLM_IGNORE_INDEX)
