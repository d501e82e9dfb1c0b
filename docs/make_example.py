"""Regenerate docs/example.png (the README picture) and docs/example-responses.json with the
service itself: the embedded default model answers the four tasks on one world sample, and each
answer is drawn by `?render=png`.

    .venv/bin/python docs/make_example.py
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.app import create_app
from service.settings import ServiceSettings

DOCS = Path(__file__).resolve().parent
SAMPLE = DOCS.parent / "tests" / "fixtures" / "world" / "000001.png"
REQUESTS = [
    ("/v1/detect", {"classes": ["circle", "square", "triangle", "diamond", "star", "hexagon"]}),
    ("/v1/segment", {"expressions": ["the blue shapes"]}),
    ("/v1/vqa", {"question": "how many squares are there?"}),
    ("/v1/caption", {}),
]


def main() -> None:
    image = base64.b64encode(SAMPLE.read_bytes()).decode()
    tiles, answers = [], {}
    with TestClient(create_app(ServiceSettings(api_keys=[]))) as client:
        while client.get("/readyz").status_code != 200:
            pass
        for path, fields in REQUESTS:
            body = {"image": image, **fields}
            answers[path] = {"request": fields, "response": client.post(path, json=body).json()}
            png = client.post(f"{path}?render=png", json=body)
            png.raise_for_status()
            tiles.append(Image.open(io.BytesIO(png.content)).convert("RGB"))
    width = max(t.width for t in tiles)
    height = max(t.height for t in tiles)
    grid = Image.new("RGB", (2 * width + 8, 2 * height + 8), (255, 255, 255))
    for index, tile in enumerate(tiles):
        grid.paste(tile, ((index % 2) * (width + 8), (index // 2) * (height + 8)))
    grid.save(DOCS / "example.png", optimize=True)
    (DOCS / "example-responses.json").write_text(json.dumps(answers, indent=1) + "\n")
    print(f"wrote {DOCS / 'example.png'} and example-responses.json")


if __name__ == "__main__":
    main()
