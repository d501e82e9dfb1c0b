"""L_loc + L_intra over the head outputs: the ATSS detection losses of a batch.

Reference: microsoft/GLIP `modeling/rpn/loss.py` (`ATSSLossComputation`). Where we deliberately
differ: background anchors get all-zero token targets (the reference's disabled "[NoObj] = last
token" target is a no-op whenever the last position is padding), and a batch with no ground
truth is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from model_export.processing.box_coding import BoxCoder
from model_export.training.losses.intra import token_sigmoid_focal_loss
from model_export.training.losses.localization import (
    ATSS_TOP_K,
    GIOU_LOSS_WEIGHT,
    centerness_targets,
    giou_loss,
    match_anchors,
)
from model_export.training.losses.soft_token import soft_token_loss
from model_export.training.losses.targets import ImageTargets


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

