"""Anchors of the GLIP ATSS head: one square anchor per feature-map location and FPN level.

Reference: microsoft/GLIP `modeling/rpn/anchor_generator.py` (`make_anchor_generator_complex`,
`generate_anchors`, `AnchorGenerator.grid_anchors`). GLIP-T uses aspect ratio 1 and one scale per
octave, so each level has a single cell anchor of side `size` centred on `(stride - 1) / 2`:
stride 8, size 64 gives [-28, -28, 35, 35] (legacy +1 convention: 35 - (-28) + 1 = 64).

Anchors are `xyxy` in pixels of the padded model input; the anchor of location (y, x) is the
cell anchor shifted by `(x * stride, y * stride)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from model_export.modeling.config import HeadConfig


def _window_geometry(box: Sequence[float]) -> tuple[float, float, float, float]:
    """(width, height, x centre, y centre) of an xyxy window with +1 widths."""
    w = box[2] - box[0] + 1
    h = box[3] - box[1] + 1
    return w, h, box[0] + 0.5 * (w - 1), box[1] + 0.5 * (h - 1)


def _window(w: float, h: float, x_ctr: float, y_ctr: float) -> list[float]:
    """xyxy window of size w x h (+1 convention) around a centre."""
    return [x_ctr - 0.5 * (w - 1), y_ctr - 0.5 * (h - 1), x_ctr + 0.5 * (w - 1),
            y_ctr + 0.5 * (h - 1)]


def generate_cell_anchor(stride: int, size: float, aspect_ratio: float = 1.0) -> list[float]:
    """The reference's cell anchor for one (stride, size, aspect ratio), in float64 arithmetic.

    Start from the window (0, 0, stride - 1, stride - 1); enumerate the aspect ratio keeping
    its area (widths rounded half-to-even, as `np.round`); then scale by `size / stride` around
    the same centre.

    Returns:
        [x0, y0, x1, y1] relative to the location's top-left pixel.
    """
    base = [0.0, 0.0, float(stride) - 1, float(stride) - 1]
    # Aspect-ratio enumeration (`_ratio_enum`): same area, h / w = aspect_ratio.
    w, h, x_ctr, y_ctr = _window_geometry(base)
    ws = float(round(math.sqrt(w * h / aspect_ratio)))
    hs = float(round(ws * aspect_ratio))
    ratio_window = _window(ws, hs, x_ctr, y_ctr)
    # Scale enumeration (`_scale_enum`): scale = size / stride around the same centre.
    scale = float(size) / float(stride)
    w, h, x_ctr, y_ctr = _window_geometry(ratio_window)
    return _window(w * scale, h * scale, x_ctr, y_ctr)


class AnchorGenerator:
    """Per-level anchors for feature maps of given sizes (one anchor per location).

    Args:
        sizes: anchor side per level, pixels (GLIP-T: 64, 128, 256, 512, 1024).
        strides: feature stride per level, pixels (GLIP-T: 8, 16, 32, 64, 128).
    """

    def __init__(self, sizes: Sequence[float], strides: Sequence[int]) -> None:
        if len(sizes) != len(strides):
            raise ValueError(f"need one size per stride, got {len(sizes)} and {len(strides)}")
        self.sizes = tuple(sizes)
        self.strides = tuple(int(s) for s in strides)
        # Computed in float64 like the reference (numpy), then stored as float32 (its `.float()`).
        self._cell_anchors = [
            torch.tensor([generate_cell_anchor(stride, size)], dtype=torch.float32)
            for size, stride in zip(self.sizes, self.strides, strict=True)
        ]

    @classmethod
    def from_config(cls, head: HeadConfig) -> AnchorGenerator:
        return cls(sizes=head.anchor_sizes, strides=head.anchor_strides)

    def cell_anchors(self) -> list[Tensor]:
        """One (1, 4) float32 xyxy tensor per level: the anchor of location (0, 0).

        Same values and shape as the checkpoint buffers `rpn.anchor_generator.cell_anchors.{i}`.
        """
        return [a.clone() for a in self._cell_anchors]

    def grid_anchors(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        device: torch.device | str | None = None,
    ) -> list[Tensor]:
        """Anchors of every location of every level.

        Args:
            feature_sizes: (height, width) of each level's feature map, finest first. Entries
                may be ints or 0-dim tensors (traced shapes): only torch ops touch them.
            device: where to build the anchors.

        Returns:
            One float32 tensor per level of shape (h * w, 4), xyxy, rows in row-major order
            (y outer, x inner): row `y * w + x`, the order of the head outputs flattened from
            (N, C, H, W) via `permute(0, 2, 3, 1)`.
        """
        if len(feature_sizes) != len(self.strides):
            raise ValueError(
                f"expected {len(self.strides)} feature sizes, got {len(feature_sizes)}"
            )
        anchors = []
        for (height, width), stride, cell in zip(
            feature_sizes, self.strides, self._cell_anchors, strict=True
        ):
            # arange(n) * stride equals the reference's arange(0, n * stride, stride) exactly
            # (integers) and keeps n symbolic under export.
            shifts_x = torch.arange(width, dtype=torch.float32, device=device) * stride
            shifts_y = torch.arange(height, dtype=torch.float32, device=device) * stride
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")  # (h, w) each
            shift_x = shift_x.reshape(-1)
            shift_y = shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)  # (h*w, 4)
            cell = cell.to(device)
            # (h*w, 1, 4) + (1, A, 4) -> (h*w, A, 4) -> (h*w*A, 4); A = 1 here.
            anchors.append((shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4))
        return anchors
