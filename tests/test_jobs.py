"""Batch jobs: the durable store, the REST resource on a tiny random model (per-input errors,
identical answers to the online endpoint, cancel, limits), and a real server killed with SIGKILL
mid-job that finishes the job after a restart with every input answered exactly once."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from engines.runtimes.torch_eager import TorchRuntime
from model_export.checkpoints.weights import save_model
from model_export.data.world import render_index
from model_export.modeling.model import Glipv2Model
from service.app import create_app
from service.jobs.store import (
    SQLITE_SCHEMA_VERSION,
    JobInput,
    JobResult,
    JobSchemaError,
    JobState,
    SqliteJobStore,
)
from service.settings import ServiceSettings
from service.state import open_job_store

from conftest import assert_same_answer, start_server

WORLD_PNG = Path(__file__).parent / "fixtures" / "world" / "000000.png"
CLASSES = ["circle", "square", "star"]


def world_png(index: int, seed: int = 3) -> bytes:
    buffer = io.BytesIO()
    render_index(seed, index).image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- the store ----------------------------------------------------------------------------------


def test_store_keeps_one_result_per_input_and_survives_reopening(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    job = store.create("detect", {"classes": ["circle"]},
                       [JobInput(data=b"a"), JobInput(path="x/y.png"), JobInput(data=b"c")])
    assert (job.state, job.total, job.done) == (JobState.QUEUED, 3, 0)
    assert store.claim(job.id, 10) == []  # nothing is claimed before the job runs
    assert store.read_input(job.id, 0).data == b"a"
    assert store.read_input(job.id, 1).path == "x/y.png"
    assert store.set_state(job.id, JobState.RUNNING)
    assert store.claim(job.id, 10) == [0, 1, 2]
    first = JobResult(1, True, '{"n": 1}')
    assert store.put_results(job.id, [first]) == [first]
    bad = JobResult(0, False, '{"code": "bad_image"}')
    assert store.put_results(job.id, [JobResult(1, True, '{"n": 2}'), bad]) == [bad]  # once
    assert not store.finish(job.id)  # input 2 has no result yet
    store.close()

    reopened = SqliteJobStore(tmp_path)
    record = reopened.get(job.id)
    assert record is not None and record.state == JobState.RUNNING
    assert (record.succeeded, record.failed, record.done_since_start) == (1, 1, 2)
    assert reopened.claim(job.id, 10) == [2]
    assert [(r.index, r.ok, r.body) for r in reopened.results(job.id)] == [
        (0, False, '{"code": "bad_image"}'), (1, True, '{"n": 1}')]
    assert [r.index for r in reopened.results(job.id, after=0)] == [1]
    assert reopened.unfinished()[0].id == job.id
    assert reopened.renew(job.id)
    assert reopened.set_state(job.id, JobState.CANCELLED)
    assert not reopened.set_state(job.id, JobState.DONE)  # finished jobs stay finished
    assert not reopened.renew(job.id)  # the worker drops its window
    assert reopened.put_results(job.id, [JobResult(2, True, "{}")]) == []  # keeps what it had
    assert reopened.claim(job.id, 10) == [] and not reopened.finish(job.id)
    assert reopened.counts()[JobState.CANCELLED] == 1
    assert reopened.purge(finished_before_s=time.time() + 1) == 1
    assert reopened.get(job.id) is None and not (tmp_path / "inputs" / job.id).exists()


def test_store_marks_a_job_done_once_every_input_has_a_result(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    job = store.create("caption", {}, [JobInput(data=b"a"), JobInput(data=b"b")])
    assert store.set_state(job.id, JobState.RUNNING)
    store.put_results(job.id, [JobResult(0, True, "{}")])
    assert not store.finish(job.id)
    store.put_results(job.id, [JobResult(1, True, "{}")])
    assert store.finish(job.id) and not store.finish(job.id)
    record = store.get(job.id)
    assert record is not None and record.state == JobState.DONE and record.finished_s
    store.close()



def test_store_schema_is_versioned(tmp_path: Path) -> None:
    """A file from before versioning (its tables, version 0) is taken as it is, jobs kept; a
    file a newer service migrated is refused, by the store and by the service at start."""
    store = SqliteJobStore(tmp_path)
    job = store.create("caption", {}, [JobInput(data=b"a")])
    store.close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SQLITE_SCHEMA_VERSION
        db.execute("PRAGMA user_version = 0")
    reopened = SqliteJobStore(tmp_path)
    assert reopened.get(job.id) is not None
    reopened.close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SQLITE_SCHEMA_VERSION
        db.execute(f"PRAGMA user_version = {SQLITE_SCHEMA_VERSION + 1}")
    with pytest.raises(JobSchemaError, match=rf"schema version {SQLITE_SCHEMA_VERSION + 1}, "
                                             rf"newer than this service's {SQLITE_SCHEMA_VERSION}"):
        SqliteJobStore(tmp_path)
    with pytest.raises(JobSchemaError):
        open_job_store(ServiceSettings(jobs_dir=tmp_path))


# --- the REST resource --------------------------------------------------------------------------


@pytest.fixture()
def client(tiny_model: Glipv2Model, tmp_path: Path) -> Iterator[TestClient]:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(WORLD_PNG.read_bytes())
    settings = ServiceSettings(model_name="tiny", api_keys=[], caption_max_tokens=4,
                               jobs_dir=tmp_path / "jobs", job_input_dir=inputs,
                               max_job_inputs=20, max_active_jobs=2)
    with TestClient(create_app(settings, TorchRuntime(tiny_model))) as test_client:
        yield test_client


def wait_for(client: TestClient | httpx.Client, job_id: str, states: set[str],
             timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get(f"/v1/jobs/{job_id}").json()
        if status["state"] in states:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def results(client: TestClient | httpx.Client, job_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/jobs/{job_id}/results")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


def test_job_answers_like_the_online_endpoint_with_errors_for_exactly_the_bad_inputs(
        client: TestClient) -> None:
    good = [world_png(i) for i in range(4)]
    inputs = [{"image": b64(good[0])}, {"image": "not base64 !!"}, {"image": b64(good[1])},
              {"image": b64(b"\x89PNG\r\n\x1a\n broken")}, {"path": "a.png"},
              {"image": b64(good[2])}, {"path": "missing.png"}, {"image": b64(good[3])}]
    params = {"classes": CLASSES, "threshold": 0.0}
    submitted = client.post("/v1/jobs", json={"task": "detect", "params": params,
                                              "inputs": inputs})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert submitted.headers["location"] == f"/v1/jobs/{job_id}"
    status = wait_for(client, job_id, {"done"})
    assert status["progress"] | {"rate_per_s": None, "eta_s": None} == {
        "total": 8, "done": 8, "succeeded": 5, "failed": 3, "rate_per_s": None, "eta_s": None}
    lines = results(client, job_id)
    assert [line["index"] for line in lines] == list(range(8))
    assert {line["index"] for line in lines if "error" in line} == {1, 3, 6}
    assert lines[1]["error"]["code"] == "bad_image"
    assert lines[6]["error"]["code"] == "invalid_request"
    assert "missing.png" in lines[6]["error"]["message"]
    images = {0: good[0], 2: good[1], 4: WORLD_PNG.read_bytes(), 5: good[2], 7: good[3]}
    for index, data in images.items():
        online = client.post("/v1/detect", json={"image": b64(data), **params})
        assert online.status_code == 200
        assert_same_answer(lines[index]["result"], online.json())
    assert client.get("/metrics").text.count('glipv2_jobs{state="done"} 1.0') == 1
    listed = client.get("/v1/jobs").json()["jobs"]
    assert [j["id"] for j in listed] == [job_id]


def test_every_task_runs_as_a_job(client: TestClient) -> None:
    image = b64(world_png(0))
    for task, params in (("segment", {"expressions": ["the red circle"]}),
                         ("vqa", {"question": "what color is the circle?"}), ("caption", {})):
        submitted = client.post("/v1/jobs", json={"task": task, "params": params,
                                                  "inputs": [{"image": image}]})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        wait_for(client, job_id, {"done"})
        (line,) = results(client, job_id)
        online = client.post(f"/v1/{task}", json={"image": image, **params}).json()
        assert_same_answer(line["result"], online)


def test_cancel_stops_a_job_within_one_window(client: TestClient) -> None:
    image = b64(world_png(0))
    submitted = client.post("/v1/jobs", json={
        "task": "detect", "params": {"classes": CLASSES}, "inputs": [{"image": image}] * 20})
    job_id = submitted.json()["id"]
    cancelled = client.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    time.sleep(0.5)
    after = client.get(f"/v1/jobs/{job_id}").json()
    assert after["state"] == "cancelled"
    assert after["progress"]["done"] <= 4  # at most the window in flight (job_concurrency)
    assert len(results(client, job_id)) == after["progress"]["done"]
    again = client.delete(f"/v1/jobs/{job_id}")
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    # the service goes on: a new job completes
    done = client.post("/v1/jobs", json={"task": "caption", "inputs": [{"image": image}]})
    wait_for(client, done.json()["id"], {"done"})


@pytest.mark.parametrize(("body", "status", "code", "fragment"), [
    ({"task": "detect", "params": {}, "inputs": [{"image": "x"}]}, 422, "invalid_request",
     "give one of classes, prompt or prompt_id"),
    ({"task": "detect", "params": {"classes": ["a"], "threshhold": 1}, "inputs": [{"image": "x"}]},
     422, "invalid_request", "params.threshhold: "),
    ({"task": "detect", "params": {"prompt_id": "lvis"}, "inputs": [{"image": "x"}]}, 404,
     "not_found", "unknown prompt_id 'lvis'"),
    ({"task": "paint", "inputs": [{"image": "x"}]}, 422, "invalid_request", "task"),
    ({"task": "caption", "inputs": []}, 422, "invalid_request", "inputs"),
    ({"task": "caption", "inputs": [{"image": "x", "path": "a.png"}]}, 422, "invalid_request",
     "give exactly one of image or path"),
    ({"task": "caption", "inputs": [{"path": "../secret.png"}]}, 422, "invalid_request",
     "inputs[0].path '../secret.png' leaves the input folder"),
    ({"task": "caption", "inputs": [{"path": "/etc/passwd"}]}, 422, "invalid_request",
     "must be relative"),
    ({"task": "caption", "inputs": [{"image": "x"}] * 21}, 422, "invalid_request",
     "more than the limit of 20 per job"),
])
def test_bad_job_requests_are_refused_whole(client: TestClient, body: dict[str, Any],
                                            status: int, code: str, fragment: str) -> None:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    message = response.json()["error"]["message"]
    assert fragment in message
    # Where a field is named, it is as the body spells it (not behind the union's tag).
    assert not message.startswith(f"{body['task']}."), message
    assert client.get("/v1/jobs").json()["jobs"] == []


def test_job_errors_and_limits(client: TestClient) -> None:
    bad_json = client.post("/v1/jobs", content=b"{not json",
                           headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    missing = client.get("/v1/jobs/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert client.get("/v1/jobs/nope/results").status_code == 404
    assert client.delete("/v1/jobs/nope").status_code == 404
    image = b64(world_png(0))
    body = {"task": "detect", "params": {"classes": CLASSES}, "inputs": [{"image": image}] * 20}
    first, second = (client.post("/v1/jobs", json=body) for _ in range(2))
    assert first.status_code == second.status_code == 202
    third = client.post("/v1/jobs", json=body)  # max_active_jobs = 2
    assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_jobs"
    assert int(third.headers["retry-after"]) > 0
    for job in (first, second):
        client.delete(f"/v1/jobs/{job.json()['id']}")
    assert client.post("/v1/jobs", json=body).status_code == 202


# --- drain (SIGTERM) ----------------------------------------------------------------------------


class GatedVision(TorchRuntime):
    """The vision engine waits for `gate`: holds the job's window in flight."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__(model)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def run(self, graph: str, inputs: Any) -> dict[str, Any]:
        if graph == "vision":
            self.entered.set()
            self.gate.wait(20)
        return super().run(graph, inputs)


def test_drain_stores_the_window_in_flight_and_claims_no_more(tiny_model: Glipv2Model,
                                                               tmp_path: Path) -> None:
    """SIGTERM mid-job: the runner claims nothing more, the window in flight finishes and its
    results are stored (not thrown away), the rest waits in the store for the restart."""
    gated = GatedVision(tiny_model)
    settings = ServiceSettings(model_name="tiny", api_keys=[], jobs_dir=tmp_path / "jobs",
                               job_concurrency=4, shutdown_timeout_s=30, shutdown_grace_s=0)
    app = create_app(settings, gated)
    state = app.state.service
    image = b64(world_png(0))

    async def scenario() -> str:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                submitted = await http.post("/v1/jobs", json={
                    "task": "detect", "params": {"classes": CLASSES},
                    "inputs": [{"image": image}] * 10})
                assert submitted.status_code == 202, submitted.text
                job_id: str = submitted.json()["id"]
                while not gated.entered.is_set():  # the first window is in the engines
                    await asyncio.sleep(0.01)
                drain = asyncio.create_task(state.drain())
                await asyncio.sleep(0.2)
                assert not drain.done()  # it waits for the window
                gated.gate.set()
                await asyncio.wait_for(drain, 20)
                await asyncio.sleep(0.3)  # a runner still claiming would have gone on
                record = state.jobs.store.get(job_id)
                assert record is not None
                assert (record.state, record.done) == (JobState.RUNNING, 4), record
                return job_id

    job_id = asyncio.run(scenario())
    store = SqliteJobStore(tmp_path / "jobs")  # what the restart finds
    try:
        assert [r.index for r in store.results(job_id)] == [0, 1, 2, 3]
        assert store.claim(job_id, 10) == [4, 5, 6, 7, 8, 9]
    finally:
        store.close()


# --- restart survival -------------------------------------------------------------------------


@pytest.mark.slow
def test_job_survives_sigkill_mid_job_with_every_input_answered_once(
        tiny_model: Glipv2Model, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    save_model(tiny_model, model_dir, external_language=True)
    env = {"GLIPV2_JOBS_DIR": str(tmp_path / "jobs"), "GLIPV2_CAPTION_MAX_TOKENS": "4"}
    images = [world_png(i) for i in range(200)]
    params = {"classes": CLASSES, "threshold": 0.0}
    process, base = start_server(["--model", str(model_dir)], env, ready_timeout_s=120)
    try:
        with httpx.Client(base_url=base, timeout=60) as http:
            submitted = http.post("/v1/jobs", json={
                "task": "detect", "params": params, "inputs": [{"image": b64(d)} for d in images]})
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            deadline = time.monotonic() + 120
            while http.get(f"/v1/jobs/{job_id}").json()["progress"]["done"] < 40:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        process.kill()  # SIGKILL: no drain, no cleanup
        process.wait()
    store = SqliteJobStore(tmp_path / "jobs")  # what the killed process left on disk
    killed = store.get(job_id)
    store.close()
    assert killed is not None and killed.state == JobState.RUNNING
    assert 40 <= killed.done < 200  # it stopped mid-job
    process, base = start_server(["--model", str(model_dir)], env, ready_timeout_s=120)
    try:
        with httpx.Client(base_url=base, timeout=60) as http:
            status = wait_for(http, job_id, {"done"}, timeout_s=300)
            assert status["progress"]["done"] == status["progress"]["succeeded"] == 200
            lines = results(http, job_id)
            assert [line["index"] for line in lines] == list(range(200))  # once each, in order
            for index in range(0, 200, 7):
                online = http.post("/v1/detect", json={"image": b64(images[index]), **params})
                assert_same_answer(lines[index]["result"], online.json())
    finally:
        process.terminate()
        process.wait(30)


def test_job_client_submits_follows_and_saves(client: TestClient, tmp_path: Path) -> None:
    from service.jobs.client import JobClient, JobClientError, folder_images

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index:02d}.png").write_bytes(world_png(index))
    (folder / "notes.txt").write_text("not an image")
    files = folder_images(folder)
    assert [f.name for f in files] == ["00.png", "01.png", "02.png"]
    jobs = JobClient("http://testserver", http=client)
    job = jobs.submit("detect", {"classes": CLASSES}, [f.read_bytes() for f in files])
    status = jobs.wait(job["id"], poll_s=0.05, progress=False)
    assert status["state"] == "done" and status["progress"]["succeeded"] == 3
    out = tmp_path / "results.jsonl"
    assert jobs.save_results(job["id"], out) == 3
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1, 2]
    with pytest.raises(JobClientError, match="HTTP 409 conflict"):
        jobs.cancel(job["id"])
    with pytest.raises(JobClientError, match=r"no \.png"):
        folder_images(tmp_path)  # results.jsonl and a folder: no images
