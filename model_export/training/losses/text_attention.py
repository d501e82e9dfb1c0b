"""The "attend" loss: tokens' attention onto their objects (not in GLIP or GLIPv2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence


def text_attention_loss(maps: Sequence[Tensor], positive_maps: Sequence[Tensor],
                        boxes: Sequence[Tensor], centres: Tensor) -> Tensor:
    """Teach tokens to look at their objects: -log of the attention mass a positive token puts
    on regions whose centre lies in one of its boxes (heads averaged, so some heads may look
    elsewhere), averaged over positive tokens, images and layers.

    Detection trains the region-to-token direction of the fusion's shared scores; nothing else
    trains the token-to-region direction, which is all VQA and captioning read the image
    through. Not in GLIP or GLIPv2.

    maps: per layer (N, heads, T, R) token-to-region attention (`recording_text_attention`).
    positive_maps: per image (K, T) 0/1, tokens each box is positive for.
    boxes: per image (K, 4) xyxy in the model-input frame, legacy convention (x1 = last pixel).
    centres: (R, 2) x, y of every region, in `flatten_levels` order.
    """
    if not any(len(image_boxes) for image_boxes in boxes):
        return centres.new_zeros(())
    # All images at once (padding boxes have all-zero positive rows): no per-image loop, no
    # host sync, which is what a GPU step was waiting on.
    pmap = pad_sequence(list(positive_maps), batch_first=True).float()  # (N, K, T)
    box = pad_sequence(list(boxes), batch_first=True)  # (N, K, 4)
    x, y = centres[:, 0], centres[:, 1]
    inside = ((x >= box[..., 0:1]) & (x <= box[..., 2:3])
              & (y >= box[..., 1:2]) & (y <= box[..., 3:4]))  # (N, K, R)
    target = (pmap.transpose(1, 2) @ inside.float()) > 0  # (N, T, R)
    tokens = target.any(dim=2)  # (N, T)
    count = tokens.sum(dim=1)
    supervised = count > 0  # images with at least one positive token
    per_layer = []
    for layer in maps:
        mass = (layer.mean(dim=1) * target).sum(dim=2)  # (N, T)
        per_layer.append((-mass.clamp(min=1e-6).log() * tokens).sum(dim=1) / count.clamp(min=1))
    per_image = torch.stack(per_layer)  # (layers, N)
    return (per_image * supervised).sum() / (supervised.sum() * len(maps)).clamp(min=1)
