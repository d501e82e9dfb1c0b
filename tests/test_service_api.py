"""The HTTP service against a tiny random small-preset model: shapes, every bad input, limits,
auth, probes, metrics, the batcher's error mapping, the OpenAPI contract, and `glipv2 serve`.

The model is random, so answers are meaningless; what is checked is the contract: status codes,
error bodies, response shapes, spans into the prompt, RLE masks of the image's size, and that
JSON and multipart give the same answer. Pre-processing is shrunk (96/128) and the candidate
threshold opened (0.0, at most 5 detections) so every task returns something to look at, fast.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pycocotools import mask as mask_utils

import service.tasks.detect as detect_module
from engines.runtimes.torch_eager import TorchRuntime
from model_export.checkpoints.weights import save_model
from model_export.modeling.model import Glipv2Model
from model_export.processing.box_coding import rescale_boxes, to_exclusive
from model_export.processing.chunking import pack_chunks
from model_export.processing.postprocess import Detections
from model_export.processing.preprocess import resized_size
from model_export.processing.prompt import load_tokenizer
from service.app import create_app
from service.batching import BatcherConfig
from service.caption_runner import CaptionRunner
from service.errors import PayloadTooLargeError, UnsupportedMediaTypeError
from service.openapi import OPENAPI_PATH, app_schema, load_openapi
from service.pipeline.caption_search import CaptionGrammar, CaptionSearch
from service.pipeline.images import decode_base64, decode_image_bytes, sniff_format
from service.pipeline.phrases import split_phrases
from service.schemas import DetectParams
from service.serving import Glipv2Serving
from service.settings import ServiceSettings
from service.tasks.common import TaskContext

from conftest import GatedRuntime, start_server, until, with_app

REPO = Path(__file__).resolve().parent.parent
WORLD_PNG = Path(__file__).parent / "fixtures" / "world" / "000000.png"
CLASSES = ["circle", "square", "triangle", "diamond", "star", "hexagon"]

# Images between 1x and 2x the pixel limit make Pillow warn before our check refuses them.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime(tiny_model: Glipv2Model) -> TorchRuntime:
    return TorchRuntime(tiny_model)


def make_settings(**overrides: Any) -> ServiceSettings:
    """Defaults for tests, independent of GLIPV2_* variables of the environment."""
    values: dict[str, Any] = {"model_name": "tiny", "caption_max_tokens": 4, "api_keys": []}
    return ServiceSettings(**(values | overrides))


@pytest.fixture(scope="module")
def client(runtime: TorchRuntime) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(), runtime)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def png_bytes() -> bytes:
    return WORLD_PNG.read_bytes()


@pytest.fixture(scope="module")
def png_b64(png_bytes: bytes) -> str:
    return base64.b64encode(png_bytes).decode()


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` RGB pixels, with one tiny IDAT: a bomb's
    header (a real bomb's IDAT would inflate to width*height*3 bytes)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["request_id"] == response.headers["x-request-id"], body
    assert body["error"]["code"] == code, body
    for fragment in fragments:
        assert fragment in body["error"]["message"], body


# --- every endpoint: 200 with the contract's shape --------------------------------------------


def test_detect_classes(client: TestClient, png_b64: str) -> None:
    response = client.post("/v1/detect", json={"image": png_b64, "classes": CLASSES,
                                               "threshold": 0.0, "max_detections": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny"
    with Image.open(WORLD_PNG) as image:
        assert body["image"] == {"width": image.width, "height": image.height}
    detections = body["detections"]
    assert 1 <= len(detections) <= 3
    scores = [d["score"] for d in detections]
    assert scores == sorted(scores, reverse=True)
    for detection in detections:
        assert set(detection) == {"label", "score", "box"}  # no span for classes
        assert detection["label"] in CLASSES and 0.0 <= detection["score"] <= 1.0
        x0, y0, x1, y1 = detection["box"]
        assert 0 <= x0 <= x1 <= body["image"]["width"] and 0 <= y0 <= y1 <= body["image"]["height"]


def test_detect_threshold_filters(client: TestClient, png_b64: str) -> None:
    response = client.post("/v1/detect", json={"image": png_b64, "classes": CLASSES,
                                               "threshold": 1.0})
    assert response.status_code == 200 and response.json()["detections"] == []


def test_phrase_grounding_spans_point_into_the_prompt(client: TestClient, png_b64: str) -> None:
    prompt = "a red circle,  large blue star ;green square."
    response = client.post("/v1/detect", json={"image": png_b64, "prompt": prompt,
                                               "threshold": 0.0})
    assert response.status_code == 200, response.text
    detections = response.json()["detections"]
    assert detections
    for detection in detections:
        start, end = detection["span"]
        assert prompt[start:end] == detection["label"]
        assert detection["label"] in {"a red circle", "large blue star", "green square"}


def test_a_prompt_over_the_token_limit_is_chunked_by_phrases(client: TestClient,
                                                            png_b64: str) -> None:
    """Like a long class list: 60 phrases of 5 tokens (>256 in all) are answered, not refused,
    and every span still points into the prompt."""
    phrases = [f"red circle number {i}" for i in range(60)]
    prompt = ". ".join(phrases)
    response = client.post("/v1/detect", json={"image": png_b64, "prompt": prompt,
                                               "threshold": 0.0, "max_detections": 1000})
    assert response.status_code == 200, response.text
    detections = response.json()["detections"]
    assert {d["label"] for d in detections} - set(phrases) == set()
    assert {d["label"] for d in detections} & set(phrases[40:])  # from a later chunk
    for detection in detections:
        start, end = detection["span"]
        assert prompt[start:end] == detection["label"]


def test_without_a_chunk_size_the_models_prompt_length_packs_the_classes(
        client: TestClient, runtime: TorchRuntime, png_b64: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`language.max_prompt_phrases` packs a request that names no chunk_size (5 classes, 2
    per prompt: 3 prompts), as an explicit chunk_size of 2 does; a request's own wins; and
    /v1/models says it."""
    packed: list[int] = []

    def spy(names, counts, max_tokens, chunk_size=None):
        chunks = pack_chunks(names, counts, max_tokens, chunk_size)
        packed.append(len(chunks))
        return chunks

    monkeypatch.setattr(detect_module, "pack_chunks", spy)
    monkeypatch.setattr(runtime.config.language, "max_prompt_phrases", 2)
    classes = ["red circle", "blue star", "green square", "gray hexagon", "purple diamond"]
    body = {"image": png_b64, "classes": classes, "threshold": 0.0}
    default = client.post("/v1/detect", json=body)
    assert default.status_code == 200, default.text
    assert packed == [3]
    assert client.post("/v1/detect", json=body | {"chunk_size": 2}).json() == default.json()
    assert client.post("/v1/detect", json=body | {"chunk_size": 5}).status_code == 200
    assert packed == [3, 1]  # chunk_size 2 was planned (and cached) by the default's request
    assert client.get("/v1/models").json()["models"][0]["max_prompt_phrases"] == 2


def test_names_with_nothing_to_match_are_never_detected(client: TestClient,
                                                         png_b64: str) -> None:
    """A class or phrase with no token once cleaned ("(x)", "_", a lone combining accent) is
    valid and finds nothing; the other names are still detected."""
    for fields in ({"classes": ["(x)", "_", "\u0301"]}, {"prompt": "(x). \u0301"}):
        response = client.post("/v1/detect", json={"image": png_b64, "threshold": 0.0,
                                                   **fields})
        assert response.status_code == 200, response.text
        assert response.json()["detections"] == []
    response = client.post("/v1/detect", json={"image": png_b64, "threshold": 0.0,
                                               "classes": ["(x)", "circle"]})
    assert response.status_code == 200, response.text
    labels = {d["label"] for d in response.json()["detections"]}
    assert labels == {"circle"}


def test_split_phrases() -> None:
    text = " red circle. blue star,\nsmall (x) square ;"
    assert [text[s:e] for s, e in split_phrases(text)] == ["red circle", "blue star",
                                                          "small (x) square"]


def test_segment_returns_rle_masks_of_the_image_size(client: TestClient, png_b64: str) -> None:
    response = client.post("/v1/segment", json={
        "image": png_b64, "expressions": ["the red circle", "a star"], "threshold": 0.0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["expression"] for r in body["results"]] == ["the red circle", "a star"]
    height, width = body["image"]["height"], body["image"]["width"]
    segments = [s for r in body["results"] for s in r["segments"]]
    assert segments
    for segment in segments:
        assert set(segment) == {"score", "box", "mask"} and len(segment["box"]) == 4
        assert segment["mask"]["size"] == [height, width]
        assert isinstance(segment["mask"]["counts"], str)
        rle = {"size": segment["mask"]["size"], "counts": segment["mask"]["counts"].encode()}
        assert mask_utils.decode(rle).shape == (height, width)


def test_segment_scores_the_words_naming_the_referent(
        client: TestClient, png_b64: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """"circle left of the red square" is scored on "circle left of", not on the anchor's
    words (which name another object), beside those words ("red square", which cap it); an
    expression without a relation on all its words."""
    scored: list[tuple[str, list[tuple[int, int]]]] = []
    phrase_detections = TaskContext.phrase_detections

    def spy(self, text, spans, *args, **kwargs):
        scored.append((text, list(spans)))
        return phrase_detections(self, text, spans, *args, **kwargs)

    monkeypatch.setattr(TaskContext, "phrase_detections", spy)
    response = client.post("/v1/segment", json={
        "image": png_b64, "expressions": ["circle left of the red square", "small red circle"]})
    assert response.status_code == 200, response.text
    assert scored == [("circle left of the red square", [(0, 14), (19, 29)]),
                      ("small red circle", [(0, 16)])]


def test_a_relation_scores_no_higher_than_its_anchor_is_found(
        client: TestClient, png_b64: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The best score of the anchor's words caps every segment of the relation: with the anchor
    found at 1.0 the segments keep their own scores; at half of the best of them, none is
    above it; found nowhere (no detection of its words), the relation names nothing."""
    phrase_detections = TaskContext.phrase_detections
    body = {"image": png_b64, "expressions": ["circle left of the red square"],
            "threshold": 0.001}

    def segments_with_anchor(score: float | None) -> list[float]:
        def fake(self, text, spans, *args, **kwargs):
            pmap, found = phrase_detections(self, text, spans, *args, **kwargs)
            anchor = found.labels == 1
            if score is None:  # the anchor's words detect nothing
                return pmap, Detections(found.boxes[~anchor], found.scores[~anchor],
                                        found.labels[~anchor])
            return pmap, Detections(found.boxes, torch.where(anchor, score, found.scores),
                                    found.labels)

        monkeypatch.setattr(TaskContext, "phrase_detections", fake)
        response = client.post("/v1/segment", json=body)
        assert response.status_code == 200, response.text
        return [s["score"] for s in response.json()["results"][0]["segments"]]

    found = segments_with_anchor(1.0)
    assert found
    half = max(found) / 2
    capped = segments_with_anchor(half)
    assert capped and max(capped) <= half + 1e-4 and len(capped) == len(found)
    assert segments_with_anchor(None) == []


def test_a_geometric_relation_keeps_the_nouns_boxes_on_the_anchors_side(
        client: TestClient, runtime: TorchRuntime, png_b64: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `relations` "geometry", "circle left of the red square" is scored on "circle"
    beside "red square"; of the circle's boxes, those wholly left of the anchor's best box are
    kept (over `relation_threshold`), none when the anchor misses `threshold`."""
    monkeypatch.setattr(runtime.config.postprocess, "relations", "geometry")
    scored: list[list[tuple[int, int]]] = []
    referent_boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [20.0, 0.0, 29.0, 9.0],
                                   [60.0, 0.0, 69.0, 9.0]])  # legacy: x1 the last pixel

    def segments(expression: str, anchor_score: float, **thresholds: float) -> int:
        def fake(self, text, spans, *args, **kwargs):
            scored.append(list(spans))
            pmap, _ = phrase_detections(self, text, spans, *args, **kwargs)
            boxes = torch.cat([referent_boxes, torch.tensor([[40.0, 0.0, 49.0, 9.0]])])
            return pmap, Detections(boxes, torch.tensor([0.5, 0.4, 0.5, anchor_score]),
                                    torch.tensor([0, 0, 0, 1]))

        monkeypatch.setattr(TaskContext, "phrase_detections", fake)
        response = client.post("/v1/segment", json={
            "image": png_b64, "expressions": [expression], "threshold": 0.6,
            "relation_threshold": 0.3} | thresholds)
        assert response.status_code == 200, response.text
        return len(response.json()["results"][0]["segments"])

    phrase_detections = TaskContext.phrase_detections
    assert segments("circle left of the red square", 0.7) == 2
    assert scored[-1] == [(0, 6), (19, 29)]
    assert segments("circle right of the red square", 0.7) == 1
    assert segments("circle left of the red square", 0.7, relation_threshold=0.45) == 1
    assert segments("circle left of the red square", 0.5) == 0  # the anchor is not found
    models = client.get("/v1/models").json()["models"][0]
    assert models["relations"] == "geometry"
    assert models["relation_threshold"] == runtime.config.postprocess.relation_threshold


def test_segment_without_a_threshold_takes_the_models_calibrated_one(
        client: TestClient, runtime: TorchRuntime, png_b64: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"image": png_b64, "expressions": ["the red circle", "a star"]}
    monkeypatch.setattr(runtime.config.postprocess, "segment_threshold", 0.0)
    assert client.get("/v1/models").json()["models"][0]["segment_threshold"] == 0.0
    opened = client.post("/v1/segment", json=body).json()
    assert any(r["segments"] for r in opened["results"])
    assert opened == client.post("/v1/segment", json=body | {"threshold": 0.0}).json()
    monkeypatch.setattr(runtime.config.postprocess, "segment_threshold", 1.0)
    closed = client.post("/v1/segment", json=body).json()
    assert not any(r["segments"] for r in closed["results"])


def test_vqa(client: TestClient, png_b64: str) -> None:
    response = client.post("/v1/vqa", json={"image": png_b64,
                                            "question": "what color is the circle?"})
    assert response.status_code == 200, response.text
    body = response.json()
    vocabulary = client.get("/v1/models").json()["models"][0]["vqa_answers"]
    assert body["answer"] in vocabulary and body["answer"] == body["answers"][0]["answer"]
    assert body["score"] == body["answers"][0]["score"] and len(body["answers"]) == 5
    question = "what color is the circle?"
    for grounded in body["grounding"]:  # random weights: maybe none over the threshold
        start, end = grounded["span"]
        assert question[start:end] == grounded["phrase"] == "circle"
    assert set(body) == {"model", "image", "answer", "score", "answers", "grounding",
                         "answer_grounding"}


def test_vqa_grounds_an_answer_that_names_something(client: TestClient, png_b64: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer's boxes are what detecting the answer as a class finds; counts are not
    grounded."""
    import service.tasks.vqa as vqa_module
    from service.pipeline.phrases import answer_names_something

    assert answer_names_something("square") and answer_names_something("red")
    assert not any(map(answer_names_something, ["3", "yes", "no", " "]))
    serving = client.app.state.service.serving
    vocabulary = serving.config.tasks.vqa_answers
    monkeypatch.setattr(vqa_module, "VQA_GROUNDING_THRESHOLD", 0.0)
    monkeypatch.setattr(serving.config.tasks, "vqa_answers", ["circle"] * len(vocabulary))
    body = client.post("/v1/vqa", json={"image": png_b64, "question": "what is red?"}).json()
    assert body["answer"] == "circle" and body["answer_grounding"]
    detected = client.post("/v1/detect", json={"image": png_b64, "classes": ["circle"],
                                               "threshold": 0.0}).json()["detections"]
    assert [b["box"] for b in body["answer_grounding"]] == [d["box"] for d in detected]
    monkeypatch.setattr(serving.config.tasks, "vqa_answers", ["2"] * len(vocabulary))
    body = client.post("/v1/vqa", json={"image": png_b64, "question": "how many?"}).json()
    assert body["answer"] == "2" and body["answer_grounding"] == []


@pytest.mark.parametrize(("on", "threshold"), [(True, 0.0), (True, 1.0), (False, 0.0)])
def test_caption_search_names_the_detected_objects_left_to_right(
        runtime: TorchRuntime, monkeypatch: pytest.MonkeyPatch, on: bool, threshold: float
        ) -> None:
    """The caption search gets the classes of the model's caption classes detected over
    `caption_object_threshold` (here every one of the tiny model's 5 detections, or none), by
    box centre x; none when nothing is found or it is off. The decoder's steps put each
    phrase's tokens on its object's box (model-input frame), and the phrases it finishes are
    grounded to those objects' boxes."""
    works: list[Any] = []
    steps: list[tuple[list[list[list[int]]], torch.Tensor]] = []  # (prefixes, token boxes)
    caption_images, caption_step = CaptionRunner.caption_images, CaptionRunner.caption_step
    run_graph = runtime.run
    prefixes: list[list[list[int]]] = []

    def spy_images(self: CaptionRunner, batch: Any) -> Any:
        works.extend(batch)
        return caption_images(self, batch)

    def spy_step(self: CaptionRunner, parts: Any) -> Any:
        prefixes[:] = [part[1] for part in parts]
        return caption_step(self, parts)

    def spy_run(graph: str, inputs: Any) -> Any:
        if graph == "caption_step":
            steps.append(([list(p) for p in prefixes], inputs["token_boxes"]))
        return run_graph(graph, inputs)

    monkeypatch.setattr(CaptionRunner, "caption_images", spy_images)
    monkeypatch.setattr(CaptionRunner, "caption_step", spy_step)
    monkeypatch.setattr(runtime, "run", spy_run)
    monkeypatch.setattr(runtime.config.postprocess, "caption_object_threshold", threshold)
    image = Image.open(WORLD_PNG).convert("RGB")

    async def run() -> tuple[Any, Any]:
        serving = Glipv2Serving(runtime, model_id="tiny", caption_objects=on,
                                caption_search=CaptionSearch(max_tokens=24),
                                batcher_config=BatcherConfig(max_batch_size=4))
        await serving.start()
        try:
            found = await serving.detections(
                serving.prepare_detect(DetectParams(classes=CLASSES)), image)
            return found, await serving.caption(image)
        finally:
            await serving.stop()

    found, response = asyncio.run(run())
    assert len(found.scores) == 5
    boxes = to_exclusive(found.boxes).tolist()
    order = sorted(range(5), key=lambda i: (boxes[i][0] + boxes[i][2], boxes[i][1] + boxes[i][3]))
    searches = [work.search for work in works]
    if on and threshold == 0.0:
        assert [search.objects for search in searches] == [
            tuple(found.labels[order].tolist())]
        resized = resized_size(image.width, image.height, runtime.config.preprocess.min_size,
                               runtime.config.preprocess.max_size)
        object_boxes = to_exclusive(rescale_boxes(found.boxes[order], (image.height, image.width),
                                                  resized))
        torch.testing.assert_close(works[0].object_boxes, object_boxes)
        grammar = CaptionGrammar.from_tokenizer(load_tokenizer(runtime.config.language.tokenizer),
                                                runtime.config.tasks.caption_classes)
        boxed = 0
        for step_prefixes, token_boxes in steps:  # each beam's newest token on its phrase's box
            rows = [prefix for image_prefixes in step_prefixes for prefix in image_prefixes]
            for prefix, box in zip(rows, token_boxes[:, 0], strict=True):
                phrase = grammar.phrase_of_tokens(prefix)[-1]
                expected = object_boxes[phrase] if phrase >= 0 else torch.zeros(4)
                torch.testing.assert_close(box, expected)
                boxed += phrase >= 0
        assert boxed
        for phrase, i in zip(response.phrases, order, strict=False):
            assert phrase.box == pytest.approx(boxes[i], abs=0.01)
            assert phrase.phrase.endswith(CLASSES[found.labels[i]])
    else:
        assert [search.objects for search in searches] == [None]
        assert works[0].object_boxes is None
        assert all(not token_boxes.any() for _, token_boxes in steps)


def test_caption_phrases_of_detected_objects_are_grounded_to_their_boxes(
        runtime: TorchRuntime) -> None:
    objects = Detections(torch.tensor([[0.0, 0, 10, 10], [20, 0, 31, 10], [40, 0, 50, 10]]),
                         torch.tensor([0.9, 0.7, 0.8]), torch.tensor([4, 5, 4]))

    async def phrases(caption: str) -> list[Any]:
        serving = Glipv2Serving(runtime, model_id="tiny",
                                batcher_config=BatcherConfig(max_batch_size=4))
        return serving.caption_task.object_phrases(caption, objects)

    caption = "a large gray star, a small red hexagon and a red star."
    found = asyncio.run(phrases(caption))
    assert [(p.phrase, p.span, p.box, p.score) for p in found] == [
        ("a large gray star", [0, 17], [0.0, 0.0, 11.0, 11.0], 0.9),
        ("a small red hexagon", [19, 38], [20.0, 0.0, 32.0, 11.0], 0.7),
        ("a red star", [43, 53], [40.0, 0.0, 51.0, 11.0], 0.8)]
    assert [p.phrase for p in asyncio.run(phrases("a large gray star, a sma"))] == [
        "a large gray star"]


def test_caption(client: TestClient, png_b64: str) -> None:
    response = client.post("/v1/caption", json={"image": png_b64})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model", "image", "caption", "phrases"}
    assert isinstance(body["caption"], str) and isinstance(body["phrases"], list)


def test_models(client: TestClient) -> None:
    (model,) = client.get("/v1/models").json()["models"]
    assert model["id"] == "tiny" and model["preset"] == "small" and model["runtime"] == "pytorch"
    assert model["tasks"] == ["detect", "segment", "vqa", "caption"]
    assert model["max_prompt_tokens"] == 256 and model["prompt_ids"] == []
    assert model["segment_threshold"] == 0.3


def test_multipart_equals_json(client: TestClient, png_bytes: bytes, png_b64: str) -> None:
    as_json = client.post("/v1/detect", json={"image": png_b64, "classes": ["circle", "star"],
                                              "threshold": 0.0})
    as_form = client.post("/v1/detect", files={"image": ("x.png", png_bytes, "image/png")},
                          data={"classes": ["circle", "star"], "threshold": "0"})
    assert as_form.status_code == 200, as_form.text
    assert as_form.json() == as_json.json()
    segment = client.post("/v1/segment", files={"image": ("x.png", png_bytes, "image/png")},
                          data={"expressions": ["red circle"]})
    assert segment.status_code == 200, segment.text
    assert [r["expression"] for r in segment.json()["results"]] == ["red circle"]


def test_other_image_formats_decode(client: TestClient) -> None:
    with Image.open(WORLD_PNG) as image:
        rgba = image.convert("RGBA")
        for fmt in ("JPEG", "WEBP"):
            data = encode(image.convert("RGB"), fmt)
            response = client.post("/v1/caption", json={"image": b64(data)})
            assert response.status_code == 200, (fmt, response.text)
        data_url = "data:image/png;base64," + b64(encode(rgba, "PNG"))
        assert client.post("/v1/caption", json={"image": data_url}).status_code == 200


# --- every bad input: status and error body ---------------------------------------------------

LONG_PROMPT = "x " * 300  # 302 tokens in 600 characters: over the token limit only


@pytest.mark.parametrize(("path", "fields", "status", "code", "fragment"), [
    ("/v1/detect", {"classes": []}, 422, "invalid_request", "classes must not be empty"),
    ("/v1/detect", {"classes": ["circle", "  "]}, 422, "invalid_request", "classes[1] is empty"),
    ("/v1/detect", {"classes": ["a"], "threshold": 1.5}, 422, "invalid_request",
     "threshold must be between 0 and 1"),
    ("/v1/detect", {"classes": ["a"], "threshold": -0.1}, 422, "invalid_request",
     "threshold must be between 0 and 1"),
    ("/v1/detect", {"classes": ["a"], "threshold": "high"}, 422, "invalid_request",
     "threshold: Input should be a valid number"),
    ("/v1/detect", {"classes": ["a"], "max_detections": 0}, 422, "invalid_request",
     "max_detections must be between 1 and 1000"),
    ("/v1/detect", {"classes": ["a"], "chunk_size": 0}, 422, "invalid_request",
     "chunk_size must be at least 1"),
    ("/v1/detect", {}, 422, "invalid_request", "give one of classes, prompt or prompt_id"),
    ("/v1/detect", {"classes": ["a"], "prompt": "a"}, 422, "invalid_request",
     "give only one of classes, prompt or prompt_id (got classes and prompt)"),
    ("/v1/detect", {"classes": ["a"], "threshhold": 0.5}, 422, "invalid_request",
     "threshhold: Extra inputs are not permitted"),
    ("/v1/detect", {"prompt": "  "}, 422, "invalid_request", "prompt must not be empty"),
    ("/v1/detect", {"prompt": " . , ;"}, 422, "invalid_request", "prompt has no phrases"),
    ("/v1/detect", {"classes": ["circle", "!" * 255]}, 422, "invalid_request",
     "257 tokens long on its own, more than the model's limit of 256"),
    ("/v1/detect", {"prompt_id": "lvis"}, 404, "not_found", "unknown prompt_id 'lvis'"),
    ("/v1/detect", {"image": "https://example.com/a.png", "classes": ["a"]}, 403,
     "disabled", "image URLs are not enabled on this server"),
    ("/v1/segment", {"expressions": []}, 422, "invalid_request",
     "expressions must not be empty"),
    ("/v1/segment", {"expressions": ["a", ""]}, 422, "invalid_request",
     "expressions[1] must not be empty"),
    ("/v1/segment", {"expressions": [LONG_PROMPT]}, 422, "invalid_request",
     "expressions[0] is"),
    ("/v1/vqa", {"question": ""}, 422, "invalid_request", "question must not be empty"),
    ("/v1/vqa", {}, 422, "invalid_request", "question: Field required"),
    ("/v1/vqa", {"question": LONG_PROMPT}, 422, "invalid_request",
     "more than the model's limit of 256"),
])
def test_invalid_fields(client: TestClient, png_b64: str, path: str, fields: dict[str, Any],
                        status: int, code: str, fragment: str) -> None:
    assert_error(client.post(path, json={"image": png_b64} | fields), status, code, fragment)


@pytest.mark.parametrize("path", ["/v1/detect", "/v1/segment", "/v1/vqa", "/v1/caption"])
def test_missing_image(client: TestClient, path: str) -> None:
    fields = {"/v1/detect": {"classes": ["a"]}, "/v1/segment": {"expressions": ["a"]},
              "/v1/vqa": {"question": "what?"}, "/v1/caption": {}}[path]
    assert_error(client.post(path, json=fields), 422, "invalid_request", "image: Field required")


def test_bad_images(client: TestClient, png_bytes: bytes) -> None:
    def post(image: str) -> httpx.Response:
        return client.post("/v1/detect", json={"image": image, "classes": ["a"]})

    corrupt = png_bytes[:8] + b"\x00" * 200
    assert_error(post(b64(corrupt)), 400, "bad_image", "PNG")
    assert_error(post(b64(png_bytes[: len(png_bytes) // 2])), 400, "bad_image",
                 "corrupt or truncated")
    assert_error(post("not base64 !!"), 400, "bad_image", "not valid base64")
    assert_error(post(""), 422, "invalid_request", "image: String should have at least 1")
    assert_error(post("data:image/png;base64,"), 400, "bad_image", "empty")
    gif = encode(Image.new("RGB", (8, 8)), "GIF")
    assert_error(post(b64(gif)), 415, "unsupported_media_type", "GIF", "PNG, JPEG or WebP")
    assert_error(post(b64(b"hello world, not an image")), 415, "unsupported_media_type")


def test_bomb_is_rejected_from_its_header(client: TestClient) -> None:
    for width, height in [(100_000, 100_000), (8_000, 6_000)]:  # Pillow's check, then ours
        response = client.post("/v1/detect", json={"image": b64(png_claiming(width, height)),
                                                   "classes": ["a"]})
        assert_error(response, 413, "payload_too_large", "40000000 pixels", "before decoding")


def test_body_and_content_type_errors(client: TestClient, png_bytes: bytes) -> None:
    assert_error(client.post("/v1/detect", content=b"{not json",
                             headers={"content-type": "application/json"}),
                 400, "invalid_json", "not valid JSON")
    assert_error(client.post("/v1/detect", content=b"x", headers={"content-type": "text/plain"}),
                 415, "unsupported_media_type", "text/plain")
    assert_error(client.post("/v1/detect", data={"classes": ["a"]},
                             files={"other": ("x.txt", b"x", "text/plain")}),
                 422, "invalid_request", "image: Field required")
    assert_error(client.post("/v1/detect", files={"image": ("x.png", png_bytes, "image/png")},
                             data={"classes": ["a"], "threshold": "2"}),
                 422, "invalid_request", "threshold must be between 0 and 1")
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(client.get("/v1/detect"), 405, "method_not_allowed")


@pytest.fixture(scope="module")
def small_limits_client(runtime: TorchRuntime) -> Iterator[TestClient]:
    settings = make_settings(max_body_bytes=50_000, max_image_pixels=10_000)
    with TestClient(create_app(settings, runtime)) as test_client:
        yield test_client


def test_body_over_the_limit_is_413(small_limits_client: TestClient) -> None:
    big = {"image": "A" * 60_000, "classes": ["a"]}
    assert_error(small_limits_client.post("/v1/detect", json=big), 413, "payload_too_large",
                 "more than the limit of 50000")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        yield json.dumps(big).encode()

    response = small_limits_client.post("/v1/detect", content=chunks(),
                                        headers={"content-type": "application/json"})
    assert_error(response, 413, "payload_too_large", "more than the limit of 50000")


def test_image_over_the_pixel_limit_is_413(small_limits_client: TestClient) -> None:
    for size in [(120, 100), (300, 300)]:  # 1.2x the limit (our check), 9x (Pillow's)
        image = encode(Image.new("RGB", size, (200, 30, 30)), "PNG")
        response = small_limits_client.post("/v1/detect", json={"image": b64(image),
                                                                 "classes": ["a"]})
        assert_error(response, 413, "payload_too_large", "limit of 10000 pixels")


# --- images module ----------------------------------------------------------------------------


def test_sniff_and_decode_helpers(png_bytes: bytes) -> None:
    assert sniff_format(png_bytes) == "PNG"
    assert sniff_format(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    with pytest.raises(UnsupportedMediaTypeError, match="TIFF"):
        sniff_format(b"II*\x00rest")
    wrapped = "\n".join(b64(png_bytes)[i:i + 76] for i in range(0, len(b64(png_bytes)), 76))
    assert decode_base64(wrapped, 10**7) == png_bytes
    with pytest.raises(PayloadTooLargeError):
        decode_base64(b64(png_bytes), 100)
    gray = decode_image_bytes(encode(Image.new("L", (5, 4), 7), "PNG"), 10**6, 10**6)
    assert gray.mode == "RGB" and gray.size == (5, 4)


# --- probes, auth, metrics --------------------------------------------------------------------


def test_readyz_is_503_before_the_model_is_loaded(runtime: TorchRuntime) -> None:
    app = create_app(make_settings(), runtime)
    bare = TestClient(app)  # no `with`: the lifespan (which starts the model) has not run
    assert bare.get("/healthz").json() == {"status": "ok"}
    response = bare.get("/readyz")
    assert_error(response, 503, "not_ready", "loading")
    assert response.headers["retry-after"] == "1"
    assert_error(bare.post("/v1/caption", json={"image": "x"}), 503, "not_ready")


def test_background_load_then_ready(runtime: TorchRuntime) -> None:
    release = threading.Event()

    def slow_loader() -> TorchRuntime:
        release.wait(10)
        return runtime

    with TestClient(create_app(make_settings(), loader=slow_loader)) as loading:
        assert_error(loading.get("/readyz"), 503, "not_ready")
        release.set()
        deadline = time.monotonic() + 10
        while loading.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert loading.get("/readyz").json() == {"status": "ready", "model": "tiny"}


def test_failed_load_is_reported_by_both_probes() -> None:
    def broken_loader() -> TorchRuntime:
        raise FileNotFoundError("no model.safetensors")

    with TestClient(create_app(make_settings(), loader=broken_loader)) as failed:
        deadline = time.monotonic() + 10
        while failed.get("/healthz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert_error(failed.get("/healthz"), 503, "not_ready", "no model.safetensors")
        assert_error(failed.get("/readyz"), 503, "not_ready", "failed to load")


def test_api_keys(runtime: TorchRuntime, png_b64: str) -> None:
    app = create_app(make_settings(api_keys=["k1", "s3cret"]), runtime)
    body = {"image": png_b64, "question": "what shape?"}
    with TestClient(app) as keyed:
        response = keyed.post("/v1/vqa", json=body)
        assert_error(response, 401, "unauthorized", "missing API key")
        assert response.headers["www-authenticate"] == "Bearer"
        assert_error(keyed.post("/v1/vqa", json=body, headers={"X-API-Key": "wrong"}),
                     401, "unauthorized", "invalid API key")
        assert_error(keyed.get("/v1/models", headers={"Authorization": "Bearer nope"}),
                     401, "unauthorized")
        assert keyed.post("/v1/vqa", json=body,
                          headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert keyed.post("/v1/vqa", json=body, headers={"X-API-Key": "k1"}).status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics"):
            assert keyed.get(open_path).status_code == 200


def test_metrics_count_requests_by_endpoint_and_status(client: TestClient, png_b64: str) -> None:
    client.post("/v1/vqa", json={"image": png_b64, "question": "how many stars?"})
    client.post("/v1/vqa", json={"image": png_b64, "question": ""})
    client.get("/does/not/exist")
    text = client.get("/metrics").text
    assert 'glipv2_requests_total{endpoint="/v1/vqa",status="200"}' in text
    assert 'glipv2_requests_total{endpoint="/v1/vqa",status="422"}' in text
    assert 'glipv2_requests_total{endpoint="unmatched",status="404"}' in text
    assert 'glipv2_request_duration_seconds_bucket{endpoint="/v1/vqa",le="+Inf"}' in text
    assert 'glipv2_engine_batch_size_count{engine="vqa"}' in text
    assert 'glipv2_engine_queue_wait_seconds_count{engine="vqa"}' in text
    assert 'glipv2_engine_compute_seconds_count{engine="vqa"}' in text
    assert 'glipv2_engine_queue_depth{engine="vqa"} 0.0' in text
    assert "glipv2_model_ready 1.0" in text
    resident = next(line for line in text.splitlines()
                    if line.startswith("process_resident_memory_bytes "))
    assert float(resident.split()[-1]) > 1e6  # the soak's memory reading: this process's RSS


def test_caption_metrics_follow_the_decoder(client: TestClient, png_b64: str) -> None:
    """Decode steps, rows per step, tokens, time to first token, live captions."""
    def value(text: str, name: str) -> float:
        return next(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith(name + " ") or line.startswith(name + "{"))

    before = client.get("/metrics").text
    assert client.post("/v1/caption", json={"image": png_b64}).status_code == 200
    after = client.get("/metrics").text
    for name in ("glipv2_caption_decode_steps_total", "glipv2_caption_tokens_total",
                 "glipv2_caption_time_to_first_token_seconds_count"):
        assert value(after, name) > value(before, name), name
    rows = 'glipv2_engine_batch_size_count{engine="caption"}'
    assert value(after, rows) - value(before, rows) == (
        value(after, "glipv2_caption_decode_steps_total")
        - value(before, "glipv2_caption_decode_steps_total"))
    assert value(after, "glipv2_caption_live") == 0.0
    assert 'glipv2_load_shed_total{engine="vision"} 0.0' in after


# --- concurrency and the batcher's errors -----------------------------------------------------



def test_bad_requests_among_good_ones(runtime: TorchRuntime, png_bytes: bytes,
                                      png_b64: str) -> None:
    app = create_app(make_settings(max_body_bytes=2_000_000), runtime)
    good = {"image": png_b64, "classes": CLASSES, "threshold": 0.0}
    bad = [
        ({"image": b64(png_bytes[:8] + b"\x01" * 64), "classes": ["a"]}, 400),  # corrupt
        ({"image": b64(png_claiming(100_000, 100_000)), "classes": ["a"]}, 413),  # bomb
        ({"image": "A" * 2_100_000, "classes": ["a"]}, 413),  # oversized body
        ({"image": png_b64, "classes": []}, 422),
    ]

    async def scenario(http: httpx.AsyncClient) -> list[httpx.Response]:
        bodies = [good, bad[0][0], good, bad[1][0], good, bad[2][0], good, bad[3][0], good]
        return list(await asyncio.gather(*(http.post("/v1/detect", json=b) for b in bodies)))

    responses = asyncio.run(with_app(app, scenario))
    goods = responses[0::2]
    assert all(r.status_code == 200 for r in goods), [r.text for r in goods]
    assert all(r.json() == goods[0].json() for r in goods) and goods[0].json()["detections"]
    assert [r.status_code for r in responses[1::2]] == [status for _, status in bad]




def test_queue_full_is_429_with_retry_after(tiny_model: Glipv2Model, png_b64: str) -> None:
    gated = GatedRuntime(tiny_model)
    app = create_app(make_settings(batcher={"max_batch_size": 1, "max_queue_size": 1,
                                            "max_queue_delay_ms": 0}), gated)
    body = {"image": png_b64, "classes": ["circle"]}

    async def scenario(http: httpx.AsyncClient) -> None:
        first = asyncio.create_task(http.post("/v1/detect", json=body))
        await until(gated.entered.is_set)
        second = asyncio.create_task(http.post("/v1/detect", json=body))
        batcher = app.state.service.serving.engines.batchers["vision"]
        await until(lambda: batcher.queue_depth == 1)
        rejected = await http.post("/v1/detect", json=body)
        assert_error(rejected, 429, "queue_full", "queue is full")
        assert int(rejected.headers["retry-after"]) >= 1
        gated.gate.set()
        assert (await first).status_code == 200 and (await second).status_code == 200
        assert (await http.get("/readyz")).status_code == 200

    asyncio.run(with_app(app, scenario))


def test_load_shedding_is_429_overloaded_before_any_work(tiny_model: Glipv2Model,
                                                          png_b64: str) -> None:
    """Once a vision batch took 1.2 s, a request behind one in flight expects 2 batches, past
    its 1 s deadline: 429 `overloaded` with Retry-After at once, not a 504 a second later. With
    nothing ahead, requests are taken again."""
    gated = GatedRuntime(tiny_model)
    app = create_app(make_settings(request_timeout_ms=1000,
                                   batcher={"max_batch_size": 1, "max_queue_delay_ms": 0}), gated)
    body = {"image": png_b64, "classes": ["circle"]}

    async def scenario(http: httpx.AsyncClient) -> None:
        slow = asyncio.create_task(http.post("/v1/detect", json=body))
        await until(gated.entered.is_set)
        await asyncio.sleep(1.2)
        gated.gate.set()
        assert_error(await slow, 504, "deadline_exceeded")
        vision = app.state.service.serving.engines.batchers["vision"]
        await until(lambda: vision._in_flight is None)
        gated.gate.clear()
        gated.entered.clear()
        held = asyncio.create_task(http.post("/v1/detect", json=body))
        await until(gated.entered.is_set)
        refused = await http.post("/v1/detect", json=body)
        assert_error(refused, 429, "overloaded", "past this request's deadline")
        assert int(refused.headers["retry-after"]) >= 1
        gated.gate.set()
        await held
        await until(lambda: vision._in_flight is None)
        assert (await http.post("/v1/detect", json=body)).status_code == 200
        metrics = (await http.get("/metrics")).text
        assert 'glipv2_load_shed_total{engine="vision"} 1.0' in metrics

    asyncio.run(with_app(app, scenario))



class SlowCaptionRuntime(TorchRuntime):
    """Each caption decoding step takes 0.4 s more (a caption of 4 tokens about 1.5 s); the
    graphs it ran are in `calls`."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__(model)
        self.calls: list[str] = []

    def run(self, graph: str, inputs: Any) -> dict[str, torch.Tensor]:
        self.calls.append(graph)
        if graph == "caption_step":
            time.sleep(0.4)
        return super().run(graph, inputs)


def test_a_caption_the_decoder_would_refuse_is_refused_before_its_vision_work(
        tiny_model: Glipv2Model, png_b64: str) -> None:
    """Once a caption took ~1.5 s (a job's: no deadline), an online caption with a 1 s deadline
    beside a caption decoding is 429 `overloaded` at once, and its image never reached the
    vision engine (the decoder is asked first); with the decoder idle it is taken."""
    slow = SlowCaptionRuntime(tiny_model)
    app = create_app(make_settings(request_timeout_ms=1000, caption_objects=False), slow)
    job_body = {"task": "caption", "inputs": [{"image": png_b64}]}

    async def job_done(http: httpx.AsyncClient, job_id: str) -> bool:
        return bool((await http.get(f"/v1/jobs/{job_id}")).json()["state"] == "done")

    async def scenario(http: httpx.AsyncClient) -> None:
        decoder = app.state.service.serving.engines.decoder
        first = (await http.post("/v1/jobs", json=job_body)).json()["id"]
        deadline = time.monotonic() + 30
        while not await job_done(http, first):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        busy = (await http.post("/v1/jobs", json=job_body)).json()["id"]
        await until(lambda: decoder.live == 1)
        vision_before = slow.calls.count("vision")
        refused = await http.post("/v1/caption", json={"image": png_b64})
        assert_error(refused, 429, "overloaded", "past its deadline")
        assert slow.calls.count("vision") == vision_before
        while not await job_done(http, busy):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await until(lambda: decoder.live == 0)
        taken = await http.post("/v1/caption", json={"image": png_b64})
        assert taken.status_code in (200, 504), taken.text  # taken: 1 s may not be enough
        assert slow.calls.count("vision") == vision_before + 1
        metrics = (await http.get("/metrics")).text
        assert 'glipv2_load_shed_total{engine="caption"} 1.0' in metrics

    asyncio.run(with_app(app, scenario))


def test_deadline_is_504_and_the_service_recovers(tiny_model: Glipv2Model,
                                                  png_b64: str) -> None:
    gated = GatedRuntime(tiny_model)
    app = create_app(make_settings(request_timeout_ms=8000), gated)
    body = {"image": png_b64, "classes": ["circle"]}

    async def scenario(http: httpx.AsyncClient) -> None:
        assert_error(await http.post("/v1/detect", json=body), 504, "deadline_exceeded",
                     "deadline passed")
        gated.gate.set()
        vision = app.state.service.serving.engines.batchers["vision"]
        await until(lambda: vision._in_flight is None)
        assert (await http.post("/v1/detect", json=body)).status_code == 200

    asyncio.run(with_app(app, scenario))


def test_stopped_engine_is_503(runtime: TorchRuntime, png_b64: str) -> None:
    app = create_app(make_settings(), runtime)

    async def scenario(http: httpx.AsyncClient) -> None:
        await app.state.service.serving.engines.batchers["vqa"].stop()
        response = await http.post("/v1/vqa", json={"image": png_b64, "question": "what?"})
        assert_error(response, 503, "unavailable")
        assert response.headers["retry-after"] == "1"

    asyncio.run(with_app(app, scenario))


def _drain_checks(response: httpx.Response, code: str = "shutting_down") -> None:
    """A 503 JSON error with Retry-After; `shutting_down` ones also close the connection."""
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == code and isinstance(error["message"], str), error
    assert response.headers["retry-after"] == "1"
    if code == "shutting_down":
        assert response.headers["connection"] == "close"


def test_drain_refuses_new_work_and_waits_for_the_work_in_flight(
        tiny_model: Glipv2Model, png_b64: str) -> None:
    """SIGTERM's drain through the app: new /v1 requests and /readyz 503 `shutting_down` at
    once, /healthz and /metrics still answer, the request in flight gets its 200, and the drain
    ends when it is answered (not at the timeout)."""
    gated = GatedRuntime(tiny_model)
    app = create_app(make_settings(shutdown_timeout_s=30, shutdown_grace_s=0), gated)
    state = app.state.service
    body = {"image": png_b64, "classes": ["circle"]}

    async def scenario(http: httpx.AsyncClient) -> None:
        held = asyncio.create_task(http.post("/v1/detect", json=body))
        await until(gated.entered.is_set)
        assert state.requests_in_flight == 1
        drain = asyncio.create_task(state.drain())
        await until(lambda: state.draining)
        for refused in (await http.post("/v1/vqa", json={"image": png_b64, "question": "what?"}),
                        await http.post("/v1/detect", json=body),
                        await http.post("/v1/jobs", json={"task": "caption",
                                                          "inputs": [{"image": png_b64}]}),
                        await http.get("/v1/models"),
                        await http.get("/readyz")):
            _drain_checks(refused)
        assert (await http.get("/healthz")).status_code == 200
        metrics = (await http.get("/metrics")).text
        assert "glipv2_requests_in_flight 1.0" in metrics and "glipv2_model_ready 0.0" in metrics
        await asyncio.sleep(0.2)
        assert not drain.done() and not held.done()  # the drain waits for the request
        started = time.monotonic()
        gated.gate.set()
        assert (await held).status_code == 200
        await asyncio.wait_for(drain, 10)
        assert time.monotonic() - started < 5  # ended with the work, far before the timeout
        assert state.requests_in_flight == 0
        _drain_checks(await http.post("/v1/detect", json=body))  # draining stays on

    asyncio.run(with_app(app, scenario))


def test_drain_timeout_answers_the_work_left_503_and_ends(tiny_model: Glipv2Model,
                                                          png_b64: str) -> None:
    """Work still in flight at `shutdown_timeout_s` is answered 503 `unavailable` (the
    engines stop without draining), and the drain ends there: the process can exit."""
    gated = GatedRuntime(tiny_model)
    app = create_app(make_settings(shutdown_timeout_s=0.5, shutdown_grace_s=0), gated)
    state = app.state.service

    async def scenario(http: httpx.AsyncClient) -> None:
        held = asyncio.create_task(http.post("/v1/detect", json={"image": png_b64,
                                                                 "classes": ["circle"]}))
        await until(gated.entered.is_set)
        started = time.monotonic()
        try:
            await asyncio.wait_for(state.drain(), 5)
            assert 0.4 < time.monotonic() - started < 2
            _drain_checks(await asyncio.wait_for(held, 5), code="unavailable")
        finally:
            gated.gate.set()  # the vision call blocked in its thread returns, unseen
        assert state.requests_in_flight == 0

    asyncio.run(with_app(app, scenario))


# --- settings, OpenAPI, CLI -------------------------------------------------------------------


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLIPV2_PORT", "9001")
    monkeypatch.setenv("GLIPV2_BATCHER__MAX_QUEUE_SIZE", "32")
    monkeypatch.setenv("GLIPV2_API_KEYS", "a, b")
    settings = ServiceSettings(batcher={"max_batch_size": 4})  # as `serve` flags pass them
    assert settings.port == 9001 and settings.api_key_values() == ["a", "b"]
    assert (settings.batcher.max_batch_size, settings.batcher.max_queue_size) == (4, 32)
    monkeypatch.setenv("GLIPV2_API_KEYS", '["x"]')
    assert ServiceSettings().api_key_values() == ["x"]
    with pytest.raises(ValueError, match="max_queue_size"):
        ServiceSettings(batcher={"max_batch_size": 8, "max_queue_size": 4})
    with pytest.raises(ValueError, match="allow_image_urls needs image_url_hosts"):
        ServiceSettings(allow_image_urls=True)
    monkeypatch.setenv("GLIPV2_IMAGE_URL_HOSTS", "images.example.com, *.cdn.example")
    assert ServiceSettings(allow_image_urls=True).image_url_hosts == [
        "images.example.com", "*.cdn.example"]


def test_openapi_yaml_matches_the_app() -> None:
    assert load_openapi(OPENAPI_PATH) == app_schema(), (
        "openapi.yaml is stale: run `python -m service.openapi`")


def test_serve_without_a_model_exits_2(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    assert main(["serve", "--model", str(tmp_path / "absent")]) == 2
    message = capsys.readouterr().err
    assert f"no model to serve at {tmp_path / 'absent'}" in message and "--model DIR" in message


def _metric_sums(base: str, names: set[str]) -> dict[str, float]:
    """Each named sample of the server's /metrics summed over its labels."""
    sums = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in names and sample.labels.get("endpoint", "/v1/")[:4] == "/v1/":
                sums[sample.name] += sample.value
    return sums


def _local_port(response: httpx.Response) -> int:
    """The client-side port of the connection `response` is coming on (read it before the
    body: a `Connection: close` answer closes it after)."""
    port: int = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    return port


@pytest.mark.slow  # ~30-60 s: a fresh interpreter imports torch and loads the model
def test_serve_end_to_end(tiny_model: Glipv2Model, tmp_path: Path, png_b64: str) -> None:
    """The real server in a subprocess: ready, one detection; then SIGTERM under mixed load.

    Requests of every task are in flight (all admitted: /metrics counts them) when SIGTERM
    comes. Every one of them gets its 200. From the moment /readyz says 503 until the last of
    them is answered (the drain is still running then), every new request gets 503 JSON
    `shutting_down` with Retry-After, on a new connection or an open one; /healthz stays 200.
    After that a request may also meet the closed listener (a transport error), never
    anything else. The process exits 0, soon after the last answer and within the timeout.
    """
    timeout_s, grace_s = 60.0, 2.0
    model_dir = save_model(tiny_model, tmp_path / "model", external_language=True)
    server, base = start_server(["--model", str(model_dir)], {
        "GLIPV2_SHUTDOWN_TIMEOUT_S": str(timeout_s), "GLIPV2_SHUTDOWN_GRACE_S": str(grace_s)},
        180)
    bodies = {"detect": {"image": png_b64, "classes": ["circle", "star"], "threshold": 0.0},
              "segment": {"image": png_b64, "expressions": ["the red circle"]},
              "vqa": {"image": png_b64, "question": "how many stars are there?"},
              "caption": {"image": png_b64}}
    per_task = 3
    kept_ports: list[int] = []  # the client-side port of each of its answers' connection
    kept = httpx.Client(base_url=base, timeout=60,  # a keep-alive connection
                        event_hooks={"response": [lambda r: kept_ports.append(_local_port(r))]})
    try:
        response = kept.post("/v1/detect", json=bodies["detect"])
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "model" and response.json()["detections"]
        before = _metric_sums(base, {"glipv2_requests_total"})["glipv2_requests_total"]

        load: list[tuple[str, float, httpx.Response | Exception]] = []  # (task, answered at, _)

        def call(task: str) -> None:
            try:
                answer: httpx.Response | Exception = httpx.post(
                    f"{base}/v1/{task}", json=bodies[task], timeout=timeout_s + 30)
            except httpx.HTTPError as exc:
                answer = exc
            load.append((task, time.monotonic(), answer))

        callers = [threading.Thread(target=call, args=(task,))
                   for task in bodies for _ in range(per_task)]
        for caller in callers:
            caller.start()
        sent = per_task * len(bodies)
        deadline = time.monotonic() + 60
        while True:  # every load request is in the server: answered, or admitted in flight
            sums = _metric_sums(base, {"glipv2_requests_total", "glipv2_requests_in_flight"})
            in_flight = int(sums["glipv2_requests_in_flight"])
            if sums["glipv2_requests_total"] - before + in_flight == sent:
                break
            assert time.monotonic() < deadline, sums
            time.sleep(0.02)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert in_flight >= 4, f"only {in_flight} requests in flight at SIGTERM"

        probes: list[tuple[str, float, httpx.Response | Exception]] = []  # (what, sent at, _)

        def probe(what: str, send: Any) -> None:
            started = time.monotonic()
            try:
                probes.append((what, started, send()))
            except httpx.TransportError as exc:  # a timeout is one too: a hang fails below
                probes.append((what, started, exc))

        while (ready := httpx.get(f"{base}/readyz", timeout=10)).status_code == 200:
            assert time.monotonic() < signalled + 10, "/readyz never went 503"
        draining_seen = time.monotonic()
        probes.append(("/readyz", draining_seen, ready))
        probe("kept /v1/segment", lambda: kept.post("/v1/segment", json=bodies["segment"]))
        assert len(kept_ports) == 2 and kept_ports[0] == kept_ports[1], kept_ports  # reused
        targets = [*(f"/v1/{task}" for task in bodies), "/v1/jobs", "/readyz", "/healthz"]
        while server.poll() is None:
            assert time.monotonic() < signalled + timeout_s + 10, "the server did not exit"
            for target in targets:
                if target.startswith("/v1/"):
                    body = ({"task": "caption", "inputs": [{"image": png_b64}]}
                            if target == "/v1/jobs" else bodies[target.removeprefix("/v1/")])
                    probe(target, lambda t=target, b=body: httpx.post(f"{base}{t}", json=b,
                                                                      timeout=10))
                else:
                    probe(target, lambda t=target: httpx.get(f"{base}{t}", timeout=10))
            time.sleep(0.05)
        exited = time.monotonic()
        output, _ = server.communicate(timeout=10)
        for caller in callers:
            caller.join(10)
    finally:
        kept.close()
        if server.poll() is None:
            server.kill()
            server.communicate()

    assert server.returncode == 0, output
    # Every request of the load was in the server at SIGTERM, and each got its answer.
    assert len(load) == sent, output
    failed = [(task, answer) for task, _, answer in load
              if not isinstance(answer, httpx.Response) or answer.status_code != 200]
    assert not failed, [(task, getattr(a, "text", repr(a))) for task, a in failed]
    after_signal = [task for task, at, _ in load if at > signalled]
    assert len(after_signal) >= 4 and len(set(after_signal)) >= 2, after_signal  # drained
    # The drain runs until the last answer, and at least `grace_s` from the signal (less a
    # margin for the probe's own connect): new work got 503 `shutting_down` meanwhile.
    # The client notes an answer a moment after the server sent it, and the listener may close
    # then: a probe sent within `skew_s` before that note may meet the closed listener.
    skew_s = 0.5
    closed = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
    drain_end = max(max(at for _, at, _ in load), signalled + grace_s - 0.2)
    assert draining_seen < drain_end, "the drain window was not observed"
    during = [(what, at, answer) for what, at, answer in probes if at < drain_end]
    assert {what for what, _, _ in during} >= {*targets, "kept /v1/segment"}, during
    for what, at, answer in during:
        if at >= drain_end - skew_s and not isinstance(answer, httpx.Response):
            assert isinstance(answer, closed), (what, repr(answer))
            continue
        assert isinstance(answer, httpx.Response), (what, answer, output)
        if what == "/healthz":
            assert answer.status_code == 200, answer.text
        else:
            _drain_checks(answer)
    # Afterwards: still 503 (or /healthz 200) while the listener is open, else the closed
    # listener or connection (never a hang, never another answer).
    for what, answer in ((what, answer) for what, at, answer in probes if at >= drain_end):
        if isinstance(answer, httpx.Response):
            if what == "/healthz" and answer.status_code == 200:
                continue
            _drain_checks(answer)
        else:
            assert isinstance(answer, closed), (what, repr(answer))
    # Exit soon after the drain (the interpreter's teardown with torch takes a few seconds),
    # not at the timeout, and within it in any case.
    assert exited - drain_end < 15, "the server lingered after the drain"
    assert exited - signalled < timeout_s + 2


def test_rle_round_trip_helper_agrees_with_numpy() -> None:
    """The service's RLE is pycocotools' own (counts as str) and decodes to the same mask."""
    from service.tasks.segment import encode_segment

    mask = torch.zeros(7, 9, dtype=torch.bool)
    mask[2:5, 3:8] = True
    encoded = encode_segment([3.0, 2.0, 8.0, 5.0], 0.5, mask)
    decoded = mask_utils.decode({"size": encoded.size, "counts": encoded.counts.encode()})
    assert np.array_equal(decoded.astype(bool), mask.numpy())
