"""Task heads: segmentation (pixel x phrase logits inside each box) and VQA, with their losses;
caption decoding with a key/value cache against the full causal pass."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from engines.graphs import CaptionPrefixGraph, CaptionStepGraph
from model_export.modeling.config import (
    FPNConfig,
    FusionConfig,
    LanguageConfig,
    SwinConfig,
    TaskHeadsConfig,
    get_preset,
)
from model_export.modeling.mask_head import (
    OUTSIDE_BOX_LOGIT,
    Glipv2MaskHead,
    box_region_mask,
    downsample_masks,
    mask_loss,
    masks_for_image,
)
from model_export.modeling.model import Glipv2Model
from model_export.modeling.vqa_head import (
    Glipv2VqaHead,
    glimpse_grounding_loss,
    vqa_loss,
    vqa_target_scores,
)

CHANNELS, TEXT_DIM, EMBED_DIM = 16, 24, 8
STRIDES = (8, 16, 32, 64, 128)


def _mask_head(seed: int = 0) -> Glipv2MaskHead:
    torch.manual_seed(seed)
    head = Glipv2MaskHead(CHANNELS, TEXT_DIM, embed_dim=EMBED_DIM, num_convs=2,
                          group_norm_groups=4).eval()
    with torch.no_grad():
        head.bias.fill_(0.3)  # a non-zero bias, so the tests see it is added
    return head


def _levels(n: int, height: int, width: int) -> list[torch.Tensor]:
    """Fused P3..P7 of an (height, width) padded input (multiples of 32)."""
    return [torch.randn(n, CHANNELS, math.ceil(height / s), math.ceil(width / s)) for s in STRIDES]


def _phrase_map(n: int, phrases: int, tokens: int) -> torch.Tensor:
    """(N, P, T): phrase p is token p + 1, except that the last phrase is an all-zero row."""
    phrase_map = torch.zeros(n, phrases, tokens)
    for p in range(phrases - 1):
        phrase_map[:, p, p + 1] = 1.0
    return phrase_map


def _boxes(n: int, phrases: int, boxes: int, height: int, width: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random valid xyxy boxes (N, P, K, 4) inside (height, width); the last slot is padding."""
    xy0 = torch.rand(n, phrases, boxes, 2) * torch.tensor([width, height]) * 0.5
    wh = torch.rand(n, phrases, boxes, 2) * torch.tensor([width, height]) * 0.5 + 4.0
    valid = torch.ones(n, phrases, boxes, dtype=torch.bool)
    valid[..., -1] = False
    return torch.cat([xy0, xy0 + wh], dim=-1), valid


def _mask_inputs(n: int, height: int, width: int, phrases: int, boxes: int, tokens: int):
    box, valid = _boxes(n, phrases, boxes, height, width)
    return (_levels(n, height, width), torch.randn(n, tokens, TEXT_DIM),
            _phrase_map(n, phrases, tokens), box, valid)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


# ---------------------------------------------------------------- mask head


def test_mask_head_output_shape_is_stride_4() -> None:
    head = _mask_head()
    logits = head(*_mask_inputs(2, 64, 96, phrases=3, boxes=2, tokens=7))
    assert logits.shape == (2, 3, 2, 16, 24)
    assert head.pixel_embeddings(_levels(1, 64, 96)).shape == (1, EMBED_DIM, 16, 24)


def test_mask_head_inside_box_rule() -> None:
    """Inside a box: the raw scaled dot product + bias; outside, or for a padding box: -1e4."""
    head = _mask_head()
    levels, text = _levels(1, 64, 64), torch.randn(1, 5, TEXT_DIM)
    phrase_map = torch.zeros(1, 1, 5)
    phrase_map[0, 0, 1:3] = 0.5  # a two-token phrase
    # Column centres are 2, 6, 10, ...: x0 = 10 takes column 2 in, x1 = 22 leaves column 5 out.
    boxes = torch.tensor([[[[10.0, 6.0, 22.0, 30.0], [0.0, 0.0, 64.0, 64.0]]]])
    valid = torch.tensor([[[True, False]]])
    with torch.no_grad():
        logits = head(levels, text, phrase_map, boxes, valid)[0, 0]  # (K, 16, 16)
        pixels = head.pixel_embeddings(levels)[0]  # (E, 16, 16)
        tokens = head.text_projection(text)[0]  # (T, E)
    phrase = 0.5 * (tokens[1] + tokens[2])
    # Row centres 6..26 lie in [6, 30): rows 1..6; the row centred on y1 = 30 is outside.
    for i, j in [(1, 2), (3, 4), (6, 3)]:  # inside box 0 (rows 1..6, columns 2..4)
        expected = torch.dot(pixels[:, i, j], phrase) / math.sqrt(EMBED_DIM) + 0.3
        torch.testing.assert_close(logits[0, i, j], expected, atol=1e-5, rtol=1e-5)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[1:7, 2:5] = True
    assert (logits[0][~inside] == OUTSIDE_BOX_LOGIT).all()
    assert (logits[0][inside] > OUTSIDE_BOX_LOGIT / 2).all()
    assert (logits[1] == OUTSIDE_BOX_LOGIT).all()  # invalid box
    assert torch.equal(box_region_mask(boxes[0, 0], valid[0, 0], 16, 16),
                       torch.stack([inside, torch.zeros_like(inside)]))


def test_mask_head_batched_equals_unbatched() -> None:
    head = _mask_head()
    inputs = _mask_inputs(3, 64, 96, phrases=2, boxes=3, tokens=6)
    with torch.no_grad():
        batched = head(*inputs)
        for i in range(3):
            levels, text, phrase_map, boxes, valid = inputs
            single = head([lvl[i:i + 1] for lvl in levels], text[i:i + 1], phrase_map[i:i + 1],
                          boxes[i:i + 1], valid[i:i + 1])
            torch.testing.assert_close(batched[i:i + 1], single, atol=1e-5, rtol=1e-5)


# jit.trace is deprecated in favour of torch.export, but it is what catches shapes frozen into a
# graph; GroupNorm's own batch-size check emits a harmless TracerWarning.
TRACE_WARNINGS = (pytest.mark.filterwarnings("ignore::DeprecationWarning"),
                  pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"))


@TRACE_WARNINGS[0]
@TRACE_WARNINGS[1]
def test_mask_head_trace_generalises_to_other_sizes() -> None:
    """One trace (the future ONNX `mask` graph) serves other image sizes, N, P, K and T."""
    head = _mask_head()
    with torch.no_grad():
        traced = torch.jit.trace(head, _mask_inputs(1, 64, 64, phrases=2, boxes=2, tokens=5))
        other = _mask_inputs(2, 96, 160, phrases=3, boxes=4, tokens=9)
        expected = head(*other)
        actual = traced(*other)
    assert actual.shape == expected.shape == (2, 3, 4, 24, 40)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- masks_for_image


def test_masks_for_image_shapes() -> None:
    logits = torch.randn(3, 32, 40)
    masks = masks_for_image(logits, resized_hw=(120, 150), padded_hw=(128, 160),
                            original_hw=(480, 600))
    assert masks.shape == (3, 480, 600) and masks.dtype == torch.bool
    empty = masks_for_image(torch.zeros(0, 32, 40), (120, 150), (128, 160), (480, 600))
    assert empty.shape == (0, 480, 600)


def test_masks_for_image_rectangle_comes_back_in_original_pixels() -> None:
    original_hw, resized_hw, padded_hw = (150, 200), (96, 128), (128, 128)
    scale = resized_hw[0] / original_hw[0]  # 0.64 on both axes
    x0, y0, x1, y1 = 50, 30, 150, 120  # the rectangle in original pixels
    centres = (torch.arange(32) + 0.5) * 4  # stride-4 pixel centres, model-input pixels
    inside_x = (centres >= x0 * scale) & (centres < x1 * scale)
    inside_y = (centres >= y0 * scale) & (centres < y1 * scale)
    logits = torch.where(inside_y[:, None] & inside_x[None, :], 8.0, -8.0)[None]  # (1, 32, 32)
    mask = masks_for_image(logits, resized_hw, padded_hw, original_hw)[0]
    expected = torch.zeros(original_hw, dtype=torch.bool)
    expected[y0:y1, x0:x1] = True
    assert _iou(mask, expected) > 0.95


def test_masks_for_image_crops_the_padding() -> None:
    """Logits over the padded area are dropped, not squeezed into the image."""
    logits = torch.full((1, 16, 16), -8.0)
    logits[0, :, 12:] = 8.0  # only the right padding (x >= 48 of a 48-wide image) is positive
    mask = masks_for_image(logits, resized_hw=(64, 48), padded_hw=(64, 64), original_hw=(64, 48))
    assert not mask.any()


# ---------------------------------------------------------------- mask losses


def test_downsample_masks_area_average_with_padding() -> None:
    masks = torch.zeros(2, 6, 5, dtype=torch.bool)
    masks[0, :2, :2] = True  # 4 of the 16 pixels of cell (0, 0)
    masks[1] = True  # the 6 x 5 image; padding to 8 x 8 is empty
    down = downsample_masks(masks, padded_hw=(8, 8))
    assert down.shape == (2, 2, 2)
    torch.testing.assert_close(down[0], torch.tensor([[0.25, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(down[1], torch.tensor([[1.0, 0.25], [0.5, 2 / 16]]))
    assert downsample_masks(torch.zeros(0, 6, 5, dtype=torch.bool), (8, 8)).shape == (0, 2, 2)
    with pytest.raises(ValueError):
        downsample_masks(masks, padded_hw=(10, 8))


def _toy_target() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 16 x 16 map, a box over rows/cols 2..13 and a target rectangle inside it."""
    region = torch.zeros(1, 16, 16, dtype=torch.bool)
    region[0, 2:14, 2:14] = True
    target = torch.zeros(1, 16, 16)
    target[0, 4:10, 3:9] = 1.0
    wrong = torch.zeros(1, 16, 16)
    wrong[0, 8:14, 8:14] = 1.0
    return region, target, wrong


def test_mask_loss_prefers_the_right_mask() -> None:
    region, target, wrong = _toy_target()

    def logits_for(mask: torch.Tensor) -> torch.Tensor:
        return torch.where(region, mask * 10.0 - 5.0, OUTSIDE_BOX_LOGIT)

    right_loss = mask_loss(logits_for(target), target)
    wrong_loss = mask_loss(logits_for(wrong), target)
    assert right_loss < 0.1 < wrong_loss
    # The region is read off the outside-box logit; an explicit region gives the same value.
    torch.testing.assert_close(mask_loss(logits_for(target), target, region=region), right_loss)


def test_mask_loss_ignores_pixels_outside_the_box_and_empty_inputs() -> None:
    region, target, _ = _toy_target()
    logits = torch.where(region, target * 10.0 - 5.0, OUTSIDE_BOX_LOGIT)
    bleeding = target.clone()
    bleeding[0, 0, 0] = 1.0  # a target pixel outside the box, as area-averaging can leave
    torch.testing.assert_close(mask_loss(logits, bleeding), mask_loss(logits, target))
    empty = torch.zeros(0, 16, 16, requires_grad=True)
    loss = mask_loss(empty, torch.zeros(0, 16, 16))
    assert loss.item() == 0.0 and loss.requires_grad
    all_outside = torch.full((1, 16, 16), OUTSIDE_BOX_LOGIT)
    assert mask_loss(all_outside, torch.zeros(1, 16, 16)).item() == pytest.approx(0.0)


def test_mask_loss_decreases_when_training_the_head() -> None:
    torch.manual_seed(0)
    head = Glipv2MaskHead(CHANNELS, TEXT_DIM, embed_dim=EMBED_DIM, num_convs=1,
                          group_norm_groups=4).train()
    levels, text = _levels(1, 64, 64), torch.randn(1, 3, TEXT_DIM)
    phrase_map = torch.tensor([[[0.0, 1.0, 0.0]]])
    boxes = torch.tensor([[[[8.0, 8.0, 56.0, 56.0]]]])
    valid = torch.ones(1, 1, 1, dtype=torch.bool)
    _, target, _ = _toy_target()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        logits = head(levels, text, phrase_map, boxes, valid)[0, 0]  # (K=1, 16, 16)
        loss = mask_loss(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- VQA head


def _vqa_head(glimpses: int = 1) -> Glipv2VqaHead:
    torch.manual_seed(0)
    return Glipv2VqaHead(TEXT_DIM, hidden_dim=32, num_answers=11, glimpses=glimpses).eval()


def _text_mask(valid: list[int], length: int) -> torch.Tensor:
    return torch.tensor([[1] * v + [0] * (length - v) for v in valid])


@pytest.mark.parametrize("glimpses", [1, 2])
def test_vqa_head_shape_and_padding_invariance(glimpses: int) -> None:
    head = _vqa_head(glimpses)
    text, mask = torch.randn(2, 6, TEXT_DIM), _text_mask([6, 3], 6)
    with torch.no_grad():
        logits = head(text, mask)
        assert logits.shape == (2, 11)
        changed = text.clone()
        changed[1, 3:] = 1e3 * torch.randn(3, TEXT_DIM)  # different pad features
        torch.testing.assert_close(head(changed, mask), logits, atol=0, rtol=0)
        # More pad slots (a batch padded to a longer prompt) change nothing either.
        longer = torch.cat([text, torch.randn(2, 4, TEXT_DIM)], dim=1)
        torch.testing.assert_close(head(longer, _text_mask([6, 3], 10)), logits,
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("glimpses", [1, 2])
def test_vqa_head_batched_equals_unbatched(glimpses: int) -> None:
    head = _vqa_head(glimpses)
    text, mask = torch.randn(3, 7, TEXT_DIM), _text_mask([7, 2, 5], 7)
    with torch.no_grad():
        batched = head(text, mask)
        for i, valid in enumerate([7, 2, 5]):
            single = head(text[i:i + 1, :valid], mask[i:i + 1, :valid])
            torch.testing.assert_close(batched[i:i + 1], single, atol=1e-6, rtol=1e-6)


@TRACE_WARNINGS[0]
@TRACE_WARNINGS[1]
@pytest.mark.parametrize("glimpses", [1, 2])
def test_vqa_head_trace_generalises_to_other_sizes(glimpses: int) -> None:
    head = _vqa_head(glimpses)
    with torch.no_grad():
        traced = torch.jit.trace(head, (torch.randn(1, 5, TEXT_DIM), _text_mask([4], 5)))
        text, mask = torch.randn(3, 9, TEXT_DIM), _text_mask([9, 1, 6], 9)
        torch.testing.assert_close(traced(text, mask), head(text, mask), atol=1e-6, rtol=1e-6)


def test_vqa_head_glimpses_pool_with_their_own_weights() -> None:
    head = _vqa_head(glimpses=2)
    text = torch.zeros(1, 4, TEXT_DIM)
    text[0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    text[0, :, 1] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # marks token 2
    with torch.no_grad():
        head.attention.weight.zero_()
        head.attention.bias.zero_()
        head.attention.weight[1, 1] = 100.0  # glimpse 1 reads token 2 only
        pooled = head.pool(text, _text_mask([4], 4))
    assert pooled.shape == (1, 2 * TEXT_DIM)
    assert pooled[0, 0].item() == pytest.approx(2.5)  # glimpse 0: uniform over the 4 tokens
    assert pooled[0, TEXT_DIM].item() == pytest.approx(3.0)  # glimpse 1: token 2


def test_glimpse_grounding_loss_is_the_weight_on_the_named_words() -> None:
    weights = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])
    named = torch.tensor([[False, True, True, False], [False, False, False, False]])
    # The second question names no object and does not count.
    assert glimpse_grounding_loss(weights, named).item() == pytest.approx(-math.log(0.5))
    assert glimpse_grounding_loss(weights, torch.zeros_like(named)).item() == 0.0


# ---------------------------------------------------------------- VQA loss and accuracy


def test_vqa_loss_is_bce_times_num_answers() -> None:
    logits = torch.tensor([[0.0, 0.0, 2.0]])
    targets = torch.tensor([[1.0, 0.0, 0.5]])
    softplus = math.log1p(math.exp(2.0))  # -log(1 - sigmoid(2))
    per_answer = [math.log(2.0), math.log(2.0), 0.5 * (softplus - 2.0) + 0.5 * softplus]
    expected = sum(per_answer) / 3 * 3  # element mean times A = 3
    assert vqa_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_vqa_target_scores_hand_computed() -> None:
    vocab = ["yes", "no", "2"]
    scores = vqa_target_scores([["yes"] * 2 + ["no"] * 7 + ["maybe"], ["2"]], vocab)
    torch.testing.assert_close(scores, torch.tensor([[2 / 3, 1.0, 0.0], [0.0, 0.0, 1.0]]))


# ---------------------------------------------------------------- caption decoding

CLS = 101


def _caption_model() -> Glipv2Model:
    """The small preset (tied LM head, positions, image values, pixel colours, coloured levels)
    at toy widths, with a tuned prompt offset; the zero-initialised paths weighted so they count.
    """
    config = get_preset("small")
    config.swin = SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
    config.fpn = FPNConfig(out_channels=16, lateral_skip=True)
    config.language = LanguageConfig(hidden_size=32, num_layers=2, num_heads=4,
                                     intermediate_size=64, prompt_offset_len=16)
    config.fusion = FusionConfig(num_layers=2, channels=16, embed_dim=32, num_heads=4,
                                 group_norm_groups=4, position_encoding=True, image_values=True,
                                 pixel_colours=True, colour_levels=True)
    config.tasks = TaskHeadsConfig()
    torch.manual_seed(0)
    model = Glipv2Model(config).eval()
    grown = (".positions.", ".out_image_proj.", ".values_colour_proj.", ".skip_blocks.",
             ".colour_levels.", "prompt_offset")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in grown):
                parameter.normal_(std=0.3)
    return model


def _caption_states(model: Glipv2Model, images: Tensor) -> list[Tensor]:
    with torch.no_grad():
        visual = model.encode_image(images)
        states, _ = model.fusion.caption_image_states(visual, model.image_colours(images))
    return states.tensors()


def test_caption_prefix_is_the_causal_pass() -> None:
    """caption_prefix on right-padded captions of different lengths: the fused tokens and the
    LM logits of `model(..., causal=True)` (projections per region, no cache), the logits at
    each row's last real token, and keys/values of every text layer."""
    model = _caption_model()
    images = torch.randn(2, 3, 64, 96)
    ids = torch.randint(1000, 30000, (2, 7))
    ids[:, 0] = CLS
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        expected = model(images, ids, mask, causal=True)
        logits, fused_text, keys, values = CaptionPrefixGraph(model)(
            ids, mask, torch.zeros(2, 7, 4), *_caption_states(model, images))
    assert expected.mlm_logits is not None
    for row, count in enumerate((7, 4)):
        torch.testing.assert_close(fused_text[row, :count], expected.fused_text[row, :count])
        torch.testing.assert_close(logits[row], expected.mlm_logits[row, count - 1])
    layers = model.config.language.num_layers + model.config.fusion.num_layers
    assert keys.shape == values.shape == (2, layers, 4, 7, 8)


def test_caption_step_with_cache_decodes_as_the_full_prefix() -> None:
    """Token by token, caption_prefix([CLS]) then caption_step with the cache, rows joining at
    different steps (so their caches are right padded, the padding filled with noise), two
    rows on one image and one on another, some tokens on boxes: every step's next-token
    logits are the full prefix's within 1e-4, and the cache ends as the full prefix's."""
    model = _caption_model()
    prefix_graph, step_graph = CaptionPrefixGraph(model), CaptionStepGraph(model)
    states = _caption_states(model, torch.randn(2, 3, 64, 96))
    generator = torch.Generator().manual_seed(1)
    box = torch.tensor([[0.0, 0.0, 40.0, 32.0], [24.0, 8.0, 96.0, 64.0]])
    # (image, token ids, token boxes, step it joins at)
    rows: list[tuple[int, Tensor, Tensor, int]] = []
    for image, length, start, boxed in ((0, 8, 0, slice(2, 5)), (1, 5, 3, slice(1, 3)),
                                        (0, 6, 1, slice(0, 0))):
        ids = torch.randint(1000, 30000, (length,), generator=generator)
        ids[0] = CLS
        boxes = torch.zeros(length, 4)
        boxes[boxed] = box[image]
        rows.append((image, ids, boxes, start))
    caches: dict[int, tuple[Tensor, Tensor]] = {}
    steps = max(start + len(ids) for _, ids, _, start in rows)
    compared = 0
    for step in range(steps):
        live = [r for r, (_, ids, _, start) in enumerate(rows) if start <= step < start + len(ids)]
        joining = [r for r in live if rows[r][3] == step]
        going = [r for r in live if rows[r][3] < step]
        logits: dict[int, Tensor] = {}
        with torch.no_grad():
            if joining:
                index = torch.tensor([rows[r][0] for r in joining])
                ids = torch.full((len(joining), 1), CLS)
                boxes = torch.stack([rows[r][2][:1] for r in joining])
                out = prefix_graph(ids, torch.ones_like(ids), boxes, *(s[index] for s in states))
                for i, r in enumerate(joining):
                    logits[r] = out[0][i]
                    caches[r] = (out[2][i:i + 1], out[3][i:i + 1])
            if going:
                logits.update(_step_rows(step_graph, states, rows, going, step, caches,
                                         generator))
            for r, got in logits.items():
                image, ids, boxes, start = rows[r]
                t = step - start + 1
                expected = prefix_graph(ids[None, :t], torch.ones(1, t, dtype=torch.long),
                                        boxes[None, :t], *(s[image:image + 1] for s in states))
                torch.testing.assert_close(got, expected[0][0], atol=1e-4, rtol=0)
                compared += 1
    assert compared == sum(len(ids) for _, ids, _, _ in rows)
    for r, (image, ids, boxes, _) in enumerate(rows):
        with torch.no_grad():
            full = prefix_graph(ids[None], torch.ones(1, len(ids), dtype=torch.long),
                                boxes[None], *(s[image:image + 1] for s in states))
        torch.testing.assert_close(caches[r][0], full[2], atol=1e-4, rtol=0)
        torch.testing.assert_close(caches[r][1], full[3], atol=1e-4, rtol=0)


def _step_rows(step_graph: CaptionStepGraph, states: list[Tensor],
               rows: list[tuple[int, Tensor, Tensor, int]], going: list[int], step: int,
               caches: dict[int, tuple[Tensor, Tensor]], generator: torch.Generator
               ) -> dict[int, Tensor]:
    """One caption_step of `going` rows, their caches right padded with noise; appends each
    row's new keys and values to its cache -> each row's next-token logits."""
    lengths = [caches[r][0].shape[3] for r in going]
    _, layers, heads, _, dim = caches[going[0]][0].shape
    shape = (len(going), layers, heads, max(lengths), dim)
    keys = 1e3 * torch.randn(shape, generator=generator)
    values = 1e3 * torch.randn(shape, generator=generator)
    past_mask = torch.zeros(len(going), max(lengths), dtype=torch.long)
    for i, (r, length) in enumerate(zip(going, lengths, strict=True)):
        keys[i, :, :, :length], values[i, :, :, :length] = caches[r][0][0], caches[r][1][0]
        past_mask[i, :length] = 1
    # A row's new token is the one at its cache's length, as step - start says too.
    assert lengths == [step - rows[r][3] for r in going]
    ids = torch.stack([rows[r][1][n:n + 1] for r, n in zip(going, lengths, strict=True)])
    boxes = torch.stack([rows[r][2][n:n + 1] for r, n in zip(going, lengths, strict=True)])
    index = torch.tensor([rows[r][0] for r in going])
    logits, new_keys, new_values = step_graph(ids, past_mask, boxes, keys, values,
                                              *(s[index] for s in states))
    assert new_keys.shape == (len(going), layers, heads, 1, dim)
    for i, r in enumerate(going):
        caches[r] = (torch.cat([caches[r][0], new_keys[i:i + 1]], dim=3),
                     torch.cat([caches[r][1], new_values[i:i + 1]], dim=3))
    return {r: logits[i] for i, r in enumerate(going)}
