"""Layout and rendering: background, object placement with margins and gaps, anti-aliased
blending and noise, then the scene's language (`render_scene`, `render_index`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from model_export.data.world.geometry import rasterize, shape_extent, tight_box
from model_export.data.world.language import caption_for
from model_export.data.world.sampling import sample_expressions, sample_questions
from model_export.data.world.scene import WorldImage, WorldObject
from model_export.data.world.vocabulary import (
    BACKGROUND_RANGE,
    COLOR_JITTER,
    COLOR_NAMES,
    COLORS,
    GAP_PX,
    IMAGE_SIDE_RANGE,
    MARGIN_PX,
    MAX_COUNT,
    NOISE_SIGMA_MAX,
    PLACEMENT_TRIES,
    RAMP_AMPLITUDE_MAX,
    SHAPES,
    SIZE_RANGES,
    SIZES,
    Box,
    Pairs,
    validate_pairs,
)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(H, W, 3) float32 background: flat colour plus a brightness ramp (noise comes later).

    The ramp is A * (cos t * u + sin t * v) with u, v the image coordinates scaled to [-1, 1], the
    same on every channel. This reading of "amplitude" matches the reference samples: their fitted
    gradients stay within 15 per unit of u, v (up to 14.8), while per-pixel readings exceed it.
    """
    base = rng.uniform(*BACKGROUND_RANGE, size=3).astype(np.float32)
    amplitude = float(rng.uniform(0.0, RAMP_AMPLITUDE_MAX))
    theta = float(rng.uniform(0.0, 2.0 * math.pi))
    u = (np.arange(width, dtype=np.float32) + 0.5) / width * 2.0 - 1.0
    v = (np.arange(height, dtype=np.float32) + 0.5) / height * 2.0 - 1.0
    ramp = amplitude * (math.cos(theta) * u[None, :] + math.sin(theta) * v[:, None])  # (H, W)
    canvas = np.empty((height, width, 3), dtype=np.float32)
    for channel in range(3):  # per-plane adds: broadcasting over a trailing axis of 3 is ~5x slower
        np.add(ramp, base[channel], out=canvas[:, :, channel])
    return canvas


def _boxes_apart(a: Box, b: Box, gap: int = GAP_PX) -> bool:
    """True when boxes a and b are separated by at least `gap` pixels along x or along y."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= gap


def _sample_attributes(rng: np.random.Generator, exclude_pairs: Pairs) -> tuple[str, str]:
    """Uniform (colour, shape) among the pairs not held out (rejection keeps it uniform)."""
    while True:
        color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        if (color, shape) not in exclude_pairs:
            return color, shape


@dataclass
class _Placed:
    """An object placed in the image: its coverage patch and where the patch's corner goes."""

    obj: WorldObject
    coverage: np.ndarray  # (h, w) float32
    origin: tuple[int, int]  # (x, y) of the patch's top-left pixel in the image
    rgb: np.ndarray  # (3,) float32 jittered colour


def _place_object(
    rng: np.random.Generator,
    width: int,
    height: int,
    color: str,
    shape: str,
    boxes: list[list[int]],
) -> _Placed | None:
    """Size, rasterise and place one object; None when no free spot was found in a few tries.

    The shape is rasterised once with a random sub-pixel offset, so its mask box is known exactly
    before placement; placement then moves it by whole pixels, which keeps the margin and gap
    rules exact (they are checked on the real mask boxes, not on nominal ones).
    """
    size = SIZES[rng.integers(len(SIZES))]
    u = rng.uniform(*SIZE_RANGES[size])
    s = float(round(u * min(width, height)))
    jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    rgb = np.clip(np.asarray(COLORS[color]) + jitter, 0, 255).astype(np.float32)
    frac = rng.uniform(0.0, 1.0, size=2)
    ext_w, ext_h = shape_extent(shape, s)
    patch = (math.ceil(frac[1] + ext_h) + 1, math.ceil(frac[0] + ext_w) + 1)
    coverage = rasterize(shape, s, (float(frac[0]), float(frac[1])), patch)
    mask = coverage >= 0.5
    bx0, by0, bx1, by1 = tight_box(mask)
    # Integer shift range that keeps the mask box MARGIN_PX inside the image.
    lo_x, hi_x = MARGIN_PX - bx0, width - MARGIN_PX - bx1
    lo_y, hi_y = MARGIN_PX - by0, height - MARGIN_PX - by1
    if hi_x < lo_x or hi_y < lo_y:
        return None
    for _ in range(PLACEMENT_TRIES):
        ox = int(rng.integers(lo_x, hi_x + 1))
        oy = int(rng.integers(lo_y, hi_y + 1))
        box = [ox + bx0, oy + by0, ox + bx1, oy + by1]
        if all(_boxes_apart(box, other) for other in boxes):
            full = np.zeros((height, width), dtype=bool)
            _paste(full, mask, (ox, oy))
            obj = WorldObject(id=-1, shape=shape, color=color, size=size, box=box, mask=full)
            return _Placed(obj=obj, coverage=coverage, origin=(ox, oy), rgb=rgb)
    return None


def _clip_window(
    origin: tuple[int, int], patch_shape: tuple[int, ...], image_shape: tuple[int, ...]
) -> tuple[slice, slice, slice, slice]:
    """Image and patch slices of the overlap of a patch at `origin` with the image."""
    ox, oy = origin
    ph, pw = patch_shape[:2]
    ih, iw = image_shape[:2]
    x0, y0 = max(ox, 0), max(oy, 0)
    x1, y1 = min(ox + pw, iw), min(oy + ph, ih)
    return (
        slice(y0, y1),
        slice(x0, x1),
        slice(y0 - oy, y1 - oy),
        slice(x0 - ox, x1 - ox),
    )


def _paste(target: np.ndarray, patch: np.ndarray, origin: tuple[int, int]) -> None:
    """Write a bool patch into a full-image mask (clipped to the image)."""
    iy, ix, py, px = _clip_window(origin, patch.shape, target.shape)
    target[iy, ix] |= patch[py, px]


def _blend(canvas: np.ndarray, placed: _Placed) -> None:
    """Alpha-blend an object's flat colour into the canvas by its coverage (anti-aliased edge)."""
    iy, ix, py, px = _clip_window(placed.origin, placed.coverage.shape, canvas.shape)
    alpha = placed.coverage[py, px][:, :, None]  # (h, w, 1)
    region = canvas[iy, ix]
    canvas[iy, ix] = region + alpha * (placed.rgb[None, None, :] - region)


def render_scene(rng: np.random.Generator, exclude_pairs: Pairs = frozenset()) -> WorldImage:
    """Render one scene of the shapes world with its expressions, questions and caption.

    exclude_pairs: held-out (colour, shape) pairs: never drawn, and never mentioned in the
    generated language either (an absent-referent "red circle -> nothing" would teach the model
    the opposite of what a held-out test asks).
    """
    exclude_pairs = validate_pairs(exclude_pairs)
    width = int(rng.integers(IMAGE_SIDE_RANGE[0], IMAGE_SIDE_RANGE[1] + 1))
    height = int(rng.integers(IMAGE_SIDE_RANGE[0], IMAGE_SIDE_RANGE[1] + 1))
    canvas = _background(rng, width, height)
    n_objects = int(rng.integers(1, MAX_COUNT + 1))
    placed: list[_Placed] = []
    for _ in range(n_objects):
        color, shape = _sample_attributes(rng, exclude_pairs)
        item = _place_object(rng, width, height, color, shape, [p.obj.box for p in placed])
        if item is not None:  # an object with no free spot is dropped, never retried forever
            item.obj.id = len(placed)
            placed.append(item)
    for item in placed:
        _blend(canvas, item)
    sigma = rng.uniform(0.0, NOISE_SIGMA_MAX)
    canvas += sigma * rng.standard_normal(canvas.shape, dtype=np.float32)
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    objects = [p.obj for p in placed]
    caption, phrases = caption_for(objects)
    # Spawning consumes no draws: each sampler's stream depends on the pixels' draws only.
    expression_rng, question_rng = rng.spawn(2)
    return WorldImage(
        width=width,
        height=height,
        image=Image.fromarray(pixels, mode="RGB"),
        objects=objects,
        expressions=sample_expressions(expression_rng, objects, exclude_pairs),
        questions=sample_questions(question_rng, objects, exclude_pairs),
        caption=caption,
        caption_phrases=phrases,
    )


def render_index(seed: int, index: int, exclude_pairs: Pairs = frozenset()) -> WorldImage:
    """Render image `index` of the dataset `seed`, independently of every other image.

    The generator is seeded from (seed, index), so a dataset can render on the fly in any order
    (e.g. in data-loader workers) and reproduce `generate_world` byte for byte.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    return render_scene(rng, exclude_pairs)
