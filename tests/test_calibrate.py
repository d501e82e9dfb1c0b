"""`glipv2 calibrate`: the referring-segment threshold sweep, its choice, and `--write`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli.main import main
from model_export.checkpoints.weights import load_config, save_model
from model_export.data.world import render_index
from model_export.evaluation.calibrate import (
    THRESHOLDS,
    best_threshold,
    geometric,
    relation_threshold_sweep,
    segment_threshold_sweep,
)
from model_export.evaluation.evaluate import PredictedSegment
from model_export.modeling.model import Glipv2Model

SEED = 2000


class ScriptedPredictor:
    """Answers each expression of the first scenes of `SEED` with its true objects at score
    0.8, and an expression that names nothing with a wrong object at score 0.4."""

    def __init__(self, n: int) -> None:
        self.truth: dict[bytes, dict[str, list[int]]] = {}
        self.objects: dict[bytes, list] = {}
        for index in range(n):
            scene = render_index(SEED, index)
            key = scene.image.tobytes()
            self.truth[key] = {e["text"]: e["targets"] for e in scene.expressions}
            self.objects[key] = scene.objects
        self.thresholds: list[tuple[float | None, float | None]] = []
        self.asked: list[str] = []

    def segment(self, image: Image.Image, expressions: Sequence[str],
                threshold: float | None = None, relation_threshold: float | None = None
                ) -> list[list[PredictedSegment]]:
        self.thresholds.append((threshold, relation_threshold))
        self.asked += expressions
        key = image.tobytes()
        objects = self.objects[key]
        out = []
        for targets in (self.truth[key][e] for e in expressions):
            if targets:
                out.append([PredictedSegment([0, 0, 1, 1], 0.8, torch.from_numpy(objects[i].mask))
                            for i in targets])
            else:
                out.append([PredictedSegment([0, 0, 1, 1], 0.4, torch.from_numpy(objects[0].mask))])
        return out


def test_sweep_scores_each_threshold_and_the_best_separates_the_scores() -> None:
    predictor = ScriptedPredictor(4)
    scores = segment_threshold_sweep(predictor, 4, SEED)  # type: ignore[arg-type]
    assert predictor.thresholds == [(0.0, 0.0)] * 4  # segmented once, unthresholded
    assert [s.threshold for s in scores] == list(THRESHOLDS)
    by_threshold = {s.threshold: s for s in scores}
    low, high = by_threshold[0.3], by_threshold[0.5]
    assert low.miou == high.miou == 1.0
    assert low.empty_accuracy == 0.0 and high.empty_accuracy == 1.0
    assert high.giou == 1.0 > low.giou
    assert by_threshold[0.9].miou == 0.0 and by_threshold[0.9].empty_accuracy == 1.0
    assert best_threshold(scores).threshold == 0.425  # the lowest above the wrong answers


def test_a_geometry_model_calibrates_its_relations_apart() -> None:
    """With `geometry`, the phrase sweep leaves out the relations resolved on boxes; the
    relation sweep segments only those, their anchors held to the chosen phrase threshold."""
    n = 12
    predictor = ScriptedPredictor(n)
    segment_threshold_sweep(predictor, n, SEED, geometry=True)  # type: ignore[arg-type]
    relations = [e for e in predictor.asked if geometric(e)]
    assert not relations and predictor.asked
    predictor.asked.clear()
    scores = relation_threshold_sweep(predictor, n, 0.45, SEED)  # type: ignore[arg-type]
    assert predictor.asked and all(geometric(e) for e in predictor.asked)
    assert set(predictor.thresholds[n:]) == {(0.45, 0.0)}
    assert best_threshold(scores).threshold == 0.425


def test_best_threshold_needs_scored_expressions() -> None:
    with pytest.raises(ValueError, match="nothing to calibrate"):
        best_threshold([])


def test_calibrate_cli_writes_the_threshold_into_the_model_config(
        tiny_model: Glipv2Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = save_model(tiny_model, tmp_path / "model", external_language=True)
    assert main(["calibrate", "--model", str(model_dir), "--n", "2"]) == 0
    assert "best" in capsys.readouterr().out
    assert load_config(model_dir).postprocess.segment_threshold == 0.3  # not written
    assert main(["calibrate", "--model", str(model_dir), "--n", "2", "--write"]) == 0
    chosen = load_config(model_dir).postprocess.segment_threshold
    assert chosen in THRESHOLDS
    assert f"-> {chosen}" in capsys.readouterr().out
    assert json.loads((model_dir / "config.json").read_text())["preset"] == "small"


def test_calibrate_cli_sweeps_and_writes_the_chosen_score_aggregation(
        tiny_model: Glipv2Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--score-agg min` sweeps with every phrase scored by its weakest token and, with
    `--write`, stores it beside the threshold; without --write the model is untouched."""
    model_dir = save_model(tiny_model, tmp_path / "model", external_language=True)
    assert main(["calibrate", "--model", str(model_dir), "--n", "2", "--score-agg", "min"]) == 0
    assert load_config(model_dir).postprocess.score_agg == "mean"
    assert main(["calibrate", "--model", str(model_dir), "--n", "2", "--score-agg", "min",
                 "--write"]) == 0
    assert "score_agg min" in capsys.readouterr().out
    assert load_config(model_dir).postprocess.score_agg == "min"


def test_calibrate_cli_writes_geometric_relations_and_their_threshold(
        tiny_model: Glipv2Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = save_model(tiny_model, tmp_path / "model", external_language=True)
    assert main(["calibrate", "--model", str(model_dir), "--n", "2", "--relations", "geometry",
                 "--write"]) == 0
    out = capsys.readouterr().out
    assert "relation threshold" in out and "relations geometry" in out
    post = load_config(model_dir).postprocess
    assert post.relations == "geometry" and post.relation_threshold in THRESHOLDS
