"""Our glip-t model reproduces the reference GLIP-T outputs for the same (fake) weights.

The vector (tests/fixtures/reference/glip_t_vector_outputs.json) was produced by the reference
microsoft/GLIP code on CPU. Tolerances are the ones its README states: per-level statistics within
1e-4 of their scale, and the final 100 detections equal as sets (same label, every box coordinate
within 0.5 px in original-image pixels, score within 1e-3), checked both ways.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli.main import main as cli_main
from model_export.inference import DetectionRun, Glipv2Detector
from model_export.processing.preprocess import batch_images, preprocess_image

from conftest import REFERENCE, label_to_tokens

pytestmark = pytest.mark.slow

VECTOR = json.loads((REFERENCE / "glip_t_vector_outputs.json").read_text())
CLASSES = VECTOR["prompt"]["classes"]


@pytest.fixture(scope="module")
def converted(glip_t_vector_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("glip_t_converted")
    assert cli_main(["convert", str(glip_t_vector_checkpoint), "--preset", "glip-t",
                     "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def detector(converted: Path) -> Glipv2Detector:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return Glipv2Detector.from_dir(converted, pad_to=VECTOR["language"]["bert_hidden_last_layer"]
                                   ["shape"][1])


@pytest.fixture(scope="module")
def image() -> Image.Image:
    with Image.open(REFERENCE / "glip_t_vector_image.png") as img:
        return img.convert("RGB")


@pytest.fixture(scope="module")
def run(detector: Glipv2Detector, image: Image.Image) -> DetectionRun:
    return detector.detect(image, CLASSES)


def assert_stats(name: str, tensor: torch.Tensor, ref: dict) -> None:
    """Compare a tensor with a reference summary, tolerance 1e-4 x the statistic's scale."""
    assert list(tensor.shape) == ref["shape"], f"{name}: shape {list(tensor.shape)}"
    t = tensor.double()
    mean_abs = ref["mean_abs"]
    if "min" in ref:
        scale = max(abs(ref["min"]), abs(ref["max"]))
        assert abs(t.min().item() - ref["min"]) <= 1e-4 * scale, f"{name}: min"
        assert abs(t.max().item() - ref["max"]) <= 1e-4 * scale, f"{name}: max"
    elif "first8" in ref:
        scale = max(abs(v) for v in ref["first8"])
    assert abs(t.abs().mean().item() - mean_abs) <= 1e-4 * mean_abs, f"{name}: mean_abs"
    assert abs(t.sum().item() - ref["sum"]) <= 1e-4 * mean_abs * t.numel(), f"{name}: sum"
    if "first8" in ref:
        first8 = t.flatten()[:8].tolist()
        for ours, theirs in zip(first8, ref["first8"], strict=True):
            assert abs(ours - theirs) <= 1e-4 * scale, f"{name}: first8 {first8}"


def test_prompt_and_input_sizes(run: DetectionRun) -> None:
    prompt = VECTOR["prompt"]
    assert run.prompt.caption == prompt["caption"]
    n = prompt["n_tokens"]
    assert run.input_ids[0, :n].tolist() == prompt["input_ids"]
    assert run.input_ids[0, n:].eq(0).all()
    expected = {int(k) - 1: v for k, v in prompt["positive_map_label_to_token"].items()}
    assert label_to_tokens(run.positive_map) == expected
    assert list(run.resized_hw) == VECTOR["input"]["resized_hw"]
    assert list(run.padded_hw) == VECTOR["input"]["padded_hw"]


def test_input_tensor(detector: Glipv2Detector, image: Image.Image) -> None:
    pixels, _ = preprocess_image(image, detector.config.preprocess)
    batch, _ = batch_images([pixels], detector.config.preprocess.size_divisibility)
    assert_stats("input", batch, VECTOR["input"]["tensor_stats"])


@torch.no_grad()
def test_fpn_features(detector: Glipv2Detector, image: Image.Image) -> None:
    pixels, _ = preprocess_image(image, detector.config.preprocess)
    batch, _ = batch_images([pixels], detector.config.preprocess.size_divisibility)
    features = detector.model.encode_image(batch)
    for level, ref in enumerate(VECTOR["levels"]):
        assert_stats(f"P{level + 3}", features[level], ref["fpn_feature"])


@torch.no_grad()
def test_language_features(detector: Glipv2Detector, run: DetectionRun) -> None:
    mask = (run.input_ids != 0).long()
    text = detector.model.encode_text(run.input_ids, mask)
    lang = VECTOR["language"]
    assert_stats("bert hidden", text.hidden, lang["bert_hidden_last_layer"])
    assert_stats("bert embedded", text.embedded, lang["bert_embedded_hidden_x_mask"])
    assert_stats("fused text", run.outputs.fused_text, lang["fused_hidden_after_dyhead"])


def test_per_level_head_outputs(run: DetectionRun) -> None:
    n = VECTOR["prompt"]["n_tokens"]
    for level, ref in enumerate(VECTOR["levels"]):
        out = run.outputs
        assert_stats(f"box_regression {level}", out.box_regression[level], ref["box_regression"])
        assert_stats(f"centerness {level}", out.centerness[level], ref["centerness"])
        assert_stats(f"logits {level}", out.token_logits[level], ref["dot_product_logits"])
        assert_stats(f"valid logits {level}", out.token_logits[level][:, :, :n],
                     ref["dot_product_logits_valid_tokens_only"])


def _unmatched(ours: list[dict], theirs: list[dict]) -> list[dict]:
    """Detections of `theirs` with no counterpart in `ours` (same label, 0.5 px, 1e-3 score)."""
    missing = []
    for det in theirs:
        if not any(
            o["label"] == det["label"]
            and abs(o["score"] - det["score"]) <= 1e-3
            and all(abs(a - b) <= 0.5 for a, b in zip(o["box"], det["box"], strict=True))
            for o in ours
        ):
            missing.append(det)
    return missing


def test_final_detections_match_as_sets(run: DetectionRun) -> None:
    reference = [{"label": d["label"] - 1, "score": d["score"], "box": d["box_xyxy"]}
                 for d in VECTOR["detections"]]
    found = run.detections
    ours = [{"label": int(label), "score": float(score), "box": box.tolist()}
            for box, score, label in zip(found.boxes, found.scores, found.labels, strict=True)]
    assert len(ours) == VECTOR["num_detections"]
    assert _unmatched(ours, reference) == []
    assert _unmatched(reference, ours) == []
