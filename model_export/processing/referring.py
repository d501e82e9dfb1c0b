"""Where a referring expression names what it refers to.

"circle left of the red square" refers to a circle; "the red square" only says where to look.
Grounding the whole expression on the circle would teach the anchor's words ("red square") to
mean the circle, against every phrase that uses them plainly; scoring the whole expression at
inference would rank the anchor highest. So referring training grounds the referent on the
words up to the end of the first spatial relation ("circle left of"), and segmentation scores
those same words: the relation words are what tell the referent from the other circles. This
is MDETR's `tokens_positive` for referring expressions (the referent's phrase, not the whole
sentence), with the relation kept because only it singles the referent out. The anchor's own
words (`anchor_span`) are grounded on the anchor in training, and at inference they must find
it: an expression whose anchor is nowhere names nothing.
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


# What comes between a relation and its anchor's words: spaces and an article, which the span
# leaves out ("the red square" -> "red square"), as training grounds the anchor's words only.
_BEFORE_ANCHOR = re.compile(r"\s*(?:(?:the|a|an)(?:\s+|$))?", re.IGNORECASE)
# An article opening an expression, followed by a word: left out of the referent's words.
_LEADING_ARTICLE = re.compile(r"\s*(?:the|a|an)\s+(?=\S)", re.IGNORECASE)


def first_relation(expression: str) -> tuple[Span, str] | None:
    """[start, end) of the expression's first spatial relation and its words, lower-cased
    ("circle to the left of the square" -> ((7, 22), "to the left of")); None when it has none."""
    match = _RELATION.search(expression)
    return None if match is None else ((match.start(), match.end()), match.group(0).lower())


def anchor_span(expression: str) -> Span | None:
    """[start, end) of the words naming a relation's anchor: what follows the first spatial
    relation, less a leading article ("circle left of the red square" -> "red square"); None
    when the expression names no relation or nothing follows it.

    The expression presupposes its anchor: where no red square is found, "circle left of the
    red square" names nothing, however well some circle matches "circle left of"."""
    match = _RELATION.search(expression)
    if match is None:
        return None
    gap = _BEFORE_ANCHOR.match(expression, match.end())
    start = gap.end() if gap else match.end()
    end = len(expression.rstrip())
    return (start, end) if end > start else None


def referent_span(expression: str) -> Span:
    """[start, end) of the words naming the referent: up to the end of the expression's first
    spatial relation ("circle left of the red square" -> "circle left of"), the whole
    expression when it names none ("small red circle"), less a leading article ("the red
    hexagon" -> "red hexagon"): an article names nothing in the image, and a phrase scored by
    its weakest token (`score_agg` "min") must not be vetoed by it."""
    lead = _LEADING_ARTICLE.match(expression)
    start = lead.end() if lead else 0
    match = _RELATION.search(expression, start)
    return (start, match.end()) if match else (start, len(expression))
