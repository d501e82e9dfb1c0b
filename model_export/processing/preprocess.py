"""Image pre-processing of the reference GLIP evaluation path, bit for bit.

Reference chain (`data/transforms/transforms.py`, `structures/image_list.py`, torchvision 0.29):
PIL RGB image -> `Resize.get_size` (shorter side `min_size`, longer side at most `max_size`)
-> torchvision `F.resize` on the PIL image, which is `image.resize((w, h), BILINEAR)` with no
`reducing_gap` (antialias does not apply to PIL input) -> `F.to_tensor` (uint8 -> float32, / 255)
-> RGB to BGR, x 255 -> `F.normalize` (subtract mean, divide by std, float32, BGR order)
-> `to_image_list`: zero-pad bottom/right to a multiple of `size_divisibility`.

Each float op is done in the same dtype and order as the reference, so tensors match it exactly:
(v / 255) * 255 in float32 is not always v, and that rounding is part of the reference input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from model_export.modeling.config import PreprocessConfig


def resized_size(width: int, height: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """Output `(height, width)` of the reference `Resize.get_size` for a `width` x `height` image.

    The shorter side becomes `min_size` unless the longer side would then exceed `max_size`, in
    which case the shorter side becomes `round(max_size * short / long)` (Python round: half to
    even). The longer side is `int(size * long / short)` (truncated). An image whose shorter side
    already equals the target keeps its size.
    """
    size = min_size
    if max_size is not None:
        min_original = float(min(width, height))
        max_original = float(max(width, height))
        if max_original / min_original * size > max_size:
            size = round(max_size * min_original / max_original)  # float -> int, half to even
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _to_bgr255_normalized(image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """(H, W) RGB PIL image -> (3, H, W) float32, BGR, normalised, with the reference's ops."""
    # F.to_tensor: uint8 HWC -> CHW -> float32 -> div(255)
    array = np.array(image, dtype=np.uint8, copy=True)  # (H, W, 3)
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)
    tensor = tensor.to(dtype=torch.float32).div(255)
    # Normalize(format="bgr255"): channel flip, then x 255
    tensor = tensor[[2, 1, 0]] * 255
    # F.normalize: mean and std cast to float32 first, then in-place sub and div
    mean = torch.as_tensor(config.pixel_mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(config.pixel_std, dtype=torch.float32).view(-1, 1, 1)
    if (std == 0).any():
        raise ValueError(f"pixel_std has a zero entry: {config.pixel_std}")
    return tensor.sub_(mean).div_(std)


def preprocess_image(
    image: Image.Image, config: PreprocessConfig
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize and normalise one image as the reference evaluation transforms do.

    Returns the (3, h, w) float32 tensor in BGR channel order, (x - mean) / std on the 0-255
    scale (roughly -2.2 to 2.7 with the default mean/std), and its size `(h, w)` after resizing,
    before any padding. Any PIL mode is first converted to RGB (alpha dropped), as the reference
    datasets do with `Image.open(...).convert("RGB")`.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    height, width = resized_size(image.width, image.height, config.min_size, config.max_size)
    if (height, width) != (image.height, image.width):
        # torchvision F.resize(pil, [h, w]) -> PIL Image.resize((w, h), BILINEAR); it passes no
        # reducing_gap and its antialias flag is ignored for PIL images (PIL always filters).
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return _to_bgr255_normalized(image, config), (height, width)


def batch_images(
    images: Sequence[torch.Tensor], size_divisibility: int
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Zero-pad (3, h_i, w_i) images bottom/right into one (N, 3, H, W) batch.

    H and W are the largest h_i and w_i, rounded up to a multiple of `size_divisibility`
    (no rounding when it is 0), as the reference `to_image_list`. Returns the batch and each
    image's unpadded `(h_i, w_i)`, which post-processing needs to clip boxes.
    """
    if not images:
        raise ValueError("batch_images needs at least one image")
    if size_divisibility < 0:
        raise ValueError(f"size_divisibility must be >= 0, got {size_divisibility}")
    if any(image.dim() != 3 for image in images):
        raise ValueError("batch_images expects (C, h, w) tensors")
    channels = max(image.shape[0] for image in images)
    max_h = max(image.shape[1] for image in images)
    max_w = max(image.shape[2] for image in images)
    if size_divisibility > 0:
        max_h = int(math.ceil(max_h / size_divisibility) * size_divisibility)
        max_w = int(math.ceil(max_w / size_divisibility) * size_divisibility)
    batch = images[0].new_zeros((len(images), channels, max_h, max_w))
    for image, padded in zip(images, batch, strict=True):
        padded[: image.shape[0], : image.shape[1], : image.shape[2]].copy_(image)
    return batch, [(int(image.shape[1]), int(image.shape[2])) for image in images]
