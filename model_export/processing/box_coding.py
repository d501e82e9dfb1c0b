"""Box coding of the GLIP ATSS head, plus clipping and rescaling in the reference's conventions.

All boxes are `xyxy` in pixels of one image frame. The reference (maskrcnn_benchmark) uses the
legacy "+1" pixel convention: a box covering pixels x0..x1 inclusive has width `x1 - x0 + 1`, and
an image of width w has valid x coordinates in [0, w - 1]. This module is the one place that
convention is written down: `TO_REMOVE`, `legacy_sizes`, `legacy_areas`, `box_iou_legacy`, and
`to_legacy` / `to_exclusive` between it and the end-exclusive boxes of the data and the API.

Reference: microsoft/GLIP `modeling/rpn/vldyhead.py` (`BoxCoder`, the ATSS coder, which differs
from `modeling/box_coder.py`: its centre is `(x0 + x1) / 2`, not `x0 + 0.5 * width`) and
`structures/bounding_box.py` (`BoxList.clip_to_image`, `BoxList.resize`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from model_export.modeling.config import HeadConfig

# Legacy pixel convention of maskrcnn_benchmark: widths are x1 - x0 + 1.
TO_REMOVE = 1.0


def legacy_sizes(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """(..., 4) xyxy boxes -> their (...,) widths and heights with the legacy +1."""
    return boxes[..., 2] - boxes[..., 0] + TO_REMOVE, boxes[..., 3] - boxes[..., 1] + TO_REMOVE


def legacy_areas(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy boxes -> their (...,) areas with the legacy +1 widths and heights."""
    widths, heights = legacy_sizes(boxes)
    return widths * heights


def box_iou_legacy(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU with the legacy +1 widths of maskrcnn_benchmark's `boxlist_iou`.

    Also the IoU of the reference NMS kernel (ml_nms.cu's devIoU) on float32 boxes: the same
    float operations in the same order.

    Args:
        boxes1: (N, 4) xyxy.
        boxes2: (M, 4) xyxy.

    Returns:
        (N, M) IoU in [0, 1]; NaN where both boxes have zero +1 area (0 / 0).
    """
    area1 = legacy_areas(boxes1)
    area2 = legacy_areas(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = (bottom_right - top_left + TO_REMOVE).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


def _end_offset(boxes: Tensor) -> Tensor:
    """(4,) offset of the end corner between the two conventions, in `boxes`' dtype and device."""
    return torch.tensor([0.0, 0.0, TO_REMOVE, TO_REMOVE], dtype=boxes.dtype, device=boxes.device)


def to_legacy(boxes: Tensor) -> Tensor:
    """End-exclusive (..., 4) [x0, y0, x1, y1] -> legacy boxes (x1, y1 = last pixel)."""
    return boxes - _end_offset(boxes)


def to_exclusive(boxes: Tensor) -> Tensor:
    """Legacy (..., 4) boxes (x1, y1 = last pixel) -> the API's end-exclusive [x0, y0, x1, y1]."""
    return boxes + _end_offset(boxes)


class BoxCoder:
    """Encodes boxes as deltas `(dx, dy, dw, dh)` relative to anchors, and decodes them back.

    With anchor width `wa = ax1 - ax0 + 1` and centre `cxa = (ax0 + ax1) / 2` (same for y):
    `dx = wx * (cx - cxa) / wa`, `dw = ww * log(w / wa)`. Decoding inverts this, clamping
    `dw / ww` and `dh / wh` from above at `bbox_xform_clip` before `exp`, and returns
    `x0 = cx - 0.5 * (w - 1)`, `x1 = cx + 0.5 * (w - 1)`.
    """

    def __init__(
        self,
        weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        bbox_xform_clip: float = math.log(1000.0 / 16),
    ) -> None:
        if len(weights) != 4:
            raise ValueError(f"weights must have 4 entries (wx, wy, ww, wh), got {len(weights)}")
        self.weights: tuple[float, float, float, float] = (
            float(weights[0]),
            float(weights[1]),
            float(weights[2]),
            float(weights[3]),
        )
        self.bbox_xform_clip = float(bbox_xform_clip)

    @classmethod
    def from_config(cls, head: HeadConfig) -> BoxCoder:
        return cls(weights=head.box_coder_weights, bbox_xform_clip=head.box_delta_clamp)

    def encode(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """Regression targets of `gt_boxes` w.r.t. `anchors`.

        Args:
            gt_boxes: (..., 4) xyxy boxes to encode.
            anchors: (..., 4) xyxy anchors, broadcastable against `gt_boxes`.

        Returns:
            (..., 4) deltas (dx, dy, dw, dh), weighted by `weights`.
        """
        wx, wy, ww, wh = self.weights
        ex_widths, ex_heights = legacy_sizes(anchors)
        ex_ctr_x = (anchors[..., 2] + anchors[..., 0]) / 2
        ex_ctr_y = (anchors[..., 3] + anchors[..., 1]) / 2

        gt_widths, gt_heights = legacy_sizes(gt_boxes)
        gt_ctr_x = (gt_boxes[..., 2] + gt_boxes[..., 0]) / 2
        gt_ctr_y = (gt_boxes[..., 3] + gt_boxes[..., 1]) / 2

        # Operation order as in the reference, so float32 results agree bit for bit.
        dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
        dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
        dw = ww * torch.log(gt_widths / ex_widths)
        dh = wh * torch.log(gt_heights / ex_heights)
        return torch.stack((dx, dy, dw, dh), dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes from regression deltas and their anchors.

        Args:
            deltas: (..., 4) predicted (dx, dy, dw, dh), as the head outputs them.
            anchors: (..., 4) xyxy anchors, broadcastable against `deltas`; cast to
                `deltas.dtype`.

        Returns:
            (..., 4) xyxy boxes, same frame as the anchors (not clipped).
        """
        anchors = anchors.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths, heights = legacy_sizes(anchors)
        ctr_x = (anchors[..., 2] + anchors[..., 0]) / 2
        ctr_y = (anchors[..., 3] + anchors[..., 1]) / 2

        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        # Only an upper clamp, as in the reference: it keeps exp() finite; tiny boxes are allowed.
        dw = torch.clamp(deltas[..., 2] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(deltas[..., 3] / wh, max=self.bbox_xform_clip)

        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        pred_w = torch.exp(dw) * widths
        pred_h = torch.exp(dh) * heights

        x0 = pred_ctr_x - 0.5 * (pred_w - TO_REMOVE)
        y0 = pred_ctr_y - 0.5 * (pred_h - TO_REMOVE)
        x1 = pred_ctr_x + 0.5 * (pred_w - TO_REMOVE)
        y1 = pred_ctr_y + 0.5 * (pred_h - TO_REMOVE)
        return torch.stack((x0, y0, x1, y1), dim=-1)


def clip_boxes_to_image(boxes: Tensor, height: float, width: float) -> Tensor:
    """Clamp xyxy boxes into an image of `height` x `width` pixels (reference `clip_to_image`).

    x is clamped to [0, width - 1] and y to [0, height - 1] (legacy +1 convention). Boxes that
    become empty are kept; `remove_empty=False` is what the ATSS post-processing uses.

    Args:
        boxes: (..., 4) xyxy boxes.
        height, width: image size in pixels (the resized image, before batch padding).

    Returns:
        (..., 4) clipped boxes.
    """
    max_x = float(width) - TO_REMOVE
    max_y = float(height) - TO_REMOVE
    x0 = boxes[..., 0].clamp(min=0, max=max_x)
    y0 = boxes[..., 1].clamp(min=0, max=max_y)
    x1 = boxes[..., 2].clamp(min=0, max=max_x)
    y1 = boxes[..., 3].clamp(min=0, max=max_y)
    return torch.stack((x0, y0, x1, y1), dim=-1)


def rescale_boxes(
    boxes: Tensor, from_hw: tuple[float, float], to_hw: tuple[float, float]
) -> Tensor:
    """Map xyxy boxes from an image of size `from_hw` to one of size `to_hw` (`BoxList.resize`).

    Every coordinate is multiplied by its axis ratio (x by `to_w / from_w`, y by
    `to_h / from_h`); there is no +1 correction: the reference scales `x1` itself, not
    `x1 + 1`. Used to take detections from the model-input frame back to the original image.

    Args:
        boxes: (..., 4) xyxy boxes in the `from_hw` frame.
        from_hw: (height, width) of the frame the boxes are in.
        to_hw: (height, width) of the target frame.

    Returns:
        (..., 4) xyxy boxes in the `to_hw` frame.
    """
    ratio_h = float(to_hw[0]) / float(from_hw[0])
    ratio_w = float(to_hw[1]) / float(from_hw[1])
    # Python-float scalars, as in the reference (the ratio is applied in the boxes' dtype).
    return torch.stack(
        (
            boxes[..., 0] * ratio_w,
            boxes[..., 1] * ratio_h,
            boxes[..., 2] * ratio_w,
            boxes[..., 3] * ratio_h,
        ),
        dim=-1,
    )

