"""L_loc: ATSS assignment of anchors to ground-truth boxes, the GIoU loss on the decoded boxes
and the centerness targets that weight it (the centerness BCE itself is in `detection`).

Reference: microsoft/GLIP `modeling/rpn/loss.py` (`ATSSLossComputation.prepare_targets`,
`GIoULoss`, `compute_centerness_targets`) and `structures/boxlist_ops.py` (`boxlist_iou`, here
`box_coding.box_iou_legacy`). Boxes are `xyxy` pixels of the padded model input, as the anchors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from model_export.processing.box_coding import box_iou_legacy
from model_export.training.losses.targets import ImageTargets

# Candidates per level and ground-truth box in ATSS (reference cfg.MODEL.ATSS.TOPK).
ATSS_TOP_K = 9
# An anchor centre must be this far inside a box (pixels) to be a positive (reference: 0.01).
ATSS_INSIDE_MARGIN = 0.01
# Weight of the GIoU loss in L_loc (reference cfg.MODEL.ATSS.REG_LOSS_WEIGHT).
GIOU_LOSS_WEIGHT = 2.0


def _box_centres(boxes: Tensor) -> Tensor:
    """(P, 4) xyxy -> (P, 2) centres `((x0 + x1) / 2, (y0 + y1) / 2)` (the ATSS coder's centre)."""
    return torch.stack(((boxes[:, 0] + boxes[:, 2]) / 2.0, (boxes[:, 1] + boxes[:, 3]) / 2.0), 1)


@torch.no_grad()
def atss_assign(anchors: Sequence[Tensor], gt_boxes: Tensor, top_k: int = ATSS_TOP_K) -> Tensor:
    """Adaptive training sample selection (Zhang et al. 2020), as the reference `prepare_targets`.

    For every ground-truth box:
    1. on each level, the `min(top_k, HW_l)` anchors whose centres are closest (Euclidean) to
       the box centre are candidates;
    2. the IoU threshold is mean + std (unbiased) of the candidates' IoUs, all levels together
       (IoU with the legacy +1 widths);
    3. a candidate is positive when its IoU >= the threshold and its centre lies inside the box
       by more than 0.01 pixel on all four sides (the reference's `min(l, t, r, b) > 0.01`).
    An anchor positive for several boxes takes the one with the highest IoU (first on ties).

    Args:
        anchors: per level (HW_l, 4) xyxy anchors, finest first (one anchor per location).
        gt_boxes: (K, 4) xyxy ground-truth boxes; K may be 0.
        top_k: candidates per level and box (reference cfg.MODEL.ATSS.TOPK = 9).

    Returns:
        (A,) int64, A = sum of HW_l, levels concatenated in order: the matched box index of each
        anchor, -1 for background.
    """
    return atss_assign_batch(anchors, [gt_boxes], top_k)[0]


@torch.no_grad()
def atss_assign_batch(anchors: Sequence[Tensor], gt_boxes: Sequence[Tensor],
                      top_k: int = ATSS_TOP_K) -> Tensor:
    """`atss_assign` of every image at once: boxes padded to the most any image has, padding
    slots never positive. No per-image loop and no host sync, which a GPU step would wait on.

    Returns (N, A) int64 matched box indices, -1 for background.
    """
    num_per_level = [int(a.shape[0]) for a in anchors]
    all_anchors = torch.cat(list(anchors), dim=0)  # (A, 4)
    num_anchors = all_anchors.shape[0]
    device, dtype = all_anchors.device, all_anchors.dtype
    background = torch.full((len(gt_boxes), num_anchors), -1, dtype=torch.int64, device=device)
    num_gt = max((int(b.shape[0]) for b in gt_boxes), default=0)
    if num_gt == 0 or num_anchors == 0:
        return background
    boxes = pad_sequence([b.to(device=device, dtype=dtype) for b in gt_boxes],
                         batch_first=True)  # (N, K, 4)
    real = pad_sequence([torch.ones(len(b), dtype=torch.bool, device=device) for b in gt_boxes],
                        batch_first=True)  # (N, K)

    ious = box_iou_legacy(all_anchors, boxes.flatten(0, 1)).unflatten(1, boxes.shape[:2])
    ious = ious.permute(1, 0, 2)  # (N, A, K)
    anchor_centres = _box_centres(all_anchors)  # (A, 2)
    gt_centres = _box_centres(boxes.flatten(0, 1)).unflatten(0, boxes.shape[:2])  # (N, K, 2)
    distances = (anchor_centres[None, :, None] - gt_centres[:, None]).pow(2).sum(-1).sqrt()

    candidates_per_level = []
    start = 0
    for count_per_level in num_per_level:
        k = min(top_k, count_per_level)
        if k > 0:
            distances_per_level = distances[:, start:start + count_per_level]  # (N, HW_l, K)
            _, idx = distances_per_level.topk(k, dim=1, largest=False)  # (N, k, K)
            candidates_per_level.append(idx + start)
        start += count_per_level
    candidates = torch.cat(candidates_per_level, dim=1)  # (N, C, K) anchor indices per box

    candidate_ious = ious.gather(1, candidates)  # (N, C, K)
    # With a single candidate the unbiased std is NaN; the reference then has no positive.
    # We use std 0 (threshold = that candidate's IoU), which keeps tiny pyramids trainable.
    iou_std = (candidate_ious.std(dim=1) if candidates.shape[1] > 1
               else torch.zeros_like(candidate_ious[:, 0]))
    iou_threshold = candidate_ious.mean(dim=1) + iou_std  # (N, K)
    is_pos = (candidate_ious >= iou_threshold[:, None]) & real[:, None]

    centres = anchor_centres[candidates]  # (N, C, K, 2)
    left = centres[..., 0] - boxes[:, None, :, 0]
    top = centres[..., 1] - boxes[:, None, :, 1]
    right = boxes[:, None, :, 2] - centres[..., 0]
    bottom = boxes[:, None, :, 3] - centres[..., 1]
    inside = torch.stack((left, top, right, bottom), dim=-1).amin(dim=-1) > ATSS_INSIDE_MARGIN
    is_pos = is_pos & inside

    # (N, A, K) IoU of positive (anchor, box) pairs, -inf elsewhere (a candidate is one anchor
    # per level and box, so no pair is written twice); max over boxes resolves anchors that
    # are positive for several boxes.
    pair_ious = torch.full_like(ious, -math.inf).scatter(
        1, candidates, torch.where(is_pos, candidate_ious, -math.inf))
    best_iou, best_gt = pair_ious.max(dim=2)
    return torch.where(best_iou == -math.inf, background, best_gt)


def match_anchors(
    anchors: Sequence[Tensor], targets: Sequence[ImageTargets], top_k: int = ATSS_TOP_K
) -> list[Tensor]:
    """`atss_assign` per image: a list of (A,) int64 matched box indices, -1 for background."""
    return list(atss_assign_batch(anchors, [t.boxes for t in targets], top_k).unbind(0))


def centerness_targets(anchors: Tensor, gt: Tensor) -> Tensor:
    """Centerness of each anchor centre in its matched box (reference `compute_centerness_targets`).

    With the anchor centre `((x0 + x1) / 2, (y0 + y1) / 2)` and its distances l, t, r, b to the
    box sides: `sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`, 1 at the box centre and
    0 on its border. Only meaningful for centres inside the box (ATSS positives are).

    Args:
        anchors: (P, 4) xyxy anchors.
        gt: (P, 4) xyxy boxes matched to them.

    Returns:
        (P,) targets in [0, 1].
    """
    centres = _box_centres(anchors)
    left = centres[:, 0] - gt[:, 0]
    top = centres[:, 1] - gt[:, 1]
    right = gt[:, 2] - centres[:, 0]
    bottom = gt[:, 3] - centres[:, 1]
    left_right = torch.stack((left, right), dim=1)
    top_bottom = torch.stack((top, bottom), dim=1)
    ratio = (left_right.amin(dim=1) / left_right.amax(dim=1)) * (
        top_bottom.amin(dim=1) / top_bottom.amax(dim=1)
    )
    return torch.sqrt(ratio)


def giou_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Summed `1 - GIoU` of predicted and target boxes, as the reference ATSS `GIoULoss`.

    Conventions reproduced from the reference: areas are `(x1 - x0) * (y1 - y0)` with NO +1
    (unlike the +1 IoU of the assignment); predicted x1, y1 are first raised to at least x0, y0;
    the intersection counts only when strictly positive in both axes; 1e-7 is added to the
    union and to the enclosing area. With `weight` (and a positive weight sum) the losses are
    weighted, else plainly summed. The caller normalises.

    Args:
        pred: (P, 4) xyxy predicted boxes (decoded).
        target: (P, 4) xyxy target boxes.
        weight: optional (P,) per-box weights (centerness targets in ATSS).

    Returns:
        Scalar sum over the P boxes.
    """
    pred_x0, pred_y0 = pred[:, 0], pred[:, 1]
    pred_x1 = torch.max(pred_x0, pred[:, 2])
    pred_y1 = torch.max(pred_y0, pred[:, 3])
    pred_area = (pred_x1 - pred_x0) * (pred_y1 - pred_y0)
    tgt_x0, tgt_y0, tgt_x1, tgt_y1 = target.unbind(dim=1)
    target_area = (tgt_x1 - tgt_x0) * (tgt_y1 - tgt_y0)

    inter_w = torch.min(pred_x1, tgt_x1) - torch.max(pred_x0, tgt_x0)
    inter_h = torch.min(pred_y1, tgt_y1) - torch.max(pred_y0, tgt_y0)
    overlaps = (inter_w > 0) & (inter_h > 0)
    # where() rather than clamp so that, as in the reference, a zero-area intersection has
    # no gradient.
    area_inter = torch.where(overlaps, inter_w * inter_h, torch.zeros_like(inter_w))

    enclosing_w = torch.max(pred_x1, tgt_x1) - torch.min(pred_x0, tgt_x0)
    enclosing_h = torch.max(pred_y1, tgt_y1) - torch.min(pred_y0, tgt_y0)
    area_enclosing = enclosing_w * enclosing_h + 1e-7
    area_union = pred_area + target_area - area_inter + 1e-7
    ious = area_inter / area_union
    gious = ious - (area_enclosing - area_union) / area_enclosing
    losses = 1.0 - gious
    if weight is not None and bool(weight.sum() > 0):
        return (losses * weight).sum()
    return losses.sum()

