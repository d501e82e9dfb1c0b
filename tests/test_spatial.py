"""Directional relations resolved on boxes: which words are scored, and which boxes lie on the
named side of the anchor (WORLD.md: wholly to one side)."""

from __future__ import annotations

import pytest
import torch

from model_export.processing.spatial import on_side, referring_query


@pytest.mark.parametrize(
    ("expression", "noun", "anchor", "side"),
    [
        ("circle left of the red square", "circle", "red square", "left"),
        ("the star below the red star", "star", "red star", "below"),  # less the article
        ("small circle to the right of a blue square", "small circle", "blue square", "right"),
        ("Hexagon ABOVE the green circle", "Hexagon", "green circle", "above"),
        ("cup on top of the table", "cup", "table", "above"),
        ("box underneath the desk", None, None, None),  # not a relation the regex knows
        ("dog under the bench", "dog", "bench", "below"),
    ],
)
def test_a_directional_relation_is_scored_on_its_noun(
        expression: str, noun: str | None, anchor: str | None, side: str | None) -> None:
    query = referring_query(expression, geometry=True)
    assert query.side == side
    if noun is not None:
        assert expression[slice(*query.referent)] == noun
        assert query.anchor is not None and expression[slice(*query.anchor)] == anchor


@pytest.mark.parametrize(
    ("expression", "referent"),
    [
        ("dog next to the bench", "dog next to"),  # no side: the model's words decide
        ("left of the red square", "left of"),  # no noun before the relation
        ("man to the left of", "man to the left of"),  # no anchor after it
        ("small red circle", "small red circle"),
    ],
)
def test_without_a_side_noun_and_anchor_the_words_decide(expression: str, referent: str) -> None:
    query = referring_query(expression, geometry=True)
    assert query.side is None and expression[slice(*query.referent)] == referent


def test_words_mode_scores_the_relation_words_under_its_anchor() -> None:
    query = referring_query("circle left of the red square", geometry=False)
    assert query.side is None and query.referent == (0, 14) and query.anchor == (19, 29)


def test_on_side_is_wholly_on_that_side_end_exclusive() -> None:
    anchor = torch.tensor([40.0, 40.0, 60.0, 60.0])
    boxes = torch.tensor([
        [10.0, 45.0, 40.0, 55.0],  # touches the anchor's left edge: left of it
        [10.0, 45.0, 41.0, 55.0],  # one pixel into it: not
        [60.0, 0.0, 70.0, 10.0],  # right of it (and above: the axes are apart)
        [45.0, 0.0, 55.0, 40.0],  # above it
        [45.0, 61.0, 55.0, 80.0],  # below it
        [40.0, 40.0, 60.0, 60.0],  # the anchor itself is on no side of itself
    ])
    assert on_side(boxes, anchor, "left").tolist() == [True, False, False, False, False, False]
    assert on_side(boxes, anchor, "right").tolist() == [False, False, True, False, False, False]
    assert on_side(boxes, anchor, "above").tolist() == [False, False, True, True, False, False]
    assert on_side(boxes, anchor, "below").tolist() == [False, False, False, False, True, False]
    with pytest.raises(ValueError, match="side must be one of"):
        on_side(boxes, anchor, "behind")
