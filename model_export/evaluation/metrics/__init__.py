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

from model_export.evaluation.metrics.detection import BoxPrediction, BoxTruth, box_ap, box_iou
from model_export.evaluation.metrics.intervals import mean_ci95, proportion_ci95
from model_export.evaluation.metrics.referring import mask_iou, referring_metrics
from model_export.evaluation.metrics.text import (
    caption_metrics,
    corpus_bleu,
    match_caption_phrases,
    phrase_grounding_accuracy,
    tokenize_caption,
    vqa_exact_accuracy,
)

__all__ = [
    "BoxPrediction",
    "BoxTruth",
    "box_ap",
    "box_iou",
    "caption_metrics",
    "corpus_bleu",
    "mask_iou",
    "match_caption_phrases",
    "mean_ci95",
    "phrase_grounding_accuracy",
    "proportion_ci95",
    "referring_metrics",
    "tokenize_caption",
    "vqa_exact_accuracy",
]
