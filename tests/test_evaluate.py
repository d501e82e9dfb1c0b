"""`glipv2 eval`: every task scored through the service's path, on the shipped model too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main
from engines.runtimes.torch_eager import TorchRuntime
from model_export.checkpoints.weights import save_model
from model_export.data.world import EXPRESSION_FORMS, QUESTION_TYPES
from model_export.evaluation.evaluate import HALF_WIDTH, evaluate, format_table
from model_export.modeling.model import Glipv2Model
from service.offline import ServingPredictor
from service.settings import DEFAULT_MODEL_DIR

METRICS = {
    "detection": {"mAP@0.5", "mAP@[.5:.95]", HALF_WIDTH},
    "grounding": {"AP50", "AP50 held-out pairs", "AP50 by form", HALF_WIDTH},
    "referring": {"mIoU", "empty-referent accuracy", "gIoU", "mIoU by form", HALF_WIDTH},
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
    by_form = metrics["grounding"]["AP50 by form"]  # AP50 is the mean over both forms' phrases
    assert set(by_form) <= {"color_shape", "size_shape"} and by_form
    low, high = min(by_form.values()), max(by_form.values())
    assert low - 1e-9 <= metrics["grounding"]["AP50"] <= high + 1e-9
    by_type = metrics["vqa"]["accuracy by type"].values()
    assert all(0.0 <= v <= 1.0 for v in by_type) and by_type
    for task in metrics:  # half-widths name the task's own figures
        assert set(metrics[task][HALF_WIDTH]) < set(metrics[task])
    assert "mAP@0.5" in capsys.readouterr().out  # the table


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
