"""`glipv2 eval`: every task scored through the service's path, on the shipped model too."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli.main import main
from engines.runtimes.torch_eager import TorchRuntime
from model_export.checkpoints.weights import save_model
from model_export.data.world import (
    EMPTY_FORMS,
    EXPRESSION_FORMS,
    QUESTION_TYPES,
    RELATION_ABSENT_ANCHOR,
    expression_targets,
    render_index,
)
from model_export.evaluation.evaluate import (
    FULL_VOCABULARY,
    HALF_WIDTH,
    PredictedSegment,
    evaluate,
    format_table,
)
from model_export.modeling.model import Glipv2Model
from model_export.processing.postprocess import Detections
from service.offline import OfflineDetection, ServingPredictor
from service.settings import DEFAULT_MODEL_DIR

METRICS = {
    "detection": {"mAP@0.5", "mAP@[.5:.95]", HALF_WIDTH},
    "grounding": {"AP50", "AP50 held-out pairs", "AP50 by form", "AP50 full vocabulary",
                  "AP50 full vocabulary held-out pairs", HALF_WIDTH},
    "referring": {"mIoU", "empty-referent accuracy", "gIoU", "mIoU by form",
                  "empty-referent accuracy by form", HALF_WIDTH},
    "vqa": {"accuracy", "accuracy by type", HALF_WIDTH},
    "caption": {"exact match", "BLEU-4", "phrase grounding accuracy", HALF_WIDTH},
}


def test_eval_cli_scores_every_task_and_writes_json(tiny_model: Glipv2Model, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = save_model(tiny_model, tmp_path / "model", external_language=True)
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(model_dir), "--n", "2", "--seed", "1000",
                 "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert {task: set(values) for task, values in metrics.items()} == METRICS
    scores = [v for values in metrics.values() for v in values.values()
              if not isinstance(v, dict)]
    assert all(0.0 <= v <= 1.0 for v in scores)
    assert set(metrics["vqa"]["accuracy by type"]) <= set(QUESTION_TYPES)
    assert set(metrics["referring"]["mIoU by form"]) <= set(EXPRESSION_FORMS)
    empty = metrics["referring"]["empty-referent accuracy by form"]
    assert empty and set(empty) <= set(EMPTY_FORMS)
    widths = metrics["referring"][HALF_WIDTH]  # per form too (None below two scored)
    assert set(widths["empty-referent accuracy by form"]) == set(empty)
    by_form = metrics["grounding"]["AP50 by form"]  # AP50 is the mean over both forms' phrases
    assert set(by_form) <= {"color_shape", "size_shape"} and by_form
    low, high = min(by_form.values()), max(by_form.values())
    assert low - 1e-9 <= metrics["grounding"]["AP50"] <= high + 1e-9
    by_type = metrics["vqa"]["accuracy by type"].values()
    assert all(0.0 <= v <= 1.0 for v in by_type) and by_type
    for task in metrics:  # half-widths name the task's own figures
        assert set(metrics[task][HALF_WIDTH]) < set(metrics[task])
    assert "mAP@0.5" in capsys.readouterr().out  # the table


class _Oracle:
    """A predictor answering from the scenes' own truth, except that it segments an object for
    every relation expression (the way the default model fails issue 38's relation negatives).
    It records the class lists it is asked to detect."""

    def __init__(self, seed: int, n: int) -> None:
        self.scenes = {render_index(seed, i).image.tobytes(): render_index(seed, i)
                       for i in range(n)}
        self.requests: list[list[str]] = []

    def detect(self, image: Image.Image, class_names: Sequence[str]) -> OfflineDetection:
        self.requests.append(list(class_names))
        objects = self.scenes[image.tobytes()].objects
        found = [(label, objects[i].box) for label, name in enumerate(class_names)
                 for i in expression_targets(name, objects)]
        boxes = torch.tensor([box for _, box in found], dtype=torch.float32).reshape(-1, 4)
        return OfflineDetection(Detections(  # legacy boxes: the last pixel, not one past it
            boxes - torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.full((len(found),), 0.9),
            torch.tensor([label for label, _ in found], dtype=torch.long)))

    def segment(self, image: Image.Image, expressions: Sequence[str],
                threshold: float | None = None, relation_threshold: float | None = None
                ) -> list[list[PredictedSegment]]:
        objects = self.scenes[image.tobytes()].objects
        answers = []
        for text in expressions:
            targets = expression_targets(text, objects)
            if " the " in text and not targets:
                targets = [0]
            answers.append([PredictedSegment(objects[i].box, 0.9, torch.from_numpy(
                objects[i].mask)) for i in targets])
        return answers


def test_eval_scores_empty_referents_by_form_and_the_whole_vocabulary_in_one_request() -> None:
    oracle = _Oracle(seed=1000, n=12)
    metrics = evaluate(oracle, n=12, seed=1000, tasks=["grounding", "referring"],
                       progress=False)
    assert oracle.requests.count(list(FULL_VOCABULARY)) == 12 and len(FULL_VOCABULARY) == 42
    grounding = metrics["grounding"]
    assert grounding["AP50 full vocabulary"] == grounding["AP50"] == 1.0
    assert grounding["AP50 full vocabulary held-out pairs"] == 1.0
    empty = metrics["referring"]["empty-referent accuracy by form"]
    assert empty["relation"] == empty[RELATION_ABSENT_ANCHOR] == 0.0
    assert {form: value for form, value in empty.items() if "relation" not in form} == {
        form: 1.0 for form in empty if "relation" not in form} and len(empty) >= 4
    assert metrics["referring"]["mIoU by form"]["relation"] == 1.0


def test_eval_cli_needs_engines_for_an_exported_runtime(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    assert main(["eval", "--runtime", "onnxruntime"]) == 2
    assert "needs --engines" in capsys.readouterr().err


def test_eval_cli_refuses_a_bad_caption_search(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", "unused", "--caption-beams", "0"]) == 2
    assert "beams >= 1" in capsys.readouterr().err
    assert main(["eval", "--model", "unused", "--caption-length-penalty", "-1"]) == 2
    assert "length_penalty >= 0" in capsys.readouterr().err


def test_shipped_model_finds_the_shapes_on_unseen_images() -> None:
    """Detection on fresh images of an evaluation seed, scored like the README's table: a
    model that regressed (or a broken post-processing path) falls well under this floor."""
    predictor = ServingPredictor(TorchRuntime.from_dir(DEFAULT_MODEL_DIR))
    try:
        metrics = evaluate(predictor, n=8, seed=1000, tasks=["detection"], progress=False)
    finally:
        predictor.close()
    assert set(metrics) == {"detection"}
    assert metrics["detection"]["mAP@0.5"] >= 0.85  # 0.95 for the step-5500 model


def test_format_table() -> None:
    table = format_table(
        {
            "detection": {"map": 0.91234, "map50": 1.0, "per_category_ap50": {"circle": 0.5}},
            "referring": {"miou": None, "n_empty": 3},
        }
    )
    assert table == (
        "| task | metric | value |\n"
        "| --- | --- | --- |\n"
        "| detection | map | 0.9123 |\n"
        "| detection | map50 | 1.0000 |\n"
        "| detection | per_category_ap50[circle] | 0.5000 |\n"
        "| referring | miou | n/a |\n"
        "| referring | n_empty | 3 |\n"
    )
    nested = format_table({"referring": {HALF_WIDTH: {"mIoU by form": {"relation": 0.05}}}})
    assert nested.endswith(f"| referring | {HALF_WIDTH}[mIoU by form][relation] | 0.0500 |\n")
