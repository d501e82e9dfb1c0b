"""`glipv2 eval`: the model's metrics on freshly rendered shapes-world images (a held-out seed).

Tasks and metrics (issue 3's bars): detection box AP (mAP@0.5, mAP@[.5:.95]); attribute-phrase
grounding AP50, separately for held-out colour-shape pairs (open-vocabulary composition), with a
few phrases per image and, as users of `/v1/detect` send them, with all 42 colour-shape phrases
in one request (`FULL_VOCABULARY`, chunked by the service); referring segmentation mIoU over
expressions with referents and the share of no-referent expressions answered with no segment;
VQA accuracy; caption exact match, BLEU-4 and phrase grounding accuracy (box IoU >= 0.5).
Referring mIoU and empty-referent accuracy, grounding AP50 and VQA accuracy are also given per
template (expression form, `referent_form`, with a relation whose anchor is absent apart; phrase
form; question type), which says where a model falls short. Means and rates carry the
half-width of their 95 % interval (`HALF_WIDTH`, per form too): how far they may move with the
images drawn, which decides whether two models' figures differ at all. AP50 gets one from an
image bootstrap; mAP@[.5:.95] and BLEU-4 get none.

What is scored is whatever `Predictor` is given: the CLI passes the service's own path
(`service.offline.ServingPredictor`) on the chosen runtime, so the metrics are those of the
answers the HTTP API returns.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
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
    referent_form,
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
# Every colour-shape phrase, held-out pairs included, in one fixed order: one detect request.
FULL_VOCABULARY = tuple(f"{c} {s}" for c in COLOR_NAMES for s in SHAPES)


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
                threshold: float | None = None, relation_threshold: float | None = None
                ) -> list[list[PredictedSegment]]: ...

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


def referring_answers(predictor: Predictor, scene: WorldImage, threshold: float | None = None,
                      relation_threshold: float | None = None,
                      select: Callable[[str], bool] | None = None
                      ) -> list[tuple[list[tuple[float, np.ndarray]], list[np.ndarray]]]:
    """Per referring expression of a scene (those `select` keeps, default all): its (score,
    mask) segments over the thresholds (None: the model's own) and its target masks (empty
    when it names nothing)."""
    expressions = [e for e in scene.expressions if select is None or select(e["text"])]
    if not expressions:
        return []
    answers = predictor.segment(scene.image, [e["text"] for e in expressions],
                                threshold=threshold, relation_threshold=relation_threshold)
    return [([(s.score, s.mask.numpy()) for s in segments],
             [scene.objects[i].mask for i in expression["targets"]])
            for expression, segments in zip(expressions, answers, strict=True)]


def evaluate(predictor: Predictor, n: int, seed: int, tasks: Sequence[str] = TASKS,
             held_out: str = HELD_OUT_PAIRS,
             progress: bool = True) -> dict[str, dict]:
    """Render `n` images with `seed` (never a training seed) and score every task."""
    pairs = sorted(parse_pairs(held_out)) if held_out else []
    held_out_phrases = {f"{c} {s}" for c, s in pairs}
    rng = random.Random(seed)
    det_truth, det_pred, grd_truth, grd_pred, sizes = [], [], [], [], {}
    full_truth: list[BoxTruth] = []
    full_pred: list[BoxPrediction] = []
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
            run = predictor.detect(scene.image, list(FULL_VOCABULARY))
            full_truth += [BoxTruth(index, p, scene.objects[i].box) for p in FULL_VOCABULARY
                           for i in expression_targets(p, scene.objects)]
            full_pred += _predictions(index, run, list(FULL_VOCABULARY))
        if "referring" in tasks:
            for expression, (segments, truth) in zip(
                    scene.expressions, referring_answers(predictor, scene), strict=True):
                answer = ([mask for _, mask in segments], truth)
                referring.append(answer)
                form = referent_form(expression["text"], scene.objects)
                referring_by_form.setdefault(form, []).append(answer)
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
        def seen(phrase: str) -> bool:
            return phrase not in held_out_phrases

        def unseen(phrase: str) -> bool:
            return phrase in held_out_phrases

        ap = _phrase_ap(grd_truth, grd_pred, sizes, seen)
        grounding, widths = {"AP50": ap["map50"]}, {"AP50": ap["map50_ci95"]}
        by_phrase_form: dict[str, list[float]] = {}  # AP50 is a mean over phrases, so by form
        for phrase, value in ap["per_category_ap50"].items():
            by_phrase_form.setdefault(expression_form(phrase), []).append(value)
        grounding["AP50 by form"] = {form: float(np.mean(values))
                                     for form, values in sorted(by_phrase_form.items())}
        for name, truths, predictions, keep in (
                ("AP50 held-out pairs", grd_truth, grd_pred, unseen),
                ("AP50 full vocabulary", full_truth, full_pred, seen),
                ("AP50 full vocabulary held-out pairs", full_truth, full_pred, unseen)):
            if any(keep(t.category) for t in truths):
                ap = _phrase_ap(truths, predictions, sizes, keep)
                grounding[name], widths[name] = ap["map50"], ap["map50_ci95"]
        metrics["grounding"] = {**grounding, HALF_WIDTH: widths}
    if "referring" in tasks:
        ref = referring_metrics(referring)
        per_form = {form: referring_metrics(answers)
                    for form, answers in sorted(referring_by_form.items())}
        miou = {form: m["miou"] for form, m in per_form.items() if m["miou"] is not None}
        empty = {form: m["empty_accuracy"] for form, m in per_form.items()
                 if m["empty_accuracy"] is not None}
        metrics["referring"] = {
            "mIoU": ref["miou"], "empty-referent accuracy": ref["empty_accuracy"],
            "gIoU": ref["giou"], "mIoU by form": miou,
            "empty-referent accuracy by form": empty,
            HALF_WIDTH: {"mIoU": ref["miou_ci95"],
                         "empty-referent accuracy": ref["empty_accuracy_ci95"],
                         "mIoU by form": {form: per_form[form]["miou_ci95"] for form in miou},
                         "empty-referent accuracy by form": {
                             form: per_form[form]["empty_accuracy_ci95"] for form in empty}}}
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


def _phrase_ap(truths: Sequence[BoxTruth], predictions: Sequence[BoxPrediction],
               sizes: Mapping[int, tuple[int, int]], keep: Callable[[str], bool]) -> dict:
    """`box_ap` over the phrases `keep` accepts (at least one of which has a truth)."""
    return box_ap([t for t in truths if keep(t.category)],
                  [p for p in predictions if keep(p.category)], sizes)


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

    Floats print with 4 decimals, `None` as "n/a"; a nested dict (e.g. `per_category_ap50`, or
    the half-widths of figures by form) is flattened to one row per key, named `metric[key]`
    (`metric[key][inner]` one level down), so no number is silently dropped. Rows keep the
    mapping order. Ends with a newline.
    """
    lines = ["| task | metric | value |", "| --- | --- | --- |"]

    def add(task: str, metric: str, value: object) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                add(task, f"{metric}[{key}]", inner)
        else:
            lines.append(f"| {task} | {metric} | {_format_value(value)} |")

    for task, values in metrics.items():
        for metric, value in values.items():
            add(task, metric, value)
    return "\n".join(lines) + "\n"


def write_report(metrics: dict[str, dict], out: str | Path) -> None:
    Path(out).write_text(json.dumps(metrics, indent=2) + "\n")


__all__ = ["FULL_VOCABULARY", "HALF_WIDTH", "TASKS", "evaluate", "format_table",
           "write_report"]
