"""ATSS post-processing: token-to-class scores, ml_nms semantics and the full path by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from model_export.modeling.config import PostprocessConfig, get_preset
from model_export.processing import postprocess as postprocess_module
from model_export.processing.anchors import AnchorGenerator
from model_export.processing.box_coding import BoxCoder
from model_export.processing.postprocess import (
    Detections,
    batched_nms,
    class_scores_from_token_logits,
    nms,
    postprocess_detections,
)

# ---------------------------------------------------------------- class scores


def test_class_score_is_mean_over_tokens() -> None:
    token_probs = torch.tensor([[[0.2, 0.4, 0.9, 0.1], [1.0, 0.0, 0.5, 0.3]]])  # (1, 2, 4)
    positive_map = torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])  # (3, 4)
    scores = class_scores_from_token_logits(token_probs, positive_map)
    # class 0 = token 0; class 1 = mean(tokens 1, 2); class 2 has no token -> 0.
    expected = torch.tensor([[[0.2, (0.4 + 0.9) / 2, 0.0], [1.0, (0.0 + 0.5) / 2, 0.0]]])
    torch.testing.assert_close(scores, expected)
    # A row-normalised map selects the same tokens.
    normalised = positive_map / positive_map.sum(-1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(class_scores_from_token_logits(token_probs, normalised), expected)


def test_class_score_min_is_the_weakest_token() -> None:
    """score_agg "min": a class scores its weakest token (no token: 0), whatever other classes'
    lengths; an unknown aggregation is refused."""
    token_probs = torch.tensor([[[0.2, 0.4, 0.9, 0.1], [1.0, 0.0, 0.5, 0.3]]])  # (1, 2, 4)
    positive_map = torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 1, 1]])
    scores = class_scores_from_token_logits(token_probs, positive_map, "min")
    expected = torch.tensor([[[0.2, 0.4, 0.0, 0.1], [1.0, 0.0, 0.0, 0.3]]])
    torch.testing.assert_close(scores, expected)
    with pytest.raises(ValueError, match="score_agg"):
        class_scores_from_token_logits(token_probs, positive_map, "max")


def test_a_model_config_with_an_unknown_score_aggregation_is_refused() -> None:
    config = get_preset("small")
    config.postprocess.score_agg = "max"
    with pytest.raises(ValueError, match="score_agg"):
        config.validate()


@pytest.mark.parametrize(("section", "field", "value", "message"), [
    ("postprocess", "relations", "boxes", "relations"),
    ("postprocess", "relation_threshold", 1.5, "relation_threshold"),
    ("language", "max_prompt_phrases", 0, "max_prompt_phrases"),
])
def test_a_model_config_out_of_range_is_refused(section: str, field: str, value: object,
                                                message: str) -> None:
    config = get_preset("small")
    setattr(getattr(config, section), field, value)
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_class_score_min_sees_the_colour_word_the_mean_dilutes() -> None:
    """"blue circle" at a red circle: the mean of a low "blue" and a high "circle" still passes a
    0.5 threshold, the weakest word does not; at a blue circle both agree."""
    token_probs = torch.tensor([[[0.1, 0.95], [0.9, 0.95]]])  # red circle, blue circle regions
    blue_circle = torch.tensor([[1.0, 1.0]])
    mean = class_scores_from_token_logits(token_probs, blue_circle, "mean")[0, :, 0]
    weakest = class_scores_from_token_logits(token_probs, blue_circle, "min")[0, :, 0]
    assert mean[0] > 0.5 > weakest[0]
    assert weakest[1] == pytest.approx(0.9)


def test_class_score_token_count_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        class_scores_from_token_logits(torch.zeros(1, 2, 4), torch.zeros(3, 5))


# ---------------------------------------------------------------- NMS


def test_nms_uses_plus_one_areas() -> None:
    # [0, 0, 1, 1] and [1, 0, 2, 1] share only the column x = 1. Without +1: intersection 0,
    # IoU 0. With +1: intersection 1 * 2 = 2, areas 2 * 2 = 4, IoU = 2 / (4 + 4 - 2) = 1/3.
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 2.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.3).tolist() == [0]  # 1/3 > 0.3: suppressed
    assert nms(boxes, scores, 0.34).tolist() == [0, 1]


def test_nms_suppresses_strictly_above_threshold() -> None:
    # [0, 0, 3, 1]: area 4 * 2 = 8; [0, 0, 1, 1]: area 4; intersection 2 * 2 = 4;
    # IoU = 4 / (8 + 4 - 4) = 0.5 exactly.
    boxes = torch.tensor([[0.0, 0.0, 3.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]  # equal is not above
    assert nms(boxes, scores, 0.49).tolist() == [0]


def test_batched_nms_only_within_a_label() -> None:
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 9.0]])
    scores = torch.tensor([0.5, 0.9, 0.7])
    labels = torch.tensor([0, 1, 0])
    # Box 2 suppresses box 0 (same label, lower score); box 1 has its own label.
    assert batched_nms(boxes, scores, labels, 0.6).tolist() == [1, 2]


def test_nms_greedy_only_kept_boxes_suppress() -> None:
    # A = [0, 0, 9, 9], B = [3, 0, 12, 9], C = [6, 0, 15, 9], all areas 10 * 10 = 100.
    # IoU(A, B) = IoU(B, C) = 70 / 130 = 0.54; IoU(A, C) = 40 / 160 = 0.25.
    # A suppresses B; B is gone, so C survives.
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [3.0, 0.0, 12.0, 9.0], [6.0, 0.0, 15.0, 9.0]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]


def test_nms_returns_ascending_indices_and_breaks_ties_by_input_order() -> None:
    separate = torch.tensor([[0.0, 0.0, 1.0, 1.0], [10.0, 0.0, 11.0, 1.0], [20.0, 0.0, 21.0, 1.0]])
    assert nms(separate, torch.tensor([0.1, 0.9, 0.5]), 0.5).tolist() == [0, 1, 2]
    same = torch.tensor([[0.0, 0.0, 9.0, 9.0]]).repeat(3, 1)
    # Equal scores: the stable sort visits index 0 first, which suppresses the others.
    assert nms(same, torch.tensor([0.5, 0.5, 0.5]), 0.5).tolist() == [0]
    assert nms(same, torch.tensor([0.4, 0.5, 0.5]), 0.5).tolist() == [1]


def test_nms_empty() -> None:
    keep = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert keep.shape == (0,) and keep.dtype == torch.int64


def _literal_ml_nms(boxes: list[list[float]], scores: list[float], labels: list[int],
                    threshold: float) -> list[int]:
    """Scalar port of ml_nms.cu (float64 here; the test boxes avoid rounding edge cases)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable
    removed = [False] * len(order)
    keep = []
    for r, i in enumerate(order):
        if removed[r]:
            continue
        keep.append(i)
        a = boxes[i]
        for s in range(r + 1, len(order)):
            b = boxes[order[s]]
            if labels[i] != labels[order[s]]:
                continue
            w = max(min(a[2], b[2]) - max(a[0], b[0]) + 1, 0.0)
            h = max(min(a[3], b[3]) - max(a[1], b[1]) + 1, 0.0)
            area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
            area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
            if w * h / (area_a + area_b - w * h) > threshold:
                removed[s] = True
    return sorted(keep)


def test_batched_nms_matches_literal_port_across_row_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = torch.Generator().manual_seed(0)
    corners = torch.randint(0, 40, (80, 2), generator=generator).float()
    sizes = torch.randint(1, 25, (80, 2), generator=generator).float()
    boxes = torch.cat((corners, corners + sizes), dim=1)
    scores = torch.randint(0, 20, (80,), generator=generator).float() / 20  # many ties
    labels = torch.randint(0, 3, (80,), generator=generator)
    expected = _literal_ml_nms(boxes.tolist(), scores.tolist(), labels.tolist(), 0.4)
    assert batched_nms(boxes, scores, labels, 0.4).tolist() == expected
    monkeypatch.setattr(postprocess_module, "_IOU_ROW_CHUNK", 7)
    assert batched_nms(boxes, scores, labels, 0.4).tolist() == expected


# ---------------------------------------------------------------- full post-processing
#
# One level, one image, a 1 x 4 feature map at stride 8 with 64-px anchors:
#   location x: anchor [-28 + 8x, -28, 35 + 8x, 35], width 64, centre (3.5 + 8x, 3.5).
# Image (resized, unpadded) 40 x 50 (h x w): boxes are clipped to x <= 49, y <= 39.
# Prompt: T = 3 tokens; class 0 = token 0, class 1 = tokens 1 and 2.
# pre_nms_thresh = 0.5 so that sigmoid(0) = 0.5 sits exactly on the threshold.
#
# loc  token logits      class probs                          ctr logit -> sigmoid
#  0   [2, 0, 0]         c0 = s(2) = 0.880797, c1 = 0.5 (out)        0 -> 0.5
#  1   [1, 3, 1]         c0 = s(1) = 0.731059, c1 = (s(3) + s(1)) / 2 = 0.841816
#                                                                    0 -> 0.5
#  2   [-5, 4, 4]        c0 = 0.0067 (out), c1 = s(4) = 0.982014    -3 -> 0.047426
#  3   [0.5, -6, 0]      c0 = s(0.5) = 0.622459, c1 = 0.2512 (out)  -4 -> 0.017986
#
# candidate  product = prob * ctr     score = sqrt   box (decoded -> clipped)
# (0, c0)    0.440399                 0.663625       deltas 0: anchor -> [0, 0, 35, 35]
# (1, c0)    0.365529                 0.604590       deltas 0: anchor -> [0, 0, 43, 35]
# (1, c1)    0.420908                 0.648774       same box as (1, c0)
# (2, c1)    0.046573 (< 0.5, but the threshold is on the class probability)
#                                     0.215807       dx = 5 -> centre 19.5 + 0.5 * 64 = 51.5,
#                                                    [20, -28, 83, 35] -> [20, 0, 49, 35]
# (3, c0)    0.011196                 0.105810       dw = -5 ln 2 -> w = 32, centre 27.5,
#                                                    [12, -28, 43, 35] -> [12, 0, 43, 35]
# NMS at 0.6 (+1 areas): label 0: IoU((0,c0), (1,c0)) = 36 * 36 / (44 * 36) = 0.82 -> (1, c0)
# suppressed; IoU((0,c0), (3,c0)) = 24 * 36 / (36 * 36 + 32 * 36 - 24 * 36) = 0.55 -> kept.
# Label 1: IoU((1,c1), (2,c1)) = 24 * 36 / (44 * 36 + 30 * 36 - 24 * 36) = 0.48 -> kept.

SCORE_0C0 = 0.6636253
SCORE_1C1 = 0.6487744
SCORE_2C1 = 0.2158075
SCORE_3C0 = 0.1058097
BOX_0 = [0.0, 0.0, 35.0, 35.0]
BOX_1 = [0.0, 0.0, 43.0, 35.0]
BOX_2 = [20.0, 0.0, 49.0, 35.0]
BOX_3 = [12.0, 0.0, 43.0, 35.0]


def _tiny_inputs() -> dict:
    token_logits = torch.tensor(
        [[2.0, 0.0, 0.0], [1.0, 3.0, 1.0], [-5.0, 4.0, 4.0], [0.5, -6.0, 0.0]]
    )[None]  # (1, HW=4, T=3)
    centerness = torch.tensor([0.0, 0.0, -3.0, -4.0]).reshape(1, 1, 1, 4)
    deltas = torch.zeros(1, 4, 1, 4)  # (N, 4, H, W)
    deltas[0, 0, 0, 2] = 5.0  # location 2: dx
    deltas[0, 2, 0, 3] = -5 * math.log(2.0)  # location 3: dw
    (anchors,) = AnchorGenerator(sizes=(64,), strides=(8,)).grid_anchors([(1, 4)])
    return {
        "box_regression": [deltas],
        "centerness": [centerness],
        "token_logits": [token_logits],
        "anchors": [anchors],
        "positive_map": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]),
        "image_sizes": [(40, 50)],
        "box_coder": BoxCoder(),
    }


def _config(**overrides: float | str) -> PostprocessConfig:
    return dataclasses.replace(
        PostprocessConfig(pre_nms_thresh=0.5, pre_nms_top_n=1000, nms_thresh=0.6,
                          detections_per_img=100, min_size=0.0),
        **overrides,
    )


def _check(found: Detections, boxes: list, scores: list, labels: list) -> None:
    torch.testing.assert_close(found.boxes, torch.tensor(boxes).reshape(-1, 4),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(found.scores, torch.tensor(scores), atol=1e-6, rtol=0)
    assert found.labels.tolist() == labels
    assert found.labels.dtype == torch.int64


def test_postprocess_hand_computed() -> None:
    (found,) = postprocess_detections(**_tiny_inputs(), config=_config())
    _check(found, [BOX_0, BOX_1, BOX_2, BOX_3], [SCORE_0C0, SCORE_1C1, SCORE_2C1, SCORE_3C0],
           [0, 1, 1, 0])


def test_postprocess_scores_classes_by_the_configured_aggregation() -> None:
    """postprocess_detections aggregates tokens as `config.score_agg` says: class 1 spans two
    tokens, so "min" can only lower its candidates' scores, never class 0's one-token ones."""
    (mean,) = postprocess_detections(**_tiny_inputs(), config=_config())
    (weakest,) = postprocess_detections(**_tiny_inputs(), config=_config(score_agg="min"))
    for found in (mean, weakest):
        assert set(found.labels.tolist()) <= {0, 1}
    one_token = {round(float(s), 6) for s, label in zip(mean.scores, mean.labels, strict=True)
                 if label == 0}
    assert one_token == {round(float(s), 6) for s, label in
                         zip(weakest.scores, weakest.labels, strict=True) if label == 0}
    assert float(weakest.scores[weakest.labels == 1].sum()) < float(
        mean.scores[mean.labels == 1].sum())


def test_postprocess_pre_nms_top_n_drops_smallest_product() -> None:
    # Five candidates, four kept: (3, c0) has the smallest product.
    (found,) = postprocess_detections(**_tiny_inputs(), config=_config(pre_nms_top_n=4))
    _check(found, [BOX_0, BOX_1, BOX_2], [SCORE_0C0, SCORE_1C1, SCORE_2C1], [0, 1, 1])


def test_postprocess_detections_per_img_and_min_size() -> None:
    (found,) = postprocess_detections(**_tiny_inputs(), config=_config(detections_per_img=2))
    _check(found, [BOX_0, BOX_1], [SCORE_0C0, SCORE_1C1], [0, 1])
    # +1 widths: box 2 is 49 - 20 + 1 = 30 wide, box 3 is 32 wide.
    (found,) = postprocess_detections(**_tiny_inputs(), config=_config(min_size=31.0))
    _check(found, [BOX_0, BOX_1, BOX_3], [SCORE_0C0, SCORE_1C1, SCORE_3C0], [0, 1, 0])


def test_postprocess_without_nms_keeps_suppressed_box() -> None:
    # nms_thresh <= 0 skips NMS, as boxlist_ml_nms does; (1, c0) comes back.
    (found,) = postprocess_detections(**_tiny_inputs(), config=_config(nms_thresh=0.0))
    assert found.labels.tolist() == [0, 1, 0, 1, 0]
    torch.testing.assert_close(found.scores[2], torch.tensor(0.6045902), atol=1e-6, rtol=0)


def test_postprocess_keeps_ties_at_detection_cap() -> None:
    # Two classes on the same single token set: equal scores, different labels, same box.
    inputs = _tiny_inputs()
    inputs["positive_map"] = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    (found,) = postprocess_detections(**inputs, config=_config(detections_per_img=1))
    # Best score (0, c0) = (0, c1): the kthvalue threshold keeps both; stable order by label.
    assert found.labels.tolist() == [0, 1]
    torch.testing.assert_close(found.scores, torch.tensor([SCORE_0C0, SCORE_0C0]))


def test_postprocess_batch_equals_single_images() -> None:
    inputs = _tiny_inputs()
    second_logits = inputs["token_logits"][0].flip(1)  # locations reversed
    batched = dict(inputs)
    batched["box_regression"] = [inputs["box_regression"][0].repeat(2, 1, 1, 1)]
    batched["centerness"] = [inputs["centerness"][0].repeat(2, 1, 1, 1)]
    batched["token_logits"] = [torch.cat((inputs["token_logits"][0], second_logits))]
    batched["image_sizes"] = [(40, 50), (30, 20)]
    together = postprocess_detections(**batched, config=_config())
    for i in range(2):
        single = dict(inputs)
        single["box_regression"] = [batched["box_regression"][0][i : i + 1]]
        single["centerness"] = [batched["centerness"][0][i : i + 1]]
        single["token_logits"] = [batched["token_logits"][0][i : i + 1]]
        single["image_sizes"] = [batched["image_sizes"][i]]
        (alone,) = postprocess_detections(**single, config=_config())
        assert torch.equal(alone.boxes, together[i].boxes)
        assert torch.equal(alone.scores, together[i].scores)
        assert torch.equal(alone.labels, together[i].labels)
    # The second image is 30 x 20: x clipped to 19, y to 29.
    assert together[1].boxes[:, 0::2].max() <= 19 and together[1].boxes[:, 1::2].max() <= 29


def test_postprocess_two_levels_concatenate() -> None:
    inputs = _tiny_inputs()
    generator = AnchorGenerator(sizes=(64, 128), strides=(8, 16))
    anchors = generator.grid_anchors([(1, 4), (1, 1)])
    # Level 1: one location, class 1 only (tokens [., 2, 2] -> s(2)), centerness 0.
    inputs["box_regression"].append(torch.zeros(1, 4, 1, 1))
    inputs["centerness"].append(torch.zeros(1, 1, 1, 1))
    inputs["token_logits"].append(torch.tensor([[[-9.0, 2.0, 2.0]]]))
    inputs["anchors"] = anchors
    (found,) = postprocess_detections(**inputs, config=_config())
    # Anchor [-56, -56, 71, 71] clipped to [0, 0, 49, 39]; score sqrt(s(2) * 0.5) = 0.663625,
    # label 1. IoU with (1, c1) [0, 0, 43, 35] = 44 * 36 / (50 * 40) = 0.79 -> it suppresses
    # (1, c1) (0.648774 < 0.663625); (2, c1) has IoU 30 * 36 / 2000 = 0.54 -> kept.
    assert found.labels.tolist() == [0, 1, 1, 0]
    torch.testing.assert_close(found.boxes[1], torch.tensor([0.0, 0.0, 49.0, 39.0]))
    torch.testing.assert_close(found.scores[:2], torch.tensor([SCORE_0C0, SCORE_0C0]))


def test_postprocess_no_candidates() -> None:
    inputs = _tiny_inputs()
    inputs["token_logits"] = [torch.full((1, 4, 3), -10.0)]
    (found,) = postprocess_detections(**inputs, config=_config())
    assert len(found) == 0
    assert found.boxes.shape == (0, 4) and found.labels.dtype == torch.int64
