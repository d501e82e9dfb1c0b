"""The world's language: relations, referring expressions, questions and captions, as evaluators.

They evaluate *text* (`expression_targets("red circle", objects)`), so the same code that labels
our scenes also checks annotations written by independent renderers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from model_export.data.world.scene import WorldObject
from model_export.data.world.vocabulary import (
    ANSWER_INDEX,
    COLOR_NAMES,
    RELATIONS,
    SHAPES,
    SIZES,
    Box,
)


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
    A relation whose anchor is absent denotes nothing (nothing can stand beside it); one whose
    anchor is there twice or more is ambiguous. Raises ValueError for that, and for other text.
    """
    text = text.strip().lower()
    if m := _ATTRIBUTE_EXPR.match(text):
        size, color, shape = m.groups()
        found = select(objects, color=color, shape=shape, size=size)
    elif m := _COLOR_EXPR.match(text):
        found = select(objects, color=m.group(1))
    elif m := _RELATION_EXPR.match(text):
        shape, relation, anchor_color, anchor_shape = m.groups()
        anchors = select(objects, color=anchor_color, shape=anchor_shape)
        if len(anchors) > 1:
            raise ValueError(f"anchor of {text!r} is not unique in the image")
        found = related(objects, anchors[0], relation, shape) if anchors else []
    else:
        raise ValueError(f"not a referring expression of the shapes world: {text!r}")
    return sorted(o.id for o in found)


def relation_parts(text: str) -> tuple[str, str, str, str] | None:
    """For `{shape} {relation} the {colour} {shape}`: (shape, relation, anchor colour, anchor
    shape); None for the other forms."""
    m = _RELATION_EXPR.match(text)
    return None if m is None else (m.group(1), m.group(2), m.group(3), m.group(4))


def relation_anchor(text: str) -> tuple[tuple[int, int], str, str] | None:
    """For `{shape} {relation} the {colour} {shape}`: where the anchor is named ([start, end) of
    "red square"), its colour and its shape; None for the other forms."""
    m = _RELATION_EXPR.match(text)
    if m is None:
        return None
    return (m.start(3), m.end(4)), m.group(3), m.group(4)


EXPRESSION_FORMS: tuple[str, ...] = (
    "color_shape", "size_shape", "size_color_shape", "color_shapes", "relation")
# A relation expression whose anchor is not in the image: it names nothing, and a model must
# say so from the anchor's words alone (with the anchor there, from where things stand).
RELATION_ABSENT_ANCHOR = "relation_absent_anchor"
EMPTY_FORMS: tuple[str, ...] = (*EXPRESSION_FORMS, RELATION_ABSENT_ANCHOR)


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


def referent_form(text: str, objects: Sequence[WorldObject]) -> str:
    """`expression_form`, except `relation_absent_anchor` for a relation whose anchor is not
    among `objects`: what an expression naming nothing is drawn and scored by (`EMPTY_FORMS`)."""
    anchor = relation_anchor(text.strip().lower())
    if anchor is not None and not select(objects, color=anchor[1], shape=anchor[2]):
        return RELATION_ABSENT_ANCHOR
    return expression_form(text)


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


# A world caption's object phrase, "a {size} {colour} {shape}" (`caption_for`).
_CAPTION_PHRASE = re.compile(r"\ba (?:small|large) \w+ \w+")


def caption_phrase_spans(caption: str) -> list[tuple[int, int]]:
    """Character spans of a caption's object phrases ("a small red circle"), to ground."""
    return [(m.start(), m.end()) for m in _CAPTION_PHRASE.finditer(caption)]
