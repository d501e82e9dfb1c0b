"""Where a referring expression names what it refers to.

"circle left of the red square" refers to a circle; "the red square" only says where to look.
Grounding the whole expression on the circle would teach the anchor's words ("red square") to
mean the circle, against every phrase that uses them plainly; scoring the whole expression at
inference would rank the anchor highest. So referring training grounds the referent on the
words up to the end of the first spatial relation ("circle left of"), and segmentation scores
those same words: the relation words are what tell the referent from the other circles. This
is MDETR's `tokens_positive` for referring expressions (the referent's phrase, not the whole
sentence), with the relation kept because only it singles the referent out.
"""

from __future__ import annotations

import re

from model_export.processing.prompt import Span

# English spatial relations, the shapes world's four among them (WORLD.md: left of, right of,
# above, below). Longest alternatives first, so "to the left of" wins over "left of".
_RELATION = re.compile(
    r"\b(?:to the (?:left|right) of|(?:left|right) of|in front of|on top of|next to|above|"
    r"below|under|beneath|beside|behind|near)\b",
    re.IGNORECASE,
)


def referent_span(expression: str) -> Span:
    """[start, end) of the words naming the referent: up to the end of the expression's first
    spatial relation ("circle left of the red square" -> "circle left of"), the whole
    expression when it names none ("small red circle")."""
    match = _RELATION.search(expression)
    return (0, match.end()) if match else (0, len(expression))
