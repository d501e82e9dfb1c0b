"""Where a referring expression names its referent and its anchor (training spans and segmentation
scores)."""

from __future__ import annotations

import pytest

from model_export.processing.referring import anchor_span, referent_span


@pytest.mark.parametrize(
    ("expression", "referent"),
    [
        ("circle left of the red square", "circle left of"),
        ("hexagon below the green circle", "hexagon below"),
        ("star above the purple star", "star above"),  # the anchor's shape repeats the referent's
        ("square right of the yellow diamond", "square right of"),
        ("small red circle", "small red circle"),  # no relation: the whole expression
        ("blue shapes", "blue shapes"),
        ("the man to the left of the car", "man to the left of"),  # less a leading article
        ("the cup on top of the table near the door", "cup on top of"),  # the first one
        ("A star", "star"),
        ("the", "the"),  # an article alone is all there is
        ("theater seats", "theater seats"),  # an article only as a whole word
        ("Dog Next To the bench", "Dog Next To"),
        ("the leftmost cover", "leftmost cover"),  # "left" and "over" inside words
    ],
)
def test_referent_span(expression: str, referent: str) -> None:
    start, end = referent_span(expression)
    assert expression[start:end] == referent


@pytest.mark.parametrize(
    ("expression", "anchor"),
    [
        ("circle left of the red square", "red square"),
        ("star above the purple star", "purple star"),
        ("the man to the left of the car", "car"),
        ("the cup on top of the table near the door", "table near the door"),  # after the first
        ("Dog Next To A bench ", "bench"),
        ("circle left of theater", "theater"),  # an article only as a whole word
        ("small red circle", None),  # no relation: no anchor
        ("the leftmost cover", None),
        ("man to the left of", None),  # nothing follows the relation
        ("man to the left of the", None),
    ],
)
def test_anchor_span(expression: str, anchor: str | None) -> None:
    span = anchor_span(expression)
    assert (None if span is None else expression[span[0]:span[1]]) == anchor
