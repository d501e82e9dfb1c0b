"""`glipv2 calibrate`: a model's default referring-segment threshold, chosen on a validation world.

A segment's score is GLIP's sqrt(phrase probability x centerness), and where a model's scores sit
is a property of that model: one fixed default either returns segments for expressions that name
nothing or drops true ones. The sweep segments every expression of a validation world (a seed
neither training nor `glipv2 eval` uses) once with threshold 0, then scores each candidate
threshold by keeping the segments at or above it; the best gIoU wins (ties: the lower threshold).

A model that resolves directional relations on boxes (`postprocess.relations` "geometry") scores
those referents on their noun, a word in its own score range: the phrase threshold is then chosen
on the other expressions, and `relation_threshold` on the relation expressions, segmented again
with the chosen phrase threshold (which their anchors must reach).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from model_export.data.world import render_index
from model_export.evaluation.evaluate import Predictor, referring_answers
from model_export.evaluation.metrics import referring_metrics
from model_export.processing.spatial import referring_query

CALIBRATION_SEED = 2000  # validation world: training uses seed 1, `glipv2 eval` 1000
THRESHOLDS = tuple(round(0.1 + 0.025 * i, 3) for i in range(33))  # 0.100, 0.125, ... 0.900


@dataclass(frozen=True)
class ThresholdScore:
    """Referring metrics of one candidate threshold."""

    threshold: float
    miou: float | None
    empty_accuracy: float | None
    giou: float | None


def segment_threshold_sweep(predictor: Predictor, n: int, seed: int = CALIBRATION_SEED,
                            thresholds: Sequence[float] = THRESHOLDS, geometry: bool = False
                            ) -> list[ThresholdScore]:
    """Referring metrics of each threshold over the expressions of scenes 0..n-1 of `seed`
    (with `geometry`, those whose relation is not resolved on boxes)."""
    def select(text: str) -> bool:
        return not (geometry and geometric(text))

    scored = [answer for index in tqdm(range(n), desc="calibrate", unit="img")
              for answer in referring_answers(predictor, render_index(seed, index), 0.0, 0.0,
                                              select)]
    return _sweep(scored, thresholds)


def relation_threshold_sweep(predictor: Predictor, n: int, phrase_threshold: float,
                             seed: int = CALIBRATION_SEED,
                             thresholds: Sequence[float] = THRESHOLDS) -> list[ThresholdScore]:
    """Referring metrics of each relation threshold over the expressions of scenes 0..n-1 of
    `seed` whose relation is resolved on boxes, their anchors held to `phrase_threshold`."""
    scored = [answer for index in tqdm(range(n), desc="calibrate relations", unit="img")
              for answer in referring_answers(predictor, render_index(seed, index),
                                              phrase_threshold, 0.0, geometric)]
    return _sweep(scored, thresholds)


def geometric(text: str) -> bool:
    """Whether a "geometry" model resolves the expression's relation on boxes."""
    return referring_query(text, geometry=True).side is not None


def _sweep(scored: Sequence[tuple[Sequence[tuple[float, np.ndarray]], Sequence[np.ndarray]]],
           thresholds: Sequence[float]) -> list[ThresholdScore]:
    out = []
    for threshold in thresholds:
        kept = [([mask for score, mask in segments if score >= threshold], truth)
                for segments, truth in scored]
        metrics = referring_metrics(kept)
        out.append(ThresholdScore(threshold, metrics["miou"], metrics["empty_accuracy"],
                                  metrics["giou"]))
    return out


def best_threshold(scores: Sequence[ThresholdScore]) -> ThresholdScore:
    """The candidate with the highest gIoU, the lowest threshold among equals."""
    defined = [s for s in scores if s.giou is not None]
    if not defined:
        raise ValueError("no referring expressions were scored: nothing to calibrate on")
    return max(defined, key=lambda s: (s.giou, -s.threshold))
