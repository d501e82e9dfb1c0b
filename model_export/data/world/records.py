"""The grounded shapes world (`WORLD.md`) records -> samples of every task."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from model_export.data._common import (
    BOX_TOLERANCE_PX,
    DataFormatError,
    check_spans,
    image_file,
    image_size_entry,
    require_keys,
    require_list,
    require_text,
    segmentation_to_rle,
    validated,
)
from model_export.data.types import Box, GroundedObject, GroundingSample, Span
from model_export.data.world.language import relation_anchor
from model_export.data.world.vocabulary import ANSWERS, COLOR_NAMES, RELATIONS, SHAPES, SIZES
from model_export.processing.referring import referent_span

# The vocabulary comes from the generator's `vocabulary`, the one source of truth for WORLD.md;
# SHAPES (in WORLD.md order) is the detection class list.
_SHAPE = "|".join(SHAPES)
_COLOR = "|".join(COLOR_NAMES)
_SIZE = "|".join(SIZES)
# `{colour} {shape}`, `{size} {shape}`, `{size} {colour} {shape}` (and a bare `{shape}`, a class
# name), or `{colour} shapes`: phrases built like detection prompts.
_ATTRIBUTE_RE = re.compile(
    rf"^(?:(?:{_SIZE}) )?(?:(?:{_COLOR}) )?(?:{_SHAPE})$|^(?:{_COLOR}) shapes$"
)
# `{shape} {relation} the {colour} {shape}`: a sentence-like expression.
_RELATION_RE = re.compile(
    rf"^(?:{_SHAPE}) (?:{'|'.join(RELATIONS)}) the (?:{_COLOR}) (?:{_SHAPE})$"
)


def is_attribute_phrase(text: str) -> bool:
    """True for the world's attribute phrases ("red circle", "small purple star", "purple
    shapes"), False for relation expressions ("circle left of the red square").

    Attribute phrases are class-name-like prompts (detection_prompt True: L_inter may propagate
    labels to them); relation expressions are natural sentences. Any other text is not a world
    expression: ValueError, so a generator change cannot silently mislabel the loss.
    """
    if _ATTRIBUTE_RE.match(text):
        return True
    if _RELATION_RE.match(text):
        return False
    raise ValueError(f"{text!r} is not a referring expression of the world grammar (WORLD.md)")


def referring_grounding(text: str, targets: list[GroundedObject],
                        anchor: Callable[[str, str], GroundedObject | None]
                        ) -> tuple[list[GroundedObject], list[list[Span]]]:
    """The objects a referring expression trains and their spans: each target on the referent's
    words (`referent_span`) and, for a relation, its anchor (`anchor(colour, shape)`, the one
    object of that colour and shape, None when there is none) on the anchor's own words, so
    "red square" keeps meaning the red square."""
    objects = list(targets)
    spans = [[referent_span(text)] for _ in targets]
    if relation := relation_anchor(text):
        anchor_words, colour, shape = relation
        if (found := anchor(colour, shape)) is not None:
            objects.append(found)
            spans.append([anchor_words])
    return objects, spans


def _anchor(record: Mapping[str, Any], objects: Mapping[int, GroundedObject], colour: str,
            shape: str, *, path: Path | str, where: str) -> GroundedObject | None:
    """The relation's anchor; None when absent (the expression names nothing); an error when
    there are several (the expression is ambiguous)."""
    found = [o["id"] for o in record["objects"] if o["color"] == colour and o["shape"] == shape]
    if len(found) > 1:
        raise DataFormatError(path, f"{where} is not unique in the image ({len(found)} found)")
    return objects[found[0]] if found else None


def load_world(records_jsonl: Path | str, *, check_images: bool = True) -> list[GroundingSample]:
    """Load shapes-world records (`annotations.jsonl`, the record format of `WORLD.md`).

    Format: one JSON object per line, the image file beside the JSONL: {file, width, height,
    objects: [{id, shape, color, size, box: [x0, y0, x1, y1], mask: COCO RLE}], expressions:
    [{text, targets: [object id]}], questions: [{question, answer}], caption,
    caption_phrases: [{span: [start, end], object: id}]}.

    Each record expands, in this order, into
    - one detection sample: every object, `label` = its shape, `class_names` = the 6 shapes;
    - one referring sample per expression: `caption` = the expression, `objects` = its targets
      (none for an expression naming nothing: a negative example), each spanning the referent's
      words (`referent_span`: the whole attribute phrase, "circle left of" of a relation), and
      a relation's anchor, where present, spanning its own words ("red square");
      detection_prompt True for attribute phrases, False for relation expressions
      (`is_attribute_phrase`);
    - one VQA sample per question: `caption` = the question, `answer`/`answers` = its answer;
      grounded (`question_grounded`) where the question carries the generator's extra keys
      `objects` (ids it names) and `span` (where it names them);
    - one caption sample: `caption` = `caption_target` = the caption, `objects` = the objects its
      phrases name (in phrase order), `spans` = their phrase spans.
    Objects are shared between a record's samples (they are frozen).

    Raises:
        DataFormatError (a ValueError) naming the file and line: missing keys, unknown vocabulary,
        unknown object id, box outside the image, mask size != image, span outside the caption,
        answer outside the 24-answer set, expression outside the grammar.
    """
    path = Path(records_jsonl)
    samples: list[GroundingSample] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(path, f"{where}: not valid JSON: {error}") from error
            samples.extend(_record_samples(record, path, where, check_images))
    return samples


def _record_samples(
    record: Any, path: Path, where: str, check_images: bool
) -> list[GroundingSample]:
    keys = (
        "file",
        "width",
        "height",
        "objects",
        "expressions",
        "questions",
        "caption",
        "caption_phrases",
    )
    require_keys(record, keys, path, where)
    width, height = image_size_entry(record, path, where)
    image_path = image_file(path.parent, record["file"], check_images, path, where)
    objects = _objects(record, width, height, path, where)

    def sample(**fields: Any) -> GroundingSample:
        built = GroundingSample(
            image_path=image_path,
            width=width,
            height=height,
            image_id=Path(record["file"]).stem,
            **fields,
        )
        return validated(built, path, where)

    samples = [
        sample(
            task="detection",
            class_names=list(SHAPES),
            objects=list(objects.values()),
            detection_prompt=True,
        )
    ]

    for index, expression in enumerate(
        require_list(record["expressions"], path, f"{where} expressions")
    ):
        expression_where = f"{where} expressions[{index}]"
        require_keys(expression, ("text", "targets"), path, expression_where)
        text = require_text(expression["text"], path, expression_where)
        try:
            attribute = is_attribute_phrase(text)
        except ValueError as error:
            raise DataFormatError(path, f"{expression_where}: {error}") from error
        targets = [
            _object(objects, target, path, expression_where)
            for target in require_list(expression["targets"], path, f"{expression_where} targets")
        ]
        anchor = partial(_anchor, record, objects, path=path,
                         where=f"{expression_where}: the anchor of {text!r}")
        targets, spans = referring_grounding(text, targets, anchor)
        samples.append(
            sample(
                task="referring",
                caption=text,
                objects=targets,
                spans=spans,
                detection_prompt=attribute,
            )
        )

    for index, question in enumerate(require_list(record["questions"], path, f"{where} questions")):
        question_where = f"{where} questions[{index}]"
        require_keys(question, ("question", "answer"), path, question_where)
        answer = question["answer"]
        if answer not in ANSWERS:
            raise DataFormatError(
                path, f"{question_where}: answer {answer!r} not in the world's 24"
            )
        text = require_text(question["question"], path, question_where)
        grounding: dict[str, Any] = {}
        if "objects" in question and "span" in question:
            named = [
                _object(objects, target, path, question_where)
                for target in require_list(question["objects"], path, f"{question_where} objects")
            ]
            named_spans = check_spans([question["span"]], text, path, question_where)
            grounding = {"objects": named, "spans": [named_spans for _ in named],
                         "question_grounded": True}
            if "answer_object" in question and "answer_span" in question:
                answer_span = check_spans([question["answer_span"]], text, path,
                                          question_where)[0]
                grounding["answer_span"] = answer_span
                if question["answer_object"] not in question["objects"]:
                    named.append(_object(objects, question["answer_object"], path,
                                         question_where))
                    grounding["spans"].append([answer_span])
        samples.append(
            sample(task="vqa", caption=text, answer=answer, answers=[answer], **grounding)
        )

    caption = require_text(record["caption"], path, f"{where} caption")
    spans_per_object: dict[int, list[Span]] = {}
    phrases = require_list(record["caption_phrases"], path, f"{where} caption_phrases")
    for index, phrase in enumerate(phrases):
        phrase_where = f"{where} caption_phrases[{index}]"
        require_keys(phrase, ("span", "object"), path, phrase_where)
        _object(objects, phrase["object"], path, phrase_where)
        phrase_spans = check_spans([phrase["span"]], caption, path, phrase_where)
        spans_per_object.setdefault(phrase["object"], []).extend(phrase_spans)
    samples.append(
        sample(
            task="caption",
            caption=caption,
            caption_target=caption,
            objects=[objects[object_id] for object_id in spans_per_object],
            spans=list(spans_per_object.values()),
        )
    )
    return samples


def _objects(
    record: Mapping[str, Any], width: int, height: int, path: Path, where: str
) -> dict[int, GroundedObject]:
    objects: dict[int, GroundedObject] = {}
    for index, obj in enumerate(require_list(record["objects"], path, f"{where} objects")):
        object_where = f"{where} objects[{index}]"
        require_keys(obj, ("id", "shape", "color", "size", "box", "mask"), path, object_where)
        for key, vocabulary in (("shape", SHAPES), ("color", COLOR_NAMES), ("size", SIZES)):
            if obj[key] not in vocabulary:
                raise DataFormatError(path, f"{object_where}: unknown {key} {obj[key]!r}")
        if obj["id"] in objects:
            raise DataFormatError(path, f"{object_where}: duplicate object id {obj['id']!r}")
        box = _strict_box(obj["box"], width, height, path, object_where)
        if obj["mask"] is None:
            raise DataFormatError(path, f"{object_where}: mask is null")
        rle = segmentation_to_rle(obj["mask"], width, height, path, object_where)
        # WORLD.md defines the box as the mask's bounding box; the RLE bbox is cheap (no decode)
        # and catches corrupt or misattributed masks.
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        mask_box = (x, y, x + w, y + h)
        if any(abs(a - b) > BOX_TOLERANCE_PX for a, b in zip(mask_box, box, strict=True)):
            raise DataFormatError(
                path,
                f"{object_where}: mask bounding box {list(mask_box)} disagrees with box "
                f"{list(box)}",
            )
        objects[obj["id"]] = GroundedObject(box=box, label=obj["shape"], rle=rle)
    return objects


def _strict_box(box: Any, width: int, height: int, path: Path, where: str) -> Box:
    """World boxes are exact integers inside the image: no tolerance, unlike real data."""
    valid = (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
    )
    if not valid:
        raise DataFormatError(path, f"{where}: box must be 4 numbers [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise DataFormatError(
            path, f"{where}: box {box} empty or outside the {width}x{height} image"
        )
    return x0, y0, x1, y1


def _object(
    objects: Mapping[int, GroundedObject], object_id: Any, path: Path, where: str
) -> GroundedObject:
    if isinstance(object_id, bool) or not isinstance(object_id, int) or object_id not in objects:
        raise DataFormatError(path, f"{where}: unknown object id {object_id!r}")
    return objects[object_id]
