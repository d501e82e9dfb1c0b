"""`glipv2 eval`: the model's metrics on freshly rendered shapes-world images (a held-out seed).

Tasks and metrics (issue 3's bars): detection box AP (mAP@0.5, mAP@[.5:.95]); attribute-phrase
grounding AP50, separately for held-out colour-shape pairs (open-vocabulary composition);
referring segmentation mIoU over expressions with referents and the share of no-referent
expressions answered with no segment; VQA accuracy; caption exact match, BLEU-4 and phrase
grounding accuracy (box IoU >= 0.5). Referring mIoU, grounding AP50 and VQA accuracy are also
given per template (expression or phrase form, question type), which says where a model falls
short. Means and rates carry the half-width of their 95 % interval (`HALF_WIDTH`): how far they
may move with the images drawn, which decides whether two models' figures differ at all. AP50
gets one from an image bootstrap; mAP@[.5:.95] and BLEU-4 get none.

What is scored is whatever `Predictor` is given: the CLI passes the service's own path
(`service.offline.ServingPredictor`) on the chosen runtime, so the metrics are those of the
answers the HTTP API returns.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from model_export.data.world import (
    COLOR_NAMES,
    HELD_OUT_PAIRS,
    SHAPES,
    WorldImage,
    expression_form,
    expression_targets,
    parse_pairs,
    render_index,
)
from model_export.evaluation.metrics import (
    BoxPrediction,
    BoxTruth,
    box_ap,
    caption_metrics,
    match_caption_phrases,
    phrase_grounding_accuracy,
    proportion_ci95,
    referring_metrics,
    vqa_exact_accuracy,
)
from model_export.processing.box_coding import to_exclusive
from model_export.processing.postprocess import Detections

TASKS = ("detection", "grounding", "referring", "vqa", "caption")
HALF_WIDTH = "95% half-width"  # the key of a task's sampling errors (module docstring)


@dataclass
class PredictedSegment:
    """One segment of a referring expression, in original-image pixels (end-exclusive box)."""

    box: list[float]
    score: float
    mask: Tensor  # (H0, W0) bool


@dataclass
class VqaAnswer:
    answer: str
    score: float
    answers: list[tuple[str, float]]  # top answers, best first


@dataclass
class CaptionPhrase:
    phrase: str
    span: tuple[int, int]  # characters of the caption, end exclusive
    box: list[float]  # original-image pixels, end exclusive
    score: float


@dataclass
class CaptionResult:
    caption: str
    phrases: list[CaptionPhrase]


class DetectionResult(Protocol):
    """Boxes in original-image pixels, legacy convention (x1, y1 = last pixel)."""

    detections: Detections


class Predictor(Protocol):
    """The four tasks on one image, as `evaluate` calls them."""

    def detect(self, image: Image.Image, class_names: Sequence[str]) -> DetectionResult: ...

    def segment(self, image: Image.Image, expressions: Sequence[str],
                threshold: float | None = None) -> list[list[PredictedSegment]]: ...

    def vqa(self, image: Image.Image, question: str) -> VqaAnswer: ...

    def caption(self, image: Image.Image) -> CaptionResult: ...


def _grounding_phrases(scene, rng: random.Random, held_out: Sequence[tuple[str, str]]
                       ) -> list[str]:
    """Attribute phrases for one image: some naming its objects, some absent, held-out pairs."""
    phrases = {f"{o.color} {o.shape}" for o in scene.objects}
    phrases |= {f"{o.size} {o.shape}" for o in scene.objects[:2]}
    phrases.add(f"{rng.choice(COLOR_NAMES)} {rng.choice(SHAPES)}")
    phrases |= {f"{c} {s}" for c, s in held_out}
    return sorted(phrases)


def referring_answers(predictor: Predictor, scene: WorldImage, threshold: float | None = None
                      ) -> list[tuple[list[tuple[float, np.ndarray]], list[np.ndarray]]]:
    """Per referring expression of a scene: its (score, mask) segments over `threshold` (None:
    the model's own) and its target masks (empty when it names nothing)."""
    if not scene.expressions:
        return []
    texts = [e["text"] for e in scene.expressions]
    answers = predictor.segment(scene.image, texts, threshold=threshold)
    return [([(s.score, s.mask.numpy()) for s in segments],
             [scene.objects[i].mask for i in expression["targets"]])
            for expression, segments in zip(scene.expressions, answers, strict=True)]


def evaluate(predictor: Predictor, n: int, seed: int, tasks: Sequence[str] = TASKS,
             held_out: str = HELD_OUT_PAIRS,
             progress: bool = True) -> dict[str, dict]:
    """Render `n` images with `seed` (never a training seed) and score every task."""
    pairs = sorted(parse_pairs(held_out)) if held_out else []
    held_out_phrases = {f"{c} {s}" for c, s in pairs}
    rng = random.Random(seed)
    det_truth, det_pred, grd_truth, grd_pred, sizes = [], [], [], [], {}
    referring, vqa_pred, vqa_gold, hyps, refs, grounding_pairs = [], [], [], [], [], []
    referring_by_form: dict[str, list] = {}
    vqa_by_type: dict[str, tuple[list[str], list[str]]] = {}
    for index in tqdm(range(n), disable=not progress, desc="eval"):
        scene = render_index(seed, index)
        sizes[index] = (scene.height, scene.width)
        if "detection" in tasks:
            run = predictor.detect(scene.image, list(SHAPES))
            det_truth += [BoxTruth(index, o.shape, o.box) for o in scene.objects]
            det_pred += _predictions(index, run, list(SHAPES))
        if "grounding" in tasks:
            phrases = _grounding_phrases(scene, rng, pairs)
            run = predictor.detect(scene.image, phrases)
            grd_truth += [BoxTruth(index, p, scene.objects[i].box) for p in phrases
                          for i in expression_targets(p, scene.objects)]
            grd_pred += _predictions(index, run, phrases)
        if "referring" in tasks:
            for expression, (segments, truth) in zip(
                    scene.expressions, referring_answers(predictor, scene), strict=True):
                answer = ([mask for _, mask in segments], truth)
                referring.append(answer)
                referring_by_form.setdefault(expression_form(expression["text"]), []).append(
                    answer)
        if "vqa" in tasks:
            for question in scene.questions:
                given = predictor.vqa(scene.image, question["question"]).answer
                vqa_pred.append(given)
                vqa_gold.append(question["answer"])
                kind = vqa_by_type.setdefault(question["type"], ([], []))
                kind[0].append(given)
                kind[1].append(question["answer"])
        if "caption" in tasks:
            result = predictor.caption(scene.image)
            hyps.append(result.caption)
            refs.append(scene.caption)
            grounding_pairs += match_caption_phrases(
                [(scene.caption[slice(*p["span"])], scene.objects[p["object"]].box)
                 for p in scene.caption_phrases],
                [(p.phrase, p.box) for p in result.phrases])

    metrics: dict[str, dict] = {}
    if "detection" in tasks:
        ap = box_ap(det_truth, det_pred, sizes, categories=list(SHAPES))
        metrics["detection"] = {"mAP@0.5": ap["map50"], "mAP@[.5:.95]": ap["map"],
                                HALF_WIDTH: {"mAP@0.5": ap["map50_ci95"]}}
    if "grounding" in tasks:
        seen = [t for t in grd_truth if t.category not in held_out_phrases]
        ap = box_ap(seen, [p for p in grd_pred if p.category not in held_out_phrases], sizes)
        grounding, widths = {"AP50": ap["map50"]}, {"AP50": ap["map50_ci95"]}
        by_phrase_form: dict[str, list[float]] = {}  # AP50 is a mean over phrases, so by form
        for phrase, value in ap["per_category_ap50"].items():
            by_phrase_form.setdefault(expression_form(phrase), []).append(value)
        grounding["AP50 by form"] = {form: float(np.mean(values))
                                     for form, values in sorted(by_phrase_form.items())}
        unseen = [t for t in grd_truth if t.category in held_out_phrases]
        if unseen:
            ap = box_ap(unseen, [p for p in grd_pred if p.category in held_out_phrases], sizes)
            grounding["AP50 held-out pairs"] = ap["map50"]
            widths["AP50 held-out pairs"] = ap["map50_ci95"]
        metrics["grounding"] = {**grounding, HALF_WIDTH: widths}
    if "referring" in tasks:
        ref = referring_metrics(referring)
        by_form = {form: referring_metrics(answers)["miou"]
                   for form, answers in sorted(referring_by_form.items())}
        metrics["referring"] = {
            "mIoU": ref["miou"], "empty-referent accuracy": ref["empty_accuracy"],
            "gIoU": ref["giou"], "mIoU by form": by_form,
            HALF_WIDTH: {"mIoU": ref["miou_ci95"],
                         "empty-referent accuracy": ref["empty_accuracy_ci95"]}}
    if "vqa" in tasks:
        accuracy = vqa_exact_accuracy(vqa_pred, vqa_gold)
        by_type = {kind: vqa_exact_accuracy(*answers)
                   for kind, answers in sorted(vqa_by_type.items())}
        metrics["vqa"] = {"accuracy": accuracy, "accuracy by type": by_type,
                          HALF_WIDTH: {"accuracy": proportion_ci95(accuracy, len(vqa_gold))}}
    if "caption" in tasks:
        cap = caption_metrics(hyps, refs)
        grounded = phrase_grounding_accuracy(grounding_pairs)
        metrics["caption"] = {
            "exact match": cap["exact_match"], "BLEU-4": cap["bleu4"],
            "phrase grounding accuracy": grounded,
            HALF_WIDTH: {"exact match": proportion_ci95(cap["exact_match"], len(refs)),
                         "phrase grounding accuracy":
                         proportion_ci95(grounded, len(grounding_pairs))}}
    return metrics


def _predictions(index: int, run: DetectionResult, names: list[str]) -> list[BoxPrediction]:
    boxes = to_exclusive(run.detections.boxes)
    return [BoxPrediction(index, names[int(label)], box.tolist(), float(score))
            for box, score, label in zip(boxes, run.detections.scores, run.detections.labels,
                                         strict=True)]


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


def write_report(metrics: dict[str, dict], out: str | Path) -> None:
    Path(out).write_text(json.dumps(metrics, indent=2) + "\n")


__all__ = ["HALF_WIDTH", "TASKS", "evaluate", "format_table", "write_report"]
