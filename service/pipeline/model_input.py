"""A decoded image as the engines take it: resized, normalised and padded like the reference,
with the sizes needed to map boxes back to the client's pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image

from model_export.modeling.config import PreprocessConfig
from model_export.processing.box_coding import rescale_boxes, to_exclusive
from model_export.processing.preprocess import batch_images, preprocess_image, resized_size


@dataclass(frozen=True)
class PreparedImage:
    """An image as the engines take it: (3, H, W) padded pixels and the sizes to map back."""

    pixels: torch.Tensor
    resized_hw: tuple[int, int]
    original_hw: tuple[int, int]

    @property
    def padded_hw(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])

    def to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """Model-input-frame boxes (legacy +1) -> end-exclusive boxes in original pixels."""
        return to_exclusive(rescale_boxes(boxes, self.resized_hw, self.original_hw))

    def to_input(self, boxes: torch.Tensor) -> torch.Tensor:
        """Original-pixel boxes (legacy +1, as `Detections` carry them) -> end-exclusive boxes
        in the model-input frame: `to_original`'s rescaling the other way."""
        return to_exclusive(rescale_boxes(boxes, self.original_hw, self.resized_hw))


def prepare_image(image: Image.Image, pre: PreprocessConfig) -> PreparedImage:
    """Resize, normalise and pad to the image's bucket (a multiple of 32), as the reference."""
    pixels, resized_hw = preprocess_image(image, pre)
    batch, _ = batch_images([pixels], pre.size_divisibility)
    return PreparedImage(pixels=batch[0], resized_hw=resized_hw,
                         original_hw=(image.height, image.width))


def image_bucket(image: Image.Image, pre: PreprocessConfig) -> tuple[int, int]:
    """The padded (H, W) the image runs at: only same-shape images stack into one tensor."""
    height, width = resized_size(image.width, image.height, pre.min_size, pre.max_size)
    step = pre.size_divisibility
    return math.ceil(height / step) * step, math.ceil(width / step) * step
