"""Training losses of GLIP / GLIPv2: `L = L_loc + L_intra + L_inter + L_mlm`.

- `L_loc`: ATSS assignment of anchors to ground-truth boxes, a GIoU loss on the decoded boxes
  weighted by centerness targets, and a BCE loss on the centerness logits.
- `L_intra`: the region-token "classification as matching" loss, a sigmoid focal loss on the
  dot-product logits of the fused features against the token positive map of the matched box.
- `L_inter`: GLIPv2's inter-image region-word contrastive loss on features *before* fusion,
  all sampled regions of the batch against all tokens of the batch, with label propagation.
- `L_mlm`: masked-language modelling on the fused text features (BERT's 80/10/10 masking).
- soft token prediction (MDETR's, not in GLIP; off unless weighted): each positive anchor's
  softmax over the prompt's tokens against its box's positive tokens. Unlike the per-pair
  sigmoid, it only asks which tokens score highest, so its gradient is the difference between
  competing tokens ("red" vs "blue" at a blue circle) rather than a push on all of them.

Reference: microsoft/GLIP `modeling/rpn/loss.py` (`ATSSLossComputation`: `prepare_targets`,
`GIoULoss`, `compute_centerness_targets`, the dot-product token loss and the shallow contrastive
loss), `layers/sigmoid_focal_loss.py` (`token_sigmoid_binary_focal_loss`),
`structures/boxlist_ops.py` (`boxlist_iou`) and `modeling/detector/generalized_vl_rcnn.py`
(`random_word`). Boxes are `xyxy` pixels of the padded model input, as the anchors.

Where we deliberately differ from the reference, the function docstring says so; in short:
background anchors get all-zero token targets (the reference's disabled "[NoObj] = last token"
target is a no-op whenever the last position is padding), a batch with no ground truth is
allowed, and MLM masking never touches special tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from model_export.processing.box_coding import TO_REMOVE, BoxCoder

# Candidates per level and ground-truth box in ATSS (reference cfg.MODEL.ATSS.TOPK).
ATSS_TOP_K = 9
# An anchor centre must be this far inside a box (pixels) to be a positive (reference: 0.01).
ATSS_INSIDE_MARGIN = 0.01
# Weight of the GIoU loss in L_loc (reference cfg.MODEL.ATSS.REG_LOSS_WEIGHT).
GIOU_LOSS_WEIGHT = 2.0
# Label of tokens the MLM loss ignores (torch cross-entropy's default ignore_index).
MLM_IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class ImageTargets:
    """Ground truth of one image.

    Attributes:
        boxes: (K, 4) float xyxy pixels in the model-input frame (resized, before padding).
        positive_map: (K, T) float 0/1: the tokens of this image's caption each box is positive
            for. T is the batch's padded token count (the width of `token_logits`).
        box_labels: K category names (e.g. "circle"), used for L_inter label propagation.
    """

    boxes: Tensor
    positive_map: Tensor
    box_labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.boxes.dim() != 2 or self.boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be (K, 4), got {tuple(self.boxes.shape)}")
        if self.positive_map.dim() != 2 or self.positive_map.shape[0] != self.boxes.shape[0]:
            raise ValueError(
                f"positive_map must be (K, T) with K = {self.boxes.shape[0]}, "
                f"got {tuple(self.positive_map.shape)}"
            )
        if self.box_labels and len(self.box_labels) != self.boxes.shape[0]:
            raise ValueError(
                f"{len(self.box_labels)} box labels for {self.boxes.shape[0]} boxes"
            )


@dataclass
class PromptInfo:
    """What L_inter label propagation needs to know about one caption of the batch.

    Attributes:
        token_labels: length T (the batch's padded token count): the category the phrase
            covering each token names (e.g. "person"), None for every other token and padding.
        detection_prompt: True for class-name / attribute prompts ("circle. square. red star"),
            whose phrases are labels; False for natural sentences, captions and questions, whose
            phrases are never propagation targets (a "person" in a sentence may be a specific
            person, not every person of the batch).
    """

    token_labels: list[str | None]
    detection_prompt: bool


# --------------------------------------------------------------------------------------------
# Box geometry
# --------------------------------------------------------------------------------------------


def box_iou_legacy(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU with the legacy +1 widths of maskrcnn_benchmark's `boxlist_iou`.

    Args:
        boxes1: (N, 4) xyxy.
        boxes2: (M, 4) xyxy.

    Returns:
        (N, M) IoU in [0, 1].
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0] + TO_REMOVE) * (boxes1[:, 3] - boxes1[:, 1] + TO_REMOVE)
    area2 = (boxes2[:, 2] - boxes2[:, 0] + TO_REMOVE) * (boxes2[:, 3] - boxes2[:, 1] + TO_REMOVE)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = (bottom_right - top_left + TO_REMOVE).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


def _box_centres(boxes: Tensor) -> Tensor:
    """(P, 4) xyxy -> (P, 2) centres `((x0 + x1) / 2, (y0 + y1) / 2)` (the ATSS coder's centre)."""
    return torch.stack(((boxes[:, 0] + boxes[:, 2]) / 2.0, (boxes[:, 1] + boxes[:, 3]) / 2.0), 1)


# --------------------------------------------------------------------------------------------
# ATSS assignment
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Localisation losses
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# L_intra: region-token focal loss
# --------------------------------------------------------------------------------------------


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


def soft_token_loss(logits: Tensor, targets: Tensor, text_mask: Tensor) -> Tensor:
    """MDETR's soft token prediction on the region-token logits, mean over positive anchors.

    Each anchor with a positive token gets `-mean_{positives} log softmax(logits)` over its
    image's valid tokens (`_multi_positive_nll`, L_inter's too); background anchors and padding
    take no part. 0 (connected to the graph) when no anchor is positive.

    Args:
        logits: (N, A, T) region-token logits.
        targets: (N, A, T) 0/1 targets.
        text_mask: (N, T) attention mask, nonzero = real token.
    """
    valid = (text_mask > 0)[:, None, :].expand_as(logits)
    return _multi_positive_nll(logits.flatten(0, 1), targets.flatten(0, 1), valid.flatten(0, 1))


# --------------------------------------------------------------------------------------------
# L_loc + L_intra over the head outputs
# --------------------------------------------------------------------------------------------


@dataclass
class DetectionLosses:
    """ATSS detection losses of a batch (already normalised; add them, with any task weights).

    Attributes:
        loss_box_giou: scalar, centerness-weighted GIoU loss / sum of centerness targets,
            times `giou_weight` (2.0, the reference REG_LOSS_WEIGHT).
        loss_centerness: scalar, BCE-with-logits on positive anchors / number of positives.
        loss_token: scalar, token focal loss over all anchors and valid tokens / number of
            positives (L_intra).
        loss_soft_token: scalar, `soft_token_loss` over the positive anchors; None unless
            asked for (`soft_token=True`).
        num_positives: positive anchors of the batch, averaged over processes, clamped >= 1 (the
            normaliser used).
        matched_gt: per image (A,) int64 matched box index of every anchor (levels concatenated,
            the order of the flattened head outputs), -1 for background: the regions and labels
            L_inter is built from (see `contrastive_region_inputs`).
    """

    loss_box_giou: Tensor
    loss_centerness: Tensor
    loss_token: Tensor
    num_positives: float
    matched_gt: list[Tensor] = field(default_factory=list)
    loss_soft_token: Tensor | None = None

    def total(self) -> Tensor:
        """Unweighted sum of the three losses."""
        return self.loss_box_giou + self.loss_centerness + self.loss_token


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _mean_over_processes(value: float, device: torch.device) -> float:
    """The reference's `reduce_sum(x) / world_size`: normalisers agree across DDP ranks."""
    if not _distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def flatten_head_outputs(
    box_regression: Sequence[Tensor],
    centerness: Sequence[Tensor],
    token_logits: Sequence[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate per-level head outputs into the anchor order of `atss_assign`.

    Args:
        box_regression: per level (N, 4, H, W).
        centerness: per level (N, 1, H, W).
        token_logits: per level (N, H*W, T).

    Returns:
        (N, A, 4) deltas, (N, A) centerness logits, (N, A, T) token logits; A = sum of H*W,
        locations row-major within a level (the anchors' order).
    """
    n = box_regression[0].shape[0]
    # (N, 4, H, W) -> (N, H, W, 4) -> (N, HW, 4)
    deltas = torch.cat([b.permute(0, 2, 3, 1).reshape(n, -1, 4) for b in box_regression], 1)
    # (N, 1, H, W) -> (N, HW)
    ctr = torch.cat([c.permute(0, 2, 3, 1).reshape(n, -1) for c in centerness], dim=1)
    logits = torch.cat(list(token_logits), dim=1)  # (N, HW_l, T) -> (N, A, T)
    return deltas, ctr, logits


def detection_losses(
    outputs_box_regression: Sequence[Tensor],
    outputs_centerness: Sequence[Tensor],
    outputs_token_logits: Sequence[Tensor],
    anchors: Sequence[Tensor],
    targets: Sequence[ImageTargets],
    text_mask: Tensor,
    box_coder: BoxCoder,
    *,
    top_k: int = ATSS_TOP_K,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    giou_weight: float = GIOU_LOSS_WEIGHT,
    matched_gt: Sequence[Tensor] | None = None,
    soft_token: bool = False,
) -> DetectionLosses:
    """L_loc and L_intra of a batch, normalised as the reference `ATSSLossComputation`.

    - positives = anchors ATSS matches to a box; `num_pos = max(total / world_size, 1)`;
    - box loss = `giou_loss(decode(deltas), target boxes, weight=centerness targets)` divided
      by the centerness-target sum (averaged over processes), times `giou_weight`; target boxes
      are `decode(encode(gt))` as in the reference (this applies the decoder's clamp of dw, dh
      to extreme gt / anchor size ratios);
    - centerness loss = BCE-with-logits summed over positives / num_pos;
    - token loss = `token_sigmoid_focal_loss` over all anchors / num_pos: a positive anchor's
      targets are its box's positive-map row, a background anchor's are all zero.
    With no positive at all, the box and centerness losses are 0 (still connected to the graph).

    Args:
        outputs_box_regression: per level (N, 4, H_l, W_l) deltas (`Glipv2Output.box_regression`).
        outputs_centerness: per level (N, 1, H_l, W_l) logits.
        outputs_token_logits: per level (N, H_l * W_l, T) region-token logits.
        anchors: per level (H_l * W_l, 4) xyxy anchors, shared by the (padded) batch.
        targets: per image ground truth; `positive_map` widths must be T.
        text_mask: (N, T) attention mask of the captions.
        box_coder: the head's box coder.
        top_k: ATSS candidates per level.
        focal_alpha, focal_gamma: token focal loss parameters (reference TOKEN_ALPHA, _GAMMA).
        giou_weight: factor on the box loss (reference ATSS.REG_LOSS_WEIGHT).
        matched_gt: precomputed `match_anchors(anchors, targets, top_k)`, to skip re-matching.
        soft_token: also compute `soft_token_loss` (off: the trainer weights it only if set).

    Returns:
        The three losses, the normaliser and the per-image matches.
    """
    deltas, ctr_logits, token_logits = flatten_head_outputs(
        outputs_box_regression, outputs_centerness, outputs_token_logits
    )
    # Losses in float32 under mixed precision, as the reference (`custom_fwd(cast_inputs=...)`).
    deltas, ctr_logits, token_logits = deltas.float(), ctr_logits.float(), token_logits.float()
    n, num_anchors, num_tokens = token_logits.shape
    if len(targets) != n:
        raise ValueError(f"{len(targets)} targets for a batch of {n}")
    all_anchors = torch.cat(list(anchors), dim=0).to(deltas)  # (A, 4)
    if all_anchors.shape[0] != num_anchors:
        raise ValueError(f"{all_anchors.shape[0]} anchors for {num_anchors} head locations")
    if matched_gt is None:
        matched_gt = match_anchors(anchors, targets, top_k)
    matched_gt = [m.to(deltas.device) for m in matched_gt]

    for i, target in enumerate(targets):
        if target.positive_map.shape[1] != num_tokens:
            raise ValueError(
                f"image {i}: positive_map has {target.positive_map.shape[1]} tokens, "
                f"logits have {num_tokens}"
            )
    # All images at once: (N, A) matches index each image's padded boxes and positive maps.
    matched = torch.stack(matched_gt)
    positive = matched >= 0
    token_targets = torch.zeros_like(token_logits)  # (N, A, T); background rows stay zero
    gt_boxes = deltas.new_zeros(n, num_anchors, 4)
    if any(len(target.boxes) for target in targets):
        rows, gt_index = torch.arange(n, device=deltas.device)[:, None], matched.clamp(min=0)
        maps = pad_sequence([t.positive_map.to(token_targets) for t in targets], batch_first=True)
        token_targets = maps[rows, gt_index] * positive[..., None]
        boxes = pad_sequence([t.boxes.to(deltas) for t in targets], batch_first=True)
        gt_boxes = boxes[rows, gt_index]  # (N, A, 4)
    pos_deltas_all = deltas[positive]  # (P, 4), image by image
    pos_ctr_all = ctr_logits[positive]  # (P,)
    pos_anchors_all = all_anchors.expand(n, -1, -1)[positive]
    pos_gt_all = gt_boxes[positive]
    num_pos_local = int(pos_deltas_all.shape[0])
    num_pos = max(_mean_over_processes(float(num_pos_local), deltas.device), 1.0)

    loss_token = (
        token_sigmoid_focal_loss(token_logits, token_targets, text_mask, focal_alpha, focal_gamma)
        / num_pos
    )
    if num_pos_local > 0:
        target_boxes = box_coder.decode(box_coder.encode(pos_gt_all, pos_anchors_all),
                                        pos_anchors_all)
        ctr_targets = centerness_targets(pos_anchors_all, target_boxes)
        ctr_sum = _mean_over_processes(float(ctr_targets.sum()), deltas.device)
        pred_boxes = box_coder.decode(pos_deltas_all, pos_anchors_all)
        loss_box = giou_loss(pred_boxes, target_boxes, ctr_targets) / ctr_sum * giou_weight
        loss_ctr = F.binary_cross_entropy_with_logits(
            pos_ctr_all, ctr_targets, reduction="sum"
        ) / num_pos
    else:
        # Keep the other ranks' all-reduce in step and the graph connected.
        _mean_over_processes(0.0, deltas.device)
        loss_box = pos_deltas_all.sum()
        loss_ctr = pos_ctr_all.sum()
    return DetectionLosses(
        loss_box_giou=loss_box,
        loss_centerness=loss_ctr,
        loss_token=loss_token,
        num_positives=num_pos,
        matched_gt=list(matched_gt),
        loss_soft_token=(soft_token_loss(token_logits, token_targets, text_mask)
                         if soft_token else None),
    )


# --------------------------------------------------------------------------------------------
# L_inter: inter-image region-word contrastive loss with label propagation
# --------------------------------------------------------------------------------------------


def contrastive_region_inputs(
    matched_gt: Sequence[Tensor],
    targets: Sequence[ImageTargets],
    region_indices: Sequence[Tensor],
) -> tuple[list[list[str | None]], list[Tensor]]:
    """Labels and own-caption positive maps of the regions sampled for L_inter.

    Args:
        matched_gt: per image (A,) int64 matched box per anchor, -1 background
            (`DetectionLosses.matched_gt`).
        targets: per image ground truth.
        region_indices: per image (R_i,) int64 anchor indices sampled as regions (e.g. the
            positives, capped, plus some background anchors).

    Returns:
        `region_box_labels` (per image, per region: its box's category or None) and
        `region_positive` (per image (R_i, T) float positive-map rows, zero for background),
        the inputs of `inter_image_contrastive_targets`.
    """
    labels: list[list[str | None]] = []
    positives: list[Tensor] = []
    for match, target, idx in zip(matched_gt, targets, region_indices, strict=True):
        gt = match[idx.to(match.device)].cpu()
        num_tokens = target.positive_map.shape[1]
        rows = torch.zeros(len(gt), num_tokens, dtype=target.positive_map.dtype,
                           device=target.positive_map.device)
        fg = gt >= 0
        if fg.any():
            rows[fg] = target.positive_map[gt[fg].to(target.positive_map.device)]
        if target.box_labels:
            labels.append([target.box_labels[g] if g >= 0 else None for g in gt.tolist()])
        else:
            labels.append([None] * len(gt))
        positives.append(rows)
    return labels, positives


def inter_image_contrastive_targets(
    region_box_labels: Sequence[Sequence[str | None]],
    region_positive: Sequence[Tensor],
    prompts: Sequence[PromptInfo],
) -> Tensor:
    """GLIPv2's L_inter target matrix: every sampled region against every token of the batch.

    Region r of image i is positive for token t of caption j when
    - j == i and `region_positive[i][r, t] > 0` (its own caption's grounding), or
    - j != i, caption j is a detection prompt, and token t of caption j names r's category
      (label propagation: a "person" region is positive for the "person" phrase of every other
      detection prompt of the batch). Natural-sentence captions never receive propagated
      positives, and background regions (category None) never propagate.

    Args:
        region_box_labels: per image (N of them), per region: the category of its matched box,
            None for background.
        region_positive: per image (R_i, T) positive-map rows of the matched boxes (zeros for
            background), in the image's own caption.
        prompts: per image the caption's `PromptInfo` (token_labels of length T).

    Returns:
        (R_total, N * T) float 0/1, rows = regions in image order, columns = caption j's token
        t at `j * T + t`.
    """
    n = len(prompts)
    if not len(region_box_labels) == len(region_positive) == n:
        raise ValueError("need one region label list, positive map and prompt per image")
    if n == 0:
        return torch.zeros(0, 0)
    token_counts = {len(p.token_labels) for p in prompts}
    if len(token_counts) != 1:
        raise ValueError(f"prompts disagree on the token count: {sorted(token_counts)}")
    t = token_counts.pop()
    device = region_positive[0].device

    # Categories as integers, so that matching is one broadcast comparison. Tokens that cannot
    # receive propagated positives (no category, or a non-detection caption) get -1; regions
    # without a category get -2: the two never compare equal.
    category_ids: dict[str, int] = {}
    token_ids = torch.full((n, t), -1, dtype=torch.int64)
    for j, prompt in enumerate(prompts):
        if not prompt.detection_prompt:
            continue
        for col, name in enumerate(prompt.token_labels):
            if name is not None:
                token_ids[j, col] = category_ids.setdefault(name, len(category_ids))
    region_ids, region_image, own_rows = [], [], []
    for i, (labels_i, positive_i) in enumerate(zip(region_box_labels, region_positive,
                                                    strict=True)):
        r = len(labels_i)
        if positive_i.shape != (r, t):
            raise ValueError(f"image {i}: region_positive is {tuple(positive_i.shape)}, "
                             f"expected {(r, t)}")
        region_ids += [category_ids.get(name, -2) if name is not None else -2
                       for name in labels_i]
        region_image += [i] * r
        own_rows.append(positive_i.detach().to("cpu", torch.float32) > 0)
    regions = torch.tensor(region_ids, dtype=torch.int64)  # (R,)
    images = torch.tensor(region_image, dtype=torch.int64)  # (R,)
    column_image = torch.arange(n).repeat_interleave(t)  # (N*T,) caption of each column

    propagated = regions[:, None] == token_ids.reshape(-1)[None, :]  # (R, N*T)
    own_block = images[:, None] == column_image[None, :]  # (R, N*T)
    own = torch.zeros_like(propagated)
    # Each region's own caption block takes its positive-map row: (R, T) -> (R, N*T).
    own[own_block] = torch.cat(own_rows, dim=0).reshape(-1)
    targets = own | (propagated & ~own_block)
    return targets.float().to(device)


def _multi_positive_nll(logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """Mean over rows with a positive of `-mean_{positives} log softmax(row over valid cols)`.

    logits, targets: (R, C); valid: (C,) or (R, C) bool. Invalid columns take no softmax mass
    and are never positives. Returns 0 (connected to the graph) when no row has a positive.
    """
    valid = valid.expand_as(logits)
    positives = (targets > 0) & valid
    has_pos = positives.any(dim=1)
    if not bool(has_pos.any()):
        return logits.sum() * 0.0
    log_prob = logits[has_pos].masked_fill(~valid[has_pos], -math.inf).log_softmax(dim=1)  # (R', C)
    pos = positives[has_pos]
    pos_log_prob = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return (-pos_log_prob / pos.sum(dim=1)).mean()


def inter_image_contrastive_loss(
    region_features: Tensor,
    token_features: Tensor,
    targets: Tensor,
    token_valid: Tensor,
    temperature: float | Tensor = 1.0,
) -> Tensor:
    """Bidirectional multi-positive contrastive loss between regions and tokens (L_inter).

    Features are L2-normalised and `logits = region · tokenᵀ / temperature` (R_total, N * T).
    Each direction is a softmax cross-entropy whose target is the uniform distribution over the
    positives (GLIP's shallow contrastive `NllSoftMaxLoss` with a row-normalised positive map,
    also MDETR's contrastive-align form): for a row with positives P,
    `-1/|P| * sum_{p in P} log softmax(row)_p`. This is principled for several positives per
    row (the expected negative log-likelihood under the target distribution, minimised only when
    the probability mass is spread over the positives) and does not make positives compete
    harder than negatives, as a per-positive InfoNCE would.
    - region -> tokens: softmax over all valid tokens of the batch, for regions with a positive;
    - token -> regions: softmax over all regions, for valid tokens with a positive.
    Rows / columns without a positive are skipped (they are still negatives for the others).
    Loss = (mean over regions + mean over tokens) / 2. (The reference sums rows and divides by
    the number of positive anchors; means keep the scale independent of batch composition.)

    Args:
        region_features: (R_total, D) pre-fusion features of the sampled regions, projected.
        token_features: (N * T, D) pre-fusion token features of all captions, projected.
        targets: (R_total, N * T) 0/1 from `inter_image_contrastive_targets`.
        token_valid: (N * T,) bool, False for padding (excluded from every softmax).
        temperature: softmax temperature, > 0 (a float, or e.g. `log_scale.exp()` to learn it).

    Returns:
        Scalar loss (0 when there is no positive pair).
    """
    if targets.shape != (region_features.shape[0], token_features.shape[0]):
        raise ValueError(
            f"targets {tuple(targets.shape)} vs {region_features.shape[0]} regions and "
            f"{token_features.shape[0]} tokens"
        )
    regions = F.normalize(region_features, p=2, dim=-1)
    tokens = F.normalize(token_features, p=2, dim=-1)
    logits = regions @ tokens.t() / temperature  # (R, N*T)
    targets = targets.to(logits.device)
    token_valid = token_valid.to(device=logits.device, dtype=torch.bool)
    region_valid = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    region_to_token = _multi_positive_nll(logits, targets, token_valid)
    token_positive = targets.t() * token_valid[:, None]
    token_to_region = _multi_positive_nll(logits.t(), token_positive, region_valid)
    return (region_to_token + token_to_region) / 2


# --------------------------------------------------------------------------------------------
# L_mlm
# --------------------------------------------------------------------------------------------


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
    label -100. Unlike the reference `random_word`, special tokens ([CLS], [SEP]) are never
    chosen: predicting them teaches nothing and a masked [SEP] would change the text.

    Args:
        input_ids: (N, T) int64 token ids.
        attention_mask: (N, T), nonzero = real token (zero = padding, never chosen).
        tokenizer_specials: mask id and never-masked ids.
        vocab_size: size of the vocabulary random replacements are drawn from.
        probability: chance of choosing each eligible token.
        generator: torch generator for reproducible masks (on the ids' device).

    Returns:
        (masked_ids (N, T), labels (N, T) with -100 where not chosen).
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
    """Masked-language-model cross-entropy, mean over chosen tokens (labels != -100).

    Args:
        logits: (N, T, V) vocabulary logits (`Glipv2Output.mlm_logits`).
        labels: (N, T) original ids of chosen tokens, -100 elsewhere (`mask_tokens`).

    Returns:
        Scalar; 0 (connected to the graph) when no token was chosen, where a plain mean would
        be NaN.
    """
    if not bool((labels != MLM_IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    vocab = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1),
                           ignore_index=MLM_IGNORE_INDEX)


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
