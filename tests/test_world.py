"""The shapes world generator against every rule of WORLD.md, and against independent samples.

Answers, targets and relations are recomputed here with deliberately plain code (string splits,
explicit box comparisons), not with the module's own evaluators, so a shared bug cannot hide.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_export.data import world
from model_export.data.world import (
    ANSWERS,
    COLORS,
    EXPRESSION_FORMS,
    RELATIONS,
    SHAPES,
    SIZE_RANGES,
    WorldImage,
    WorldObject,
    answer_question,
    caption_for,
    expression_form,
    expression_targets,
    generate_world,
    objects_from_record,
    read_records,
    relation_holds,
    render_index,
    tight_box,
    to_record,
)
from model_export.processing.rle import decode_mask, encode_mask

SAMPLES = Path(__file__).parent / "fixtures" / "world"
N_SCENES = 150
HELD_OUT = frozenset(
    {("red", "circle"), ("blue", "square"), ("green", "star"), ("gray", "hexagon")}
)


@pytest.fixture(scope="module")
def scenes() -> list[WorldImage]:
    return [render_index(7, i) for i in range(N_SCENES)]


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _obj(i: int, shape: str, color: str, size: str, box: list[int]) -> WorldObject:
    return WorldObject(id=i, shape=shape, color=color, size=size, box=box)


def _left_of(a: list[int], b: list[int]) -> bool:
    return a[2] <= b[0]


def _plain_relation(a: list[int], b: list[int], relation: str) -> bool:
    """The spec's relations written out separately from the module's `relation_holds`."""
    return {
        "left of": a[2] <= b[0],
        "right of": a[0] >= b[2],
        "above": a[3] <= b[1],
        "below": a[1] >= b[3],
    }[relation]


def _plain_targets(text: str, objects: list[WorldObject]) -> list[int]:
    """Referring-expression targets, recomputed by splitting words."""
    words = text.split()
    for relation in RELATIONS:
        marker = f" {relation} the "
        if marker in text:
            shape, anchor_text = text.split(marker)
            a_color, a_shape = anchor_text.split()
            anchors = [o for o in objects if o.color == a_color and o.shape == a_shape]
            assert len(anchors) <= 1, f"anchor of {text!r} must be unique or absent"
            return sorted(
                o.id
                for o in objects
                for anchor in anchors
                if o.shape == shape and _plain_relation(o.box, anchor.box, relation)
            )
    if words[-1] == "shapes":
        return sorted(o.id for o in objects if o.color == words[0])
    *attrs, shape = words
    return sorted(
        o.id for o in objects if o.shape == shape and all(a in (o.color, o.size) for a in attrs)
    )


def _plain_answer(question: str, objects: list[WorldObject]) -> str:
    """VQA answers recomputed from the objects with plain string handling."""
    q = question.rstrip("?")
    words = q.split()
    if q.startswith("what color is the "):
        (obj,) = [o for o in objects if o.shape == words[-1]]
        return obj.color
    if q.startswith("what shape is the ") and q.endswith(" object"):
        (obj,) = [o for o in objects if o.color == words[-2]]
        return obj.shape
    if q.startswith("how many") and q.endswith("objects are there"):
        return str(sum(o.color == words[2] for o in objects))
    if q.startswith("how many"):
        return str(sum(o.shape + "s" == words[2] for o in objects))
    if q.startswith("is there a "):
        return "yes" if any(o.color == words[3] and o.shape == words[4] for o in objects) else "no"
    if q.startswith("what size is the "):
        (obj,) = [o for o in objects if o.color == words[-2] and o.shape == words[-1]]
        return obj.size
    if q.startswith("what shape is "):
        relation = " ".join(words[3:-3])
        (anchor,) = [o for o in objects if o.color == words[-2] and o.shape == words[-1]]
        (obj,) = [o for o in objects if _plain_relation(o.box, anchor.box, relation)]
        return obj.shape
    raise AssertionError(f"unexpected question {question!r}")


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion by a 3x3 square, `steps` times (keeps edge pixels out of colour checks)."""
    out = mask.copy()
    for _ in range(steps):
        core = out.copy()
        core[1:, :] &= out[:-1, :]
        core[:-1, :] &= out[1:, :]
        core[:, 1:] &= out[:, :-1]
        core[:, :-1] &= out[:, 1:]
        out = core
    return out


# --- vocabulary --------------------------------------------------------------------------------


def test_vocabulary_and_answer_order() -> None:
    assert SHAPES == ("circle", "square", "triangle", "diamond", "star", "hexagon")
    assert list(COLORS) == ["red", "green", "blue", "yellow", "purple", "orange", "gray"]
    assert len(ANSWERS) == 24 and len(set(ANSWERS)) == 24
    assert ANSWERS[:7] == tuple(COLORS) and ANSWERS[7:13] == SHAPES
    assert ANSWERS[13:] == ("yes", "no", "0", "1", "2", "3", "4", "5", "6", "small", "large")


def test_held_out_pairs_validation() -> None:
    assert world.parse_pairs("red circle, blue star") == {("red", "circle"), ("blue", "star")}
    with pytest.raises(ValueError):
        world.parse_pairs("red")
    with pytest.raises(ValueError):
        world.validate_pairs([("pink", "circle")])


# --- determinism ------------------------------------------------------------------------------


def test_render_is_deterministic_per_seed_and_index() -> None:
    a, b = render_index(3, 5), render_index(3, 5)
    assert a.image.tobytes() == b.image.tobytes()
    assert to_record(a, "x.png") == to_record(b, "x.png")
    assert render_index(4, 5).image.tobytes() != a.image.tobytes()
    assert render_index(3, 6).image.tobytes() != a.image.tobytes()


def test_generate_world_is_reproducible(tmp_path: Path) -> None:
    first = generate_world(tmp_path / "a", 3, seed=11, progress=False)
    second = generate_world(tmp_path / "b", 3, seed=11, progress=False)
    other = generate_world(tmp_path / "c", 3, seed=12, progress=False)
    assert first.name == "annotations.jsonl"
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    for i in range(3):
        name = f"{i:06d}.png"
        assert (first.parent / name).read_bytes() == (second.parent / name).read_bytes()
        # Any image regenerates on its own from (seed, index): on-the-fly datasets match disk.
        assert (first.parent / name).read_bytes() == _png_bytes(render_index(11, i).image)
    records = read_records(first.parent)
    assert [r["file"] for r in records] == ["000000.png", "000001.png", "000002.png"]


# --- image and object rules over many scenes ---------------------------------------------------


def test_image_size_and_object_count(scenes: list[WorldImage]) -> None:
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) <= set(range(1, 7)) and len(counts) >= 5
    for scene in scenes:
        assert 256 <= scene.width <= 640 and 256 <= scene.height <= 640
        assert scene.image.mode == "RGB" and scene.image.size == (scene.width, scene.height)
        assert [o.id for o in scene.objects] == list(range(len(scene.objects)))


def test_boxes_margins_and_gaps(scenes: list[WorldImage]) -> None:
    for scene in scenes:
        w, h = scene.width, scene.height
        for obj in scene.objects:
            assert obj.mask.shape == (h, w) and obj.mask.dtype == bool
            assert obj.box == tight_box(obj.mask)
            x0, y0, x1, y1 = obj.box
            assert x0 >= 2 and y0 >= 2 and x1 <= w - 2 and y1 <= h - 2
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                gap = max(
                    b.box[0] - a.box[2],
                    a.box[0] - b.box[2],
                    b.box[1] - a.box[3],
                    a.box[1] - b.box[3],
                )
                assert gap >= 4, (a.box, b.box)


# How far the half-covered mask's width may fall short of s: sharp tips lose pixels (a star's
# 36-degree side points up to 3), never more than one pixel is gained.
WIDTH_SLACK = {"circle": 1, "square": 0, "triangle": 1, "diamond": 1, "star": 3, "hexagon": 1}
# Shape area / its width squared, and height / width: they tell the six outlines apart.
STAR_AREA = 5 * 0.45 * math.sin(math.radians(36)) / (4 * math.cos(math.radians(18)) ** 2)
AREA_RATIO = {
    "circle": math.pi / 4,
    "square": 1.0,
    "triangle": 0.5,
    "diamond": 0.5,
    "star": STAR_AREA,
    "hexagon": 3 * math.sqrt(3) / 8,
}
HEIGHT_RATIO = {
    "hexagon": math.sqrt(3) / 2,
    "star": (1 + math.cos(math.radians(36))) / (2 * math.cos(math.radians(18))),
}

CENTROID_Y = {  # centre of mass / height, from the top of the box
    "triangle": 2 / 3,
    "star": 1 / (1 + math.cos(math.radians(36))),
}


def test_sizes_and_geometry(scenes: list[WorldImage]) -> None:
    sizes = Counter()
    for scene in scenes:
        side = min(scene.width, scene.height)
        for obj in scene.objects:
            sizes[obj.size] += 1
            lo, hi = SIZE_RANGES[obj.size]
            width = obj.box[2] - obj.box[0]
            height = obj.box[3] - obj.box[1]
            assert round(lo * side) - WIDTH_SLACK[obj.shape] <= width <= round(hi * side) + 1
            expected_h = HEIGHT_RATIO.get(obj.shape, 1.0) * width
            assert abs(height - expected_h) <= 2.5, (obj.shape, width, height)
            # Normalise by width * height so that pixels lost at sharp tips cancel out.
            ratio = obj.mask.sum() / float(width * height)
            expected = AREA_RATIO[obj.shape] / HEIGHT_RATIO.get(obj.shape, 1.0)
            assert abs(ratio - expected) <= expected * (0.03 + 5.0 / width), (obj.shape, ratio)
            # Apex up: a triangle's mass sits 2/3 down its box, a star's a little below half.
            rows = np.nonzero(obj.mask)[0]
            centroid = (rows.mean() + 0.5 - obj.box[1]) / height
            assert abs(centroid - CENTROID_Y.get(obj.shape, 0.5)) <= 0.02 + 1.0 / height

    total = sum(sizes.values())
    assert sizes["small"] > 0.35 * total and sizes["large"] > 0.25 * total


def test_star_area_ratio_constant() -> None:
    verts = world.shape_vertices("star", 1.0)
    x, y = verts[:, 0], verts[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    assert area == pytest.approx(STAR_AREA)
    assert x.max() - x.min() == pytest.approx(1.0)  # star box is s wide
    assert np.argmin(y) == 0 and x[0] == pytest.approx(0.5)  # apex up, centred


def test_object_colours_within_jitter(scenes: list[WorldImage]) -> None:
    for scene in scenes[:60]:
        pixels = np.asarray(scene.image, dtype=np.float32)
        for obj in scene.objects:
            core = _erode(obj.mask, 2)
            assert core.any()
            mean = pixels[core].mean(axis=0)
            base = np.asarray(COLORS[obj.color], dtype=np.float32)
            # jitter 20 + noise averaged over the interior (sigma <= 6) + rounding
            assert np.abs(mean - base).max() <= 20 + 2.5, (obj.color, mean)


def test_background_is_light(scenes: list[WorldImage]) -> None:
    for scene in scenes[:30]:
        pixels = np.asarray(scene.image, dtype=np.float32)
        occupied = np.zeros(pixels.shape[:2], dtype=bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            occupied[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = True
        background = pixels[~occupied].mean(axis=0)
        # channel in [200, 255], ramp averages out to ~0 over the image
        assert (background >= 200 - 12).all() and (background <= 255).all()


def test_held_out_pairs_never_appear() -> None:
    pairs_seen = set()
    for i in range(60):
        scene = render_index(21, i, HELD_OUT)
        for obj in scene.objects:
            assert (obj.color, obj.shape) not in HELD_OUT
            pairs_seen.add((obj.color, obj.shape))
        texts = [e["text"] for e in scene.expressions] + [q["question"] for q in scene.questions]
        for color, shape in HELD_OUT:
            assert not any(f"{color} {shape}" in t for t in texts)
    assert len(pairs_seen) > 20  # the other pairs still occur


# --- relations, captions, language -------------------------------------------------------------


def test_relations_on_hand_built_boxes() -> None:
    a, b = [10, 10, 20, 20], [20, 30, 40, 50]  # touching in x, apart in y
    assert relation_holds(a, b, "left of") and not relation_holds(b, a, "left of")
    assert relation_holds(b, a, "right of") and not relation_holds(a, b, "right of")
    assert relation_holds(a, b, "above") and relation_holds(b, a, "below")
    c = [15, 40, 25, 45]  # overlaps a in x: neither left nor right of it
    assert not relation_holds(c, a, "left of") and not relation_holds(c, a, "right of")
    assert relation_holds(c, a, "below")
    with pytest.raises(ValueError):
        relation_holds(a, b, "near")


def test_expressions_on_hand_built_scene() -> None:
    objects = [
        _obj(0, "circle", "red", "small", [10, 10, 30, 30]),
        _obj(1, "square", "blue", "large", [50, 10, 100, 60]),
        _obj(2, "circle", "blue", "large", [120, 70, 170, 120]),
        _obj(3, "circle", "red", "large", [200, 10, 250, 60]),
    ]
    assert expression_targets("red circle", objects) == [0, 3]
    assert expression_targets("large circle", objects) == [2, 3]
    assert expression_targets("small red circle", objects) == [0]
    assert expression_targets("blue shapes", objects) == [1, 2]
    assert expression_targets("circle right of the blue square", objects) == [2, 3]
    assert expression_targets("circle below the blue square", objects) == [2]
    assert expression_targets("circle left of the blue square", objects) == [0]
    assert expression_targets("star above the blue square", objects) == []
    assert expression_targets("green hexagon", objects) == []
    assert expression_targets("circle left of the green star", objects) == []  # no anchor
    assert world.referent_form("circle left of the green star", objects) == (
        world.RELATION_ABSENT_ANCHOR)
    assert world.referent_form("star above the blue square", objects) == "relation"
    assert world.referent_form("green hexagon", objects) == "color_shape"
    with pytest.raises(ValueError):  # anchor not unique
        expression_targets("square left of the red circle", objects)
    with pytest.raises(ValueError):
        expression_targets("the thing", objects)


def test_questions_on_hand_built_scene() -> None:
    objects = [
        _obj(0, "circle", "red", "small", [10, 10, 30, 30]),
        _obj(1, "square", "blue", "large", [50, 10, 100, 60]),
        _obj(2, "circle", "blue", "large", [120, 70, 170, 120]),
    ]
    q = answer_question("what color is the square?", objects)
    assert q == {
        "question": "what color is the square?",
        "answer": "blue",
        "type": "color",
        "objects": [1],
        "span": [18, 24],  # "square"
    }
    q = answer_question("what shape is the red object?", objects)
    assert q["answer"] == "circle" and q["answer_object"] == 0
    assert q["answer_span"] == q["span"]  # the colour word names the answer object itself
    assert answer_question("how many circles are there?", objects)["answer"] == "2"
    assert answer_question("how many circles are there?", objects)["objects"] == [0, 2]
    assert answer_question("how many yellow objects are there?", objects)["answer"] == "0"
    assert answer_question("is there a blue circle?", objects)["answer"] == "yes"
    assert answer_question("is there a orange circle?", objects)["answer"] == "no"
    assert answer_question("what size is the red circle?", objects)["answer"] == "small"
    q = answer_question("what shape is left of the blue square?", objects)
    assert q["answer"] == "circle" and q["objects"] == [1] and q["answer_object"] == 0
    start, end = q["answer_span"]
    assert q["question"][start:end] == "left of"
    named = {  # the words naming the question's objects, what grounded VQA boxes
        "what shape is the red object?": "red",
        "how many circles are there?": "circles",
        "how many yellow objects are there?": "yellow",
        "is there a orange circle?": "orange circle",
        "what size is the red circle?": "red circle",
        "what shape is left of the blue square?": "blue square",
    }
    for text, words in named.items():
        start, end = answer_question(text, objects)["span"]
        assert text[start:end] == words
    with pytest.raises(ValueError):  # two circles
        answer_question("what color is the circle?", objects)
    with pytest.raises(ValueError):  # two blue objects
        answer_question("what shape is the blue object?", objects)
    with pytest.raises(ValueError):  # nothing right of the blue circle
        answer_question("what shape is right of the blue circle?", objects)


def test_caption_spec_example() -> None:
    objects = [
        _obj(0, "star", "green", "small", [300, 40, 330, 70]),
        _obj(1, "circle", "red", "small", [10, 10, 40, 40]),
        _obj(2, "square", "blue", "large", [100, 100, 180, 180]),
    ]
    caption, phrases = caption_for(objects)
    assert caption == "a small red circle, a large blue square and a small green star."
    assert [caption[p["span"][0] : p["span"][1]] for p in phrases] == [
        "a small red circle",
        "a large blue square",
        "a small green star",
    ]
    assert [p["object"] for p in phrases] == [1, 2, 0]
    one, spans = caption_for([_obj(0, "hexagon", "gray", "large", [5, 5, 50, 45])])
    assert one == "a large gray hexagon." and spans == [{"span": [0, 20], "object": 0}]
    two, _ = caption_for(objects[:2])
    assert two == "a small red circle and a small green star."
    # Equal centre x: the upper object comes first.
    tie, _ = caption_for(
        [
            _obj(0, "square", "red", "small", [10, 50, 20, 60]),
            _obj(1, "circle", "blue", "small", [10, 10, 20, 20]),
        ]
    )
    assert tie == "a small blue circle and a small red square."


def test_generated_language_is_correct(scenes: list[WorldImage]) -> None:
    n_expr = n_empty = 0
    answers: Counter[str] = Counter()
    types: Counter[str] = Counter()
    for scene in scenes:
        objects = scene.objects
        assert 5 <= len(scene.expressions) <= 6
        texts = [e["text"] for e in scene.expressions]
        assert len(set(texts)) == len(texts)
        for expr in scene.expressions:
            assert expr["targets"] == _plain_targets(expr["text"], objects), expr
            n_expr += 1
            n_empty += not expr["targets"]
        assert len(scene.questions) >= 3
        for q in scene.questions:
            assert q["answer"] in ANSWERS
            assert q["answer"] == _plain_answer(q["question"], objects), q
            assert set(q["objects"]) <= {o.id for o in objects}
            if q["type"] in ("shape", "relation_shape"):
                assert objects[q["answer_object"]].shape == q["answer"]
                assert len(q["answer_span"]) == 2
            else:
                assert "answer_object" not in q and "answer_span" not in q
            if q["type"] == "relation_shape":
                anchor = objects[q["objects"][0]]
                assert f"the {anchor.color} {anchor.shape}?" in q["question"]
            answers[q["answer"]] += 1
            types[q["type"]] += 1
        caption, phrases = caption_for(objects)
        assert scene.caption == caption and scene.caption_phrases == phrases
        centres = [objects[p["object"]].box[0] + objects[p["object"]].box[2] for p in phrases]
        assert centres == sorted(centres)
    assert 0.15 <= n_empty / n_expr <= 0.4  # about a quarter name something absent
    assert set(types) == set(world.QUESTION_TYPES)
    assert answers["yes"] > 0.5 * answers["no"] and answers["no"] > 0.5 * answers["yes"]
    assert {"0", "1", "2"} <= set(answers)


# --- records -----------------------------------------------------------------------------------


def test_rle_round_trip(scenes: list[WorldImage]) -> None:
    scene = next(s for s in scenes if len(s.objects) >= 3)
    record = json.loads(json.dumps(to_record(scene, "000000.png")))
    assert list(record) == [
        "file",
        "width",
        "height",
        "objects",
        "expressions",
        "questions",
        "caption",
        "caption_phrases",
    ]
    assert record["objects"][0]["mask"]["size"] == [scene.height, scene.width]
    assert isinstance(record["objects"][0]["mask"]["counts"], str)
    for obj, back in zip(scene.objects, objects_from_record(record), strict=True):
        assert np.array_equal(obj.mask, back.mask)
        assert (back.id, back.shape, back.color, back.size, back.box) == (
            obj.id,
            obj.shape,
            obj.color,
            obj.size,
            obj.box,
        )
    mask = np.zeros((7, 5), dtype=bool)
    mask[2:5, 1:3] = True
    assert np.array_equal(decode_mask(encode_mask(mask)), mask)


# --- independent samples -----------------------------------------------------------------------


def test_independent_samples_agree_with_our_reading_of_the_spec() -> None:
    records = read_records(SAMPLES / "annotations.jsonl")
    assert len(records) == 3
    for record in records:
        with Image.open(SAMPLES / record["file"]) as image:
            assert image.size == (record["width"], record["height"])
        objects = objects_from_record(record)
        for obj in objects:
            assert obj.box == tight_box(obj.mask)
        caption, phrases = caption_for(objects)
        assert caption == record["caption"]
        assert phrases == record["caption_phrases"]
        for expr in record["expressions"]:
            assert expression_targets(expr["text"], objects) == sorted(expr["targets"])
            assert _plain_targets(expr["text"], objects) == sorted(expr["targets"])
        for q in record["questions"]:
            assert answer_question(q["question"], objects)["answer"] == q["answer"]


def _plain_nearness(text: str, objects: list[WorldObject]) -> int:
    """How many parts of an expression naming nothing are present, counted by splitting words
    (the nearest misses are what the world draws, `empty_expressions`)."""
    def some(**attributes: str) -> int:
        return int(any(all(getattr(o, k) == v for k, v in attributes.items()) for o in objects))

    words = text.split()
    if " the " in text:
        referent, *_, a_color, a_shape = words
        anchored = some(color=a_color, shape=a_shape)
        return some(shape=referent) + (0 if anchored else some(shape=a_shape) + some(color=a_color))
    if words[-1] == "shapes":
        return 0
    if len(words) == 3:
        size, color, shape = words
        return (some(color=color, shape=shape) + some(size=size, shape=shape)
                + some(size=size, color=color))
    first, shape = words
    attribute = "size" if first in ("small", "large") else "color"
    return some(shape=shape) + some(**{attribute: first})


def test_empty_referents_of_every_form_are_drawn_evenly_and_nearly_name_something(
        scenes: list[WorldImage]) -> None:
    """Issue 38: each form of an expression naming nothing about as often as the others, and
    each one of its form's nearest misses in its scene (most parts present: "red circle" with
    a circle and something red there; "star below the red star" with the one star the red
    star), not "green hexagon" in a scene with neither; relations with referents of every
    relation word alike."""
    empty: Counter[str] = Counter()
    relations: Counter[str] = Counter()
    for scene in scenes:
        candidates = world.empty_expressions(scene.objects)
        for expr in scene.expressions:
            form = world.referent_form(expr["text"], scene.objects)
            if expr["targets"]:
                relations.update(r for r in RELATIONS if f" {r} the " in expr["text"])
                continue
            empty[form] += 1
            nearest = max(_plain_nearness(t, scene.objects) for t in candidates[form])
            assert _plain_nearness(expr["text"], scene.objects) == nearest, expr
            assert _plain_targets(expr["text"], scene.objects) == []
    assert set(empty) == set(world.EMPTY_FORMS)
    assert min(empty.values()) >= 0.6 * max(empty.values()), empty
    assert set(relations) == set(RELATIONS)
    assert min(relations.values()) >= 0.6 * max(relations.values()), relations
    # The nearest misses: the shape named is there in most relation negatives (not on that
    # side of its anchor), and both parts of most colour-shape negatives are.
    hard = Counter(world.referent_form(e["text"], s.objects) for s in scenes
                   for e in s.expressions if not e["targets"]
                   and _plain_nearness(e["text"], s.objects) >= 1)
    assert hard["relation"] >= 0.9 * empty["relation"], (hard, empty)


def test_relation_contrasts_name_nothing_and_differ_from_their_relation_in_one_word(
        scenes: list[WorldImage]) -> None:
    """Each contrast of a relation naming something names nothing and differs from it in one
    word: the relation word (same shape, same anchor, there) or the anchor's colour (an anchor
    absent from the image, never a held-out pair); both forms occur; other text has none."""
    forms: Counter[str] = Counter()
    for scene in scenes[:60]:
        for group in world.present_expressions(scene.objects, HELD_OUT).get("relation", []):
            for text, _ in group:
                words = text.split()
                for form, contrasts in world.relation_contrasts(
                        scene.objects, text, HELD_OUT).items():
                    for contrast in contrasts:
                        other = contrast.split()
                        assert _plain_targets(contrast, scene.objects) == [], contrast
                        assert world.referent_form(contrast, scene.objects) == form
                        if form == "relation":  # "{shape} {relation} the {colour} {shape}"
                            assert other[0] == words[0] and other[-3:] == words[-3:]
                            assert contrast != text
                        else:
                            assert other[:-2] == words[:-2] and other[-1] == words[-1]
                            assert other[-2] != words[-2]
                            assert (other[-2], other[-1]) not in HELD_OUT
                        forms[form] += 1
    assert set(forms) == {"relation", world.RELATION_ABSENT_ANCHOR}, forms
    assert world.relation_contrasts(scenes[0].objects, "red circle") == {}


def test_the_samplers_draw_from_streams_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A change to how expressions are drawn leaves every seed's pixels and questions as they
    were (the expression sampler here draws ten times more)."""
    before = render_index(9, 2)
    sample = world.sampling.sample_expressions

    def greedy(rng: np.random.Generator, *args: object) -> list[dict]:
        rng.uniform(size=10)
        return sample(rng, *args)

    monkeypatch.setattr(world.render, "sample_expressions", greedy)
    after = render_index(9, 2)
    assert after.questions == before.questions
    assert after.image.tobytes() == before.image.tobytes()
    assert after.expressions != before.expressions


@pytest.mark.parametrize(
    ("text", "form"),
    [
        ("red circle", "color_shape"),
        ("small star", "size_shape"),
        ("large purple hexagon", "size_color_shape"),
        ("gray shapes", "color_shapes"),
        ("diamond above the red square", "relation"),
        ("circle", "shape"),
    ],
)
def test_expression_form_names_the_template(text: str, form: str) -> None:
    assert expression_form(text) == form
    assert form in EXPRESSION_FORMS or form == "shape"


def test_expression_form_of_every_generated_expression() -> None:
    forms = {expression_form(e["text"]) for i in range(30) for e in render_index(5, i).expressions}
    assert forms == set(EXPRESSION_FORMS)
    with pytest.raises(ValueError, match="not a referring expression"):
        expression_form("the red circle")
