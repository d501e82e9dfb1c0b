"""BoxCoder, clipping and rescaling against hand-computed values (legacy +1 convention)."""

from __future__ import annotations

import math

import torch

from model_export.modeling.config import HeadConfig
from model_export.processing.box_coding import (
    BoxCoder,
    clip_boxes_to_image,
    legacy_areas,
    legacy_sizes,
    rescale_boxes,
    to_exclusive,
    to_legacy,
)


def test_decode_hand_computed() -> None:
    # Anchor [-28, -28, 35, 35]: width = 35 - (-28) + 1 = 64, centre = (35 - 28) / 2 = 3.5.
    # Deltas (5, -2.5, 5 ln 2, 0) / weights (10, 10, 5, 5) = (0.5, -0.25, ln 2, 0):
    #   cx = 0.5 * 64 + 3.5 = 35.5, cy = -0.25 * 64 + 3.5 = -12.5, w = 2 * 64 = 128, h = 64
    #   x0 = 35.5 - 0.5 * 127 = -28, x1 = 35.5 + 63.5 = 99
    #   y0 = -12.5 - 0.5 * 63 = -44, y1 = -12.5 + 31.5 = 19
    coder = BoxCoder()
    anchors = torch.tensor([[-28.0, -28.0, 35.0, 35.0]])
    deltas = torch.tensor([[5.0, -2.5, 5 * math.log(2.0), 0.0]])
    boxes = coder.decode(deltas, anchors)
    torch.testing.assert_close(boxes, torch.tensor([[-28.0, -44.0, 99.0, 19.0]]),
                               atol=1e-4, rtol=0)


def test_encode_hand_computed() -> None:
    # Inverse of the case above: the box [-28, -44, 99, 19] w.r.t. anchor [-28, -28, 35, 35].
    coder = BoxCoder()
    anchors = torch.tensor([[-28.0, -28.0, 35.0, 35.0]])
    boxes = torch.tensor([[-28.0, -44.0, 99.0, 19.0]])
    expected = torch.tensor([[5.0, -2.5, 5 * math.log(2.0), 0.0]])
    torch.testing.assert_close(coder.encode(boxes, anchors), expected, atol=1e-5, rtol=0)


def test_round_trip_batched_shapes() -> None:
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(2, 3, 2, generator=generator) * 200
    sizes = torch.rand(2, 3, 2, generator=generator) * 100 + 1
    gt = torch.cat((corners, corners + sizes), dim=-1).double()  # (2, 3, 4)
    anchors = torch.tensor([-28.0, -28.0, 35.0, 35.0], dtype=torch.float64).expand(2, 3, 4)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    deltas = coder.encode(gt, anchors)
    assert deltas.shape == (2, 3, 4)
    torch.testing.assert_close(coder.decode(deltas, anchors), gt)
    # Batched decode equals row-by-row decode.
    rows = coder.decode(deltas.reshape(-1, 4), anchors.reshape(-1, 4))
    torch.testing.assert_close(rows.reshape(2, 3, 4), coder.decode(deltas, anchors))


def test_decode_clamps_only_large_dw_dh() -> None:
    # Anchor [0, 0, 63, 63]: width 64, centre 31.5. dw = 50 / 5 = 10 is clamped at
    # log(1000 / 16), so w = 62.5 * 64 = 4000: x0 = 31.5 - 0.5 * 3999 = -1968, x1 = 2031.
    # dh = 0 leaves y unchanged.
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0.0, 63.0, 63.0], [0.0, 0.0, 63.0, 63.0]])
    deltas = torch.tensor([[0.0, 0.0, 50.0, 0.0], [0.0, 0.0, -50.0, 0.0]])
    boxes = coder.decode(deltas, anchors)
    torch.testing.assert_close(boxes[0], torch.tensor([-1968.0, 0.0, 2031.0, 63.0]),
                               atol=1e-2, rtol=0)
    # No lower clamp: dw = -10 gives w = 64 e^-10 (+1 width, so x1 < x0 here).
    width = boxes[1, 2] - boxes[1, 0] + 1
    torch.testing.assert_close(width, torch.tensor(64 * math.exp(-10.0)), atol=1e-5, rtol=0)


def test_weights_and_clip_from_config() -> None:
    head = HeadConfig()
    coder = BoxCoder.from_config(head)
    assert coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert coder.bbox_xform_clip == math.log(1000.0 / 16)
    # Weights divide the deltas: with weights 1, dx = 0.5 moves the centre by half a width.
    unit = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    box = unit.decode(torch.tensor([0.5, 0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 63.0, 63.0]))
    torch.testing.assert_close(box, torch.tensor([32.0, 0.0, 95.0, 63.0]))


def test_clip_to_image_uses_minus_one() -> None:
    # Image 40 x 100 (h x w): x in [0, 99], y in [0, 39].
    boxes = torch.tensor([[-5.0, -3.0, 120.0, 50.0], [10.0, 5.0, 20.0, 15.0]])
    clipped = clip_boxes_to_image(boxes, height=40, width=100)
    torch.testing.assert_close(
        clipped, torch.tensor([[0.0, 0.0, 99.0, 39.0], [10.0, 5.0, 20.0, 15.0]])
    )


def test_rescale_scales_coordinates_without_plus_one() -> None:
    # From 100 x 200 (h x w) to 50 x 50: x times 0.25, y times 0.5; x1 = 109 * 0.25 = 27.25,
    # not (109 + 1) * 0.25 - 1 = 26.5.
    boxes = torch.tensor([[10.0, 20.0, 109.0, 59.0]])
    scaled = rescale_boxes(boxes, (100, 200), (50, 50))
    torch.testing.assert_close(scaled, torch.tensor([[2.5, 10.0, 27.25, 29.5]]))


def test_legacy_conversions_round_trip_with_plus_one_sizes() -> None:
    exclusive = torch.tensor([[0.0, 2.0, 10.0, 7.0]])  # 10 x 5 pixels, end-exclusive
    legacy = to_legacy(exclusive)
    assert legacy.tolist() == [[0.0, 2.0, 9.0, 6.0]]
    widths, heights = legacy_sizes(legacy)
    assert (widths.item(), heights.item()) == (10.0, 5.0)
    assert legacy_areas(legacy).item() == 50.0
    assert torch.equal(to_exclusive(legacy), exclusive)
