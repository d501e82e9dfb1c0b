"""Grounded VQA head of GLIPv2: attention pooling over fused tokens, then a 2-layer GeLU MLP.

The question (with the image's grounding folded in by the fusion tower) is read from the fused
token features: a linear layer scores each token, a softmax over the real tokens (padding masked
out) weights them into one pooled vector, and an MLP maps it to one logit per answer of a fixed
vocabulary. With more than one glimpse (MCAN's AttFlat), each glimpse scores the tokens with its
own weights and the MLP reads the glimpses side by side: one glimpse can keep to the question's
wording while another reads the words that name an object, the tokens that looked at it.

VQA is multi-label: each answer's logit is trained with BCE against a soft score
(`vqa_target_scores`), as in GLIPv2 and MCAN.

`Glipv2VqaHead.forward` is the ONNX `vqa` graph (pure tensor ops; any batch size and token
count). Picking the answer and its score is post-processing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Score given to padded tokens before the softmax: exp() of it underflows to exactly 0 in float32
# and float16, and it is representable in float16 (finfo.min or -inf would become -inf / NaN).
_PAD_SCORE = -1e4


def _normalize_answer(answer: str) -> str:
    """Light normalisation for matching answers: surrounding spaces and case are ignored."""
    return answer.strip().lower()


def _agreement_needed(answers: Sequence[str]) -> int:
    """Annotators who must give an answer for full credit: 3, or all of them when fewer."""
    return max(1, min(3, len(answers)))


class Glipv2VqaHead(nn.Module):
    """Attention pooling over fused tokens -> Linear(G * D, hidden) -> GELU -> Linear(hidden, A).

    Args:
        text_dim: width D of the fused token features.
        hidden_dim: width of the MLP's hidden layer.
        num_answers: size A of the answer vocabulary.
        glimpses: number G of attention poolings, concatenated before the MLP.
    """

    def __init__(self, text_dim: int, hidden_dim: int, num_answers: int, glimpses: int = 1
                 ) -> None:
        super().__init__()
        self.attention = nn.Linear(text_dim, glimpses)
        self.mlp = nn.Sequential(
            nn.Linear(glimpses * text_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, num_answers)
        )

    def pool(self, fused_text: Tensor, text_mask: Tensor) -> Tensor:
        """fused_text (N, T, D), text_mask (N, T) 1/True for real tokens -> pooled (N, G * D).

        Padded tokens get weight exactly 0, so neither their features nor their number changes
        the result. A row with no real token pools uniformly over its slots (no NaN).
        """
        weights = self.pool_weights(fused_text, text_mask)  # (N, G, T)
        return torch.bmm(weights, fused_text).flatten(1)  # (N, G, D) -> (N, G * D)

    def pool_weights(self, fused_text: Tensor, text_mask: Tensor) -> Tensor:
        """fused_text (N, T, D), text_mask (N, T) -> each glimpse's token weights (N, G, T)."""
        scores = self.attention(fused_text).transpose(1, 2)  # (N, T, G) -> (N, G, T)
        real = text_mask.bool()[:, None, :]
        scores = torch.where(real, scores, torch.full_like(scores, _PAD_SCORE))
        return scores.softmax(dim=-1)

    def forward(self, fused_text: Tensor, text_mask: Tensor) -> Tensor:
        """fused_text (N, T, D), text_mask (N, T) -> answer logits (N, num_answers).

        Logits are independent per answer (sigmoid gives each answer's score in [0, 1]).
        """
        return self.mlp(self.pool(fused_text, text_mask))


def vqa_target_scores(answers_per_question: Sequence[Sequence[str]],
                      answer_vocab: Sequence[str]) -> Tensor:
    """Soft targets (N, A) in [0, 1]: min(#annotators who gave the answer / n, 1).

    n = min(3, number of reference answers of the question): 3 for VQAv2's 10 annotators, and
    a question with one or two references gets score 1 for them (VQA accuracy). Answers
    outside the vocabulary are dropped (their question may end with an all-zero row). Matching
    ignores case and surrounding spaces.
    """
    index = {_normalize_answer(answer): i for i, answer in enumerate(answer_vocab)}
    scores = torch.zeros(len(answers_per_question), len(answer_vocab))
    for row, answers in enumerate(answers_per_question):
        for answer in answers:
            column = index.get(_normalize_answer(answer))
            if column is not None:
                scores[row, column] += 1.0 / _agreement_needed(answers)
    return scores.clamp(max=1.0)


def vqa_loss(logits: Tensor, target_scores: Tensor) -> Tensor:
    """BCE-with-logits over all answers, times the number of answers A.

    logits (N, A), target_scores (N, A) in [0, 1] -> scalar. Multiplying the element mean by A
    makes it the per-question sum over answers averaged over questions, the scaling of the
    standard VQA BCE loss (bottom-up attention, MCAN, GLIPv2): without it the gradient per answer
    shrinks as the vocabulary grows (3,129 answers for VQAv2).
    """
    bce = F.binary_cross_entropy_with_logits(logits, target_scores.to(logits.dtype))
    return bce * logits.shape[-1]


def glimpse_grounding_loss(weights: Tensor, named: Tensor) -> Tensor:
    """Teach a glimpse to read the words that name the question's objects: -log of the weight
    it puts on them, averaged over questions that name an object (0 when none does).

    Grounded VQA knows those words (they are what it returns boxes for), and they are the tokens
    that attend to the objects in the fusion; left to the answer loss alone, the one pool of a
    trained head put 2 % of its weight on them. Not in GLIPv2.

    weights: (N, T) one glimpse's token weights (`Glipv2VqaHead.pool_weights`).
    named: (N, T) bool, the tokens that name an object of the question.
    """
    rows = named.any(dim=1)
    if not rows.any():
        return weights.new_zeros(())
    mass = (weights[rows] * named[rows].to(weights.dtype)).sum(dim=1)
    return -mass.clamp(min=1e-6).log().mean()
