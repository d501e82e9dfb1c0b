"""Anchors: reference cell anchors and hand-written grids."""

from __future__ import annotations

import pytest
import torch

from model_export.modeling.config import HeadConfig, get_preset
from model_export.processing.anchors import AnchorGenerator, generate_cell_anchor

GLIP_T_CELL_ANCHORS = [
    [-28.0, -28.0, 35.0, 35.0],
    [-56.0, -56.0, 71.0, 71.0],
    [-112.0, -112.0, 143.0, 143.0],
    [-224.0, -224.0, 287.0, 287.0],
    [-448.0, -448.0, 575.0, 575.0],
]


def test_cell_anchors_equal_reference_buffers() -> None:
    cells = AnchorGenerator.from_config(get_preset("glip-t").head).cell_anchors()
    assert len(cells) == 5
    for cell, expected in zip(cells, GLIP_T_CELL_ANCHORS, strict=True):
        assert cell.shape == (1, 4) and cell.dtype == torch.float32
        assert torch.equal(cell, torch.tensor([expected]))


def test_generate_cell_anchor_matches_faster_rcnn_table() -> None:
    # The Matlab table quoted above the reference generate_anchors (stride 16) is 1-based; the
    # 0-based Python port gives the same windows minus 1. Checks the aspect ratio (h / w) and
    # the half-to-even rounding: ratio 0.5 -> w = round(sqrt(256 / 0.5)) = 23,
    # h = round(11.5) = 12, then x 8: 184 x 96 around (7.5, 7.5) -> [-84, -40, 99, 55].
    assert generate_cell_anchor(16, 128, 0.5) == [-84.0, -40.0, 99.0, 55.0]
    assert generate_cell_anchor(16, 256, 1.0) == [-120.0, -120.0, 135.0, 135.0]
    assert generate_cell_anchor(16, 512, 2.0) == [-168.0, -344.0, 183.0, 359.0]


def test_grid_anchors_2x3_stride_8() -> None:
    # Location (y, x) = cell [-28, -28, 35, 35] + (8x, 8y, 8x, 8y); rows y-major.
    generator = AnchorGenerator(sizes=(64,), strides=(8,))
    (anchors,) = generator.grid_anchors([(2, 3)])
    expected = torch.tensor([
        [-28.0, -28.0, 35.0, 35.0],  # (0, 0)
        [-20.0, -28.0, 43.0, 35.0],  # (0, 1)
        [-12.0, -28.0, 51.0, 35.0],  # (0, 2)
        [-28.0, -20.0, 35.0, 43.0],  # (1, 0)
        [-20.0, -20.0, 43.0, 43.0],  # (1, 1)
        [-12.0, -20.0, 51.0, 43.0],  # (1, 2)
    ])
    assert torch.equal(anchors, expected)


def test_grid_order_matches_head_flattening() -> None:
    generator = AnchorGenerator.from_config(HeadConfig())
    sizes = [(4, 5), (2, 3), (1, 2), (1, 1), (1, 1)]
    grids = generator.grid_anchors(sizes)
    for (h, w), stride, grid in zip(sizes, generator.strides, grids, strict=True):
        assert grid.shape == (h * w, 4)
        # A head output whose channels hold the location's (x, y) index.
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        output = torch.stack((xs, ys)).float()[None]  # (1, 2, H, W)
        flat = output.permute(0, 2, 3, 1).reshape(1, h * w, 2)[0]  # (1, 2, H, W) -> (HW, 2)
        cell = generator.cell_anchors()[generator.strides.index(stride)][0]
        expected = cell + stride * torch.cat((flat, flat), dim=1)
        assert torch.equal(grid, expected)


def test_grid_anchors_accept_tensor_sizes() -> None:
    generator = AnchorGenerator(sizes=(64,), strides=(8,))
    (from_ints,) = generator.grid_anchors([(2, 3)])
    (from_tensors,) = generator.grid_anchors([(torch.tensor(2), torch.tensor(3))])
    assert torch.equal(from_ints, from_tensors)


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError):
        AnchorGenerator(sizes=(64, 128), strides=(8,))
    with pytest.raises(ValueError):
        AnchorGenerator(sizes=(64,), strides=(8,)).grid_anchors([(1, 1), (1, 1)])
