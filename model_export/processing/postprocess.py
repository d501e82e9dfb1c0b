"""ATSS post-processing of GLIP head outputs: raw head tensors in, `Detections` out.

Pure functions shared by PyTorch evaluation and the service; every threshold lives here, none in
the model. The path is the reference evaluation path (microsoft/GLIP
`modeling/rpn/inference.py`, `ATSSPostProcessor` with dot-product logits and score_agg MEAN):

per level and image
  1. class probability = mean over the class's tokens of sigmoid(dot-product logit) (or, with
     `score_agg` "min", not in the reference, their minimum);
  2. candidates = (location, class) pairs with class probability > pre_nms_thresh (strict; the
     threshold applies to the class probability, before centerness);
  3. product = class probability * sigmoid(centerness); keep the pre_nms_top_n largest;
  4. decode the candidates' boxes from their deltas and anchors; score = sqrt(product);
  5. clip to the image (x in [0, w-1], y in [0, h-1]); drop boxes with a +1 side < min_size;
then per image: concatenate the levels, class-aware NMS (legacy +1 IoU, suppress when IoU >
nms_thresh), keep the detections_per_img best (ties at the cut are all kept, as in the
reference), sort by score.

Order and tie conventions where the reference is implementation-defined: candidates are ordered
by (level, location y * W + x, class); the per-level top-k breaks ties towards that order and
keeps the chosen candidates in it (the reference's `topk(sorted=False)` order is whatever the
sort kernel leaves); NMS visits boxes by score with a stable sort over that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model_export.modeling.config import SCORE_AGGREGATIONS, PostprocessConfig
from model_export.processing.box_coding import (
    BoxCoder,
    box_iou_legacy,
    clip_boxes_to_image,
    legacy_sizes,
)


@dataclass
class Detections:
    """Detections of one image.

    Boxes are in the model-input frame: pixels of the resized image before batch padding,
    clipped to x in [0, w - 1] and y in [0, h - 1] (legacy +1 convention). Use
    `box_coding.rescale_boxes(boxes, resized_hw, original_hw)` to go to original image pixels.

    Attributes:
        boxes: (K, 4) float xyxy.
        scores: (K,) float in [0, 1]: sqrt(class probability * sigmoid(centerness)), sorted
            descending.
        labels: (K,) int64, 0-based class index = row of the positive map.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def class_scores_from_token_logits(token_probs: Tensor, positive_map: Tensor,
                                   score_agg: str = "mean") -> Tensor:
    """Class probabilities from token probabilities, over each class's tokens.

    "mean" is the reference's (score_agg MEAN). "min" scores a class by its weakest token, so
    every word must match: with the mean, "circle" alone gives a red circle half of "blue
    circle"'s score, and with a whole vocabulary in one prompt such near misses outrank true
    objects in other images (on the shapes world, all 42 colour-shape phrases in one prompt:
    AP50 0.76 mean, 0.82 min over 500 images; docs/default_model.md).

    Args:
        token_probs: (N, HW, T) sigmoid of the region-token dot-product logits, in [0, 1].
        positive_map: (C, T) token map of the prompt; a class's tokens are its nonzero entries
            (0/1 maps and row-normalised maps give the same result).
        score_agg: one of `SCORE_AGGREGATIONS`.

    Returns:
        (N, HW, C) class probabilities in [0, 1]. A class with no token scores 0.
    """
    if positive_map.shape[-1] != token_probs.shape[-1]:
        raise ValueError(
            f"positive_map has {positive_map.shape[-1]} token columns, "
            f"token_probs has {token_probs.shape[-1]}"
        )
    mask = positive_map > 0  # (C, T)
    if score_agg == "mean":
        weights = mask.to(token_probs.dtype)
        num_tokens = weights.sum(dim=-1).clamp(min=1)  # (C,)
        # (N, HW, T) @ (T, C) -> (N, HW, C): per-class token sums, then the mean.
        return torch.matmul(token_probs, weights.t()) / num_tokens
    if score_agg == "min":
        return _weakest_token(token_probs, mask)
    raise ValueError(f"score_agg must be one of {SCORE_AGGREGATIONS}, got {score_agg!r}")


def _weakest_token(token_probs: Tensor, mask: Tensor) -> Tensor:
    """(N, HW, T), (C, T) bool -> (N, HW, C): each class's smallest token probability.

    Each class's token columns, padded to the longest class with a column of ones, are gathered
    at once: N * HW * C * (tokens of the longest class) values, not N * HW * C * T.
    """
    tokens = mask.shape[-1]
    columns = torch.arange(tokens, device=mask.device).expand_as(mask)
    padded = torch.where(mask, columns, tokens).sort(dim=-1).values  # class tokens first
    longest = max(1, int(mask.sum(dim=-1).max()))
    index = padded[:, :longest]  # (C, K), `tokens` where a class has fewer
    ones = token_probs.new_ones(*token_probs.shape[:-1], 1)
    gathered = torch.cat([token_probs, ones], dim=-1)[..., index]  # (N, HW, C, K)
    return gathered.amin(dim=-1) * mask.any(dim=-1).to(token_probs.dtype)


# Rows of a label's (K, K) IoU matrix computed at once: bounds each float intermediate to
# 2 * _IOU_ROW_CHUNK * K values (K is at most levels * pre_nms_top_n, 5000 for GLIP-T).
_IOU_ROW_CHUNK = 512


def _greedy_keep(boxes: Tensor, iou_threshold: float) -> list[int]:
    """Positions kept by greedy NMS over (K, 4) float32 boxes sorted by descending score.

    Like the kernel, the suppressions are computed first as one bit mask per box (here a
    Python int over all K boxes), then a sequential pass keeps a box unless a kept box set
    its bit.
    """
    num_boxes = boxes.shape[0]
    masks: list[int] = []
    for start in range(0, num_boxes, _IOU_ROW_CHUNK):
        stop = min(start + _IOU_ROW_CHUNK, num_boxes)
        # Rows start..stop against columns start..K: only later boxes can be suppressed.
        iou = box_iou_legacy(boxes[start:stop], boxes[start:])  # (R, K - start)
        later = torch.ones_like(iou, dtype=torch.bool).triu(diagonal=1)
        # NaN IoU (0 / 0) compares False, as in the kernel.
        suppresses = ((iou > iou_threshold) & later).cpu().numpy()
        packed = np.packbits(suppresses, axis=1, bitorder="little")  # (R, ceil((K-start)/8))
        masks.extend(int.from_bytes(row.tobytes(), "little") << start for row in packed)
    removed = 0
    keep = []
    for position, mask in enumerate(masks):
        if not (removed >> position) & 1:
            keep.append(position)
            removed |= mask
    return keep


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Class-aware greedy NMS with the semantics of the reference `ml_nms` CUDA kernel.

    Boxes are visited by score, descending (stable sort, so equal scores keep their input
    order); a visited box that no kept box suppressed is kept and suppresses every later box
    with the same label whose IoU with it (+1 widths and heights, float32) is strictly above
    `iou_threshold`. Boxes with different labels never suppress each other, so each label is
    processed on its own.

    Args:
        boxes: (K, 4) xyxy boxes.
        scores: (K,) scores.
        labels: (K,) integer labels.
        iou_threshold: IoU above which a box is suppressed.

    Returns:
        (K',) int64 indices of the kept boxes, in ascending original order (as the kernel
        returns them), on the device of `boxes`.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices  # (K,) rank -> index
    sorted_boxes = boxes[order].float()  # the kernel works in float32
    sorted_labels = labels[order]
    kept_ranks = []
    for label in torch.unique(sorted_labels):
        ranks = torch.nonzero(sorted_labels == label).squeeze(1)  # ascending rank = by score
        keep = _greedy_keep(sorted_boxes[ranks], iou_threshold)
        kept_ranks.append(ranks[torch.tensor(keep, dtype=torch.int64, device=ranks.device)])
    kept = order[torch.cat(kept_ranks)]
    return torch.sort(kept).values


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Class-agnostic `batched_nms`: all boxes share one label. Returns ascending indices."""
    labels = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
    return batched_nms(boxes, scores, labels, iou_threshold)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (ascending) of xyxy boxes whose +1 width and height are both >= `min_size`."""
    widths, heights = legacy_sizes(boxes)
    return torch.nonzero((widths >= min_size) & (heights >= min_size)).squeeze(1)


def _top_k_in_order(values: Tensor, k: int) -> Tensor:
    """Indices of the k largest `values`, ties towards lower index, returned ascending."""
    top = torch.sort(values, descending=True, stable=True).indices[:k]
    return torch.sort(top).values


def _select_top_detections(scores: Tensor, max_detections: int) -> Tensor:
    """Indices (ascending) kept by the reference's per-image cap `select_over_all_levels`.

    With n > max_detections > 0, the threshold is the (n - max_detections + 1)-th smallest
    score and every score >= it is kept, so ties at the cut may keep more than max_detections.
    """
    num = scores.shape[0]
    if not num > max_detections > 0:
        return torch.arange(num, device=scores.device)
    threshold = torch.kthvalue(scores.float(), num - max_detections + 1).values
    return torch.nonzero(scores >= threshold).squeeze(1)


def postprocess_detections(
    box_regression: Sequence[Tensor],
    centerness: Sequence[Tensor],
    token_logits: Sequence[Tensor],
    anchors: Sequence[Tensor],
    positive_map: Tensor,
    image_sizes: Sequence[tuple[int, int]],
    config: PostprocessConfig,
    box_coder: BoxCoder,
) -> list[Detections]:
    """The reference ATSS post-processing (see the module docstring for the steps).

    Args:
        box_regression: per level, (N, 4, H, W) box deltas (dx, dy, dw, dh).
        centerness: per level, (N, 1, H, W) centerness logits.
        token_logits: per level, (N, H*W, T) region-token dot-product logits, rows row-major
            over (H, W).
        anchors: per level, (H*W, 4) xyxy anchors in the same row order, shared by the batch.
        positive_map: (C, T) class-to-token map of the prompt; row c is class label c.
        image_sizes: per image, (height, width) of the resized image before batch padding;
            boxes are clipped to it.
        config: thresholds and counts.
        box_coder: decodes deltas against anchors.

    Returns:
        One `Detections` per image (model-input frame, scores descending, 0-based labels).
    """
    num_levels = len(box_regression)
    if not len(centerness) == len(token_logits) == len(anchors) == num_levels:
        raise ValueError("box_regression, centerness, token_logits and anchors need one entry "
                         "per level")
    num_images = box_regression[0].shape[0]
    if len(image_sizes) != num_images:
        raise ValueError(f"{len(image_sizes)} image sizes for a batch of {num_images}")

    boxes_per_image: list[list[Tensor]] = [[] for _ in range(num_images)]
    scores_per_image: list[list[Tensor]] = [[] for _ in range(num_images)]
    labels_per_image: list[list[Tensor]] = [[] for _ in range(num_images)]

    for regression_per_level, centerness_per_level, logits_per_level, anchors_per_level in zip(
        box_regression, centerness, token_logits, anchors, strict=True
    ):
        n, _, h, w = regression_per_level.shape
        # (N, 4, H, W) -> (N, H, W, 4) -> (N, HW, 4)
        deltas = regression_per_level.permute(0, 2, 3, 1).reshape(n, h * w, 4)
        # (N, 1, H, W) -> (N, H, W, 1) -> (N, HW)
        center_probs = centerness_per_level.permute(0, 2, 3, 1).reshape(n, h * w).sigmoid()
        class_probs = class_scores_from_token_logits(
            logits_per_level.sigmoid(), positive_map, config.score_agg
        )  # (N, HW, C)
        is_candidate = class_probs > config.pre_nms_thresh  # (N, HW, C)
        # The threshold applied to the class probability; top-k and scores use the product.
        products = class_probs * center_probs[:, :, None]  # (N, HW, C)

        for i in range(num_images):
            # Row-major over (HW, C): location-major, then class.
            locations, classes = torch.nonzero(is_candidate[i], as_tuple=True)
            products_per_image = products[i, locations, classes]  # (M,)
            if products_per_image.shape[0] > config.pre_nms_top_n:
                top = _top_k_in_order(products_per_image, config.pre_nms_top_n)
                locations, classes = locations[top], classes[top]
                products_per_image = products_per_image[top]

            boxes = box_coder.decode(deltas[i, locations], anchors_per_level[locations])
            height, width = image_sizes[i]
            boxes = clip_boxes_to_image(boxes, float(height), float(width))
            keep = remove_small_boxes(boxes, config.min_size)
            boxes_per_image[i].append(boxes[keep])
            scores_per_image[i].append(torch.sqrt(products_per_image[keep]))
            labels_per_image[i].append(classes[keep])

    return [
        merge_detections(
            [Detections(b, s, lab) for b, s, lab in zip(boxes_list, scores_list, labels_list,
                                                        strict=True)], config)
        for boxes_list, scores_list, labels_list in zip(
            boxes_per_image, scores_per_image, labels_per_image, strict=True)
    ]


def merge_detections(parts: Sequence[Detections], config: PostprocessConfig) -> Detections:
    """One image's detections from several parts (FPN levels, or prompt chunks whose labels
    already index one class list): class-aware NMS, the `detections_per_img` best, by score."""
    boxes = torch.cat([part.boxes for part in parts])  # (K, 4), parts in order
    scores = torch.cat([part.scores for part in parts])
    labels = torch.cat([part.labels for part in parts])
    # boxlist_ml_nms returns its input unchanged for a threshold <= 0.
    if config.nms_thresh > 0:
        keep = batched_nms(boxes, scores, labels, config.nms_thresh)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = _select_top_detections(scores, config.detections_per_img)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    order = torch.sort(scores, descending=True, stable=True).indices
    return Detections(boxes=boxes[order], scores=scores[order], labels=labels[order])


def ground_phrases(
    box_regression: Sequence[Tensor],
    centerness: Sequence[Tensor],
    token_logits: Sequence[Tensor],
    anchors: Sequence[Tensor],
    positive_map: Tensor,
    image_size: tuple[int, int],
    box_coder: BoxCoder,
    score_agg: str = "mean",
) -> Detections:
    """Each phrase's one best region, for grounded captions and VQA (GLIPv2's grounding of
    generated tokens: the region with the highest token-region score).

    Inputs as `postprocess_detections`, for ONE image (N = 1); `positive_map` (P, T) has a row
    per phrase. A phrase's probability at a region aggregates its tokens' sigmoid logits as
    detections do (`score_agg`, `class_scores_from_token_logits`);
    the region maximising it wins, and its score is sqrt(probability * sigmoid(centerness)), as
    a detection's. Returns one row per phrase, in phrase order (label p = phrase p); boxes in the
    model-input frame, clipped.
    """
    # per level (1, 4, H, W) -> (HW, 4); (1, 1, H, W) -> (HW,); (1, HW, T) -> (HW, T)
    deltas = torch.cat([b[0].flatten(1).T for b in box_regression])
    center_probs = torch.cat([c[0].flatten() for c in centerness]).sigmoid()
    token_probs = torch.cat([t[0] for t in token_logits]).sigmoid()
    phrase_probs = class_scores_from_token_logits(token_probs[None], positive_map,
                                                  score_agg)[0]  # (A, P)
    best = phrase_probs.argmax(dim=0)  # (P,)
    boxes = box_coder.decode(deltas[best], torch.cat(list(anchors))[best])
    boxes = clip_boxes_to_image(boxes, float(image_size[0]), float(image_size[1]))
    phrases = torch.arange(positive_map.shape[0])
    scores = (phrase_probs[best, phrases] * center_probs[best]).sqrt()
    return Detections(boxes=boxes, scores=scores, labels=phrases)
