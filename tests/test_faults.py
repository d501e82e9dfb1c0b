"""Fault injection against the real app (tiny random model): a runtime that raises, returns NaN
or infinity, or hangs on a chosen batch of one engine, and a job store whose disk fills up or
turns read-only.

What each fault must look like from outside: the requests of the faulty batch get a JSON error
(500 `inference_failed`, or 504 `deadline_exceeded` at their deadline for a hang), requests in
other batches and every later batch are answered, `/readyz` is 200 afterwards, and the fault is
counted in `glipv2_engine_failures_total{engine, kind}`. A job store that cannot be written makes
the jobs API answer 503 `jobs_unavailable` with Retry-After while online requests go on; the job
runner backs off without recomputing, and results stored before the fault stay.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from engines.runtimes.torch_eager import TorchRuntime
from model_export.modeling.model import Glipv2Model
from service.app import create_app
from service.batching import (
    PRIORITY_BATCH,
    BatcherConfig,
    BatchPlan,
    DeadlineExceededError,
    DynamicBatcher,
    EngineStalledError,
    FailureKind,
)
from service.settings import ServiceSettings

from conftest import free_port, until, with_app

WORLD_PNG = Path(__file__).parent / "fixtures" / "world" / "000000.png"
IMAGE = base64.b64encode(WORLD_PNG.read_bytes()).decode()
DETECT = {"image": IMAGE, "classes": ["circle", "square"]}
HANG_S = 20.0  # how long a hung batch would last if the test did not release it


# --- the faulty runtime -----------------------------------------------------------------------


class FaultyRuntime(TorchRuntime):
    """`TorchRuntime` misbehaving on chosen calls (batches) of one graph.

    faults: call number of `graph` (1-based) -> "raise", "nan", "inf" or "hang". A hung call
    waits for `release` (at most `HANG_S`). While `hold` is clear, the first call of `graph`
    waits for it (`holding` tells it is there), so a test can queue exactly the requests it
    wants into the next batch.
    """

    def __init__(self, model: Glipv2Model, graph: str, faults: dict[int, str]) -> None:
        super().__init__(model)
        self.graph = graph
        self.faults = faults
        self.calls = 0
        self.lock = threading.Lock()
        self.hold = threading.Event()
        self.hold.set()
        self.holding = threading.Event()
        self.release = threading.Event()
        self.hung = threading.Event()

    def run(self, graph: str, inputs: Any) -> dict[str, torch.Tensor]:
        if graph != self.graph:
            return super().run(graph, inputs)
        with self.lock:
            self.calls += 1
            call = self.calls
        if call == 1 and not self.hold.is_set():
            self.holding.set()
            self.hold.wait(HANG_S)
        fault = self.faults.get(call)
        if fault == "raise":
            raise RuntimeError(f"injected fault in {graph} call {call}")
        if fault == "hang":
            self.hung.set()
            self.release.wait(HANG_S)
        outputs = super().run(graph, inputs)
        if fault in ("nan", "inf"):
            name = next(n for n, t in outputs.items() if t.is_floating_point())
            poisoned = outputs[name].clone()
            poisoned.view(-1)[:: max(1, poisoned.numel() // 7)] = (
                math.nan if fault == "nan" else math.inf)
            outputs = {**outputs, name: poisoned}
        return outputs


def make_settings(tmp_path: Path, **overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = {"model_name": "tiny", "caption_max_tokens": 4, "api_keys": [],
                              "jobs_dir": tmp_path / "jobs"}
    return ServiceSettings(**(values | overrides))




def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for fragment in fragments:
        assert fragment in error["message"], error


def metric(text: str, series: str) -> float:
    """The value of one series of a /metrics page (`name{labels}` as Prometheus writes it)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no series {series} in /metrics")


def failures(text: str, engine: str) -> dict[str, float]:
    return {kind: metric(text, f'glipv2_engine_failures_total{{engine="{engine}",kind="{kind}"}}')
            for kind in ("error", "nan", "timeout")}


# --- an engine's batch fails: raises, NaN, infinity -------------------------------------------


@pytest.mark.parametrize(("fault", "kind", "fragment"), [
    ("raise", "error", "see the server log"),
    ("nan", "nan", "non-finite outputs"),
    ("inf", "nan", "non-finite outputs"),
])
def test_a_failing_batch_fails_only_its_own_requests(tiny_model: Glipv2Model, tmp_path: Path,
                                                     fault: str, kind: str,
                                                     fragment: str) -> None:
    """Vision batch 1 is held while two requests queue (batch 2, the faulty one) and a third
    behind them (batch 3): only batch 2's requests fail, with a JSON 500."""
    runtime = FaultyRuntime(tiny_model, "vision", {2: fault})
    app = create_app(make_settings(tmp_path, batcher={"max_batch_size": 2,
                                                      "max_queue_delay_ms": 0}), runtime)

    async def scenario(http: httpx.AsyncClient) -> None:
        vision = app.state.service.serving.engines.batchers["vision"]

        def post() -> asyncio.Task[httpx.Response]:
            return asyncio.create_task(http.post("/v1/detect", json=DETECT))

        runtime.hold.clear()
        first = post()
        await until(runtime.holding.is_set)
        faulty = [post(), post()]
        await until(lambda: vision.queue_depth == 2)
        behind = post()
        await until(lambda: vision.queue_depth == 3)
        runtime.hold.set()
        assert (await first).status_code == 200
        for response in faulty:
            assert_error(await response, 500, "inference_failed", fragment)
            assert "injected" not in response.result().text  # the cause stays in the log
        answered = await behind
        assert answered.status_code == 200, answered.text
        assert answered.json() == (await first).json()
        assert runtime.calls == 3
        for _ in range(2):  # every later batch
            assert (await http.post("/v1/detect", json=DETECT)).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        counted = failures((await http.get("/metrics")).text, "vision")
        assert counted == {"error": 0.0, "nan": 0.0, "timeout": 0.0} | {kind: 1.0}
        assert failures((await http.get("/metrics")).text, "fusion")[kind] == 0.0

    asyncio.run(with_app(app, scenario))


def test_non_finite_outputs_of_a_later_engine_fail_that_batch(tiny_model: Glipv2Model,
                                                              tmp_path: Path) -> None:
    """The check sits where every engine's outputs leave the runtime: NaN in `fusion` is
    caught as well, and counted under its engine."""
    runtime = FaultyRuntime(tiny_model, "fusion", {1: "nan"})
    app = create_app(make_settings(tmp_path), runtime)

    async def scenario(http: httpx.AsyncClient) -> None:
        assert_error(await http.post("/v1/detect", json=DETECT), 500, "inference_failed",
                     "non-finite outputs")
        assert (await http.post("/v1/detect", json=DETECT)).status_code == 200
        counted = failures((await http.get("/metrics")).text, "fusion")
        assert counted == {"error": 0.0, "nan": 1.0, "timeout": 0.0}

    asyncio.run(with_app(app, scenario))


# --- an engine's batch hangs ------------------------------------------------------------------


def test_a_hung_batch_is_504_at_the_deadline_and_the_engine_recovers(tiny_model: Glipv2Model,
                                                                     tmp_path: Path) -> None:
    """The hung batch's request hears 504 at its deadline, not when the batch returns. The
    batch cannot be interrupted: meanwhile the replica is not ready and online requests to that
    engine are refused at once (503 + Retry-After) instead of queueing to time out. Once the
    batch returns, everything is served again; the stall is counted once."""
    runtime = FaultyRuntime(tiny_model, "vision", {2: "hang"})
    app = create_app(make_settings(tmp_path, request_timeout_ms=3000,
                                   batcher={"max_queue_delay_ms": 0}), runtime)

    async def scenario(http: httpx.AsyncClient) -> None:
        vision = app.state.service.serving.engines.batchers["vision"]
        assert (await http.post("/v1/detect", json=DETECT)).status_code == 200
        started = time.monotonic()
        hung = await http.post("/v1/detect", json=DETECT)
        waited_s = time.monotonic() - started
        assert_error(hung, 504, "deadline_exceeded")
        assert runtime.hung.is_set() and not runtime.release.is_set()
        assert 2.9 <= waited_s < 8.0, waited_s  # the 3 s deadline, far from the hang's end

        await until(lambda: vision.stalled_s is not None)
        assert_error(await http.get("/readyz"), 503, "not_ready", "vision engine")
        assert (await http.get("/healthz")).status_code == 200  # alive: it will come back
        started = time.monotonic()
        refused = await http.post("/v1/detect", json=DETECT)
        assert_error(refused, 503, "engine_stalled", "vision")
        assert int(refused.headers["retry-after"]) >= 1
        assert time.monotonic() - started < 1.0  # at once, not at its deadline
        metrics = (await http.get("/metrics")).text
        assert failures(metrics, "vision") == {"error": 0.0, "nan": 0.0, "timeout": 1.0}

        runtime.release.set()
        await until(lambda: vision.stalled_s is None)
        assert (await http.get("/readyz")).status_code == 200
        for _ in range(2):
            assert (await http.post("/v1/detect", json=DETECT)).status_code == 200
        metrics = (await http.get("/metrics")).text
        assert failures(metrics, "vision")["timeout"] == 1.0

    try:
        asyncio.run(with_app(app, scenario))
    finally:
        runtime.release.set()


def test_the_batcher_marks_a_hung_batch_stalled_once_and_refuses_only_online_work() -> None:
    """On a fake clock: stalled once the batch has run a whole default deadline (not merely
    past its request's deadline), counted once however long it hangs; online requests are
    refused meanwhile, job work queues and runs when the batch returns."""

    async def main() -> None:
        now = [100.0]
        entered, release = threading.Event(), threading.Event()

        def run_batch(plan: BatchPlan[str]) -> list[str]:
            if plan.payloads == ["hangs"]:
                entered.set()
                release.wait(HANG_S)
            return [f"r{payload}" for payload in plan.payloads]

        kinds: list[FailureKind] = []
        batcher: DynamicBatcher[str, str] = DynamicBatcher(
            BatcherConfig(max_batch_size=1, default_deadline_ms=1000.0), run_batch,
            clock=lambda: now[0], on_failure=kinds.append, name="vision")
        await batcher.start()
        try:
            hung = asyncio.create_task(batcher.submit("hangs", "b", deadline_ms=500.0))
            await until(entered.is_set)
            now[0] += 0.6
            batcher.wake()
            with pytest.raises(DeadlineExceededError):
                await hung
            assert batcher.stalled_s is None and kinds == []
            now[0] += 0.5  # 1.1 s: a whole default deadline
            batcher.wake()
            await until(lambda: batcher.stalled_s is not None)
            assert kinds == [FailureKind.TIMEOUT]
            with pytest.raises(EngineStalledError) as refused:
                await batcher.submit("online", "b")
            assert refused.value.retry_after_s >= 1.0
            now[0] += 60.0
            batcher.wake()
            await asyncio.sleep(0.05)
            assert kinds == [FailureKind.TIMEOUT]  # once per batch
            job = asyncio.create_task(batcher.submit("job", "b", priority=PRIORITY_BATCH))
            await until(lambda: batcher.queue_depth == 1)
            release.set()
            assert await job == "rjob"
            assert batcher.stalled_s is None
            # The hang (61 s on this clock) is not the engine's speed: it enters the compute
            # estimate as the default deadline it overran (then the job batch, 0 s, at 0.2).
            assert batcher._compute_ema_s == pytest.approx(0.8)
            assert await batcher.submit("online", "b") == "ronline"
        finally:
            release.set()
            await batcher.stop()

    asyncio.run(main())


def test_a_hung_caption_step_is_504_at_the_deadline(tiny_model: Glipv2Model,
                                                   tmp_path: Path) -> None:
    """The caption decoder's thread is stuck in a step: the caption still hears its 504 at the
    deadline (kept on the event loop too), and the decoder serves again once the step ends."""
    runtime = FaultyRuntime(tiny_model, "caption_step", {1: "hang"})
    app = create_app(make_settings(tmp_path, request_timeout_ms=3000), runtime)

    async def scenario(http: httpx.AsyncClient) -> None:
        started = time.monotonic()
        hung = await http.post("/v1/caption", json={"image": IMAGE})
        waited_s = time.monotonic() - started
        assert_error(hung, 504, "deadline_exceeded")
        assert runtime.hung.is_set() and waited_s < 8.0, waited_s
        runtime.release.set()
        assert (await http.post("/v1/caption", json={"image": IMAGE})).status_code == 200

    try:
        asyncio.run(with_app(app, scenario))
    finally:
        runtime.release.set()


# --- the job store's disk is full, or read-only -----------------------------------------------


RESULT_PAGE_READ = "SELECT idx, ok, body FROM results"  # SqliteJobStore.results' query


class FailingDisk:
    """Stands in for the SQLite connection of a `SqliteJobStore`: while `full`, every write
    fails as SQLite fails it on a full disk (SQLITE_FULL); while `away`, every statement fails
    with an I/O error. `fill_after_results`: become full by itself (once) when that many results
    have been inserted (the transaction they are in still commits). `result_reads_left`: so
    many pages of results are read (`results`), then each read fails with an I/O error."""

    WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")

    def __init__(self, db: sqlite3.Connection, fill_after_results: int | None = None) -> None:
        self.db = db
        self.full = False
        self.away = False
        self.fill_after_results = fill_after_results
        self.results_inserted = 0
        self.result_reads_left: int | None = None
        self.refused = 0

    def _refuse(self, sql: str) -> None:
        verb = sql.lstrip().split(None, 1)[0].upper()
        if self.result_reads_left is not None and RESULT_PAGE_READ in sql:
            if self.result_reads_left == 0:
                raise _sqlite_error("disk I/O error", sqlite3.SQLITE_IOERR)
            self.result_reads_left -= 1
        if self.away:
            self.refused += 1
            raise _sqlite_error("disk I/O error", sqlite3.SQLITE_IOERR)
        if self.full and verb in self.WRITES:
            self.refused += 1
            raise _sqlite_error("database or disk is full", sqlite3.SQLITE_FULL)

    def _count(self, sql: str, rows: int) -> None:
        if "INTO results" in sql:
            self.results_inserted += rows
            if (self.fill_after_results is not None
                    and self.results_inserted >= self.fill_after_results):
                self.full, self.fill_after_results = True, None  # once

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        self._refuse(sql)
        cursor = self.db.execute(sql, parameters)
        self._count(sql, 1)
        return cursor

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        self._refuse(sql)
        rows = list(rows)
        cursor = self.db.executemany(sql, rows)
        self._count(sql, len(rows))
        return cursor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def _sqlite_error(message: str, code: int) -> sqlite3.OperationalError:
    """The error SQLite raises, with its result code as the sqlite3 module attaches it."""
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code  # type: ignore[attr-defined]
    return error


@pytest.fixture()
def jobs_app(tiny_model: Glipv2Model, tmp_path: Path) -> Iterator[tuple[TestClient, Any]]:
    """A client of the real app, and its job runner (backing off 0.05 s, at most 0.2 s)."""
    settings = make_settings(tmp_path, job_concurrency=4, max_active_jobs=4)
    with TestClient(create_app(settings, TorchRuntime(tiny_model))) as client:
        runner = client.app.state.service.jobs  # type: ignore[attr-defined]
        runner.store_retry_s = (0.05, 0.2)
        yield client, runner


def wait_for(condition: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def job_inputs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "jobs" / "inputs").iterdir())


def test_a_full_disk_mid_job_is_503_for_jobs_only_and_loses_no_result(
        jobs_app: tuple[TestClient, Any], tmp_path: Path) -> None:
    client, runner = jobs_app
    store = runner.store
    disk = FailingDisk(store._db, fill_after_results=4)  # full after the first window
    store._db = disk
    submitted = client.post("/v1/jobs", json={"task": "detect", "params": {"classes": ["circle"]},
                                              "inputs": [{"image": IMAGE}] * 8})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    wait_for(lambda: disk.refused >= 2)  # the second window's results were refused, twice

    # Reads still work: the job runs, with the first window's results.
    status = client.get(f"/v1/jobs/{job_id}").json()
    assert status["state"] == "running" and status["progress"]["done"] == 4, status
    before = client.get(f"/v1/jobs/{job_id}/results").text.splitlines()
    assert len(before) == 4
    # Writes answer 503 with Retry-After, and change nothing.
    refused = client.post("/v1/jobs", json={"task": "caption", "inputs": [{"image": IMAGE}]})
    assert_error(refused, 503, "jobs_unavailable", "database or disk is full")
    assert int(refused.headers["retry-after"]) >= 1
    assert job_inputs(tmp_path) == [job_id]  # the refused job left no files behind
    assert_error(client.delete(f"/v1/jobs/{job_id}"), 503, "jobs_unavailable")
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "running"
    # Online requests are not affected.
    assert client.post("/v1/detect", json=DETECT).status_code == 200
    assert client.get("/readyz").status_code == 200
    # The runner waits with the window's results instead of computing them again.
    vision_batches = 'glipv2_engine_batch_size_count{engine="vision"}'
    batches = metric(client.get("/metrics").text, vision_batches)
    refusals = disk.refused
    time.sleep(1.0)
    assert metric(client.get("/metrics").text, vision_batches) == batches
    assert disk.refused - refusals <= 10  # backing off (0.2 s at most), not spinning
    # The database away altogether: reads answer 503 too.
    disk.away = True
    assert_error(client.get(f"/v1/jobs/{job_id}"), 503, "jobs_unavailable", "I/O error")
    assert_error(client.get("/v1/jobs"), 503, "jobs_unavailable")
    disk.away = False

    disk.full = False  # the disk has room again: the job completes, its results intact
    wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "done")
    after = client.get(f"/v1/jobs/{job_id}/results").text.splitlines()
    assert len(after) == 8 and after[:4] == before
    status = client.get(f"/v1/jobs/{job_id}").json()
    assert status["progress"]["succeeded"] == 8, status
    assert metric(client.get("/metrics").text, 'glipv2_job_inputs_total{result="ok"}') == 8.0
    assert client.post("/v1/jobs", json={"task": "caption",
                                         "inputs": [{"image": IMAGE}]}).status_code == 202


def test_a_read_only_job_store_is_503_until_it_is_writable(jobs_app: tuple[TestClient, Any],
                                                           tmp_path: Path) -> None:
    """SQLite's own read-only error (`PRAGMA query_only`: a chmod does not stop root)."""
    client, runner = jobs_app
    store = runner.store
    with store._lock:
        store._db.execute("PRAGMA query_only = 1")
    body = {"task": "detect", "params": {"classes": ["circle"]}, "inputs": [{"image": IMAGE}] * 2}
    refused = client.post("/v1/jobs", json=body)
    assert_error(refused, 503, "jobs_unavailable", "readonly database")
    assert int(refused.headers["retry-after"]) >= 1
    assert job_inputs(tmp_path) == []
    assert client.get("/v1/jobs").json() == {"jobs": []}
    assert client.post("/v1/detect", json=DETECT).status_code == 200
    assert client.get("/readyz").status_code == 200

    with store._lock:
        store._db.execute("PRAGMA query_only = 0")
    submitted = client.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "done")
    assert len(client.get(f"/v1/jobs/{job_id}/results").text.splitlines()) == 2


def test_results_are_503_when_the_store_fails_before_the_stream_and_cut_when_after(
        tiny_model: Glipv2Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over real HTTP (uvicorn): a results table that cannot be read before the first line is
    a 503 like every jobs route's; one that fails mid-stream ends the chunked body without its
    closing chunk, so the client sees an incomplete body, not a shorter list."""
    import uvicorn

    from service.routers import jobs as jobs_router

    monkeypatch.setattr(jobs_router, "_RESULTS_PAGE", 2)
    app = create_app(make_settings(tmp_path, job_concurrency=4), TorchRuntime(tiny_model))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started)
        base = f"http://127.0.0.1:{server.config.port}"
        with httpx.Client(base_url=base, timeout=60) as client:
            submitted = client.post("/v1/jobs", json={
                "task": "detect", "params": {"classes": ["circle"]},
                "inputs": [{"image": IMAGE}] * 4})
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "done")
            store = app.state.service.jobs.store
            disk = FailingDisk(store._db)
            store._db = disk

            disk.result_reads_left = 0
            assert_error(client.get(f"/v1/jobs/{job_id}/results"), 503, "jobs_unavailable",
                         "I/O error")
            disk.result_reads_left = 1  # the first page (2 lines) is read, the second fails
            received: list[str] = []
            with pytest.raises(httpx.RemoteProtocolError), \
                    client.stream("GET", f"/v1/jobs/{job_id}/results") as response:
                assert response.status_code == 200
                received.extend(response.iter_lines())
            assert len(received) == 2
            disk.result_reads_left = None
            lines = client.get(f"/v1/jobs/{job_id}/results").text.splitlines()
            assert [json.loads(line)["index"] for line in lines] == [0, 1, 2, 3]
            assert client.post("/v1/detect", json=DETECT).status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)
