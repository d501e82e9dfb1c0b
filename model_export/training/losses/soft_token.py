"""Soft token prediction (MDETR's, not in GLIP; off unless weighted).

Each positive anchor's softmax over the prompt's tokens against its box's positive tokens.
Unlike the per-pair sigmoid of L_intra, it only asks which tokens score highest, so its gradient
is the difference between competing tokens ("red" vs "blue" at a blue circle) rather than a push
on all of them.
"""

from __future__ import annotations

from torch import Tensor

from model_export.training.losses.inter import multi_positive_nll


def soft_token_loss(logits: Tensor, targets: Tensor, text_mask: Tensor) -> Tensor:
    """MDETR's soft token prediction on the region-token logits, mean over positive anchors.

    Each anchor with a positive token gets `-mean_{positives} log softmax(logits)` over its
    image's valid tokens (`multi_positive_nll`, L_inter's too); background anchors and padding
    take no part. 0 (connected to the graph) when no anchor is positive.

    Args:
        logits: (N, A, T) region-token logits.
        targets: (N, A, T) 0/1 targets.
        text_mask: (N, T) attention mask, nonzero = real token.
    """
    valid = (text_mask > 0)[:, None, :].expand_as(logits)
    return multi_positive_nll(logits.flatten(0, 1), targets.flatten(0, 1), valid.flatten(0, 1))

