"""L_intra: the region-token "classification as matching" loss, a sigmoid focal loss on the
dot-product logits of the fused features against the token positive map of the matched box.

Reference: microsoft/GLIP `layers/sigmoid_focal_loss.py` (`token_sigmoid_binary_focal_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    text_mask: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """Binary sigmoid focal loss over region-token pairs, summed over valid tokens only.

    Reference `token_sigmoid_binary_focal_loss`: per pair
    `alpha_t * BCE(logit, target) * (1 - p_t) ** gamma`, with `p_t = p` for positives and
    `1 - p` for negatives and `alpha_t = alpha` / `1 - alpha`; pairs whose token is padding
    (`text_mask == 0`) are left out. Special tokens with mask 1 are valid negatives. The caller
    normalises (ATSS: by the number of positive anchors).

    Args:
        logits: (N, A, T) region-token logits.
        targets: (N, A, T) 0/1 targets (float).
        text_mask: (N, T) attention mask, nonzero = real token.
        alpha: weight of positives (negatives get 1 - alpha); < 0 disables weighting.
        gamma: focusing exponent.

    Returns:
        Scalar sum.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} vs targets {tuple(targets.shape)}")
    valid = (text_mask > 0)[:, None, :].expand_as(logits)  # (N, T) -> (N, A, T)
    logits = logits[valid]
    targets = targets[valid].to(logits.dtype)
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum()

