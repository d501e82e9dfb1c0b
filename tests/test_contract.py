"""The HTTP contract, `openapi.yaml`, against the real server (a subprocess, an API key set).

- schemathesis with every check it has, every operation, positive and negative data and the
  stateful links from `POST /v1/jobs` to the job routes: no 5xx, every response (errors too)
  as the schema says, and no schema-valid request refused for its fields
  (tests/contract/schemathesis.toml and hooks.py say what is exempt, and why).
- A client generated from the file by openapi-python-client, as a new user would make one:
  its names are the contract's (`detect`, `DetectRequest`, `submitJob`, ...), and it runs a
  detection and a job end to end.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from model_export.checkpoints.weights import save_model
from model_export.modeling.model import Glipv2Model
from service.openapi import OPENAPI_PATH

from conftest import start_server

API_KEY = "contract-test-key"
CONTRACT_DIR = Path(__file__).parent / "contract"
WORLD_PNG = Path(__file__).parent / "fixtures" / "world" / "000000.png"
FUZZ_SECONDS = 60  # schemathesis' time budget: ~3-6k requests on 2 cores
TOOLS = Path(sys.executable).parent  # the venv's console scripts: st, openapi-python-client


@pytest.fixture(scope="module")
def server(tiny_model: Glipv2Model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("contract")
    model_dir = save_model(tiny_model, root / "model", external_language=True)
    process, base = start_server(["--model", str(model_dir)], {
        "GLIPV2_API_KEYS": API_KEY, "GLIPV2_JOBS_DIR": str(root / "jobs"),
        "HF_HUB_OFFLINE": "1"}, 180)
    try:
        yield base
    finally:
        process.terminate()
        process.communicate(timeout=60)


def _tool(name: str) -> str:
    path = TOOLS / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def test_schemathesis_finds_nothing(server: str, tmp_path: Path) -> None:
    # One worker: with two threads, Hypothesis describing filter lambdas (`ast.parse`) in both
    # at once trips CPython 3.11's "AST constructor recursion depth mismatch" SystemError.
    command = [
        _tool("st"), "--config-file", str(CONTRACT_DIR / "schemathesis.toml"),
        "run", str(OPENAPI_PATH), "--url", server,
        "--header", f"Authorization: Bearer {API_KEY}",
        "--checks", "all", "--max-time", str(FUZZ_SECONDS), "--workers", "1",
        "--request-timeout", "60", "--generation-database", "none", "--no-color",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.contract.hooks",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=FUZZ_SECONDS + 240)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-15000:]
    assert "Tested: 13" in output, output[-3000:]  # every operation of the contract
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in output, output[-3000:]


@pytest.fixture(scope="module")
def generated_client(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """`openapi-python-client generate` from openapi.yaml, imported as `glipv2_client`."""
    root = tmp_path_factory.mktemp("client")
    run = subprocess.run(
        [_tool("openapi-python-client"), "generate", "--path", str(OPENAPI_PATH),
         "--meta", "none", "--output-path", str(root / "glipv2_client")],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    # The one part it cannot type: results are JSON Lines (it hands back the bytes).
    output = run.stdout + run.stderr
    warnings = [line for line in output.splitlines() if line.startswith("WARNING")]
    assert warnings == ["WARNING parsing GET /v1/jobs/{job_id}/results within jobs."], \
        output
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("glipv2_client")
    finally:
        sys.path.remove(str(root))


def _module(name: str) -> Any:
    return importlib.import_module(f"glipv2_client.{name}")


def test_the_generated_client_has_the_contracts_names(generated_client: ModuleType) -> None:
    api = {name: _module(f"api.{group}.{name}") for group, name in [
        ("tasks", "detect"), ("tasks", "segment"), ("tasks", "vqa"), ("tasks", "caption"),
        ("jobs", "submit_job"), ("jobs", "get_job"), ("jobs", "list_jobs"),
        ("jobs", "cancel_job"), ("jobs", "get_job_results"), ("models", "list_models")]}
    assert all(hasattr(module, "sync") for module in api.values())
    models = _module("models")
    for name in ("DetectRequest", "DetectForm", "SegmentRequest", "VqaRequest",
                 "CaptionRequest", "DetectJob", "JobStatus", "ErrorBody", "DetectResponse"):
        assert hasattr(models, name), name


def test_the_generated_client_detects_and_runs_a_job(generated_client: ModuleType,
                                                     server: str) -> None:
    models = _module("models")
    detect = _module("api.tasks.detect")
    submit_job, get_job = _module("api.jobs.submit_job"), _module("api.jobs.get_job")
    get_job_results = _module("api.jobs.get_job_results")
    image = base64.b64encode(WORLD_PNG.read_bytes()).decode()
    keyed = generated_client.AuthenticatedClient(base_url=server, token=API_KEY, timeout=120)

    answer = detect.sync(client=keyed, body=models.DetectRequest(
        image=image, classes=["circle", "star"], threshold=0.0))
    assert isinstance(answer, models.DetectResponse), answer
    expected = httpx.post(f"{server}/v1/detect", timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"image": image, "classes": ["circle", "star"], "threshold": 0.0})
    assert answer.to_dict() == expected.json()

    # Without a key the same client class works, and the refusal is the contract's ErrorBody.
    anonymous = generated_client.Client(base_url=server, timeout=120)
    refused = detect.sync(client=anonymous, body=models.DetectRequest(image=image,
                                                                     classes=["circle"]))
    assert isinstance(refused, models.ErrorBody) and refused.error.code == "unauthorized"

    job = submit_job.sync(client=keyed, body=models.DetectJob(
        task="detect", params=models.DetectParams(classes=["circle", "star"], threshold=0.0),
        inputs=[models.JobInputItem(image=image),
                models.JobInputItem(image="bm90IGFuIGltYWdl")]))  # "not an image"
    assert isinstance(job, models.JobStatus), job
    deadline = time.monotonic() + 120
    while (status := get_job.sync(job.id, client=keyed)).state != "done":
        assert status.state in ("queued", "running") and time.monotonic() < deadline, status
        time.sleep(0.5)
    assert (status.progress.succeeded, status.progress.failed) == (1, 1)
    lines = [json.loads(line) for line in
             get_job_results.sync_detailed(job.id, client=keyed).content.splitlines()]
    assert lines[0]["index"] == 0 and lines[0]["result"] == expected.json()
    assert lines[1]["index"] == 1 and lines[1]["error"]["code"] == "unsupported_media_type"
