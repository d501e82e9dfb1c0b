"""Samplers: which referring expressions and VQA questions an image gets.

They draw from the scene's random generator after its pixels, so their order of draws is part of
what makes a seed reproduce a dataset byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from model_export.data.world.language import (
    QUESTION_TYPES,
    answer_question,
    expression_targets,
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
