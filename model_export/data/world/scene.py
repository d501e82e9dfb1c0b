"""The world's data classes: a drawn object and a rendered scene with its annotations.

Kept apart from rendering so that the language layer and the records can use them without pulling
in the renderer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


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
