"""Samplers: which referring expressions and VQA questions an image gets.

Each draws from a generator of its own, spawned from the scene's after its pixels
(`render_scene`): their order of draws is part of what makes a seed reproduce a dataset byte for
byte, and a change to one sampler leaves the other's draws, and the pixels, as they were.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from model_export.data.world.language import (
    EMPTY_FORMS,
    QUESTION_TYPES,
    RELATION_ABSENT_ANCHOR,
    answer_question,
    expression_targets,
    related,
    relation_parts,
    select,
    unique_anchor,
)
from model_export.data.world.scene import WorldObject
from model_export.data.world.vocabulary import (
    ABSENT_EXPRESSION_FRACTION,
    COLOR_NAMES,
    EXPRESSIONS_PER_IMAGE,
    QUESTIONS_PER_IMAGE,
    RELATIONS,
    SHAPES,
    SIZES,
    Pairs,
)


def _allowed_pairs(exclude_pairs: Pairs) -> list[tuple[str, str]]:
    return [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in exclude_pairs]


# Expressions to draw from evenly, each with its targets (`present_expressions`).
ExpressionGroup = list[tuple[str, list[int]]]


def present_expressions(objects: Sequence[WorldObject], exclude_pairs: Pairs = frozenset()
                        ) -> dict[str, list[ExpressionGroup]]:
    """Every expression with referents the image supports, per template, as groups to draw from
    evenly: one per relation word for relations (so "below" is drawn as often as "left of",
    however many objects each has), one for each other template. A template the scene cannot
    fill is missing."""
    pairs = _allowed_pairs(exclude_pairs)
    attribute_texts = {
        "color_shape": [f"{c} {s}" for c, s in pairs],
        "size_shape": [f"{z} {s}" for z in SIZES for s in SHAPES],
        "size_color_shape": [f"{z} {c} {s}" for z in SIZES for c, s in pairs],
        "color_shapes": [f"{c} shapes" for c in COLOR_NAMES],
    }
    pools: dict[str, list[ExpressionGroup]] = {}
    for form, texts in attribute_texts.items():
        group = [(text, targets) for text in texts
                 if (targets := expression_targets(text, objects))]
        if group:
            pools[form] = [group]
    by_relation: dict[str, ExpressionGroup] = {}
    for anchor in _unique_anchors(objects):
        for relation in RELATIONS:
            for shape in SHAPES:
                if found := related(objects, anchor, relation, shape):
                    by_relation.setdefault(relation, []).append(
                        (f"{shape} {relation} the {anchor.color} {anchor.shape}",
                         sorted(o.id for o in found)))
    if by_relation:
        pools["relation"] = [by_relation[r] for r in RELATIONS if r in by_relation]
    return pools


def _unique_anchors(objects: Sequence[WorldObject]) -> list[WorldObject]:
    return [o for o in objects if unique_anchor(objects, o.color, o.shape) is o]


def empty_expressions(objects: Sequence[WorldObject], exclude_pairs: Pairs = frozenset()
                      ) -> dict[str, list[str]]:
    """Per form of `EMPTY_FORMS`, the expressions naming nothing in the scene that come nearest
    to naming something: the most of their parts present. A form the scene cannot fill (a
    relation with no unique anchor) is missing.

    Parts: "red circle" -> a circle, a red object; "small circle" -> a circle, a small object;
    "small red circle" -> a red circle, a small circle, a small red object; a relation with its
    anchor -> an object of its shape (not on that side: "star below the red star" with the one
    star being the red star counts); a relation without its anchor -> an object of its shape,
    one of the anchor's shape, one of the anchor's colour. `{colour} shapes` has no parts.
    "Green hexagon" in a scene with neither says nothing a model could get wrong; these do.
    """
    # What is present, as (size, colour, shape) with None for "any": a part is present when
    # its pattern is here (sets: the absent-anchor relations alone are some 800 candidates).
    present = {pattern for o in objects
               for pattern in itertools.product((o.size, None), (o.color, None), (o.shape, None))}

    def some(size: str | None = None, color: str | None = None, shape: str | None = None) -> int:
        return int((size, color, shape) in present)

    pairs = _allowed_pairs(exclude_pairs)
    scored: dict[str, list[tuple[str, int]]] = {form: [] for form in EMPTY_FORMS}
    for color, shape in pairs:
        if some(color=color, shape=shape):
            continue
        scored["color_shape"].append((f"{color} {shape}", some(shape=shape) + some(color=color)))
        for relation in RELATIONS:
            for referent in SHAPES:
                scored[RELATION_ABSENT_ANCHOR].append(
                    (f"{referent} {relation} the {color} {shape}",
                     some(shape=referent) + some(shape=shape) + some(color=color)))
    for size in SIZES:
        for shape in SHAPES:
            if not some(size, shape=shape):
                scored["size_shape"].append((f"{size} {shape}", some(shape=shape) + some(size)))
        for color, shape in pairs:
            if not some(size, color, shape):
                near = some(color=color, shape=shape) + some(size, shape=shape) + some(size, color)
                scored["size_color_shape"].append((f"{size} {color} {shape}", near))
    scored["color_shapes"] = [(f"{c} shapes", 0) for c in COLOR_NAMES if not some(color=c)]
    for anchor in _unique_anchors(objects):
        for relation in RELATIONS:
            for shape in SHAPES:
                if not related(objects, anchor, relation, shape):
                    scored["relation"].append(
                        (f"{shape} {relation} the {anchor.color} {anchor.shape}",
                         some(shape=shape)))
    out = {}
    for form, candidates in scored.items():
        if candidates:
            nearest = max(near for _, near in candidates)
            out[form] = [text for text, near in candidates if near == nearest]
    return out


def relation_contrasts(objects: Sequence[WorldObject], text: str,
                       exclude_pairs: Pairs = frozenset()) -> dict[str, list[str]]:
    """The relations naming nothing that differ from `text`, a relation naming something, in
    one word, per empty form: `relation` (another relation word: nothing of its shape on that
    side of the same anchor) and `relation_absent_anchor` (the anchor in a colour no object of
    its shape has). A form the scene cannot fill is missing; {} for other text.

    Why: a negative that differs in its shape or anchor too can be told from the positive by
    those words alone; one that differs only in its relation or anchor colour makes the model
    read where things stand, or whether the anchor is there.
    """
    parts = relation_parts(text)
    if parts is None:
        return {}
    shape, relation, color, anchor_shape = parts
    anchor = unique_anchor(objects, color, anchor_shape)
    out: dict[str, list[str]] = {}
    if anchor is not None and (sides := [
            f"{shape} {other} the {color} {anchor_shape}" for other in RELATIONS
            if other != relation and not related(objects, anchor, other, shape)]):
        out["relation"] = sides
    if absent := [f"{shape} {relation} the {other} {anchor_shape}"
                  for other, named in _allowed_pairs(exclude_pairs)
                  if named == anchor_shape and not select(objects, color=other, shape=named)]:
        out[RELATION_ABSENT_ANCHOR] = absent
    return out


def sample_expressions(
    rng: np.random.Generator, objects: Sequence[WorldObject], exclude_pairs: Pairs = frozenset()
) -> list[dict[str, Any]]:
    """A handful of distinct referring expressions, about a quarter of them naming nothing.

    Each slot picks "naming nothing" with probability ABSENT_EXPRESSION_FRACTION, then a form
    uniformly among those the scene can fill (`EMPTY_FORMS` for those, the five templates for the
    others), then a group (a relation word, for relations with referents), then a text. So every
    form of empty referent, and every relation, is drawn as often as the others, and the
    empty-target share stays steady whatever the scene. Empty referents are their form's nearest
    misses (`empty_expressions`).
    """
    count = EXPRESSIONS_PER_IMAGE[0] if len(objects) <= 1 else EXPRESSIONS_PER_IMAGE[1]
    pools: dict[bool, dict[str, list[ExpressionGroup]]] = {
        True: present_expressions(objects, exclude_pairs),
        False: {form: [[(text, []) for text in texts]]
                for form, texts in empty_expressions(objects, exclude_pairs).items()},
    }
    chosen: dict[str, list[int]] = {}
    for _ in range(count * 4):  # bounded: a tiny scene may not have `count` distinct texts
        if len(chosen) == count:
            break
        present = rng.uniform() >= ABSENT_EXPRESSION_FRACTION
        pool = pools[present] or pools[not present]
        forms = [form for form in EMPTY_FORMS if form in pool]
        groups = pool[forms[rng.integers(len(forms))]]
        group = groups[rng.integers(len(groups))]
        text, targets = group[rng.integers(len(group))]
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
