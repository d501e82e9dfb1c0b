"""`?render=png`: every task's answer drawn on its image (checked for size and real content)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from engines.runtimes.torch_eager import TorchRuntime
from model_export.modeling.model import Glipv2Model
from service.app import create_app
from service.pipeline.render import PALETTE, render_png
from service.schemas import Detection, DetectResponse, ImageInfo
from service.settings import ServiceSettings

WORLD_PNG = Path(__file__).parent / "fixtures" / "world" / "000000.png"


@pytest.fixture(scope="module")
def client(tiny_model: Glipv2Model) -> Iterator[TestClient]:
    settings = ServiceSettings(model_name="tiny", api_keys=[], caption_max_tokens=4)
    with TestClient(create_app(settings, TorchRuntime(tiny_model))) as test_client:
        yield test_client


def changed_fraction(png: bytes, original: Image.Image) -> tuple[Image.Image, float]:
    drawn = Image.open(io.BytesIO(png)).convert("RGB")
    assert drawn.width == original.width and drawn.height >= original.height
    bottom = np.asarray(drawn)[drawn.height - original.height:].astype(int)
    return drawn, float((np.abs(bottom - np.asarray(original).astype(int)).sum(-1) > 30).mean())


@pytest.mark.parametrize(("path", "fields", "band"), [
    ("/v1/detect", {"classes": ["circle", "square"], "threshold": 0.0}, False),
    ("/v1/segment", {"expressions": ["the red circle"], "threshold": 0.0}, False),
    ("/v1/vqa", {"question": "what color is the circle?"}, True),
    ("/v1/caption", {}, True),
])
def test_every_task_renders_its_answer_on_the_image(client: TestClient, path: str,
                                                    fields: dict, band: bool) -> None:
    original = Image.open(WORLD_PNG).convert("RGB")
    image = base64.b64encode(WORLD_PNG.read_bytes()).decode()
    response = client.post(f"{path}?render=png", json={"image": image, **fields})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    drawn, changed = changed_fraction(response.content, original)
    assert (drawn.height > original.height) == band  # a text band for answers and captions
    if band:  # the answer or caption is written (the random model may ground nothing)
        text = np.asarray(drawn.convert("L"))[: drawn.height - original.height]
        assert (text < 128).mean() > 0.005
    else:
        assert changed > 0.005, changed
    # JSON stays the default
    assert client.post(path, json={"image": image, **fields}).headers[
        "content-type"] == "application/json"


def _rendered_detections(detections: list[Detection]) -> np.ndarray:
    """`render_png` of `detections` on a blank 200x120 light-grey image, as (H, W, 3) pixels."""
    original = Image.new("RGB", (200, 120), (240, 240, 240))
    png = render_png(original, DetectResponse(model="m", image=ImageInfo(width=200, height=120),
                                              detections=detections))
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_render_draws_each_box_in_its_colour() -> None:
    pixels = _rendered_detections([Detection(label="circle", score=0.9, box=[10, 40, 60, 100]),
                                   Detection(label="star", score=0.5, box=[100, 30, 190, 110])])
    assert tuple(pixels[70, 10]) == PALETTE[0]  # left edge of the first box
    assert tuple(pixels[70, 100]) == PALETTE[1]  # left edge of the second box
    assert tuple(pixels[70, 30]) == (240, 240, 240)  # inside a box: untouched


def test_render_draws_the_best_score_on_top() -> None:
    # A weaker second guess on the same box must not cover the top label: the first detection
    # (best score) is drawn last, so the shared edge and the label patch are its colour.
    pixels = _rendered_detections([
        Detection(label="square", score=0.8, box=[10, 40, 60, 100]),
        Detection(label="triangle", score=0.3, box=[10, 40, 60, 100])])
    assert tuple(pixels[70, 10]) == PALETTE[0]  # the shared left edge
    assert tuple(pixels[38, 11]) == PALETTE[0]  # the label patch just above the box


def test_render_rejects_an_unknown_value(client: TestClient) -> None:
    image = base64.b64encode(WORLD_PNG.read_bytes()).decode()
    response = client.post("/v1/caption?render=gif", json={"image": image})
    assert response.status_code == 422 and "render" in response.json()["error"]["message"]
