"""Referring / instance segmentation head of GLIPv2: per-pixel features dotted with phrase features.

GLIPv2 turns mask prediction into matching, like its detection head: an hourglass-style extractor
builds a per-pixel embedding map E at stride 4 from the fused image levels P3..P5, a phrase is the
weighted sum of its projected fused tokens, and a pixel's logit for the phrase is their scaled dot
product plus a learned bias. The logit map is shared by every box of the phrase, so objects of the
same phrase are separated by the "inside each box" rule: box k keeps the logits at pixels whose
centre lies inside it and sets every other pixel to `OUTSIDE_BOX_LOGIT`.

`Glipv2MaskHead.forward` is the ONNX `mask` graph: pure tensor ops, no data-dependent Python
control flow, so one trace serves every image size, phrase count and box count. Thresholds and
resizing to original image pixels are post-processing (`masks_for_image`); the training loss is
`mask_loss` on stride-4 targets made by `downsample_masks`.

Coordinate frames: boxes are xyxy in model-input pixels (the resized image before batch padding,
which is also the padded image's frame since padding is bottom/right). The stride-4 pixel (i, j)
covers input pixels [4j, 4j + 4) x [4i, 4i + 4) and its centre is ((j + 0.5) * 4, (i + 0.5) * 4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Logit given to pixels outside a box (and to every pixel of an invalid box). sigmoid() of it is 0
# in float32 and float16, and it is representable in float16 (max 65504), unlike -inf which would
# turn into NaN in the BCE loss and in bilinear resizing.
OUTSIDE_BOX_LOGIT = -1e4

# Output stride of the embedding map: the stride-8 P3 level upsampled by 2.
MASK_STRIDE = 4

# Default loss weights (see `mask_loss`).
MASK_BCE_WEIGHT = 1.0
MASK_DICE_WEIGHT = 1.0


def _conv_block(in_channels: int, out_channels: int, groups: int) -> nn.Sequential:
    """3x3 conv (no bias: GroupNorm follows) + GroupNorm + ReLU, spatial size kept."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.GroupNorm(groups, out_channels), nn.ReLU(inplace=True))


def _pixel_centres(like: Tensor, stride: int, dtype: torch.dtype) -> Tensor:
    """Centres (k + 0.5) * stride, in input pixels, of the positions along the last dim of `like`.

    like: (..., L) any tensor whose last dim is the feature length -> (..., L) of `dtype`.
    Export hazard: `torch.arange(like.shape[-1])` can be frozen to a constant length by tracing
    (the size turns into a Python int); a cumulative sum of ones follows the input's length.
    """
    return (torch.ones_like(like, dtype=dtype).cumsum(dim=-1) - 0.5) * stride


def box_region_mask(boxes: Tensor, box_valid: Tensor, height: int | Tensor, width: int | Tensor,
                    stride: int = MASK_STRIDE) -> Tensor:
    """Which stride-`stride` pixels lie inside each box (the "inside each box" rule).

    boxes: (..., 4) xyxy in model-input pixels; box_valid: (...) bool.
    Returns (..., height, width) bool: True where the pixel centre ((j + 0.5) * stride,
    (i + 0.5) * stride) lies in [x0, x1) x [y0, y1) and the box is valid. Half-open intervals so
    that two boxes sharing an edge never both claim a pixel.
    For traced code use `Glipv2MaskHead.forward`, which derives the lengths from a tensor.
    """
    ys = _pixel_centres(boxes.new_zeros(int(height)), stride, boxes.dtype)  # (h,)
    xs = _pixel_centres(boxes.new_zeros(int(width)), stride, boxes.dtype)  # (w,)
    return _inside(boxes, box_valid, ys, xs)


def _inside(boxes: Tensor, box_valid: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
    """boxes (..., 4), box_valid (...), ys (h,) or broadcastable, xs (w,) -> (..., h, w) bool."""
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))  # each (..., 1)
    inside_x = (xs >= x0) & (xs < x1)  # (..., w)
    inside_y = (ys >= y0) & (ys < y1)  # (..., h)
    return inside_y[..., :, None] & inside_x[..., None, :] & box_valid[..., None, None]


class Glipv2MaskHead(nn.Module):
    """Hourglass-style pixel embeddings at stride 4, matched against phrase features per box.

    Extractor: each of P3, P4, P5 goes through a lateral conv block (C -> hidden); from P5 down,
    the running map is bilinearly resized to the next finer level's size, added to its lateral
    and merged by a conv block; the stride-8 result is upsampled x2 to stride 4, refined by
    `num_convs` conv blocks (the first maps hidden -> embed_dim) and a final 1x1 conv gives the
    embedding map E (N, embed_dim, 2 * H3, 2 * W3). Every conv block is 3x3 conv + GroupNorm + ReLU.

    Args:
        channels: width C of the fused visual levels (fusion.channels).
        text_dim: width D of the fused token features (language.hidden_size).
        embed_dim: width of the pixel and phrase embeddings the logits are dot products of.
        num_convs: conv blocks at stride 4 before the final 1x1 embedding conv (0: none).
        hidden_channels: width of the stride-8..32 path; None: `channels`.
        group_norm_groups: GroupNorm groups; must divide hidden_channels and embed_dim.
    """

    def __init__(self, channels: int, text_dim: int, embed_dim: int = 64, num_convs: int = 2,
                 hidden_channels: int | None = None, group_norm_groups: int = 8) -> None:
        super().__init__()
        hidden = channels if hidden_channels is None else hidden_channels
        if num_convs < 0:
            raise ValueError(f"num_convs must be >= 0, got {num_convs}")
        for name, width in (("hidden_channels", hidden), ("embed_dim", embed_dim)):
            if width % group_norm_groups:
                raise ValueError(f"{name}={width} is not divisible by "
                                 f"group_norm_groups={group_norm_groups}")
        self.embed_dim = embed_dim
        self.lateral = nn.ModuleList(_conv_block(channels, hidden, group_norm_groups)
                                     for _ in range(3))  # P3, P4, P5
        self.merge = nn.ModuleList(_conv_block(hidden, hidden, group_norm_groups)
                                   for _ in range(2))  # into P3, into P4
        tower: list[nn.Module] = []
        width = hidden
        for _ in range(num_convs):
            tower.append(_conv_block(width, embed_dim, group_norm_groups))
            width = embed_dim
        self.tower = nn.Sequential(*tower)
        self.pixel_embed = nn.Conv2d(width, embed_dim, kernel_size=1)
        self.text_projection = nn.Linear(text_dim, embed_dim)
        self.bias = nn.Parameter(torch.zeros(1))
        self.logit_scale = 1.0 / math.sqrt(embed_dim)

    def pixel_embeddings(self, fused_visual: list[Tensor]) -> Tensor:
        """fused_visual: levels P3, P4, P5, ... (N, C, H_l, W_l), strides 8, 16, 32, ...

        Only P3..P5 are read. Returns E (N, embed_dim, 2 * H_3, 2 * W_3), stride 4.
        """
        x = self.lateral[2](fused_visual[2])  # (N, hidden, H5, W5)
        for level in (1, 0):
            lateral = self.lateral[level](fused_visual[level])  # (N, hidden, H_l, W_l)
            # Resize to the lateral's size (not x2) so odd level sizes still line up.
            top_down = F.interpolate(x, size=lateral.shape[-2:], mode="bilinear",
                                     align_corners=False)
            x = self.merge[level](lateral + top_down)
        # scale_factor (not a size computed in Python) keeps the traced output size dynamic.
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.pixel_embed(self.tower(x))  # (N, embed_dim, 2 * H3, 2 * W3)

    def phrase_embeddings(self, fused_text: Tensor, phrase_map: Tensor) -> Tensor:
        """fused_text (N, T, D), phrase_map (N, P, T) -> phrase embeddings (N, P, embed_dim)."""
        tokens = self.text_projection(fused_text)  # (N, T, embed_dim)
        return torch.bmm(phrase_map.to(tokens.dtype), tokens)

    def forward(self, fused_visual: list[Tensor], fused_text: Tensor, phrase_map: Tensor,
                boxes: Tensor, box_valid: Tensor) -> Tensor:
        """Per-box mask logits at stride 4.

        Args:
            fused_visual: fused levels (N, C, H_l, W_l), P3 first (stride 8); P3..P5 are read,
                extra levels (P6, P7) are ignored.
            fused_text: (N, T, D) fused token features.
            phrase_map: (N, P, T) float; row p selects phrase p's tokens with weights summing to
                1 (e.g. 1/len over its tokens). An all-zero row gives a zero embedding, so its
                logits are just the bias: pair it with invalid boxes.
            boxes: (N, P, K, 4) xyxy in model-input pixels, K boxes per phrase.
            box_valid: (N, P, K) bool; False marks padding slots.

        Returns:
            mask_logits: (N, P, K, h4, w4) with (h4, w4) = 2 x the P3 size (the padded input size
            / 4). Inside box k: <E[pixel], phrase p> / sqrt(embed_dim) + bias; outside it, and
            everywhere for an invalid box: `OUTSIDE_BOX_LOGIT`.
        """
        pixels = self.pixel_embeddings(fused_visual)  # (N, E, h4, w4)
        phrases = self.phrase_embeddings(fused_text, phrase_map)  # (N, P, E)
        # (N, P, E) @ (N, E, h4*w4) -> (N, P, h4*w4) -> (N, P, h4, w4)
        logits = torch.bmm(phrases, pixels.flatten(2)) * self.logit_scale + self.bias
        logits = logits.unflatten(2, pixels.shape[-2:])

        ys = _pixel_centres(pixels[:, 0, :, 0], MASK_STRIDE, boxes.dtype)  # (N, h4)
        xs = _pixel_centres(pixels[:, 0, 0, :], MASK_STRIDE, boxes.dtype)  # (N, w4)
        inside = _inside(boxes, box_valid.bool(), ys[:, None, None, :], xs[:, None, None, :])
        # (N, P, 1, h4, w4) broadcast against (N, P, K, h4, w4); a scalar branch, because a
        # full_like tensor would be frozen to the traced size in the exported graph.
        return torch.where(inside, logits[:, :, None], OUTSIDE_BOX_LOGIT)


def masks_for_image(mask_logits_per_box: Tensor, resized_hw: tuple[int, int],
                    padded_hw: tuple[int, int], original_hw: tuple[int, int],
                    threshold: float = 0.0) -> Tensor:
    """Binary masks of one image's boxes in original image pixels (post-processing).

    Args:
        mask_logits_per_box: (K, h4, w4) stride-4 logits of one image (rows of the head output).
        resized_hw: (h, w) of the resized image before batch padding (the model-input frame).
        padded_hw: (H, W) of the padded batch the image ran in (normally (4 * h4, 4 * w4)).
        original_hw: (H0, W0) of the image as the client sent it.
        threshold: logit threshold; 0.0 is probability 0.5.

    Returns:
        (K, H0, W0) bool. Logits are resized bilinearly (align_corners=False) to the padded size,
        cropped to the resized size (padding is bottom/right), resized bilinearly to the original
        size and thresholded, so the mask edge is interpolated between pixels rather than blocky.
    """
    count = mask_logits_per_box.shape[0]
    height0, width0 = original_hw
    if count == 0:
        return torch.zeros((0, height0, width0), dtype=torch.bool,
                           device=mask_logits_per_box.device)
    logits = mask_logits_per_box[:, None].float()  # (K, h4, w4) -> (K, 1, h4, w4)
    logits = F.interpolate(logits, size=tuple(padded_hw), mode="bilinear", align_corners=False)
    logits = logits[:, :, : resized_hw[0], : resized_hw[1]]  # (K, 1, h, w)
    logits = F.interpolate(logits, size=(height0, width0), mode="bilinear", align_corners=False)
    return logits[:, 0] > threshold


def downsample_masks(gt_masks: Tensor, padded_hw: tuple[int, int],
                     stride: int = MASK_STRIDE) -> Tensor:
    """Stride-`stride` soft targets from full-resolution masks.

    gt_masks: (M, h, w) bool in the model-input frame (the resized image, top-left aligned, with
    h <= H and w <= W). The masks are zero-padded bottom/right to padded_hw = (H, W) (multiples
    of `stride`) and area-averaged over stride x stride cells.
    Returns (M, H / stride, W / stride) float in [0, 1]: the fraction of each cell covered.
    """
    height, width = padded_hw
    if height % stride or width % stride:
        raise ValueError(f"padded size {padded_hw} is not a multiple of stride {stride}")
    count, mask_h, mask_w = gt_masks.shape
    if mask_h > height or mask_w > width:
        raise ValueError(f"masks of size {(mask_h, mask_w)} exceed the padded size {padded_hw}")
    if count == 0:
        return torch.zeros((0, height // stride, width // stride), device=gt_masks.device)
    masks = F.pad(gt_masks.float(), (0, width - mask_w, 0, height - mask_h))  # (M, H, W)
    return F.avg_pool2d(masks[:, None], kernel_size=stride, stride=stride)[:, 0]


def mask_loss(mask_logits: Tensor, gt_masks: Tensor, region: Tensor | None = None,
              bce_weight: float = MASK_BCE_WEIGHT, dice_weight: float = MASK_DICE_WEIGHT,
              ) -> Tensor:
    """Segmentation loss of M matched (box, mask) pairs at stride 4.

    loss = bce_weight * BCE + dice_weight * dice, each averaged over the M masks:
    - BCE-with-logits averaged over the pixels inside the mask's box. Outside the box the head
      outputs `OUTSIDE_BOX_LOGIT` and has no say, so those pixels are left out (a target pixel
      bleeding past the box after downsampling would otherwise cost ~1e4).
    - Dice loss 1 - (2 sum(p g) + 1) / (sum(p) + sum(g) + 1) over the same pixels, with
      p = sigmoid(logit). Dice does not scale with the box area, so small objects, whose BCE
      is dominated by background pixels, still get a strong signal. Both weights default to
      1.0: the two terms are on the same [0, ~1] scale at the start of training.

    Args:
        mask_logits: (M, h4, w4) head logits (rows of the head output for matched boxes).
        gt_masks: (M, h4, w4) float targets in [0, 1] (`downsample_masks`).
        region: (M, h4, w4) bool pixels inside each box; None: where the logits are not the
            outside-box value (exactly the head's box rule).

    Returns:
        scalar loss; 0 (still attached to the graph) when M == 0. A mask whose region is empty
        (invalid box) contributes 0.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    if region is None:
        region = mask_logits > OUTSIDE_BOX_LOGIT / 2
    weight = region.to(mask_logits.dtype).flatten(1)  # (M, h4*w4)
    logits = mask_logits.flatten(1)
    targets = gt_masks.to(mask_logits.dtype).flatten(1)

    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    bce = (bce * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)  # (M,)

    probs = logits.sigmoid() * weight
    targets = targets * weight
    dice = 1.0 - (2.0 * (probs * targets).sum(dim=1) + 1.0) / (
        probs.sum(dim=1) + targets.sum(dim=1) + 1.0)  # (M,)
    return bce_weight * bce.mean() + dice_weight * dice.mean()
