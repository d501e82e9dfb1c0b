"""Runtimes: manifest validation, and ONNX Runtime == PyTorch through the whole service path.

The parity test exports the shipped default model and serves the same world samples through
`Glipv2Serving` on `TorchRuntime` and on `OnnxRuntime` (CPU): the four tasks must give the same
labels, boxes within 0.5 px, masks with IoU >= 0.99, the same answers and captions. It also shows
that batching is invisible: requests with different prompts, sent together, batch in the engines
and answer exactly as the same requests one at a time.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from engines.export import export_model
from engines.manifest import MANIFEST_FILE
from engines.runtimes import (
    ManifestError,
    RuntimeOptions,
    RuntimeUnavailableError,
    load_manifest,
    open_runtime,
)
from engines.runtimes.onnx_runtime import OnnxRuntime
from engines.runtimes.torch_eager import TorchRuntime
from service.batching import BatcherConfig
from service.pipeline.caption_search import CaptionSearch
from service.schemas import DetectParams, SegmentParams, VqaParams
from service.serving import Glipv2Serving
from service.settings import DEFAULT_MODEL_DIR
from service.telemetry import ServiceMetrics

pytestmark = pytest.mark.slow  # exports the default model (~1 min) and runs it twice

SAMPLES = Path(__file__).parent / "fixtures" / "world"
SHAPES = ["circle", "square", "triangle", "diamond", "star", "hexagon"]
BOX_TOLERANCE_PX = 0.5


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "default"
    export_model(DEFAULT_MODEL_DIR, out)
    return out


def samples() -> list[tuple[Image.Image, dict[str, Any]]]:
    records = [json.loads(line) for line in (SAMPLES / "annotations.jsonl").read_text().split("\n")
               if line.strip()]
    return [(Image.open(SAMPLES / r["file"]).convert("RGB"), r) for r in records]


async def serve_all(serving: Glipv2Serving, concurrent: bool) -> list[Any]:
    """Every task on every sample, all at once or one after another."""
    calls = []
    for image, record in samples():
        expressions = [e["text"] for e in record["expressions"]] or ["red circle"]
        question = (record["questions"] or [{"question": "how many circles are there?"}])[0]
        calls += [
            lambda i=image: serving.detect(serving.prepare_detect(
                DetectParams(classes=SHAPES, threshold=0.3)), i),
            lambda i=image, r=record: serving.detect(serving.prepare_detect(DetectParams(
                prompt=". ".join(f"{o['color']} {o['shape']}" for o in r["objects"]),
                threshold=0.3)), i),
            lambda i=image, e=expressions: serving.segment(SegmentParams(expressions=e), i),
            lambda i=image, q=question: serving.vqa(VqaParams(question=q["question"]), i),
            lambda i=image: serving.caption(i),
        ]
    await serving.start()
    try:
        if concurrent:
            return list(await asyncio.gather(*(call() for call in calls)))
        return [await call() for call in calls]
    finally:
        await serving.stop()


def make_serving(runtime: Any, metrics: ServiceMetrics | None = None) -> Glipv2Serving:
    return Glipv2Serving(runtime, model_id="default", metrics=metrics,
                         caption_search=CaptionSearch(max_tokens=24),
                         batcher_config=BatcherConfig(max_batch_size=8, max_queue_delay_ms=50,
                                                      max_queue_size=64))


def assert_same(reference: Any, other: Any) -> None:
    a, b = reference.model_dump(), other.model_dump()
    if "detections" in a:
        assert [d["label"] for d in a["detections"]] == [d["label"] for d in b["detections"]]
        for x, y in zip(a["detections"], b["detections"], strict=True):
            assert np.abs(np.subtract(x["box"], y["box"])).max() <= BOX_TOLERANCE_PX
    elif "results" in a:
        for x, y in zip(a["results"], b["results"], strict=True):
            assert len(x["segments"]) == len(y["segments"]), x["expression"]
            for s, t in zip(x["segments"], y["segments"], strict=True):
                assert np.abs(np.subtract(s["box"], t["box"])).max() <= BOX_TOLERANCE_PX
                assert mask_iou(s["mask"], t["mask"]) >= 0.99
    elif "answer" in a:
        assert a["answer"] == b["answer"]
        assert [g["phrase"] for g in a["grounding"]] == [g["phrase"] for g in b["grounding"]]
        for x, y in zip(a["answer_grounding"], b["answer_grounding"], strict=True):
            assert np.abs(np.subtract(x["box"], y["box"])).max() <= BOX_TOLERANCE_PX
    else:
        assert a["caption"] == b["caption"]
        for x, y in zip(a["phrases"], b["phrases"], strict=True):
            assert x["span"] == y["span"]
            assert np.abs(np.subtract(x["box"], y["box"])).max() <= BOX_TOLERANCE_PX


def mask_iou(a: dict[str, Any], b: dict[str, Any]) -> float:
    ma = mask_utils.decode({"size": a["size"], "counts": a["counts"].encode()}).astype(bool)
    mb = mask_utils.decode({"size": b["size"], "counts": b["counts"].encode()}).astype(bool)
    union = (ma | mb).sum()
    return 1.0 if union == 0 else float((ma & mb).sum() / union)


def test_onnxruntime_serves_what_pytorch_serves(engine_dir: Path) -> None:
    torch_runtime = TorchRuntime.from_dir(DEFAULT_MODEL_DIR)
    metrics = ServiceMetrics()
    one_by_one = asyncio.run(serve_all(make_serving(torch_runtime), concurrent=False))
    together = asyncio.run(serve_all(make_serving(torch_runtime, metrics), concurrent=True))
    for a, b in zip(one_by_one, together, strict=True):
        assert_same(a, b)
    fusion_rows = metrics.registry.get_sample_value(
        "glipv2_engine_batch_size_sum", {"engine": "fusion"})
    fusion_batches = metrics.registry.get_sample_value(
        "glipv2_engine_batch_size_count", {"engine": "fusion"})
    assert fusion_rows > fusion_batches, "concurrent requests never shared a fusion batch"

    ort_runtime = open_runtime(RuntimeOptions(kind="onnxruntime", engine_dir=engine_dir))
    assert ort_runtime.name == "onnxruntime-cpu-fp32"
    on_ort = asyncio.run(serve_all(make_serving(ort_runtime), concurrent=True))
    for a, b in zip(one_by_one, on_ort, strict=True):
        assert_same(a, b)
    detections = [r for r in one_by_one if hasattr(r, "detections")]
    assert any(r.detections for r in detections), "the shipped model found nothing to compare"


# --- manifest validation ----------------------------------------------------------------------


@pytest.fixture()
def copy_of(engine_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(engine_dir, out)
    return out


def edit_manifest(directory: Path, change: Any) -> None:
    path = directory / MANIFEST_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_manifest_loads_and_names_its_model(engine_dir: Path) -> None:
    manifest = load_manifest(engine_dir, expected_preset="small")
    assert manifest.config.preset == "small" and manifest.model_id == "default"
    assert {"vision", "language", "fusion", "mask", "vqa"} <= set(manifest.graphs)


def test_manifest_errors_say_what_is_wrong(copy_of: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not an engine folder"):
        load_manifest(tmp_path / "nothing")
    with pytest.raises(ManifestError, match="holds a 'small' model, but 'glip-t' was asked"):
        load_manifest(copy_of, expected_preset="glip-t")

    vqa = copy_of / "vqa.onnx"
    vqa.write_bytes(vqa.read_bytes()[:-10])
    with pytest.raises(ManifestError, match=r"vqa\.onnx does not match its manifest checksum"):
        load_manifest(copy_of)
    vqa.unlink()
    with pytest.raises(ManifestError, match=r"vqa\.onnx is listed in the manifest but missing"):
        load_manifest(copy_of)

    edit_manifest(copy_of, lambda d: d["graphs"].pop("vqa"))
    edit_manifest(copy_of, lambda d: d["graphs"]["mask"].update(opset=17))
    with pytest.raises(ManifestError, match="graph 'mask' has opset 17"):
        load_manifest(copy_of)
    edit_manifest(copy_of, lambda d: d["graphs"].pop("fusion"))
    with pytest.raises(ManifestError, match="no fusion graph"):
        load_manifest(copy_of)
    edit_manifest(copy_of, lambda d: d.update(preset="glip-t"))
    with pytest.raises(ManifestError, match="preset 'small' but the manifest says 'glip-t'"):
        load_manifest(copy_of)
    edit_manifest(copy_of, lambda d: d.update(format="other/9"))
    with pytest.raises(ManifestError, match="format 'other/9'"):
        load_manifest(copy_of)


def test_unavailable_provider_and_precision_are_clear_errors(engine_dir: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeUnavailableError, match=r"'cuda'.*not available here"):
            OnnxRuntime(engine_dir, provider="cuda")
    with pytest.raises(RuntimeUnavailableError, match="no int8 variant of 'vision'"):
        OnnxRuntime(engine_dir, precision="int8")
    with pytest.raises(ValueError, match="needs an engine folder"):
        open_runtime(RuntimeOptions(kind="onnxruntime"))
