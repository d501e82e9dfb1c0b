"""The package layout's promises: imports go one way, and PyTorch serving needs no ONNX.

The layer contract itself is `lint-imports` (pyproject.toml, run by `make test`); these tests
check what it cannot see: modules that exist only at run time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORLD_PNG = REPO / "tests" / "fixtures" / "world" / "000001.png"

# Serve the embedded default model on PyTorch, answer one request of every task, and report
# which ONNX packages got imported on the way.
_SERVE_ON_PYTORCH = """
import base64, sys, time
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import ServiceSettings

image = base64.b64encode(open({image!r}, "rb").read()).decode()
settings = ServiceSettings(runtime="pytorch", jobs_dir={jobs_dir!r})
with TestClient(create_app(settings)) as client:
    deadline = time.monotonic() + 120
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "model never became ready"
        time.sleep(0.2)
    for path, body in [("/v1/detect", {{"classes": ["circle", "square"]}}),
                       ("/v1/segment", {{"expressions": ["red circle"]}}),
                       ("/v1/vqa", {{"question": "how many squares are there?"}}),
                       ("/v1/caption", {{}})]:
        response = client.post(path, json={{"image": image, **body}})
        assert response.status_code == 200, response.text
print(sorted(m for m in ("onnx", "onnxruntime", "tensorrt") if m in sys.modules))
"""


def test_serving_on_pytorch_imports_no_onnx(tmp_path: Path) -> None:
    """Eager PyTorch serving runs the graph wrappers of `engines.graphs` and never the ONNX
    exporter or ONNX Runtime: a deployment without them serves all four tasks."""
    script = _SERVE_ON_PYTORCH.format(image=str(WORLD_PNG), jobs_dir=str(tmp_path / "jobs"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLIPV2_")}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=env | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_model_export_and_engines_import_no_higher_layer() -> None:
    """The layers contract as `git grep` reads it (imports inside functions included)."""
    done = subprocess.run(["git", "grep", "-nE", r"^\s*(from|import) (service|benchmarks|cli)\b",
                           "--", "model_export", "engines"], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 1 and not done.stdout, done.stdout
