"""VQA v2 questions + annotations -> VQA samples."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from model_export.data._common import (
    DataFormatError,
    read_image_size,
    read_json,
    require_keys,
    require_list,
    require_text,
    validated,
)
from model_export.data.types import GroundingSample


def load_vqa_v2(
    questions_json: Path | str,
    annotations_json: Path | str | None,
    image_dir: Path | str,
    image_name_format: str = "COCO_{split}_{image_id:012d}.jpg",
    *,
    split: str | None = None,
) -> list[GroundingSample]:
    """Load VQA v2 (visualqa.org/download.html) for the VQA head.

    Format: `v2_OpenEnded_mscoco_{split}_questions.json` = {data_subtype: "train2014",
    questions: [{question_id, image_id, question}]} and `v2_mscoco_{split}_annotations.json` =
    {annotations: [{question_id, image_id, multiple_choice_answer, answers: [{answer, ...}] x 10,
    ...}]}. Test splits have no annotations file: pass None and the samples carry no answer.

    One sample per question, in file order: `caption` is the question (a natural sentence, so
    detection_prompt False), `answer` the most common answer (`multiple_choice_answer`, or the
    mode of `answers` when absent), `answers` all annotator answers with repeats (the soft VQA
    target counts them). No objects: VQA v2 has no grounding. Image sizes are read from the image
    headers, the files carrying none.

    Args:
        questions_json: the questions file.
        annotations_json: the annotations file, or None.
        image_dir: folder holding the COCO images of the split.
        image_name_format: image file name, formatted with `split` and `image_id`.
        split: the `split` for file names; default the questions' `data_subtype`. test-dev
            questions ("test-dev2015") use the test2015 images: pass split="test2015".

    Raises:
        DataFormatError (a ValueError) naming the file and entry: missing keys, a question with no
        annotation, mismatched image ids, unreadable image.
    """
    questions_path = Path(questions_json)
    data = require_keys(read_json(questions_path), ("questions",), questions_path, "file")
    split = split if split is not None else data.get("data_subtype")
    if split is None and "{split" in image_name_format:
        raise DataFormatError(
            questions_path, "no 'data_subtype' to name the images by; pass split=..."
        )
    annotations = _annotations_by_question(annotations_json)

    sizes: dict[Path, tuple[int, int]] = {}
    samples = []
    for index, question in enumerate(require_list(data["questions"], questions_path, "questions")):
        where = f"questions[{index}]"
        require_keys(question, ("question_id", "image_id", "question"), questions_path, where)
        text = require_text(question["question"], questions_path, f"{where} question")
        image_id = question["image_id"]
        image_path = Path(image_dir) / image_name_format.format(split=split, image_id=image_id)
        if image_path not in sizes:
            sizes[image_path] = read_image_size(image_path, questions_path, where)
        width, height = sizes[image_path]
        answer: str | None = None
        answers: list[str] = []
        if annotations is not None:
            answer, answers = _answers(annotations, question, annotations_json, where)
        sample = GroundingSample(
            image_path=image_path,
            width=width,
            height=height,
            task="vqa",
            caption=text,
            detection_prompt=False,
            answer=answer,
            answers=answers,
            image_id=str(image_id),
        )
        samples.append(validated(sample, questions_path, where))
    return samples


def _annotations_by_question(annotations_json: Path | str | None) -> dict[Any, dict] | None:
    if annotations_json is None:
        return None
    path = Path(annotations_json)
    data = require_keys(read_json(path), ("annotations",), path, "file")
    by_question: dict[Any, dict] = {}
    for index, ann in enumerate(require_list(data["annotations"], path, "annotations")):
        where = f"annotations[{index}]"
        require_keys(ann, ("question_id", "image_id", "answers"), path, where)
        answers = require_list(ann["answers"], path, f"{where} answers")
        for answer_index, answer in enumerate(answers):
            answer_where = f"{where} answers[{answer_index}]"
            require_keys(answer, ("answer",), path, answer_where)
            require_text(answer["answer"], path, answer_where)
        if not answers and "multiple_choice_answer" not in ann:
            raise DataFormatError(path, f"{where}: no answers")
        by_question[ann["question_id"]] = ann
    return by_question


def _answers(
    annotations: dict[Any, dict], question: dict, annotations_json: Any, where: str
) -> tuple[str, list[str]]:
    path = Path(annotations_json)
    ann = annotations.get(question["question_id"])
    if ann is None:
        raise DataFormatError(
            path, f"no annotation for question_id {question['question_id']!r} ({where})"
        )
    if ann["image_id"] != question["image_id"]:
        raise DataFormatError(
            path,
            f"question_id {question['question_id']!r}: image_id {ann['image_id']!r} != "
            f"the question's {question['image_id']!r}",
        )
    answers = [answer["answer"] for answer in ann["answers"]]
    if "multiple_choice_answer" in ann:
        answer = require_text(ann["multiple_choice_answer"], path, f"{where} answer")
    else:
        answer = Counter(answers).most_common(1)[0][0]
    return answer, answers
