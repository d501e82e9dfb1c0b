"""Referring segmentation: mask IoU of expressions with referents, and the share of no-referent
expressions answered with no segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model_export.evaluation.metrics.intervals import mean_ci95, proportion_ci95


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two `(H, W)` boolean masks, in [0, 1].

    Two empty masks give 1.0: predicting "nothing" for "nothing" is a perfect answer.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask_iou: shapes differ, {pred.shape} vs {gt.shape}")
    union = int(np.logical_or(pred, gt).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, gt).sum()) / union


def _union(masks: Sequence[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for mask in masks:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"referring_metrics: mask shape {mask.shape}, expected {shape}")
        out |= mask
    return out


def referring_metrics(
    results: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]],
) -> dict:
    """Referring-segmentation scores over expressions, each `(predicted masks, gt masks)`.

    An expression denotes a set of objects, so it is scored on the union of its masks (which
    object a predicted segment "is" does not matter). Expressions with referents and those
    without are scored apart: mIoU alone would hide a model that always segments something.

    - With referents (gt list non-empty): IoU of the union of predicted masks with the union of
      gt masks; no prediction gives 0. `miou` is the mean over these expressions.
    - Without referents (gt list empty): correct when the answer has no segment, i.e. no
      predicted mask has a foreground pixel (a mask with no pixel is no segment).
      `empty_accuracy` is the fraction correct.
    - `giou` (gRefCOCO's generalised IoU, Liu et al. 2023) averages over all expressions, an
      expression without referents scoring 1 when answered with no segment and 0 otherwise: the
      one number a score threshold trades off.

    Masks are `(H, W)` bool arrays, all of one expression the same shape. Returns `miou`,
    `n_with_referent`, `empty_accuracy`, `n_empty`, `giou`, and the 95 % half-widths
    `miou_ci95` and `empty_accuracy_ci95`; a ratio over zero expressions is `None`.
    """
    ious: list[float] = []
    n_empty = 0
    n_empty_correct = 0
    for predicted, truth in results:
        if truth:
            shape = np.asarray(truth[0]).shape
            ious.append(mask_iou(_union(predicted, shape), _union(truth, shape)))
        else:
            n_empty += 1
            n_empty_correct += not any(np.asarray(mask, dtype=bool).any() for mask in predicted)
    empty_accuracy = n_empty_correct / n_empty if n_empty else None
    return {
        "miou": float(np.mean(ious)) if ious else None,
        "miou_ci95": mean_ci95(ious),
        "n_with_referent": len(ious),
        "empty_accuracy": empty_accuracy,
        "empty_accuracy_ci95": proportion_ci95(empty_accuracy, n_empty),
        "n_empty": n_empty,
        "giou": ((sum(ious) + n_empty_correct) / (len(ious) + n_empty)
                 if results else None),
    }
