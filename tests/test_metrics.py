"""Metric functions on hand-computed cases: every expected number is derived in a comment."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model_export.evaluation.metrics import (
    BoxPrediction,
    BoxTruth,
    box_ap,
    box_iou,
    caption_metrics,
    corpus_bleu,
    mask_iou,
    match_caption_phrases,
    mean_ci95,
    phrase_grounding_accuracy,
    proportion_ci95,
    referring_metrics,
    tokenize_caption,
    vqa_exact_accuracy,
)
from model_export.evaluation.metrics.detection import _coco_evaluator, _image_matches, _pooled_ap

SIZES = {1: (100, 100), 2: (100, 100), 3: (100, 100)}


# --- box AP ------------------------------------------------------------------------------------


def test_box_ap_perfect_predictions_score_one() -> None:
    truths = [
        BoxTruth(1, "circle", [10, 10, 30, 30]),
        BoxTruth(1, "square", [50, 50, 80, 90]),
        BoxTruth(2, "circle", [0, 0, 40, 20]),
    ]
    predictions = [BoxPrediction(t.image_id, t.category, t.box, 0.9) for t in truths]
    result = box_ap(truths, predictions, SIZES)
    assert result["map"] == pytest.approx(1.0)
    assert result["map50"] == pytest.approx(1.0)
    assert result["map75"] == pytest.approx(1.0)
    assert result["per_category_ap50"] == pytest.approx({"circle": 1.0, "square": 1.0})


def test_box_ap_shifted_box_counts_at_50_not_75() -> None:
    # Circle: [0, 0, 10, 6.2] against [0, 0, 10, 10], end exclusive: IoU = 62 / 100 = 0.62
    # (0.62, not 0.6, keeps clear of the 0.60 threshold's float rounding). It matches at
    # IoU .50, .55, .60: AP@[.5:.95] = 3/10. A +1 width convention would give IoU 0.65 and 4/10.
    # Square is perfect. Means over the two categories.
    truths = [BoxTruth(1, "circle", [0, 0, 10, 10]), BoxTruth(1, "square", [50, 50, 70, 70])]
    predictions = [
        BoxPrediction(1, "circle", [0, 0, 10, 6.2], 0.8),
        BoxPrediction(1, "square", [50, 50, 70, 70], 0.8),
    ]
    result = box_ap(truths, predictions, SIZES)
    assert result["map50"] == pytest.approx(1.0)
    assert result["map75"] == pytest.approx((0.0 + 1.0) / 2)
    assert result["map"] == pytest.approx((0.3 + 1.0) / 2)
    assert result["per_category_ap50"] == pytest.approx({"circle": 1.0, "square": 1.0})


def test_box_ap_higher_scored_false_positive_on_image_without_truths() -> None:
    # Two truths; detections by score: TP (0.9), FP on image 3, which has no truths (0.85),
    # TP (0.8). Recall/precision: (0.5, 1), (0.5, 1/2), (1, 2/3); the precision envelope is
    # 1 up to recall 0.5 and 2/3 above it. Over COCO's 101 recall points 0, .01, ..., 1:
    # 51 points at 1 and 50 at 2/3. All boxes are exact, so every IoU threshold agrees.
    truths = [BoxTruth(1, "star", [10, 10, 30, 30]), BoxTruth(2, "star", [40, 40, 60, 60])]
    predictions = [
        BoxPrediction(1, "star", [10, 10, 30, 30], 0.9),
        BoxPrediction(3, "star", [10, 10, 30, 30], 0.85),
        BoxPrediction(2, "star", [40, 40, 60, 60], 0.8),
    ]
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    result = box_ap(truths, predictions, SIZES)
    assert result["map50"] == pytest.approx(expected)
    assert result["map"] == pytest.approx(expected)
    assert result["per_category_ap50"]["star"] == pytest.approx(expected)


def test_box_ap_false_positive_ranked_first_halves_single_truth_ap() -> None:
    # One truth; FP (0.9) then TP (0.8): precision 1/2 at recall 1, so every recall point is 1/2.
    truths = [BoxTruth(1, "hexagon", [10, 10, 30, 30])]
    predictions = [
        BoxPrediction(1, "hexagon", [60, 60, 90, 90], 0.9),
        BoxPrediction(1, "hexagon", [10, 10, 30, 30], 0.8),
    ]
    assert box_ap(truths, predictions, SIZES)["map50"] == pytest.approx(0.5)


def test_box_ap_no_predictions_is_zero() -> None:
    truths = [BoxTruth(1, "circle", [10, 10, 30, 30]), BoxTruth(2, "square", [0, 0, 5, 5])]
    result = box_ap(truths, [], SIZES)
    assert result == {
        "map": 0.0,
        "map50": 0.0,
        "map75": 0.0,
        "per_category_ap50": {"circle": 0.0, "square": 0.0},
        "map50_ci95": 0.0,
    }


def test_box_ap_category_without_truths_is_excluded_from_mean() -> None:
    # "star" is predicted but absent everywhere: pycocotools leaves its AP undefined (-1) and
    # out of the mean, so the perfect circle alone sets the score.
    truths = [BoxTruth(1, "circle", [10, 10, 30, 30])]
    predictions = [
        BoxPrediction(1, "circle", [10, 10, 30, 30], 0.9),
        BoxPrediction(2, "star", [10, 10, 30, 30], 0.95),
    ]
    result = box_ap(truths, predictions, SIZES, categories=["circle", "star"])
    assert result["map"] == pytest.approx(1.0)
    assert result["per_category_ap50"] == pytest.approx({"circle": 1.0})


def test_box_ap_phrase_categories_and_unlisted_predictions_dropped() -> None:
    # Phrase grounding: categories are phrase texts. A prediction for an unlisted phrase is
    # dropped, not counted as a false positive.
    truths = [
        BoxTruth(1, "red circle", [10, 10, 30, 30]),
        BoxTruth(2, "small purple star", [40, 40, 50, 50]),
    ]
    predictions = [
        BoxPrediction(1, "red circle", [10, 10, 30, 30], 0.7),
        BoxPrediction(2, "small purple star", [40, 40, 50, 50], 0.6),
        BoxPrediction(2, "blue square", [0, 0, 20, 20], 0.99),
    ]
    result = box_ap(truths, predictions, SIZES, categories=["red circle", "small purple star"])
    assert result["map"] == pytest.approx(1.0)
    assert set(result["per_category_ap50"]) == {"red circle", "small purple star"}


def test_box_ap_keeps_stdout_clean(capsys: pytest.CaptureFixture[str]) -> None:
    truths = [BoxTruth(1, "circle", [10, 10, 30, 30])]
    box_ap(truths, [BoxPrediction(1, "circle", [10, 10, 30, 30], 0.5)], SIZES)
    assert capsys.readouterr().out == ""


def _random_detections(rng: np.random.Generator, images: range
                       ) -> tuple[list[BoxTruth], list[BoxPrediction], dict]:
    """Two categories, 1-3 truths per image, each found with a jittered box or missed, plus
    scored false positives: an AP well inside (0, 1) with every kind of COCOeval match."""
    truths, predictions = [], []
    for image in images:
        for _ in range(int(rng.integers(1, 4))):
            category = str(rng.choice(["circle", "square"]))
            x, y = rng.uniform(0, 60, 2)
            box = [x, y, x + 30, y + 30]
            truths.append(BoxTruth(image, category, box))
            if rng.random() < 0.8:
                shift = rng.uniform(-9, 9, 2)
                predictions.append(BoxPrediction(
                    image, category, [x + shift[0], y + shift[1], x + 30, y + 30],
                    float(rng.uniform(0.2, 1.0))))
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, 60, 2)
            predictions.append(BoxPrediction(image, str(rng.choice(["circle", "square"])),
                                             [x, y, x + 20, y + 20], float(rng.uniform(0, 0.8))))
    return truths, predictions, {image: (100, 100) for image in images}


def test_pooled_ap_reproduces_cocoeval_accumulate() -> None:
    # The bootstrap's per-resample AP is `_pooled_ap` over COCOeval's own matches; on the
    # original images (each drawn once) it must equal COCOeval's AP50, category by category.
    truths, predictions, sizes = _random_detections(np.random.default_rng(3), range(1, 41))
    result = box_ap(truths, predictions, sizes)
    assert 0.2 < result["map50"] < 0.95
    evaluator = _coco_evaluator(truths, predictions, sizes, {"circle": 1, "square": 2}, 100)
    per_image = _image_matches(evaluator, 0)  # IoU threshold 0 is .50
    pooled = [_pooled_ap(list(rows.values()), np.asarray(evaluator.params.recThrs))
              for rows in per_image]
    assert pooled == pytest.approx([result["per_category_ap50"]["circle"],
                                    result["per_category_ap50"]["square"]], abs=1e-12)


def test_box_ap_bootstrap_half_width_shrinks_with_images() -> None:
    # Sampling error falls as 1/sqrt(n): 160 images drawn like 40 give about half the width.
    few = box_ap(*_random_detections(np.random.default_rng(5), range(1, 41)))["map50_ci95"]
    many = box_ap(*_random_detections(np.random.default_rng(6), range(1, 161)))["map50_ci95"]
    assert 0.02 < few < 0.3
    assert 0.3 < many / few < 0.75
    truths = [BoxTruth(i, "circle", [10, 10, 30, 30]) for i in (1, 2, 3)]
    perfect = [BoxPrediction(t.image_id, t.category, t.box, 0.9) for t in truths]
    assert box_ap(truths, perfect, SIZES)["map50_ci95"] == 0.0  # every resample scores 1
    assert box_ap(truths, [], SIZES)["map50_ci95"] == 0.0
    assert box_ap(truths[:1], perfect[:1], {1: (100, 100)})["map50_ci95"] is None
    assert box_ap(truths, perfect, SIZES, resamples=0)["map50_ci95"] is None


def test_box_ap_rejects_undefined_inputs() -> None:
    with pytest.raises(ValueError, match="no ground-truth"):
        box_ap([], [BoxPrediction(1, "circle", [0, 0, 1, 1], 0.5)], SIZES)
    with pytest.raises(ValueError, match="image 9"):
        box_ap([BoxTruth(9, "circle", [0, 0, 1, 1])], [], SIZES)


# --- masks and referring segmentation ----------------------------------------------------------


def _mask(*pixels: tuple[int, int], shape: tuple[int, int] = (4, 4)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for y, x in pixels:
        mask[y, x] = True
    return mask


def test_mask_iou_cases() -> None:
    empty = _mask()
    assert mask_iou(empty, empty) == 1.0
    assert mask_iou(_mask((0, 0)), empty) == 0.0
    assert mask_iou(_mask((0, 0)), _mask((3, 3))) == 0.0
    assert mask_iou(_mask((0, 0), (0, 1)), _mask((0, 0), (0, 1))) == 1.0
    # 1 shared pixel, 3 in the union.
    assert mask_iou(_mask((0, 0), (0, 1)), _mask((0, 1), (0, 2))) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(empty, np.zeros((3, 4), dtype=bool))


def test_referring_metrics_hand_built() -> None:
    a = _mask((0, 0), (0, 1))  # 2 pixels
    b = _mask((3, 3))  # 1 pixel
    results = [
        ([a], [a, b]),  # union of gt = 3 pixels, prediction covers 2: IoU 2/3
        ([], [a]),  # referent missed entirely: IoU 0
        ([b, a], [a, b]),  # set denoted, order irrelevant: IoU 1
        ([], []),  # no referent, no segment: correct
        ([b], []),  # no referent, a segment: wrong
        ([_mask()], []),  # a mask with no pixel is no segment: correct
    ]
    result = referring_metrics(results)
    assert result["miou"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert result["n_with_referent"] == 3
    assert result["empty_accuracy"] == pytest.approx(2 / 3)
    assert result["n_empty"] == 3
    assert result["giou"] == pytest.approx((2 / 3 + 0 + 1 + 1 + 0 + 1) / 6)
    # IoUs 2/3, 0, 1: mean 5/9, squared deviations (1 + 25 + 16) / 81, sample variance 21/81;
    # 1.96 * sqrt(21) / 9 / sqrt(3) = 1.96 * sqrt(7) / 9
    assert result["miou_ci95"] == pytest.approx(1.96 * math.sqrt(7) / 9)
    # 2 of 3 right: 1.96 * sqrt((2/3) (1/3) / 2) = 1.96 / 3
    assert result["empty_accuracy_ci95"] == pytest.approx(1.96 / 3)


def test_referring_metrics_empty_groups_are_none() -> None:
    assert referring_metrics([]) == {
        "miou": None,
        "miou_ci95": None,
        "n_with_referent": 0,
        "empty_accuracy": None,
        "empty_accuracy_ci95": None,
        "n_empty": 0,
        "giou": None,
    }
    only_referents = referring_metrics([([_mask((1, 1))], [_mask((1, 1))])])
    assert only_referents["miou"] == 1.0
    assert only_referents["empty_accuracy"] is None


def test_ci95_half_widths() -> None:
    # 1, 1, 1, 0: mean 3/4, sample variance (3 * 1/16 + 9/16) / 3 = 1/4, so 1.96 * 0.5 / 2
    assert mean_ci95([1.0, 1.0, 1.0, 0.0]) == pytest.approx(0.49)
    assert proportion_ci95(0.75, 4) == pytest.approx(0.49)  # the same outcomes as a rate
    # 87 % right over 81 expressions: 1.96 * sqrt(.87 * .13 / 80)
    assert proportion_ci95(0.87, 81) == pytest.approx(0.0737, abs=1e-4)
    assert mean_ci95([0.5]) is None and mean_ci95([]) is None
    assert proportion_ci95(None, 10) is None and proportion_ci95(1.0, 1) is None
    assert proportion_ci95(1.0, 50) == 0.0  # no spread seen: the normal approximation's limit


# --- VQA ---------------------------------------------------------------------------------------


def test_vqa_exact_accuracy() -> None:
    assert vqa_exact_accuracy(["Red", " yes ", "3"], ["red", "yes", "2"]) == pytest.approx(2 / 3)
    assert vqa_exact_accuracy([], []) is None
    with pytest.raises(ValueError):
        vqa_exact_accuracy(["red"], [])


# --- captions ----------------------------------------------------------------------------------

CAPTION = "a small red circle, a large blue square and a small green star."


def test_tokenize_caption_splits_punctuation() -> None:
    assert tokenize_caption("A large gray hexagon, a small red star.") == [
        "a", "large", "gray", "hexagon", ",", "a", "small", "red", "star", ".",
    ]  # fmt: skip


def test_caption_identical_scores_one() -> None:
    result = caption_metrics([CAPTION, "a large gray hexagon."], [CAPTION, "a large gray hexagon."])
    assert result["exact_match"] == 1.0
    assert result["bleu4"] == pytest.approx(1.0)


def test_caption_exact_match_ignores_case_and_whitespace() -> None:
    hyps = ["A  Small red circle.", "a small red circle", "a large red circle."]
    refs = ["a small red circle."] * 3
    # The final "." is part of the caption, so the second is not an exact match.
    assert caption_metrics(hyps, refs)["exact_match"] == pytest.approx(1 / 3)


def test_caption_bleu_one_word_change() -> None:
    # 15 tokens: a small red circle , a large blue square and a small green star .
    # "green" -> "gray" (token 13 of 15, "gray" nowhere in the reference) spoils the n-grams
    # that contain it: 1 of 15 unigrams, 2 of 14 bigrams, 3 of 13 trigrams and 3 of 12 four-grams
    # (only three 4-grams reach token 13 this close to the end). Same length: no brevity penalty.
    hyp = CAPTION.replace("green", "gray")
    precisions = [14 / 15, 12 / 14, 10 / 13, 9 / 12]
    expected = math.prod(precisions) ** 0.25  # (15120 / 32760) ** 0.25 = 0.82424
    result = caption_metrics([hyp], [CAPTION])
    assert result["exact_match"] == 0.0
    assert result["bleu4"] == pytest.approx(expected)
    assert result["bleu4"] == pytest.approx(0.82424, abs=1e-5)


def test_caption_bleu_brevity_penalty() -> None:
    # hyp: a large gray hexagon . (c = 5)
    # ref: a large gray hexagon and a small red star . (r = 10)
    # precisions 5/5, 3/4, 2/3, 1/2 (only n-grams ending in "." miss); BP = exp(1 - 10/5).
    hyp = "a large gray hexagon."
    ref = "a large gray hexagon and a small red star."
    expected = math.exp(-1.0) * (1.0 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert caption_metrics([hyp], [ref])["bleu4"] == pytest.approx(expected)


def test_caption_bleu_is_corpus_level() -> None:
    # Pair 2 ("a red star ." vs "a blue star .") has no 4-gram match, so its sentence BLEU is 0;
    # the corpus sums counts first. Pair 1 is identical (5 tokens).
    # unigrams (5+3)/(5+4), bigrams (4+1)/(4+3), trigrams (3+0)/(3+2), 4-grams (2+0)/(2+1).
    hyps = ["a small red circle.", "a red star."]
    refs = ["a small red circle.", "a blue star."]
    expected = (8 / 9 * 5 / 7 * 3 / 5 * 2 / 3) ** 0.25
    assert caption_metrics(hyps, refs)["bleu4"] == pytest.approx(expected)
    assert corpus_bleu([tokenize_caption(hyps[1])], [tokenize_caption(refs[1])]) == 0.0


def test_caption_bleu_clips_repeated_ngrams() -> None:
    # "a a a a ." against "a star .": unigram "a" is clipped to 1 match; no bigram "a a" in ref.
    assert corpus_bleu([["a", "a", "a", "a", "."]], [["a", "star", "."]]) == 0.0


def test_caption_metrics_empty_is_none() -> None:
    assert caption_metrics([], []) == {"exact_match": None, "bleu4": None}


# --- phrase grounding --------------------------------------------------------------------------


def test_box_iou_cases() -> None:
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    # End exclusive: boxes that share the edge x = 10 share no pixel.
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    assert box_iou([0, 0, 10, 10], [30, 30, 40, 40]) == 0.0
    assert box_iou([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0


def test_match_caption_phrases_pairs_repeated_phrases_in_order() -> None:
    # Reference "a small red circle" twice (left, right) and one square; the caption has both
    # circles, in order, and no square. Each circle gets its own box, the square None.
    left, right, square = [0, 0, 10, 10], [50, 0, 60, 10], [20, 20, 30, 30]
    references = [("a small red circle", left), ("a small red circle", right),
                  ("a large blue square", square)]
    predicted = [("a small red circle", [1, 0, 10, 10]), ("a small red circle", [50, 1, 60, 10])]
    pairs = match_caption_phrases(references, predicted)
    assert pairs == [([1, 0, 10, 10], left), ([50, 1, 60, 10], right), (None, square)]
    assert phrase_grounding_accuracy(pairs) == pytest.approx(2 / 3)
    # Generated once, referenced twice: the second reference is unmatched, not reused.
    assert match_caption_phrases(references[:2], predicted[:1])[1] == (None, right)


def test_phrase_grounding_accuracy() -> None:
    gt = [0, 0, 10, 10]
    pairs = [
        ([0, 0, 10, 10], gt),  # IoU 1
        ([0, 0, 10, 5], gt),  # IoU exactly 0.5: counts
        ([0, 0, 10, 4.9], gt),  # IoU 0.49: wrong
        (None, gt),  # not grounded: wrong
    ]
    assert phrase_grounding_accuracy(pairs) == pytest.approx(0.5)
    assert phrase_grounding_accuracy([]) is None
