"""The grounded shapes world: a procedural scene generator with exact ground truth.

No public GLIPv2 weights exist, so the project trains on scenes rendered from the specification in
`WORLD.md` (kept in `shared/`). This module follows that page exactly and is organised in layers:

- vocabulary: `SHAPES`, `COLORS`, `SIZES`, `RELATIONS`, the 24-answer VQA set `ANSWERS`;
- geometry: `shape_extent`, `shape_vertices` (a shape's outline relative to its tight-box corner);
- rasterisation: `rasterize` (5x5 supersampled coverage; mask = pixels at least half covered);
- layout: `render_scene` (background, objects, placement with margins and gaps);
- language: `relation_holds`, `expression_targets`, `answer_question`, `caption_for` and the
  samplers that turn a scene into referring expressions, VQA pairs and a grounded caption;
- records: `to_record`, `read_records`, `objects_from_record`, `generate_world`, `render_index`.

The language functions evaluate *text* (`expression_targets("red circle", objects)`), so the same
code that labels our scenes also checks annotations written by independent renderers.

Box convention everywhere: `[x0, y0, x1, y1]` in pixels, integers, end exclusive.
Held-out pairs are `(colour, shape)` tuples, e.g. `("red", "circle")`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from model_export.processing.rle import decode_mask, encode_mask

# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {  # base RGB before the per-object jitter
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "gray": (120, 120, 120),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: tuple[str, ...] = ("small", "large")
SIZE_RANGES: dict[str, tuple[float, float]] = {  # u range; side s = round(u * min(W, H))
    "small": (0.08, 0.14),
    "large": (0.20, 0.30),
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MAX_COUNT = 6  # most objects in one image, so count answers are 0..6

# The closed VQA answer set, in a fixed order that classifier heads index into:
# 7 colours (COLORS order), 6 shapes (SHAPES order), yes, no, "0".."6", small, large.
ANSWERS: tuple[str, ...] = (
    *COLOR_NAMES,
    *SHAPES,
    "yes",
    "no",
    *(str(n) for n in range(MAX_COUNT + 1)),
    *SIZES,
)
ANSWER_INDEX: dict[str, int] = {answer: i for i, answer in enumerate(ANSWERS)}

IMAGE_SIDE_RANGE = (256, 640)  # width and height, independent, inclusive
BACKGROUND_RANGE = (200.0, 255.0)  # per channel
RAMP_AMPLITUDE_MAX = 15.0  # brightness ramp, see `_background`
NOISE_SIGMA_MAX = 6.0  # Gaussian noise over the finished image
COLOR_JITTER = 20  # each channel of an object's colour moves by up to +-20
MARGIN_PX = 2  # least distance from a tight box to the image border
GAP_PX = 4  # least distance between two objects' tight boxes
STAR_INNER_RATIO = 0.45
SUPERSAMPLE = 5  # coverage from 5 x 5 points per pixel; odd, see `rasterize`
PLACEMENT_TRIES = 50  # positions tried per object before it is dropped
EXPRESSIONS_PER_IMAGE = (5, 6)  # one object / several objects (the samples' counts)
QUESTIONS_PER_IMAGE = 5
ABSENT_EXPRESSION_FRACTION = 0.25  # share of expressions that deliberately denote nothing

Box = Sequence[int]
Pairs = frozenset[tuple[str, str]]
# Colour-shape pairs the default model never sees in training, so that `glipv2 eval` can score
# open-vocabulary composition on them (training, prompt tuning and eval all default to these).
HELD_OUT_PAIRS = "purple star,orange hexagon,green triangle"


def validate_pairs(pairs: Iterable[tuple[str, str]]) -> Pairs:
    """Check held-out `(colour, shape)` pairs and return them as a frozenset.

    Raises ValueError on an unknown word or when every pair would be held out (nothing to draw).
    """
    out = frozenset((str(c), str(s)) for c, s in pairs)
    for color, shape in out:
        if color not in COLORS or shape not in SHAPES:
            raise ValueError(f"unknown held-out pair ({color!r}, {shape!r})")
    if len(out) >= len(COLORS) * len(SHAPES):
        raise ValueError("every colour-shape pair is held out")
    return out


def parse_pairs(text: str) -> Pairs:
    """Parse `"red circle, blue star"` (comma-separated `colour shape`) into held-out pairs."""
    pairs = []
    for item in text.split(","):
        words = item.split()
        if not words:
            continue
        if len(words) != 2:
            raise ValueError(f"held-out pair must be 'colour shape', got {item.strip()!r}")
        pairs.append((words[0], words[1]))
    return validate_pairs(pairs)


# ----------------------------------------------------------------------------------------------
# Data classes
# ----------------------------------------------------------------------------------------------


@dataclass
class WorldObject:
    """One drawn shape with its exact ground truth.

    box: [x0, y0, x1, y1] integers, end exclusive: the tight box of `mask`.
    mask: (H, W) bool, the pixels at least half covered by the shape (None when not decoded).
    """

    id: int
    shape: str
    color: str
    size: str
    box: list[int]
    mask: np.ndarray | None = None


@dataclass
class WorldImage:
    """A rendered scene with all its annotations.

    expressions: [{"text", "targets": [object ids]}] (targets may be empty).
    questions: [{"question", "answer" (in ANSWERS), "type", "objects": [ids the question names],
        "span": [start, end) of the words naming them,
        "answer_object": id and "answer_span": [start, end) of the words pointing at it (only for
        the two `what shape` forms: the colour word, or a relation's "left of")}].
    caption_phrases: [{"span": [start, end) character span of `a {size} {colour} {shape}`,
        "object": id}].
    """

    width: int
    height: int
    image: Image.Image
    objects: list[WorldObject]
    expressions: list[dict[str, Any]]
    questions: list[dict[str, Any]]
    caption: str
    caption_phrases: list[dict[str, Any]]


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


def shape_extent(shape: str, s: float) -> tuple[float, float]:
    """(width, height) of a shape of side `s`: the size of its exact (continuous) tight box."""
    if shape == "hexagon":
        return s, math.sqrt(3.0) / 2.0 * s
    if shape == "star":
        radius = s / (2.0 * math.cos(math.radians(18.0)))
        return s, radius * (1.0 + math.cos(math.radians(36.0)))
    return s, s


def shape_vertices(shape: str, s: float) -> np.ndarray | None:
    """(K, 2) outline vertices (x, y), relative to the top-left of the shape's tight box.

    y grows downwards (image coordinates). Returns None for the circle, which is tested exactly.
    """
    if shape == "circle":
        return None
    if shape == "square":
        pts = [(0, 0), (s, 0), (s, s), (0, s)]
    elif shape == "triangle":
        pts = [(0, s), (s, s), (s / 2, 0)]
    elif shape == "diamond":
        pts = [(s / 2, 0), (s, s / 2), (s / 2, s), (0, s / 2)]
    elif shape == "hexagon":
        h = math.sqrt(3.0) / 2.0 * s
        pts = [(0, h / 2), (s / 4, 0), (3 * s / 4, 0), (s, h / 2), (3 * s / 4, h), (s / 4, h)]
    elif shape == "star":
        radius = s / (2.0 * math.cos(math.radians(18.0)))
        # Apex up: the first outer point is straight above the centre, which sits R below the top.
        angles = np.radians(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, radius, STAR_INNER_RATIO * radius)
        return np.stack([s / 2 + radii * np.cos(angles), radius + radii * np.sin(angles)], axis=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(pts, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Rasterisation
# ----------------------------------------------------------------------------------------------


def _inside(shape: str, s: float, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Point-in-shape test on a grid: px (1, M) and py (N, 1) sample coordinates -> (N, M) bool.

    Shape coordinates are relative to the tight-box corner. Polygons use the even-odd crossing
    rule edge by edge; a row's crossing point depends on y only, so each edge costs one (N, M)
    comparison, which keeps a 200 px star at 5x5 supersampling to a few milliseconds.
    """
    if shape == "circle":
        r = s / 2.0
        return (px - r) ** 2 + (py - r) ** 2 <= r * r
    verts = shape_vertices(shape, s)
    inside = np.zeros((py.shape[0], px.shape[1]), dtype=bool)
    for (xa, ya), (xb, yb) in zip(verts, np.roll(verts, -1, axis=0), strict=True):
        if ya == yb:
            continue  # horizontal edges never cross a horizontal ray
        crosses = (ya > py) != (yb > py)  # (N, 1): the ray at this y meets the edge
        x_cross = xa + (py - ya) * (xb - xa) / (yb - ya)  # (N, 1)
        inside ^= crosses & (px < x_cross)
    return inside


def rasterize(
    shape: str, s: float, offset: tuple[float, float], patch: tuple[int, int]
) -> np.ndarray:
    """Coverage in [0, 1] of a shape whose tight-box corner sits at `offset` (x, y) in a patch.

    patch: (height, width) in pixels; pixel (i, j) covers [j, j+1) x [i, i+1). Coverage is the
    fraction of SUPERSAMPLE^2 stratified points inside the shape, which estimates the covered area:
    the mask rule "at least half covered" is `coverage >= 0.5`. The point count per axis is odd so
    that the middle column / row of points sits on the pixel centre line: an axis-aligned edge
    then covers >= half the points exactly when it covers >= half the pixel (with 4 x 4 points a
    square came out s + 1 wide a quarter of the time). Returns float32 (height, width).
    """
    h, w = patch
    n = SUPERSAMPLE
    steps = (np.arange(n) + 0.5) / n
    xs = (np.arange(w)[:, None] + steps[None, :]).reshape(1, w * n) - offset[0]
    ys = (np.arange(h)[:, None] + steps[None, :]).reshape(h * n, 1) - offset[1]
    inside = _inside(shape, s, xs, ys).view(np.uint8)  # (h*n, w*n), 0 / 1
    # Sum the n x n blocks with strided slice adds: numpy reductions over a short trailing axis
    # are ~20x slower, and this is the hottest loop of the renderer.
    rows = inside.reshape(h, n, w * n)  # (h*n, w*n) -> (h, n, w*n)
    per_row = rows[:, 0].astype(np.float32)
    for k in range(1, n):
        per_row += rows[:, k]  # (h, w*n)
    counts = per_row[:, 0::n].copy()
    for k in range(1, n):
        counts += per_row[:, k::n]  # (h, w)
    return counts / (n * n)


def tight_box(mask: np.ndarray) -> list[int]:
    """[x_min, y_min, x_max + 1, y_max + 1] of a non-empty bool mask."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


# ----------------------------------------------------------------------------------------------
# Layout and rendering
# ----------------------------------------------------------------------------------------------


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
    return WorldImage(
        width=width,
        height=height,
        image=Image.fromarray(pixels, mode="RGB"),
        objects=objects,
        expressions=sample_expressions(rng, objects, exclude_pairs),
        questions=sample_questions(rng, objects, exclude_pairs),
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


# ----------------------------------------------------------------------------------------------
# Language: relations, expressions, questions, captions
# ----------------------------------------------------------------------------------------------


def relation_holds(a: Box, b: Box, relation: str) -> bool:
    """Whether box a is `relation` box b: wholly to one side (e.g. left of: a.x1 <= b.x0)."""
    if relation == "left of":
        return a[2] <= b[0]
    if relation == "right of":
        return b[2] <= a[0]
    if relation == "above":
        return a[3] <= b[1]
    if relation == "below":
        return b[3] <= a[1]
    raise ValueError(f"unknown relation {relation!r}")


def select(
    objects: Sequence[WorldObject],
    color: str | None = None,
    shape: str | None = None,
    size: str | None = None,
) -> list[WorldObject]:
    """The objects matching every given attribute (None matches anything)."""
    return [
        o
        for o in objects
        if (color is None or o.color == color)
        and (shape is None or o.shape == shape)
        and (size is None or o.size == size)
    ]


def unique_anchor(objects: Sequence[WorldObject], color: str, shape: str) -> WorldObject | None:
    """The single object that is `color shape`, or None when there are zero or several."""
    found = select(objects, color=color, shape=shape)
    return found[0] if len(found) == 1 else None


def related(
    objects: Sequence[WorldObject], anchor: WorldObject, relation: str, shape: str | None = None
) -> list[WorldObject]:
    """Objects (optionally only of `shape`) that stand in `relation` to the anchor."""
    return [o for o in select(objects, shape=shape) if relation_holds(o.box, anchor.box, relation)]


_SHAPE_RE = "|".join(SHAPES)
_COLOR_RE = "|".join(COLOR_NAMES)
_SIZE_RE = "|".join(SIZES)
_REL_RE = "|".join(RELATIONS)
_ATTRIBUTE_EXPR = re.compile(rf"^(?:({_SIZE_RE}) )?(?:({_COLOR_RE}) )?({_SHAPE_RE})$")
_COLOR_EXPR = re.compile(rf"^({_COLOR_RE}) shapes$")
_RELATION_EXPR = re.compile(rf"^({_SHAPE_RE}) ({_REL_RE}) the ({_COLOR_RE}) ({_SHAPE_RE})$")


def expression_targets(text: str, objects: Sequence[WorldObject]) -> list[int]:
    """Sorted ids of the objects a referring expression denotes (possibly none).

    Accepts the spec's forms, plus a bare `{shape}` (a detection prompt):
    `[{size}] [{colour}] {shape}`, `{colour} shapes`, `{shape} {relation} the {colour} {shape}`.
    Raises ValueError for other text, or a relational anchor that is not unique in the image.
    """
    text = text.strip().lower()
    if m := _ATTRIBUTE_EXPR.match(text):
        size, color, shape = m.groups()
        found = select(objects, color=color, shape=shape, size=size)
    elif m := _COLOR_EXPR.match(text):
        found = select(objects, color=m.group(1))
    elif m := _RELATION_EXPR.match(text):
        shape, relation, anchor_color, anchor_shape = m.groups()
        anchor = unique_anchor(objects, anchor_color, anchor_shape)
        if anchor is None:
            raise ValueError(f"anchor of {text!r} is not unique in the image")
        found = related(objects, anchor, relation, shape)
    else:
        raise ValueError(f"not a referring expression of the shapes world: {text!r}")
    return sorted(o.id for o in found)


def relation_anchor(text: str) -> tuple[tuple[int, int], str, str] | None:
    """For `{shape} {relation} the {colour} {shape}`: where the anchor is named ([start, end) of
    "red square"), its colour and its shape; None for the other forms."""
    m = _RELATION_EXPR.match(text)
    if m is None:
        return None
    return (m.start(3), m.end(4)), m.group(3), m.group(4)


EXPRESSION_FORMS: tuple[str, ...] = (
    "color_shape", "size_shape", "size_color_shape", "color_shapes", "relation")


def expression_form(text: str) -> str:
    """The spec's template a referring expression follows: `color_shape`, `size_shape`,
    `size_color_shape`, `color_shapes` or `relation` (`shape` for a bare shape, a detection
    prompt); ValueError for other text."""
    text = text.strip().lower()
    if m := _ATTRIBUTE_EXPR.match(text):
        size, color, _ = m.groups()
        named = [name for name, word in (("size", size), ("color", color)) if word]
        return "_".join([*named, "shape"])
    if _COLOR_EXPR.match(text):
        return "color_shapes"
    if _RELATION_EXPR.match(text):
        return "relation"
    raise ValueError(f"not a referring expression of the shapes world: {text!r}")


_QUESTION_FORMS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("color", re.compile(rf"^what color is the ({_SHAPE_RE})\?$")),
    ("shape", re.compile(rf"^what shape is the ({_COLOR_RE}) object\?$")),
    ("count_shape", re.compile(rf"^how many ({_SHAPE_RE})s are there\?$")),
    ("count_color", re.compile(rf"^how many ({_COLOR_RE}) objects are there\?$")),
    ("exists", re.compile(rf"^is there a ({_COLOR_RE}) ({_SHAPE_RE})\?$")),
    ("size", re.compile(rf"^what size is the ({_COLOR_RE}) ({_SHAPE_RE})\?$")),
    (
        "relation_shape",
        re.compile(rf"^what shape is ({_REL_RE}) the ({_COLOR_RE}) ({_SHAPE_RE})\?$"),
    ),
)
QUESTION_TYPES: tuple[str, ...] = tuple(name for name, _ in _QUESTION_FORMS)


def _parse_question(text: str) -> tuple[str, re.Match[str]]:
    """(question type, match) of a lower-cased question; ValueError if no form fits."""
    for kind, pattern in _QUESTION_FORMS:
        m = pattern.match(text)
        if m:
            return kind, m
    raise ValueError(f"not a question of the shapes world: {text!r}")


def _named_span(kind: str, match: re.Match[str]) -> list[int]:
    """[start, end) of the phrase naming the question's objects: the captured attribute words
    ("circle", "red", "red circle"), a count's plural "s" included, a relation's anchor only."""
    first = 2 if kind == "relation_shape" else 1
    end = match.end(match.lastindex or first)
    return [match.start(first), end + (kind == "count_shape")]


def _single(found: list[WorldObject], question: str) -> WorldObject:
    if len(found) != 1:
        raise ValueError(f"{question!r} needs exactly one matching object, found {len(found)}")
    return found[0]


def answer_question(question: str, objects: Sequence[WorldObject]) -> dict[str, Any]:
    """Answer a VQA question of the spec and say which objects ground it.

    Returns {"question", "answer" (in ANSWERS), "type" (in QUESTION_TYPES), "objects": sorted ids
    the question names (for counts and `is there`: every matching object), "span": where the
    question names them (what grounded VQA returns boxes for), and for the two `what shape` forms
    "answer_object" with "answer_span", the words pointing at it (the named colour word, or the
    relation words, as "left of")}. Raises ValueError when the text is not one of the spec's
    templates or its precondition fails (e.g. `what color is the circle?` with two circles).
    """
    text = question.strip().lower()
    kind, match = _parse_question(text)
    groups = match.groups()
    answer_object: WorldObject | None = None
    if kind == "color":
        named = [_single(select(objects, shape=groups[0]), text)]
        answer = named[0].color
    elif kind == "shape":
        named = [_single(select(objects, color=groups[0]), text)]
        answer_object = named[0]
        answer = answer_object.shape
    elif kind == "count_shape":
        named = select(objects, shape=groups[0])
        answer = str(len(named))
    elif kind == "count_color":
        named = select(objects, color=groups[0])
        answer = str(len(named))
    elif kind == "exists":
        named = select(objects, color=groups[0], shape=groups[1])
        answer = "yes" if named else "no"
    elif kind == "size":
        named = [_single(select(objects, color=groups[0], shape=groups[1]), text)]
        answer = named[0].size
    else:  # relation_shape
        relation, anchor_color, anchor_shape = groups
        named = [_single(select(objects, color=anchor_color, shape=anchor_shape), text)]
        answer_object = _single(related(objects, named[0], relation), text)
        answer = answer_object.shape
    if answer not in ANSWER_INDEX:
        raise ValueError(f"answer {answer!r} is outside the closed answer set")
    out: dict[str, Any] = {
        "question": text,
        "answer": answer,
        "type": kind,
        "objects": sorted(o.id for o in named),
        "span": _named_span(kind, match),
    }
    if answer_object is not None:
        out["answer_object"] = answer_object.id
        out["answer_span"] = ([match.start(1), match.end(1)] if kind == "relation_shape"
                              else out["span"])
    return out


def caption_for(objects: Sequence[WorldObject]) -> tuple[str, list[dict[str, Any]]]:
    """The grounded caption: `a {size} {colour} {shape}` per object, ordered by box centre x.

    Ties in centre x fall back to centre y, then id. Phrases are joined by ", " with " and "
    before the last and the caption ends with "."; each phrase span [start, end) covers the whole
    `a {size} {colour} {shape}` including the article (as in the reference samples).
    """
    order = sorted(
        objects, key=lambda o: (o.box[0] + o.box[2], o.box[1] + o.box[3], o.id)
    )  # doubled centres: exact integer comparison
    if not order:
        return "", []
    pieces = [f"a {o.size} {o.color} {o.shape}" for o in order]
    caption = ""
    phrases = []
    for i, (obj, piece) in enumerate(zip(order, pieces, strict=True)):
        if i > 0:
            caption += " and " if i == len(order) - 1 else ", "
        phrases.append({"span": [len(caption), len(caption) + len(piece)], "object": obj.id})
        caption += piece
    return caption + ".", phrases


# --- samplers: which expressions and questions an image gets ---------------------------------


def _allowed_pairs(exclude_pairs: Pairs) -> list[tuple[str, str]]:
    return [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in exclude_pairs]


def _expression_candidates(
    objects: Sequence[WorldObject], exclude_pairs: Pairs
) -> dict[str, list[str]]:
    """Every expression text the image supports, per template (present and absent mixed)."""
    pairs = _allowed_pairs(exclude_pairs)
    candidates: dict[str, list[str]] = {
        "color_shape": [f"{c} {s}" for c, s in pairs],
        "size_shape": [f"{z} {s}" for z in SIZES for s in SHAPES],
        "size_color_shape": [f"{z} {c} {s}" for z in SIZES for c, s in pairs],
        "color_shapes": [f"{c} shapes" for c in COLOR_NAMES],
        "relation": [],
    }
    anchors = [o for o in objects if unique_anchor(objects, o.color, o.shape) is o]
    for anchor in anchors:
        for relation in RELATIONS:
            for shape in SHAPES:
                candidates["relation"].append(
                    f"{shape} {relation} the {anchor.color} {anchor.shape}"
                )
    return candidates


def sample_expressions(
    rng: np.random.Generator, objects: Sequence[WorldObject], exclude_pairs: Pairs = frozenset()
) -> list[dict[str, Any]]:
    """A handful of distinct referring expressions, about a quarter of them denoting nothing.

    Each slot picks "absent" with probability ABSENT_EXPRESSION_FRACTION, then a template
    uniformly among those that can fill it, then a text uniformly: this keeps all five templates
    in play and the empty-target share steady whatever the scene.
    """
    count = EXPRESSIONS_PER_IMAGE[0] if len(objects) <= 1 else EXPRESSIONS_PER_IMAGE[1]
    pools: dict[bool, dict[str, list[tuple[str, list[int]]]]] = {True: {}, False: {}}
    for template, texts in _expression_candidates(objects, exclude_pairs).items():
        for text in texts:
            targets = expression_targets(text, objects)
            pools[bool(targets)].setdefault(template, []).append((text, targets))
    chosen: dict[str, list[int]] = {}
    for _ in range(count * 4):  # bounded: a tiny scene may not have `count` distinct texts
        if len(chosen) == count:
            break
        present = rng.uniform() >= ABSENT_EXPRESSION_FRACTION
        pool = pools[present] or pools[not present]
        templates = sorted(pool)
        options = pool[templates[rng.integers(len(templates))]]
        text, targets = options[rng.integers(len(options))]
        chosen.setdefault(text, targets)
    return [{"text": text, "targets": targets} for text, targets in chosen.items()]


def _question_candidates(
    objects: Sequence[WorldObject], exclude_pairs: Pairs
) -> dict[str, list[list[str]]]:
    """Valid questions per template, each split into answer groups to sample from evenly.

    Groups make the answers balanced: `is there` is split into yes / no, counts into one group per
    count value (so 0 and 2 appear, not only the most common 1).
    """
    pairs = _allowed_pairs(exclude_pairs)
    by_answer: dict[str, dict[str, list[str]]] = {}

    def add(kind: str, text: str) -> None:
        try:
            answer = answer_question(text, objects)["answer"]
        except ValueError:
            return  # precondition fails in this image
        by_answer.setdefault(kind, {}).setdefault(answer, []).append(text)

    for shape in SHAPES:
        add("color", f"what color is the {shape}?")
        add("count_shape", f"how many {shape}s are there?")
    for color in COLOR_NAMES:
        add("shape", f"what shape is the {color} object?")
        add("count_color", f"how many {color} objects are there?")
    for color, shape in pairs:
        add("exists", f"is there a {color} {shape}?")
        add("size", f"what size is the {color} {shape}?")
    for anchor in objects:
        for relation in RELATIONS:
            add("relation_shape", f"what shape is {relation} the {anchor.color} {anchor.shape}?")
    # Open answers (colour, shape, size) need no balancing: keep one group per template.
    balanced = {"count_shape", "count_color", "exists"}
    out: dict[str, list[list[str]]] = {}
    for kind, groups in by_answer.items():
        if kind in balanced:
            out[kind] = [groups[a] for a in sorted(groups)]
        else:
            out[kind] = [[t for a in sorted(groups) for t in groups[a]]]
    return out


def sample_questions(
    rng: np.random.Generator, objects: Sequence[WorldObject], exclude_pairs: Pairs = frozenset()
) -> list[dict[str, Any]]:
    """A handful of distinct VQA questions: template uniform, then answer group, then text."""
    candidates = _question_candidates(objects, exclude_pairs)
    kinds = [k for k in QUESTION_TYPES if k in candidates]
    chosen: dict[str, dict[str, Any]] = {}
    for _ in range(QUESTIONS_PER_IMAGE * 4):
        if len(chosen) == QUESTIONS_PER_IMAGE:
            break
        groups = candidates[kinds[rng.integers(len(kinds))]]
        group = groups[rng.integers(len(groups))]
        text = group[rng.integers(len(group))]
        if text not in chosen:
            chosen[text] = answer_question(text, objects)
    return list(chosen.values())


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


def to_record(world_image: WorldImage, file_name: str) -> dict[str, Any]:
    """The JSON record of one image in the format of WORLD.md (extra keys on questions only)."""
    objects = []
    for obj in world_image.objects:
        if obj.mask is None:
            raise ValueError(f"object {obj.id} has no mask to encode")
        objects.append(
            {
                "id": obj.id,
                "shape": obj.shape,
                "color": obj.color,
                "size": obj.size,
                "box": [int(v) for v in obj.box],
                "mask": encode_mask(obj.mask),
            }
        )
    return {
        "file": file_name,
        "width": world_image.width,
        "height": world_image.height,
        "objects": objects,
        "expressions": world_image.expressions,
        "questions": world_image.questions,
        "caption": world_image.caption,
        "caption_phrases": world_image.caption_phrases,
    }


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of an `annotations.jsonl` (or of a folder holding one), one dict per image."""
    path = Path(path)
    if path.is_dir():
        path = path / "annotations.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def objects_from_record(record: dict[str, Any], decode_masks: bool = True) -> list[WorldObject]:
    """The record's objects as WorldObjects (masks decoded unless `decode_masks` is False)."""
    return [
        WorldObject(
            id=int(o["id"]),
            shape=o["shape"],
            color=o["color"],
            size=o["size"],
            box=[int(v) for v in o["box"]],
            mask=decode_mask(o["mask"]) if decode_masks else None,
        )
        for o in record["objects"]
    ]


def generate_world(
    out_dir: str | Path,
    n: int,
    seed: int,
    exclude_pairs: Pairs = frozenset(),
    progress: bool = True,
) -> Path:
    """Render images 0..n-1 of dataset `seed` as `{i:06d}.png` plus `annotations.jsonl`.

    Deterministic: image i is `render_index(seed, i, exclude_pairs)`. Returns the path of the
    written `annotations.jsonl`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exclude_pairs = validate_pairs(exclude_pairs)
    annotations = out_dir / "annotations.jsonl"
    with annotations.open("w", encoding="utf-8") as f:
        for index in tqdm(range(n), desc="rendering world", disable=not progress):
            scene = render_index(seed, index, exclude_pairs)
            file_name = f"{index:06d}.png"
            scene.image.save(out_dir / file_name)
            f.write(json.dumps(to_record(scene, file_name)) + "\n")
    return annotations
