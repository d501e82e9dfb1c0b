"""The web playground (`GET /playground`, `service/playground/`) in headless Chromium against the
real server (`glipv2 serve` on the embedded default model, with an API key).

Each task is run from the page as a user would (upload a world image, pick the task, type, Run),
and checked against the API itself: the request the page sent, the JSON it shows (equal to the
API's answer to the same request), the boxes drawn in their colours on the canvas, the masks as
its RLE decoder reads them, the grounded spans highlighted in the same colours. Errors show the
API's error body. Screenshots of each task go under the test's tmp dir.

The default model rather than the tiny random one of the other end-to-end tests: its answers
ground something in every task (the random model's VQA grounds nothing, so the drawing of a
grounded answer would go unchecked), and it loads and answers about as fast (~1 s a request).

Browser: Debian's `chromium` (`.ci/run` installs it), driven by Playwright (the `browser`
extra); the tests skip, saying why, where either is missing or Chromium cannot start.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pycocotools import mask as mask_utils

from service.app import create_app
from service.routers.playground import PLAYGROUND_DIR
from service.settings import ServiceSettings

from conftest import start_server

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

REPO = Path(__file__).resolve().parent.parent
UPLOAD = Path(__file__).parent / "fixtures" / "world" / "000000.png"
API_KEY = "playground-test-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}


# --- without a browser ------------------------------------------------------------------------


def test_the_playground_is_served_outside_the_contract_unless_turned_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its files by name only; `/` leads to it; no route in the OpenAPI document;
    `GLIPV2_PLAYGROUND=false` makes all of it 404."""
    monkeypatch.delenv("GLIPV2_PLAYGROUND", raising=False)  # on by default
    app = create_app(ServiceSettings())
    client = TestClient(app)  # no lifespan: no model is needed to serve files
    root = client.get("/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/playground"
    page = client.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ("image", "task", "text", "threshold", "run", "canvas", "result-json",
                    "error"):
        assert f'id="{element}"' in page.text, element
    for name, media_type in [("app.js", "text/javascript"), ("style.css", "text/css"),
                             ("world-000001.png", "image/png")]:
        asset = client.get(f"/playground/{name}")
        assert asset.status_code == 200 and asset.content == (PLAYGROUND_DIR / name).read_bytes()
        assert asset.headers["content-type"].startswith(media_type), name
    for path in ("/playground/nothing.js", "/playground/..%2Frouters%2Fplayground.py",
                 "/playground/%2E%2E"):
        assert client.get(path).status_code == 404, path
    assert not [path for path in app.openapi()["paths"]
                if path == "/" or path.startswith("/playground")]

    monkeypatch.setenv("GLIPV2_PLAYGROUND", "false")
    off = TestClient(create_app(ServiceSettings()))
    for path in ("/", "/playground", "/playground/app.js"):
        response = off.get(path, follow_redirects=False)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_the_wheel_ships_the_playground(tmp_path: Path) -> None:
    """A non-editable install (the Docker image's) has the page: package data, not just files
    that happen to sit in the checkout."""
    source = tmp_path / "src"
    for name in ("cli", "benchmarks", "service", "engines", "model_export"):
        shutil.copytree(REPO / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("glipv2-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"service/playground/{path.name}" for path in PLAYGROUND_DIR.iterdir()}
    assert expected <= shipped, expected - shipped


# --- in Chromium ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is missing: pip install -e '.[browser]'")
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("no Chromium here: apt-get install chromium")
    with sync_api.sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable)
        except sync_api.Error as exc:
            pytest.skip(f"Chromium cannot start here: {exc}")
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """`glipv2 serve` on the embedded default model, with an API key; yields its URL."""
    process, url = start_server([], {"GLIPV2_API_KEYS": API_KEY}, 180)
    try:
        yield url
    finally:
        process.terminate()
        process.communicate(timeout=60)


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    """The playground with UPLOAD chosen in its file input and the API key filled in."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(f"{server}/playground")
    opened.wait_for_selector("#output[data-status=idle]")  # the first example has loaded
    opened.set_input_files("#image", str(UPLOAD))
    opened.wait_for_selector(f'#canvas[data-source="{UPLOAD.name}"]')
    opened.fill("#api-key", API_KEY)
    yield opened
    context.close()
    assert not errors, errors  # no uncaught script error on the way


def canvas_rgb(page: Page) -> np.ndarray:
    """The canvas's pixels, (H, W, 3) uint8, read losslessly as a PNG."""
    url = page.evaluate("() => document.getElementById('canvas').toDataURL('image/png')")
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def css_rgb(value: str) -> tuple[int, int, int]:
    r, g, b = (int(part) for part in re.findall(r"\d+", value)[:3])
    return r, g, b


def drawn_items(task: str, request: dict[str, Any], answer: dict[str, Any]
                ) -> list[tuple[list[float], str | None, dict[str, Any] | None]]:
    """What the page must draw for an answer, in its table's order: (box, the highlighted text
    of its span or None, its mask or None)."""
    def spanned(text: str, span: list[int]) -> str:
        return text[span[0]:span[1]]

    if task == "detect-classes":
        return [(d["box"], None, None) for d in answer["detections"]]
    if task == "detect-prompt":
        return [(d["box"], spanned(request["prompt"], d["span"]), None)
                for d in answer["detections"]]
    if task == "segment":
        return [(s["box"], r["expression"], s["mask"])
                for r in answer["results"] for s in r["segments"]]
    if task == "vqa":
        return ([(g["box"], spanned(request["question"], g["span"]), None)
                 for g in answer["grounding"]]
                + [(g["box"], None, None) for g in answer["answer_grounding"]])
    assert task == "caption"
    return [(p["box"], spanned(answer["caption"], p["span"]), None) for p in answer["phrases"]]


def edge_colours(rgb: np.ndarray, box: list[float]) -> list[tuple[int, ...]]:
    """The pixels under the midpoints of a box's four edges."""
    x0, y0, x1, y1 = box
    height, width = rgb.shape[:2]
    points = [(x0, (y0 + y1) / 2), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y0),
              ((x0 + x1) / 2, y1)]
    return [tuple(int(v) for v in rgb[min(math.floor(y), height - 1),
                                      min(math.floor(x), width - 1)])
            for x, y in points]


# (task, form fields to fill, the request fields the page must send); a blank option is the
# server's default (not sent); VQA and caption take none.
TASKS = [
    ("detect-classes", {"#text": "circle, square,, star", "#threshold": "0.5",
                        "#max-detections": "4"},
     {"classes": ["circle", "square", "star"], "threshold": 0.5, "max_detections": 4}),
    ("detect-prompt", {"#text": "red hexagon. small purple circle", "#threshold": "0.4",
                       "#max-detections": ""},
     {"prompt": "red hexagon. small purple circle", "threshold": 0.4}),
    ("segment", {"#text": "the red hexagon\n\nthe purple shapes", "#threshold": ""},
     {"expressions": ["the red hexagon", "the purple shapes"]}),
    ("vqa", {"#text": "what shape is left of the purple circle?"},
     {"question": "what shape is left of the purple circle?"}),
    ("caption", {}, {}),
]


@pytest.mark.parametrize(("task", "form", "fields"), TASKS, ids=[task for task, *_ in TASKS])
def test_each_task_draws_the_apis_answer(page: Page, server: str, task: str,
                                         form: dict[str, str], fields: dict[str, Any],
                                         tmp_path: Path) -> None:
    blank = canvas_rgb(page)
    assert np.array_equal(blank, np.asarray(Image.open(UPLOAD).convert("RGB")))  # own pixels
    # Options set for another task first: a task that takes none must not send them.
    page.fill("#threshold", "0.9")
    page.fill("#max-detections", "1")
    page.select_option("#task", task)
    for selector, value in form.items():
        page.fill(selector, value)
    endpoint = task.split("-")[0]
    with page.expect_response(f"**/v1/{endpoint}") as answered:
        page.click("#run")
    page.wait_for_selector("#output[data-status=done]", timeout=60_000)
    page.screenshot(path=tmp_path / f"{task}.png", full_page=True)

    # The request is the form's, the answer shown is the API's answer to that request.
    request = answered.value.request
    sent = request.post_data_json
    assert sent == {"image": base64.b64encode(UPLOAD.read_bytes()).decode(), **fields}
    assert request.headers["authorization"] == AUTH["authorization"]
    direct = httpx.post(f"{server}/v1/{endpoint}", json=sent, headers=AUTH, timeout=60)
    assert direct.status_code == 200, direct.text
    answer = direct.json()
    shown = page.text_content("#result-json") or ""
    assert shown.startswith('{\n  "model": ') and json.loads(shown) == answer  # pretty-printed
    assert re.fullmatch(r"\d+ ms · HTTP 200 · request [0-9a-f]{32}",
                        page.text_content("#latency") or "")
    assert page.is_hidden("#error")

    # One table row and one box per item, each box in its row's colour on the canvas.
    items = drawn_items(task, sent, answer)
    assert items, "the default model answers every task here with boxes"
    colours = [css_rgb(value) for value in page.eval_on_selector_all(
        "#detections tbody .swatch", "els => els.map(el => getComputedStyle(el).backgroundColor)")]
    assert len(colours) == len(items)
    drawn = canvas_rgb(page)
    # Boxes are drawn in table order, 2 px wide here: one within 4 px of a later box (the
    # same object found twice) is drawn over. Another's label may hide one edge's midpoint.
    boxes = [np.array(box) for box, _, _ in items]
    for index, (box, colour) in enumerate(zip(boxes, colours, strict=True)):
        if not any(np.abs(box - later).max() <= 4 for later in boxes[index + 1:]):
            assert edge_colours(drawn, box.tolist()).count(colour) >= 3, (box, colour)

    # Grounded spans highlighted in their boxes' colours.
    marks = page.eval_on_selector_all(
        "#highlight mark", "els => els.map(el => [el.textContent, "
        "getComputedStyle(el).borderBottomColor])")
    assert {(text, css_rgb(colour)) for text, colour in marks} == {
        (text, colour) for (_, text, _), colour in zip(items, colours, strict=True) if text}
    if task == "vqa":  # the answer in the colour of its boxes
        assert (page.text_content("#answer") or "").startswith(f"Answer: {answer['answer']} (")
        answer_mark = page.eval_on_selector(
            "#answer mark", "el => [el.textContent, getComputedStyle(el).borderBottomColor]")
        assert answer["answer_grounding"] and answer_mark[0] == answer["answer"]
        assert css_rgb(answer_mark[1]) == colours[-1]  # answer boxes come last

    # Masks: the page's RLE decoder reads what pycocotools reads, and paints those pixels.
    tinted = blank.astype(np.float64)  # the page's blend, mask after mask, rounded each time
    masked = np.zeros(blank.shape[:2], dtype=bool)
    for (_, _, mask), colour in zip(items, colours, strict=True):
        if mask is None:
            continue
        expected = mask_utils.decode({"size": mask["size"], "counts": mask["counts"].encode()})
        decoded = page.evaluate("mask => Array.from(rleDecode(mask)).join('')", mask)
        assert decoded == "".join(map(str, expected.flatten(order="F")))
        inside = expected.astype(bool)
        tinted[inside] = np.rint(tinted[inside] + (np.array(colour) - tinted[inside]) * 0.45)
        masked |= inside
    assert masked.any() == (task == "segment")
    if masked.any():  # boxes and labels drawn over the masks cover a few of their pixels
        assert (np.abs(drawn - tinted).max(axis=-1) <= 1)[masked].mean() > 0.9


def test_an_image_can_be_dropped_or_taken_from_the_examples(page: Page) -> None:
    """Both end as the file input does: the image drawn at its own size, ready to send."""
    dropped = Path(__file__).parent / "fixtures" / "world" / "000008.png"
    transfer = page.evaluate_handle(
        """([name, b64]) => {
            const transfer = new DataTransfer();
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            transfer.items.add(new File([bytes], name, {type: "image/png"}));
            return transfer;
        }""", [dropped.name, base64.b64encode(dropped.read_bytes()).decode()])
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    page.wait_for_selector(f'#canvas[data-source="{dropped.name}"]')
    assert np.array_equal(canvas_rgb(page), np.asarray(Image.open(dropped).convert("RGB")))

    page.click('[data-example="world-000001.png"]')
    page.wait_for_selector('#canvas[data-source="world-000001.png"]')
    example = PLAYGROUND_DIR / "world-000001.png"
    assert np.array_equal(canvas_rgb(page), np.asarray(Image.open(example).convert("RGB")))
    assert page.is_enabled("#run")



def test_a_photo_is_drawn_in_its_stored_pixels_whatever_its_exif_orientation(
        page: Page, tmp_path: Path) -> None:
    """The service answers in the stored pixel grid (EXIF orientation not applied), so the
    canvas is that grid too: a JPEG saved 48x24 with "rotate 90" in its EXIF (a browser shows
    it 24x48) is drawn 48x24, its left half red, as stored."""
    stored = Image.new("RGB", (48, 24), (220, 30, 30))
    stored.paste((30, 30, 220), (24, 0, 48, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    photo = tmp_path / "sideways.jpg"
    stored.save(photo, "JPEG", quality=95, exif=exif)
    page.set_input_files("#image", str(photo))
    page.wait_for_selector(f'#canvas[data-source="{photo.name}"]')
    drawn = canvas_rgb(page).astype(int)
    assert drawn.shape == (24, 48, 3)
    assert np.abs(drawn - np.asarray(Image.open(photo).convert("RGB"), dtype=int)).max() <= 8


def test_the_rle_decoder_reads_long_and_shrinking_runs(page: Page) -> None:
    """Runs of several characters and negative differences (pycocotools' delta coding), which
    the tiny model's few masks may not contain."""
    rng = np.random.default_rng(0)
    mask = np.zeros((300, 500), dtype=np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, 280), rng.integers(0, 480)
        mask[y:y + rng.integers(1, 200), x:x + rng.integers(1, 300)] ^= 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    counts = rle["counts"].decode()
    decoded = page.evaluate("mask => Array.from(rleDecode(mask)).join('')",
                            {"size": rle["size"], "counts": counts})
    assert decoded == "".join(map(str, mask.flatten(order="F")))


def test_errors_show_the_apis_error_body(page: Page, server: str, tmp_path: Path) -> None:
    """An empty class list (422) and then no API key (401): code, message and request id of
    the error body in #error, the body itself in #result-json, nothing drawn; the API answers
    the same request with the same error."""
    blank = canvas_rgb(page)
    page.select_option("#task", "detect-classes")
    page.fill("#text", " , ")
    for key, status in [(API_KEY, 422), ("", 401)]:
        page.fill("#api-key", key)
        with page.expect_response("**/v1/detect") as answered:
            page.click("#run")
        page.wait_for_selector("#output[data-status=error]")
        page.screenshot(path=tmp_path / f"error-{status}.png", full_page=True)
        response = answered.value
        assert response.status == status
        body = response.json()
        error = body["error"]
        shown = page.text_content("#error") or ""
        assert shown == f"{error['code']}: {error['message']} (request {error['request_id']})"
        assert json.loads(page.text_content("#result-json") or "") == body
        assert page.eval_on_selector_all("#detections tbody tr", "rows => rows.length") == 0
        assert np.array_equal(canvas_rgb(page), blank)

        sent = response.request.post_data_json
        assert sent["classes"] == []
        direct = httpx.post(f"{server}/v1/detect", json=sent, timeout=60,
                            headers=AUTH if key else {})
        assert direct.status_code == status
        assert direct.json()["error"] | {"request_id": ""} == error | {"request_id": ""}
