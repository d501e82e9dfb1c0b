"""Image pre-processing against the reference GLIP-T test vector and Resize.get_size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from model_export.modeling.config import PreprocessConfig
from model_export.processing.preprocess import batch_images, preprocess_image, resized_size

from conftest import REFERENCE


@pytest.mark.parametrize(
    ("width", "height", "expected_hw"),
    [
        (514, 372, (800, 1105)),  # the test vector: landscape, 800 * 514 / 372 = 1105.4 -> 1105
        (372, 514, (1105, 800)),  # portrait
        (500, 500, (800, 800)),  # square
        (1000, 800, (800, 1000)),  # shorter side already 800: size kept
        (2000, 500, (333, 1332)),  # capped: round(1333 * 500 / 2000) = 333, 333 * 4 = 1332
        (1333, 600, (600, 1333)),  # capped to exactly the shorter side: size kept
        (5, 2666, (1066, 2)),  # round(2.5) == 2 (half to even), then int(2 * 2666 / 5)
    ],
)
def test_resized_size_matches_reference_get_size(
    width: int, height: int, expected_hw: tuple[int, int]
) -> None:
    assert resized_size(width, height, 800, 1333) == expected_hw


def test_resized_size_half_to_even_and_no_cap() -> None:
    # 1333 * 50 / 100 = 666.5 -> Python round gives 666; int(666 * 100 / 50) = 1332
    assert resized_size(100, 50, 800, 1333) == (666, 1332)
    assert resized_size(100, 50, 800, None) == (800, 1600)
    assert resized_size(640, 480, 384, 640) == (384, 512)  # the `small` preset


def test_vector_image_matches_reference_tensor() -> None:
    reference = json.loads((REFERENCE / "glip_t_vector_outputs.json").read_text())["input"]
    stats = reference["tensor_stats"]
    with Image.open(REFERENCE / "glip_t_vector_image.png") as image:
        assert image.size == (514, 372)
        tensor, size = preprocess_image(image, PreprocessConfig())
    assert size == tuple(reference["resized_hw"]) == (800, 1105)
    assert tensor.shape == (3, 800, 1105) and tensor.dtype == torch.float32

    batch, sizes = batch_images([tensor], PreprocessConfig().size_divisibility)
    assert list(batch.shape) == stats["shape"] == [1, 3, 800, 1120]
    assert sizes == [(800, 1105)]
    assert tuple(batch.shape[-2:]) == tuple(reference["padded_hw"])

    values = batch.double()
    assert values.sum().item() == pytest.approx(stats["sum"], rel=1e-6)
    assert values.abs().mean().item() == pytest.approx(stats["mean_abs"], rel=1e-6)
    assert batch.min().item() == pytest.approx(stats["min"], abs=1e-5)
    assert batch.max().item() == pytest.approx(stats["max"], abs=1e-5)
    assert batch.flatten()[:8].tolist() == pytest.approx(stats["first8"], abs=1e-5)
    assert not batch.isnan().any() and not batch.isinf().any()


def test_channels_are_bgr_255_normalised() -> None:
    config = PreprocessConfig()
    image = Image.new("RGB", (800, 800), (255, 0, 10))  # shorter side already 800: no resize
    tensor, size = preprocess_image(image, config)
    assert size == (800, 800)
    expected = [
        (10 - config.pixel_mean[0]) / config.pixel_std[0],  # B
        (0 - config.pixel_mean[1]) / config.pixel_std[1],  # G
        (255 - config.pixel_mean[2]) / config.pixel_std[2],  # R
    ]
    for channel, value in enumerate(expected):
        assert tensor[channel].unique().tolist() == pytest.approx([value], abs=1e-6)


def test_other_modes_are_converted_to_rgb() -> None:
    config = PreprocessConfig(min_size=32, max_size=64)
    rgba = Image.new("RGBA", (40, 20), (30, 60, 90, 7))
    gray = Image.new("L", (40, 20), 77)
    rgb_tensor, rgb_size = preprocess_image(rgba.convert("RGB"), config)
    rgba_tensor, rgba_size = preprocess_image(rgba, config)
    assert rgba_size == rgb_size == (32, 64)
    assert torch.equal(rgba_tensor, rgb_tensor)
    gray_tensor, _ = preprocess_image(gray, config)
    assert torch.equal(gray_tensor, preprocess_image(gray.convert("RGB"), config)[0])


def test_resize_is_pil_bilinear() -> None:
    config = PreprocessConfig(min_size=24, max_size=100)
    image = Image.effect_noise((16, 12), 64).convert("RGB")
    tensor, size = preprocess_image(image, config)
    assert size == (24, 32)
    resized = image.resize((32, 24), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(resized)).float()  # (24, 32, 3) RGB
    r, g, b = pixels.unbind(-1)
    expected_b = (b - config.pixel_mean[0]) / config.pixel_std[0]
    assert torch.allclose(tensor[0], expected_b, atol=1e-6)
    assert torch.allclose(tensor[2], (r - config.pixel_mean[2]) / config.pixel_std[2], atol=1e-6)
    assert torch.allclose(tensor[1], (g - config.pixel_mean[1]) / config.pixel_std[1], atol=1e-6)


def test_batch_images_pads_bottom_right_with_zeros() -> None:
    first = torch.rand(3, 40, 50) + 1.0
    second = torch.rand(3, 70, 20) + 1.0
    batch, sizes = batch_images([first, second], 32)
    assert batch.shape == (2, 3, 96, 64)
    assert sizes == [(40, 50), (70, 20)]
    assert torch.equal(batch[0, :, :40, :50], first)
    assert torch.equal(batch[1, :, :70, :20], second)
    assert batch[0, :, 40:].eq(0).all() and batch[0, :, :, 50:].eq(0).all()
    assert batch[1, :, 70:].eq(0).all() and batch[1, :, :, 20:].eq(0).all()

    unrounded, _ = batch_images([first, second], 0)
    assert unrounded.shape == (2, 3, 70, 50)
    exact, _ = batch_images([torch.ones(3, 64, 32)], 32)
    assert exact.shape == (1, 3, 64, 32)
    with pytest.raises(ValueError):
        batch_images([], 32)
