"""The shapes world's vocabulary and the numbers of its spec (`WORLD.md`), plus held-out pairs.

Every other layer of the world and the records loader read these, so the spec's words and ranges
live in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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
