"""Detection and attribute-phrase grounding: COCO box AP from pycocotools `COCOeval`, with an
image bootstrap for AP50's 95 % half-width, and the box IoU the other metrics share.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

Box = Sequence[float]


@dataclass
class BoxPrediction:
    """One predicted box: `box` is `[x0, y0, x1, y1]` (end exclusive), `score` in [0, 1]."""

    image_id: int
    category: str
    box: Box
    score: float


@dataclass
class BoxTruth:
    """One ground-truth box: `box` is `[x0, y0, x1, y1]` (end exclusive)."""

    image_id: int
    category: str
    box: Box


def _xyxy_to_xywh(box: Box) -> list[float]:
    # End-exclusive xyxy maps to COCO xywh with no +1: pycocotools' IoU is then the same IoU as
    # `box_iou` below.
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def _coco_evaluator(truths: Sequence[BoxTruth], predictions: Sequence[BoxPrediction],
                    image_sizes: Mapping[int, tuple[int, int]], category_ids: dict[str, int],
                    max_detections: int) -> COCOeval:
    """A `COCOeval` that has matched `predictions` (at least one, each of a listed category) to
    the truths of the listed categories, image by image (`evaluate`), not yet pooled."""
    detections = [
        {
            "image_id": int(p.image_id),
            "category_id": category_ids[p.category],
            "bbox": _xyxy_to_xywh(p.box),
            "score": float(p.score),
        }
        for p in predictions
    ]
    annotations = []
    for index, truth in enumerate(truths):
        if truth.category not in category_ids:
            continue
        xywh = _xyxy_to_xywh(truth.box)
        annotations.append(
            {
                # Ids start at 1: COCOeval marks an unmatched detection with gt id 0.
                "id": index + 1,
                "image_id": int(truth.image_id),
                "category_id": category_ids[truth.category],
                "bbox": xywh,
                "area": xywh[2] * xywh[3],
                "iscrowd": 0,
            }
        )
    dataset = {
        "images": [
            {"id": int(image_id), "height": int(h), "width": int(w)}
            for image_id, (h, w) in image_sizes.items()
        ],
        "annotations": annotations,
        "categories": [{"id": cid, "name": name} for name, cid in category_ids.items()],
    }
    # pycocotools prints progress and its summary table; eval output must stay clean.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = sorted(int(i) for i in image_sizes)
        evaluator.params.catIds = sorted(category_ids.values())
        evaluator.params.maxDets = [max_detections]
        evaluator.evaluate()
    return evaluator


def box_ap(
    truths: Sequence[BoxTruth],
    predictions: Sequence[BoxPrediction],
    image_sizes: Mapping[int, tuple[int, int]],
    categories: Sequence[str] | None = None,
    max_detections: int = 100,
    resamples: int = 200,
) -> dict:
    """COCO box AP of `predictions` against `truths`, computed by pycocotools `COCOeval`.

    Used for detection (categories are shape names) and for attribute-phrase grounding
    (categories are phrase texts such as "red circle"; an image's truths are the objects its
    phrase prompt selects). Using `COCOeval` itself, rather than a re-implementation, keeps the
    numbers comparable with published GLIP results.

    Args:
        truths: ground-truth boxes, `[x0, y0, x1, y1]` end exclusive.
        predictions: scored predicted boxes; those whose category is not in `categories` are
            dropped (the model cannot be scored on a class nobody asked for).
        image_sizes: `{image_id: (height, width)}` for every evaluated image, including images
            with no truths (their predictions are false positives).
        categories: the evaluated categories; `None` = the sorted union of truth and prediction
            categories.
        max_detections: per-image cap applied by `COCOeval` (highest scores kept), COCO's 100.
        resamples: image bootstraps behind `map50_ci95`; 0 skips it.

    Returns:
        `map` (AP@[.5:.95]), `map50`, `map75`, each in [0, 1], and `per_category_ap50`
        (`{category: AP50}`), and `map50_ci95`, the half-width of AP50's 95 % interval from an
        image bootstrap (`None` below two images). As in pycocotools, a category with no truth
        in any image has undefined AP: it is left out of the means and out of
        `per_category_ap50`. With no predictions at all every AP is 0.0.

    Raises:
        ValueError: no truths at all (AP is undefined), or a box on an image missing from
            `image_sizes`.
    """
    if not truths:
        raise ValueError("box_ap: no ground-truth boxes, AP is undefined")
    if categories is None:
        categories = sorted({t.category for t in truths} | {p.category for p in predictions})
    categories = list(dict.fromkeys(categories))
    category_ids = {name: index + 1 for index, name in enumerate(categories)}
    boxes: tuple[BoxTruth | BoxPrediction, ...] = (*truths, *predictions)
    for item in boxes:
        if item.image_id not in image_sizes:
            raise ValueError(f"box_ap: image {item.image_id} is not in image_sizes")

    gt_categories = [c for c in categories if any(t.category == c for t in truths)]
    kept = [p for p in predictions if p.category in category_ids]
    if not kept:
        # `COCO.loadRes([])` raises; the answer is known anyway: no detection, no recall.
        return {
            "map": 0.0,
            "map50": 0.0,
            "map75": 0.0,
            "per_category_ap50": dict.fromkeys(gt_categories, 0.0),
            "map50_ci95": 0.0 if len(image_sizes) > 1 and resamples > 1 else None,
        }

    evaluator = _coco_evaluator(truths, kept, image_sizes, category_ids, max_detections)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()

    # precision: (T iou thresholds, R recall points, K categories, A area ranges, M max dets);
    # area range 0 is "all". -1 marks undefined entries (category without truths).
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    iou_thresholds = evaluator.params.iouThrs

    def mean_defined(values: np.ndarray) -> float:
        defined = values[values > -1]
        return float(defined.mean()) if defined.size else 0.0

    t50 = int(np.argmin(np.abs(iou_thresholds - 0.5)))
    t75 = int(np.argmin(np.abs(iou_thresholds - 0.75)))
    per_category = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        name = categories[category_id - 1]
        if name in gt_categories:
            per_category[name] = mean_defined(precision[t50, :, k])
    return {
        "map": mean_defined(precision),
        "map50": mean_defined(precision[t50]),
        "map75": mean_defined(precision[t75]),
        "per_category_ap50": per_category,
        "map50_ci95": _ap50_half_width(evaluator, t50, resamples),
    }


# One category's detections on one image, at one IoU threshold, as COCOeval matched them:
# scores, matched, ignored, and the number of truths that count.
_ImageMatches = tuple[np.ndarray, np.ndarray, np.ndarray, int]


def _image_matches(evaluator: COCOeval, t: int) -> list[dict[int, _ImageMatches]]:
    """Per category, `{image index: matches}` for the images where it has truths or detections,
    read from `COCOeval.evalImgs` (ordered category, area range, image; area range 0 is "all")."""
    n_images, n_areas = len(evaluator.params.imgIds), len(evaluator.params.areaRng)
    categories = []
    for k in range(len(evaluator.params.catIds)):
        rows = {}
        for i in range(n_images):
            entry = evaluator.evalImgs[k * n_areas * n_images + i]
            if entry is not None:
                rows[i] = (np.asarray(entry["dtScores"], dtype=np.float64),
                           np.asarray(entry["dtMatches"][t]) > 0,
                           np.asarray(entry["dtIgnore"][t]).astype(bool),
                           int(np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0)))
        categories.append(rows)
    return categories


def _pooled_ap(rows: Sequence[_ImageMatches], recall_points: np.ndarray) -> float | None:
    """AP of one category over images pooled as `COCOeval.accumulate` pools them: detections
    ranked by score across images (stable sort), precision made non-increasing, read at the
    recall points (0 past the last recall reached). `None` with no truth (undefined)."""
    n_truth = sum(row[3] for row in rows)
    if n_truth == 0:
        return None
    scores = np.concatenate([row[0] for row in rows])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([row[1] for row in rows])[order]
    counted = ~np.concatenate([row[2] for row in rows])[order]
    tp = np.cumsum(matched & counted)
    fp = np.cumsum(~matched & counted)
    if tp.size == 0:
        return 0.0
    recall = tp / n_truth
    precision = np.maximum.accumulate((tp / (tp + fp + np.spacing(1)))[::-1])[::-1]
    at = np.searchsorted(recall, recall_points, side="left")
    return float(np.where(at < tp.size, precision[np.minimum(at, tp.size - 1)], 0.0).mean())


def _ap50_half_width(evaluator: COCOeval, t50: int, resamples: int, seed: int = 0
                     ) -> float | None:
    """1.96 standard deviations of AP50 over `resamples` image bootstraps (images drawn with
    replacement, each keeping its truths and detections), the counterpart for a corpus-level AP
    of `mean_ci95`. It reuses COCOeval's per-image matches, so a resample costs no IoU work.
    `None` below two images or resamples."""
    n_images = len(evaluator.params.imgIds)
    if n_images < 2 or resamples < 2:
        return None
    categories = _image_matches(evaluator, t50)
    recall_points = np.asarray(evaluator.params.recThrs)
    rng = np.random.default_rng(seed)
    replicates = []
    for _ in range(resamples):
        counts = np.bincount(rng.integers(0, n_images, n_images), minlength=n_images)
        aps = [_pooled_ap([row for i, row in rows.items() for _ in range(counts[i])],
                          recall_points) for rows in categories]
        defined = [ap for ap in aps if ap is not None]
        if defined:
            replicates.append(float(np.mean(defined)))
    if len(replicates) < 2:
        return None
    return 1.96 * float(np.std(replicates, ddof=1))


def box_iou(a: Box, b: Box) -> float:
    """IoU of two `[x0, y0, x1, y1]` end-exclusive boxes, in [0, 1]; 0.0 when both are empty."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0) + max(0.0, bx1 - bx0) * max(0.0, by1 - by0)
    union -= inter
    return inter / union if union > 0 else 0.0
