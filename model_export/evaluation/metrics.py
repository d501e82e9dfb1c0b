"""Evaluation metrics for the shapes-world tasks: pure functions, no model code.

These are the numbers `glipv2 eval` reports and the README quotes, so each follows a published
definition rather than a home-made variant:

- detection and attribute-phrase grounding: COCO box AP from pycocotools `COCOeval` (101-point
  interpolated precision, IoU thresholds .50:.05:.95, up to 100 detections per image);
- referring segmentation: mean mask IoU over expressions that have referents, plus the fraction of
  no-referent expressions answered with no segment;
- VQA: exact-match accuracy (the world has one answer per question, so no VQA-v2 soft score);
- captioning: exact match, corpus BLEU-4 (Papineni et al. 2002) and phrase-grounding accuracy
  (a phrase's box is right when its IoU with the object's box is >= 0.5).

Sampling error: `mean_ci95` and `proportion_ci95` give the half-width of the normal-approximation
95 % interval of a mean or a rate over n items, which says how far a figure on n images may move
with the images drawn (7 points either way for an accuracy of 0.87 over 81 expressions). AP50,
which pools detections across images, gets the same from an image bootstrap (`box_ap`'s
`map50_ci95`).

Box convention everywhere: `[x0, y0, x1, y1]` float pixels, end exclusive (the HTTP API's), so a
box's width is `x1 - x0` with no +1. Ratios over an empty set are `None`, not 0 or NaN: "no data"
must not read as "all wrong", and NaN does not survive JSON.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "BoxPrediction",
    "BoxTruth",
    "box_ap",
    "box_iou",
    "caption_metrics",
    "corpus_bleu",
    "format_table",
    "mask_iou",
    "match_caption_phrases",
    "mean_ci95",
    "phrase_grounding_accuracy",
    "proportion_ci95",
    "referring_metrics",
    "tokenize_caption",
    "vqa_exact_accuracy",
]

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
    for item in (*truths, *predictions):
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


def mean_ci95(values: Sequence[float]) -> float | None:
    """Half-width of the 95 % interval of the mean of `values`: 1.96 sample standard deviations
    over sqrt(n). `None` below two values (no spread to estimate)."""
    if len(values) < 2:
        return None
    return 1.96 * float(np.std(np.asarray(values, dtype=np.float64), ddof=1)) / math.sqrt(
        len(values))


def proportion_ci95(rate: float | None, n: int) -> float | None:
    """`mean_ci95` of n yes/no outcomes of which a fraction `rate` are yes (e.g. an accuracy)."""
    if rate is None or n < 2:
        return None
    return 1.96 * math.sqrt(rate * (1.0 - rate) / (n - 1))


def box_iou(a: Box, b: Box) -> float:
    """IoU of two `[x0, y0, x1, y1]` end-exclusive boxes, in [0, 1]; 0.0 when both are empty."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0) + max(0.0, bx1 - bx0) * max(0.0, by1 - by0)
    union -= inter
    return inter / union if union > 0 else 0.0


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


def _normalise_text(text: str) -> str:
    # Case and runs of whitespace carry no meaning in a closed-set answer or a caption.
    return " ".join(text.lower().split())


def _check_lengths(name: str, a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name}: {len(a)} predictions for {len(b)} references")


def vqa_exact_accuracy(predicted: Sequence[str], answers: Sequence[str]) -> float | None:
    """Fraction of answers equal to the truth, ignoring case and whitespace; `None` if empty.

    The world's VQA has exactly one right answer per question, so exact match replaces the
    VQA-v2 "min(#humans agreeing / 3, 1)" soft score.
    """
    _check_lengths("vqa_exact_accuracy", predicted, answers)
    if not answers:
        return None
    hits = sum(
        _normalise_text(p) == _normalise_text(a) for p, a in zip(predicted, answers, strict=True)
    )
    return hits / len(answers)


_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize_caption(text: str) -> list[str]:
    """BLEU tokens: lower-cased words, with every punctuation mark a token of its own.

    `"a small red circle, a large gray star."` -> `a small red circle , a large gray star .`
    Splitting punctuation off is what sacrebleu's default "13a" tokeniser does for text without
    digits, so the BLEU here equals sacrebleu's (lowercase=True, scaled to [0, 1]) on captions.
    """
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
    max_order: int = 4,
) -> float:
    """Corpus BLEU (Papineni et al. 2002) of token lists, one reference each, in [0, 1].

    Clipped n-gram matches and n-gram counts are summed over the corpus before dividing (not
    averaged per sentence); uniform weights over orders 1..max_order; brevity penalty
    exp(1 - r/c) when the total hypothesis length c is below the reference length r. No
    smoothing: an order with no match gives 0, as the standard definition does.
    """
    _check_lengths("corpus_bleu", hypotheses, references)
    matches = [0] * max_order
    totals = [0] * max_order
    hyp_length = 0
    ref_length = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        hyp_length += len(hyp)
        ref_length += len(ref)
        for n in range(1, max_order + 1):
            hyp_counts = _ngrams(hyp, n)
            ref_counts = _ngrams(ref, n)
            matches[n - 1] += sum(min(c, ref_counts[g]) for g, c in hyp_counts.items())
            totals[n - 1] += sum(hyp_counts.values())
    if hyp_length == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_order
    brevity = 1.0 if hyp_length > ref_length else math.exp(1.0 - ref_length / hyp_length)
    return brevity * math.exp(log_precision)


def caption_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Caption `exact_match` (case/whitespace-insensitive) and corpus `bleu4`, both in [0, 1].

    The world's captions are fully determined by the image, so exact match is the strict score
    and BLEU-4 the partial-credit one. Tokenisation: `tokenize_caption`. Empty input gives `None`
    for both.
    """
    _check_lengths("caption_metrics", hypotheses, references)
    if not references:
        return {"exact_match": None, "bleu4": None}
    pairs = zip(hypotheses, references, strict=True)
    exact = sum(_normalise_text(h) == _normalise_text(r) for h, r in pairs)
    bleu = corpus_bleu(
        [tokenize_caption(h) for h in hypotheses], [tokenize_caption(r) for r in references]
    )
    return {"exact_match": exact / len(references), "bleu4": bleu}


def phrase_grounding_accuracy(pairs: Sequence[tuple[Box | None, Box]]) -> float | None:
    """Fraction of `(predicted box or None, gt box)` pairs with IoU >= 0.5; `None` if empty.

    A phrase the model did not ground (`None`) counts as wrong, so skipping hard phrases cannot
    raise the score.
    """
    if not pairs:
        return None
    hits = sum(pred is not None and box_iou(pred, gt) >= 0.5 for pred, gt in pairs)
    return hits / len(pairs)


def match_caption_phrases(references: Sequence[tuple[str, Box]],
                          predicted: Sequence[tuple[str, Box]]) -> list[tuple[Box | None, Box]]:
    """Pairs each reference phrase `(text, gt box)` of a caption with the predicted box of the
    same text, in caption order: the k-th "a small red circle" of the reference takes the k-th
    of the generated caption, so two objects that read alike can both be grounded right. A
    reference phrase the caption lacks (or has fewer times) gets `None`. Input to
    `phrase_grounding_accuracy`."""
    boxes: dict[str, list[Box]] = {}
    for text, box in predicted:
        boxes.setdefault(text, []).append(box)
    taken: Counter = Counter()
    pairs = []
    for text, truth in references:
        found = boxes.get(text, [])
        pairs.append((found[taken[text]] if taken[text] < len(found) else None, truth))
        taken[text] += 1
    return pairs


def _format_value(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.4f}"
    return str(value)


def format_table(metrics: Mapping[str, Mapping[str, object]]) -> str:
    """A Markdown table `| task | metric | value |` of `{task: {metric: value}}` for the README.

    Floats print with 4 decimals, `None` as "n/a"; a nested dict (e.g. `per_category_ap50`) is
    flattened to one row per key, named `metric[key]`, so no number is silently dropped. Rows
    keep the mapping order. Ends with a newline.
    """
    lines = ["| task | metric | value |", "| --- | --- | --- |"]
    for task, values in metrics.items():
        for metric, value in values.items():
            if isinstance(value, Mapping):
                for key, inner in value.items():
                    lines.append(f"| {task} | {metric}[{key}] | {_format_value(inner)} |")
            else:
                lines.append(f"| {task} | {metric} | {_format_value(value)} |")
    return "\n".join(lines) + "\n"
