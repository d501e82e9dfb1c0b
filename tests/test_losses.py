"""Training losses: ATSS assignment, centerness, GIoU, token focal loss, L_inter, MLM."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model_export.processing.anchors import AnchorGenerator
from model_export.processing.box_coding import BoxCoder, box_iou_legacy
from model_export.training.losses import (
    ImageTargets,
    PromptInfo,
    SpecialTokenIds,
    atss_assign,
    atss_assign_batch,
    centerness_targets,
    contrastive_region_inputs,
    detection_losses,
    giou_loss,
    inter_image_contrastive_loss,
    inter_image_contrastive_targets,
    mask_tokens,
    mlm_loss,
    soft_token_loss,
    text_attention_loss,
    token_sigmoid_focal_loss,
)


def _two_level_anchors() -> list[torch.Tensor]:
    """A 32 x 32 input: level 0 is 4 x 4 (stride 8, side 16), level 1 is 2 x 2 (stride 16, side 32).

    Level 0 anchor (y, x) is row 4y + x: [-4, -4, 11, 11] + 8 (x, y, x, y), centre (3.5 + 8x, ...).
    Level 1 anchor (y, x) is row 16 + 2y + x: [-8, -8, 23, 23] + 16 (x, y, x, y).
    """
    return AnchorGenerator((16, 32), (8, 16)).grid_anchors([(4, 4), (2, 2)])


# --- ATSS ---------------------------------------------------------------------------------


def test_legacy_iou_uses_plus_one_widths() -> None:
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])  # 10 x 10 pixels
    b = torch.tensor([[5.0, 0.0, 14.0, 9.0]])  # overlap 5 x 10
    assert box_iou_legacy(a, b).item() == pytest.approx(50 / 150)


def test_atss_two_levels_by_hand() -> None:
    anchors = _two_level_anchors()
    # Box A = [0, 0, 14, 10] (15 x 11 = 165 px), centre (7, 5). top_k = 3 per level:
    #   level 0 closest centres: #0 (d2 14.5), #1 (22.5), #4 (54.5); IoUs 132/289 = .4567,
    #     121/300 = .4033, 84/337 = .2493;
    #   level 1: #16 (d2 6.5), #17, #18; IoUs 165/1024 = .1611, 77/1112 = .0692, 45/1144 = .0393;
    #   mean .2298 + std .1725 = threshold .4023 -> #0 and #1, both centres inside A.
    box_a = torch.tensor([[0.0, 0.0, 14.0, 10.0]])
    # Box B = [15, 14, 31, 31], centre (23, 22.5): candidates #10, #11, #14 and #19, #17, #18,
    #   IoUs .4789 .4264 .3842 .2988 .1466 .1387 -> threshold .3123 + .1440 = .4563 -> #10 only.
    box_b = torch.tensor([[15.0, 14.0, 31.0, 31.0]])
    expected_a = torch.full((20,), -1)
    expected_a[[0, 1]] = 0
    assert torch.equal(atss_assign(anchors, box_a, top_k=3), expected_a)
    expected_b = torch.full((20,), -1)
    expected_b[10] = 0
    assert torch.equal(atss_assign(anchors, box_b, top_k=3), expected_b)
    both = torch.full((20,), -1)
    both[[0, 1]] = 0
    both[10] = 1
    matched = atss_assign(anchors, torch.cat([box_a, box_b]), top_k=3)
    assert matched.dtype == torch.int64
    assert torch.equal(matched, both)


def test_atss_centre_must_be_inside_the_box() -> None:
    gt = torch.tensor([[0.0, 0.0, 9.0, 9.0]])  # 10 x 10
    low = [[-5.0, -5.0, 12.0, 12.0], [-3.0, -8.0, 12.0, 12.0], [-8.0, -3.0, 12.0, 12.0]]
    # IoUs .309, .298, .298 and .5 for the candidate below: threshold .351 + .099 = .451.
    outside = torch.tensor([[0.0, 0.0, 19.0, 9.0], *low])  # centre x 9.5 > 9: outside
    inside = torch.tensor([[-1.0, 0.0, 18.0, 9.0], *low])  # centre x 8.5, same IoU .5
    assert box_iou_legacy(outside[:1], gt).item() == pytest.approx(0.5)
    assert box_iou_legacy(inside[:1], gt).item() == pytest.approx(0.5)
    assert torch.equal(atss_assign([outside], gt), torch.tensor([-1, -1, -1, -1]))
    assert torch.equal(atss_assign([inside], gt), torch.tensor([0, -1, -1, -1]))


def test_atss_anchor_positive_for_two_boxes_takes_highest_iou() -> None:
    anchors = _two_level_anchors()
    box_a = [0.0, 0.0, 14.0, 10.0]
    box_c = [0.0, 0.0, 12.0, 12.0]  # anchor #0: IoU .5125 with C, .4567 with A
    assert atss_assign(anchors, torch.tensor([box_a]), top_k=3)[0] == 0
    assert atss_assign(anchors, torch.tensor([box_c]), top_k=3)[0] == 0
    matched = atss_assign(anchors, torch.tensor([box_a, box_c]), top_k=3)
    assert matched[0] == 1
    assert matched[1] == 0  # positive for A only


def test_atss_without_boxes_is_all_background() -> None:
    anchors = _two_level_anchors()
    matched = atss_assign(anchors, torch.zeros(0, 4))
    assert matched.shape == (20,)
    assert matched.dtype == torch.int64
    assert bool((matched == -1).all())


def test_atss_of_a_batch_matches_each_image_alone() -> None:
    """Padding images to the most boxes any has changes no image's matches (padding slots are
    never positive), for images with 0, 1 and several boxes, overlapping ones included."""
    anchors = _two_level_anchors()
    generator = torch.Generator().manual_seed(0)
    images = []
    for count in (3, 0, 1, 5):
        corner = torch.rand(count, 2, generator=generator) * 30
        images.append(torch.cat([corner, corner + 4 + torch.rand(count, 2, generator=generator)
                                 * 20], dim=1))
    batch = atss_assign_batch(anchors, images, top_k=3)
    assert batch.shape == (4, 20)
    for row, boxes in zip(batch, images, strict=True):
        assert torch.equal(row, atss_assign(anchors, boxes, top_k=3))
    assert bool((batch[1] == -1).all()) and bool((batch[3] >= 0).any())


# --- centerness and GIoU ------------------------------------------------------------------


def test_centerness_targets_by_hand() -> None:
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])  # centre (5, 5)
    gt = torch.tensor([[2.0, 1.0, 12.0, 9.0], [0.0, 0.0, 10.0, 10.0]])
    # l, t, r, b = 3, 4, 7, 4 -> sqrt(3/7 * 4/4); a centred box gives 1.
    expected = torch.tensor([math.sqrt(3 / 7), 1.0])
    assert torch.allclose(centerness_targets(anchors, gt), expected)


def test_giou_loss_overlapping_and_disjoint_by_hand() -> None:
    # Overlapping: areas 10 x 10 (no +1), intersection 25, union 175, enclosing 225:
    #   GIoU = 25/175 - 50/225.
    overlap = 1 - (25 / 175 - 50 / 225)
    # Disjoint: areas 4 and 4, no intersection, union 8, enclosing 6 x 2 = 12: GIoU = -4/12.
    disjoint = 1 + 4 / 12
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 2.0, 2.0]])
    target = torch.tensor([[5.0, 5.0, 15.0, 15.0], [4.0, 0.0, 6.0, 2.0]])
    assert giou_loss(pred, target).item() == pytest.approx(overlap + disjoint, rel=1e-6)
    weight = torch.tensor([0.5, 2.0])
    assert giou_loss(pred, target, weight).item() == pytest.approx(
        0.5 * overlap + 2.0 * disjoint, rel=1e-6
    )
    # A zero weight sum falls back to the plain sum, as in the reference.
    assert giou_loss(pred, target, torch.zeros(2)).item() == pytest.approx(overlap + disjoint)
    assert giou_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)


def test_giou_loss_inverted_prediction_is_collapsed() -> None:
    # x1 < x0 is raised to x0: a zero-width box; GIoU = 0 - (enclosing - union) / enclosing.
    pred = torch.tensor([[6.0, 0.0, 2.0, 4.0]])  # -> [6, 0, 6, 4], area 0
    target = torch.tensor([[0.0, 0.0, 4.0, 4.0]])  # area 16
    expected = 1 - (0 - (24 - 16) / 24)  # enclosing [0, 0, 6, 4] = 24
    assert giou_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)


# --- token focal loss ---------------------------------------------------------------------


def test_token_focal_loss_matches_formula_and_ignores_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, generator=gen) * 3
    targets = (torch.rand(2, 5, 4, generator=gen) > 0.7).float()
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    alpha, gamma = 0.25, 2.0
    expected = 0.0
    for n in range(2):
        for a in range(5):
            for t in range(4):
                if not text_mask[n, t]:
                    continue
                p = torch.sigmoid(logits[n, a, t]).item()
                if targets[n, a, t] > 0:
                    expected += -alpha * (1 - p) ** gamma * math.log(p)
                else:
                    expected += -(1 - alpha) * p**gamma * math.log(1 - p)
    loss = token_sigmoid_focal_loss(logits, targets, text_mask, alpha, gamma)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Whatever sits in padded positions does not count.
    logits2, targets2 = logits.clone(), targets.clone()
    logits2[text_mask[:, None, :].expand_as(logits) == 0] = 100.0
    targets2[text_mask[:, None, :].expand_as(logits) == 0] = 0.0
    assert token_sigmoid_focal_loss(logits2, targets2, text_mask).item() == pytest.approx(
        loss.item(), rel=1e-6
    )


def test_soft_token_loss_matches_formula_over_positive_anchors_only() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, generator=gen) * 2
    targets = torch.zeros(2, 3, 4)
    targets[0, 0, 1] = 1.0  # one positive token
    targets[0, 2, 0] = targets[0, 2, 2] = 1.0  # two: half the mass each
    targets[1, 1, 0] = 1.0
    targets[1, 1, 3] = 1.0  # padding: takes no mass and is no target
    text_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    expected = [
        -logits[0, 0].log_softmax(0)[1],
        -(logits[0, 2].log_softmax(0)[0] + logits[0, 2].log_softmax(0)[2]) / 2,
        -logits[1, 1, :3].log_softmax(0)[0],
    ]
    loss = soft_token_loss(logits, targets, text_mask)
    assert loss.item() == pytest.approx(float(sum(expected) / 3), rel=1e-5)
    # Background anchors (rows without a target) do not count, whatever their logits.
    changed = logits.clone()
    changed[0, 1] = changed[1, 0] = 50.0
    assert soft_token_loss(changed, targets, text_mask).item() == pytest.approx(loss.item())
    assert soft_token_loss(logits, torch.zeros_like(targets), text_mask).item() == 0.0


def test_soft_token_gradient_is_the_difference_between_competing_tokens() -> None:
    """Raising every token's logit alike leaves the loss unchanged; only the gap counts."""
    logits = torch.tensor([[[1.0, 1.0, -2.0]]], requires_grad=True)
    targets = torch.tensor([[[1.0, 0.0, 0.0]]])
    soft_token_loss(logits, targets, torch.ones(1, 3)).backward()
    assert logits.grad.sum().item() == pytest.approx(0.0, abs=1e-6)
    assert logits.grad[0, 0, 0] < 0 < logits.grad[0, 0, 1]


# --- L_inter ------------------------------------------------------------------------------


def _hand_built_batch() -> tuple[list[list[str | None]], list[torch.Tensor], list[PromptInfo]]:
    """Three images, T = 6 tokens each.

    0: detection prompt "[CLS] person . dog [SEP] [PAD]"; regions person, dog, background.
    1: detection prompt "[CLS] cat . person [SEP] [PAD]"; regions person, cat.
    2: sentence "[CLS] a person walks [SEP] [PAD]"; region person.
    """
    prompts = [
        PromptInfo([None, "person", None, "dog", None, None], detection_prompt=True),
        PromptInfo([None, "cat", None, "person", None, None], detection_prompt=True),
        PromptInfo([None, None, "person", None, None, None], detection_prompt=False),
    ]
    labels: list[list[str | None]] = [["person", "dog", None], ["person", "cat"], ["person"]]
    positive = [torch.zeros(3, 6), torch.zeros(2, 6), torch.zeros(1, 6)]
    positive[0][0, 1] = 1  # person -> "person"
    positive[0][1, 3] = 1  # dog -> "dog"
    positive[1][0, 3] = 1  # person -> "person"
    positive[1][1, 1] = 1  # cat -> "cat"
    positive[2][0, 2] = 1  # person -> "person" of the sentence
    return labels, positive, prompts


def test_inter_image_targets_propagate_labels_to_detection_prompts_only() -> None:
    labels, positive, prompts = _hand_built_batch()
    targets = inter_image_contrastive_targets(labels, positive, prompts)
    # Columns: caption j's token t at 6 j + t. "person" tokens are 1 (caption 0), 9 (caption 1)
    # and 14 (the sentence: only its own image's region is positive there).
    expected = torch.zeros(6, 18)
    expected[0, [1, 9]] = 1  # image 0 person: own token + caption 1's "person"
    expected[1, [3]] = 1  # image 0 dog: own token only (nobody else says dog)
    # image 0 background (row 2): nothing
    expected[3, [9, 1]] = 1  # image 1 person: own token + caption 0's "person"
    expected[4, [7]] = 1  # image 1 cat: own token only
    expected[5, [14, 1, 9]] = 1  # image 2 person: own sentence token + both detection prompts
    assert torch.equal(targets, expected)


def test_inter_image_targets_own_caption_uses_the_positive_map_only() -> None:
    prompts = [
        PromptInfo([None, "person", None, "person", None], detection_prompt=True),
        PromptInfo([None, "person", None, None, None], detection_prompt=True),
    ]
    positive = [torch.tensor([[0.0, 1, 0, 0, 0]]), torch.tensor([[0.0, 1, 0, 0, 0]])]
    targets = inter_image_contrastive_targets([["person"], ["person"]], positive, prompts)
    # Region 0 is not propagated to the second "person" of its own caption (token 3); the
    # region of image 1 is positive for both "person" tokens of caption 0.
    assert targets.tolist() == [
        [0, 1, 0, 0, 0, 0, 1, 0, 0, 0],
        [0, 1, 0, 1, 0, 0, 1, 0, 0, 0],
    ]


def test_contrastive_region_inputs_from_matches() -> None:
    target = ImageTargets(
        boxes=torch.tensor([[0.0, 0, 4, 4], [5, 5, 9, 9]]),
        positive_map=torch.tensor([[0.0, 1, 0], [0, 0, 1]]),
        box_labels=["circle", "square"],
    )
    matched = torch.tensor([-1, 1, 0, -1, 1])
    labels, positive = contrastive_region_inputs([matched], [target], [torch.tensor([1, 3, 2])])
    assert labels == [["square", None, "circle"]]
    assert positive[0].tolist() == [[0, 0, 1], [0, 0, 0], [0, 1, 0]]


def test_contrastive_loss_lower_when_aligned() -> None:
    labels, positive, prompts = _hand_built_batch()
    targets = inter_image_contrastive_targets(labels, positive, prompts)
    token_valid = torch.tensor([[1, 1, 1, 1, 1, 0]] * 3, dtype=torch.bool).reshape(-1)
    gen = torch.Generator().manual_seed(0)
    concepts = {name: torch.randn(16, generator=gen) for name in ("person", "dog", "cat")}
    filler = torch.randn(18, 16, generator=gen)
    tokens = filler.clone()
    for j, prompt in enumerate(prompts):
        for t, name in enumerate(prompt.token_labels):
            if name is not None:
                tokens[j * 6 + t] = concepts[name]
    region_names = [n for per_image in labels for n in per_image]
    regions = torch.stack(
        [concepts[n] if n else torch.randn(16, generator=gen) for n in region_names]
    )
    aligned = inter_image_contrastive_loss(regions, tokens, targets, token_valid, 0.1)
    shuffled = inter_image_contrastive_loss(
        regions[torch.tensor([1, 4, 2, 5, 0, 3])], tokens, targets, token_valid, 0.1
    )
    assert torch.isfinite(aligned) and torch.isfinite(shuffled)
    assert aligned.item() < shuffled.item()


def test_contrastive_loss_by_hand_and_skips_rows_without_positives() -> None:
    # One region, tokens [pos, neg, padding]; features give cosine 1, 0 and -1.
    region = torch.tensor([[1.0, 0.0]])
    tokens = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0]])
    valid = torch.tensor([True, True, False])
    region_to_token = -math.log(math.e / (math.e + 1))  # softmax over the two valid tokens
    token_to_region = 0.0  # the positive token's only region: softmax over one region
    loss = inter_image_contrastive_loss(region, tokens, targets, valid, temperature=1.0)
    assert loss.item() == pytest.approx((region_to_token + token_to_region) / 2, rel=1e-6)
    none = inter_image_contrastive_loss(region, tokens, torch.zeros(1, 3), valid)
    assert none.item() == 0.0


def test_contrastive_loss_gradient_is_finite_with_padding() -> None:
    region = torch.randn(3, 8, requires_grad=True)
    tokens = torch.randn(5, 8, requires_grad=True)
    targets = torch.tensor(
        [[1.0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]
    )
    valid = torch.tensor([True, True, True, False, False])
    inter_image_contrastive_loss(region, tokens, targets, valid, 0.07).backward()
    assert torch.isfinite(region.grad).all() and torch.isfinite(tokens.grad).all()


# --- detection losses ---------------------------------------------------------------------


def _synthetic_batch() -> tuple[list[torch.Tensor], list[ImageTargets], torch.Tensor]:
    """Boxes A and B of `test_atss_two_levels_by_hand` (positives #0, #1 -> A, #10 -> B at
    top_k 3) in image 0; no box in image 1."""
    anchors = _two_level_anchors()
    targets = [
        ImageTargets(
            boxes=torch.tensor([[0.0, 0.0, 14.0, 10.0], [15.0, 14.0, 31.0, 31.0]]),
            positive_map=torch.tensor([[0.0, 1, 0, 0, 0], [0, 0, 1, 1, 0]]),
            box_labels=["circle", "square"],
        ),
        ImageTargets(  # an image without boxes: every anchor is a negative
            boxes=torch.zeros(0, 4), positive_map=torch.zeros(0, 5), box_labels=[]
        ),
    ]
    text_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    return anchors, targets, text_mask


def test_detection_losses_finite_and_decrease_with_sgd() -> None:
    anchors, targets, text_mask = _synthetic_batch()
    gen = torch.Generator().manual_seed(0)
    sizes = [(4, 4), (2, 2)]
    box_params = [torch.nn.Parameter(0.5 * torch.randn(2, 4, h, w, generator=gen))
                  for h, w in sizes]
    ctr_params = [torch.nn.Parameter(torch.randn(2, 1, h, w, generator=gen)) for h, w in sizes]
    token_params = [torch.nn.Parameter(torch.randn(2, h * w, 5, generator=gen))
                    for h, w in sizes]
    coder = BoxCoder()
    optimiser = torch.optim.SGD([*box_params, *ctr_params, *token_params], lr=0.5)

    def compute() -> torch.Tensor:
        losses = detection_losses(box_params, ctr_params, token_params, anchors, targets,
                                  text_mask, coder, top_k=3)
        return losses.total()

    first = detection_losses(box_params, ctr_params, token_params, anchors, targets, text_mask,
                             coder, top_k=3)
    assert first.num_positives == 3.0  # anchors #0, #1 (box A) and #10 (box B)
    assert torch.equal(first.matched_gt[0][[0, 1, 10]], torch.tensor([0, 0, 1]))
    assert bool((first.matched_gt[1] == -1).all())
    for value in (first.loss_box_giou, first.loss_centerness, first.loss_token):
        assert value.dim() == 0 and torch.isfinite(value) and value.item() > 0
    start = compute().item()
    for _ in range(10):
        optimiser.zero_grad()
        loss = compute()
        loss.backward()
        optimiser.step()
    assert compute().item() < 0.7 * start


def test_detection_losses_normalisation_matches_reference_formulas() -> None:
    anchors, targets, text_mask = _synthetic_batch()
    coder = BoxCoder()
    gen = torch.Generator().manual_seed(1)
    box = [torch.randn(2, 4, 4, 4, generator=gen) * 0.3, torch.randn(2, 4, 2, 2, generator=gen)]
    ctr = [torch.randn(2, 1, 4, 4, generator=gen), torch.randn(2, 1, 2, 2, generator=gen)]
    tok = [torch.randn(2, 16, 5, generator=gen), torch.randn(2, 4, 5, generator=gen)]
    losses = detection_losses(box, ctr, tok, anchors, targets, text_mask, coder, top_k=3)

    all_anchors = torch.cat(anchors)
    pos = torch.tensor([0, 1, 10])
    gt = targets[0].boxes[torch.tensor([0, 0, 1])]
    deltas = torch.cat([b.permute(0, 2, 3, 1).reshape(2, -1, 4) for b in box], 1)[0, pos]
    ctr_logits = torch.cat([c.reshape(2, -1) for c in ctr], 1)[0, pos]
    ctr_t = centerness_targets(all_anchors[pos], gt)
    pred = coder.decode(deltas, all_anchors[pos])
    expected_box = 2.0 * giou_loss(pred, gt, ctr_t) / ctr_t.sum()
    expected_ctr = F.binary_cross_entropy_with_logits(ctr_logits, ctr_t, reduction="sum") / 3
    token_targets = torch.zeros(2, 20, 5)
    token_targets[0, pos] = targets[0].positive_map[torch.tensor([0, 0, 1])]
    expected_tok = token_sigmoid_focal_loss(torch.cat(tok, 1), token_targets, text_mask) / 3
    assert losses.loss_box_giou.item() == pytest.approx(expected_box.item(), rel=1e-5)
    assert losses.loss_centerness.item() == pytest.approx(expected_ctr.item(), rel=1e-5)
    assert losses.loss_token.item() == pytest.approx(expected_tok.item(), rel=1e-5)
    assert losses.loss_soft_token is None  # only computed when asked for
    with_soft = detection_losses(box, ctr, tok, anchors, targets, text_mask, coder, top_k=3,
                                 soft_token=True)
    expected_soft = soft_token_loss(torch.cat(tok, 1), token_targets, text_mask)
    assert with_soft.loss_soft_token.item() == pytest.approx(expected_soft.item(), rel=1e-5)


def test_detection_losses_without_any_box() -> None:
    anchors, _, text_mask = _synthetic_batch()
    empty = ImageTargets(boxes=torch.zeros(0, 4), positive_map=torch.zeros(0, 5))
    box = [torch.zeros(1, 4, 4, 4, requires_grad=True), torch.zeros(1, 4, 2, 2)]
    ctr = [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]
    tok = [torch.zeros(1, 16, 5, requires_grad=True), torch.zeros(1, 4, 5)]
    losses = detection_losses(box, ctr, tok, anchors, [empty], text_mask[:1], BoxCoder())
    assert losses.num_positives == 1.0
    assert losses.loss_box_giou.item() == 0.0 and losses.loss_centerness.item() == 0.0
    assert losses.loss_token.item() > 0
    losses.total().backward()
    assert tok[0].grad is not None


# --- MLM ----------------------------------------------------------------------------------


SPECIALS = SpecialTokenIds.of(mask=103, special=[0, 100, 101, 102])  # PAD UNK CLS SEP


def _token_batch(n: int = 64, t: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (n, t), generator=gen)
    lengths = torch.randint(5, t + 1, (n,), generator=gen)
    attention = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 101
    ids[torch.arange(n), lengths - 1] = 102
    ids[attention == 0] = 0
    return ids, attention


def test_mask_tokens_never_touches_specials_or_padding() -> None:
    ids, attention = _token_batch()
    masked, labels = mask_tokens(ids, attention, SPECIALS, vocab_size=30522,
                                 generator=torch.Generator().manual_seed(1))
    protected = (attention == 0) | torch.isin(ids, torch.tensor([0, 100, 101, 102, 103]))
    assert torch.equal(masked[protected], ids[protected])
    assert bool((labels[protected] == -100).all())
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    # Random replacements are never special tokens.
    replaced = chosen & (masked != 103) & (masked != ids)
    assert not bool(torch.isin(masked[replaced], torch.tensor([0, 100, 101, 102])).any())


def test_mask_tokens_rates() -> None:
    ids, attention = _token_batch(n=400, t=64)
    masked, labels = mask_tokens(ids, attention, SPECIALS, vocab_size=30522, probability=0.15,
                                 generator=torch.Generator().manual_seed(2))
    eligible = (attention > 0) & ~torch.isin(ids, torch.tensor([101, 102]))
    chosen = labels != -100
    rate = chosen.sum().item() / eligible.sum().item()
    assert rate == pytest.approx(0.15, abs=0.01)
    as_mask = (masked[chosen] == 103).float().mean().item()
    unchanged = (masked[chosen] == ids[chosen]).float().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.03)
    assert unchanged == pytest.approx(0.1, abs=0.03)


def test_mask_tokens_is_reproducible() -> None:
    ids, attention = _token_batch()
    a = mask_tokens(ids, attention, SPECIALS, 30522, generator=torch.Generator().manual_seed(3))
    b = mask_tokens(ids, attention, SPECIALS, 30522, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mlm_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 11, generator=gen)
    labels = torch.tensor([[-100, 3, -100, 7], [-100, -100, 1, -100]])
    expected = -(
        logits[0, 1].log_softmax(-1)[3] + logits[0, 3].log_softmax(-1)[7]
        + logits[1, 2].log_softmax(-1)[1]
    ) / 3
    assert mlm_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert mlm_loss(logits, torch.full((2, 4), -100)).item() == 0.0


def test_text_attention_loss_is_minus_log_mass_on_the_tokens_boxes() -> None:
    """Hand-built: 4 regions, one box holding regions 0 and 1, token 1 positive to it."""
    centres = torch.tensor([[5.0, 5.0], [15.0, 5.0], [50.0, 50.0], [80.0, 80.0]])
    boxes = [torch.tensor([[0.0, 0.0, 19.0, 9.0]])]
    pmap = [torch.tensor([[0.0, 1.0, 0.0]])]  # (K=1, T=3)
    uniform = torch.full((1, 2, 3, 4), 0.25)  # (N, heads, T, R)
    loss = text_attention_loss([uniform], pmap, boxes, centres)
    assert loss.item() == pytest.approx(-math.log(0.5))
    # one head on the box, one elsewhere: the mean over heads puts half the mass inside
    split = torch.zeros(1, 2, 3, 4)
    split[0, 0, :, 0] = 1.0
    split[0, 1, :, 3] = 1.0
    assert text_attention_loss([split], pmap, boxes, centres).item() == pytest.approx(
        -math.log(0.5))
    focused = torch.zeros(1, 2, 3, 4)
    focused[0, :, 1, 1] = 1.0  # token 1 looks inside; tokens 0 and 2 have no box and don't count
    focused[0, :, 0, 3] = 1.0
    assert text_attention_loss([focused, focused], pmap, boxes, centres).item() == pytest.approx(
        0.0, abs=1e-6)
    # nothing to supervise (no boxes): zero, not NaN
    empty = text_attention_loss([uniform], [torch.zeros(0, 3)], [torch.zeros(0, 4)], centres)
    assert empty.item() == 0.0


def test_text_attention_loss_weighs_each_supervised_image_once() -> None:
    """A batch is the mean of its images' losses (images without positive tokens left out),
    whatever number of boxes and positive tokens each has."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.rand(30, 2, generator=generator) * 100
    maps = [torch.softmax(torch.randn(3, 2, 5, 30, generator=generator), dim=-1)]
    pmaps = [torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]]),
             torch.zeros(0, 5), torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])]
    boxes = [torch.tensor([[0.0, 0.0, 60.0, 60.0], [40.0, 40.0, 99.0, 99.0]]), torch.zeros(0, 4),
             torch.tensor([[10.0, 10.0, 90.0, 90.0]])]
    alone = [text_attention_loss([maps[0][i:i + 1]], [pmaps[i]], [boxes[i]], centres)
             for i in (0, 2)]
    torch.testing.assert_close(text_attention_loss(maps, pmaps, boxes, centres),
                               (alone[0] + alone[1]) / 2)
    assert alone[0] != alone[1]
