"""Spatial relations resolved on boxes: "circle left of the red square" as geometry.

A grounding model scores words against regions; "left of" is a fact about two boxes, and
grounding its words on the referent asks every region to know where the anchor is. Measured on
our default model (docs/default_model.md, issue 38), scoring the relation's words answered a
third of the expressions whose anchor is there but whose referent is not on that side with a
segment, and refused many true referents. With `postprocess.relations` "geometry" the model
grounds the referent's noun ("circle") and the anchor ("red square") and the relation is
checked here, as MAttNet's location module reads the referent's box against the anchor's:
A is left of B when A lies wholly to B's left (A.x1 <= B.x0), and so on for right of, above and
below (WORLD.md's definition, which is also the plain English one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_export.processing.prompt import Span
from model_export.processing.referring import anchor_span, first_relation, referent_span

# The side of the anchor each directional relation names; others ("next to", "near", "behind")
# have no side and stay with the model's words.
SIDE_OF_RELATION: dict[str, str] = {
    "left of": "left", "to the left of": "left",
    "right of": "right", "to the right of": "right",
    "above": "above", "on top of": "above",
    "below": "below", "under": "below", "beneath": "below",
}
SIDES = tuple(dict.fromkeys(SIDE_OF_RELATION.values()))  # left, right, above, below


@dataclass(frozen=True)
class ReferringQuery:
    """How a referring expression is scored: the words naming the referent (`referent`) and
    the relation's anchor (`anchor`, None without one), and the side of the anchor the referent
    must lie on (`side`, None: the words decide)."""

    referent: Span
    anchor: Span | None = None
    side: str | None = None


def referring_query(expression: str, geometry: bool) -> ReferringQuery:
    """Which words of the expression are scored. By default, the referent's words
    (`referent_span`, "circle left of"), capped by its anchor's (`anchor_span`, "red square").
    With `geometry` and a directional relation before an anchor, the referent's noun ("circle")
    beside the anchor's words, the relation left to `on_side`. (Grounding the two noun phrases
    as their own prompt, "circle. red square", scored true referents lower: measured in
    docs/default_model.md.)"""
    anchor = anchor_span(expression)
    plain = ReferringQuery(referent_span(expression), anchor)
    found = first_relation(expression)
    if not geometry or anchor is None or found is None or found[1] not in SIDE_OF_RELATION:
        return plain
    start = plain.referent[0]
    end = start + len(expression[start:found[0][0]].rstrip())
    if end <= start:
        return plain
    return ReferringQuery((start, end), anchor, SIDE_OF_RELATION[found[1]])


def on_side(boxes: torch.Tensor, anchor: torch.Tensor, side: str) -> torch.Tensor:
    """(N,) bool: which end-exclusive xyxy `boxes` lie wholly on `side` of the `anchor` box
    (left: box.x1 <= anchor.x0; right: box.x0 >= anchor.x1; above and below alike in y)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, not {side!r}")
    axis = 0 if side in ("left", "right") else 1
    if side in ("left", "above"):
        return boxes[:, axis + 2] <= anchor[axis]
    return boxes[:, axis] >= anchor[axis + 2]
