"""Batch jobs on PostgreSQL, against a real server started by the test run (`postgres_server`):
the store's leases (claim, renew, reclaim after expiry, exactly one result under concurrent
claimers, cancellation across workers), versioned migrations, the REST resource on two apps
sharing one database, and two `glipv2 serve` processes on one database, one killed with SIGKILL
mid-job, the other finishing the job with every input answered exactly once."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
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
from service.jobs.store import JobInput, JobResult, JobSchemaError, JobState
from service.settings import ServiceSettings
from service.state import open_job_store

from conftest import start_server

psycopg = pytest.importorskip("psycopg", reason="psycopg is missing: pip install -e '.[postgres]'")
from service.jobs.postgres import SCHEMA_VERSION, PostgresJobStore  # noqa: E402  (needs psycopg)

CLASSES = ["circle", "square", "star"]


@pytest.fixture()
def database(postgres_server: Callable[[], str]) -> str:
    """An empty database of its own for each test."""
    return postgres_server()


@pytest.fixture()
def stores(database: str) -> Iterator[Callable[..., PostgresJobStore]]:
    """Opens stores (workers, as replicas would) on the test's database; closes them after."""
    opened: list[PostgresJobStore] = []

    def open_store(**options: Any) -> PostgresJobStore:
        store = PostgresJobStore(database, **options)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def world_png(index: int, seed: int = 3) -> bytes:
    buffer = io.BytesIO()
    render_index(seed, index).image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def workers(database: str, job_id: str) -> dict[str, int]:
    """Results per worker (the replica that computed them), read from the database."""
    with psycopg.connect(database) as connection:
        rows = connection.execute("SELECT worker, count(*) FROM job_results WHERE job_id = %s "
                                  "GROUP BY worker", (job_id,)).fetchall()
    return dict(rows)


# --- the store ----------------------------------------------------------------------------------


def test_store_round_trip_and_exactly_one_result(stores: Callable[..., PostgresJobStore]) -> None:
    store = stores()
    job = store.create("detect", {"classes": ["circle"]},
                       [JobInput(data=b"a\x00\xff"), JobInput(path="x/y.png"), JobInput(data=b"c")])
    assert (job.state, job.total, job.done, job.params) == (
        JobState.QUEUED, 3, 0, {"classes": ["circle"]})
    assert store.read_input(job.id, 0) == JobInput(data=b"a\x00\xff")  # bytes kept exactly
    assert store.read_input(job.id, 1) == JobInput(path="x/y.png")
    with pytest.raises(KeyError):
        store.read_input(job.id, 3)
    assert store.claim(job.id, 10) == []  # nothing is claimed before the job runs
    assert store.set_state(job.id, JobState.RUNNING)
    assert store.claim(job.id, 10) == [0, 1, 2]
    first = JobResult(1, True, '{"n": 1}')
    assert store.put_results(job.id, [first]) == [first]
    bad = JobResult(0, False, '{"code": "bad_image"}')
    assert store.put_results(job.id, [JobResult(1, True, '{"n": 2}'), bad]) == [bad]
    record = store.get(job.id)
    assert record is not None
    assert (record.succeeded, record.failed, record.done_since_start) == (1, 1, 2)
    assert store.claim(job.id, 10) == [2]  # released with the window's results
    assert not store.finish(job.id)
    store.put_results(job.id, [JobResult(2, True, "{}")])
    assert store.finish(job.id) and not store.finish(job.id)
    done = store.get(job.id)
    assert done is not None and done.state == JobState.DONE and done.finished_s is not None
    assert [(r.index, r.ok, r.body) for r in store.results(job.id)] == [
        (0, False, '{"code": "bad_image"}'), (1, True, '{"n": 1}'), (2, True, "{}")]
    assert [r.index for r in store.results(job.id, after=0, limit=1)] == [1]
    assert store.counts()[JobState.DONE] == 1 and store.unfinished() == []
    assert [j.id for j in store.recent()] == [job.id]
    assert store.purge(finished_before_s=time.time() + 1) == 1
    assert store.get(job.id) is None and store.results(job.id) == []


def test_leases_are_renewed_while_held_and_reclaimed_after_their_holder_dies(
        stores: Callable[..., PostgresJobStore]) -> None:
    lease_s = 1.0
    alive, dying, rescuer = (stores(lease_timeout_s=lease_s) for _ in range(3))
    job = alive.create("caption", {}, [JobInput(data=b"x")] * 6)
    assert alive.set_state(job.id, JobState.RUNNING)
    assert dying.claim(job.id, 3) == [0, 1, 2]
    assert alive.claim(job.id, 10) == [3, 4, 5]  # skips the other worker's leases
    assert rescuer.claim(job.id, 10) == []  # all held
    for _ in range(3):  # 1.2 s in all, past the lease timeout, but renewed meanwhile
        time.sleep(lease_s * 0.4)
        assert alive.renew(job.id)
    # `dying` never renewed: its leases expired and go to another worker; `alive` keeps its own
    assert rescuer.claim(job.id, 10) == [0, 1, 2]
    late = [JobResult(i, True, '{"by": "dying"}') for i in (0, 1)]
    assert dying.put_results(job.id, late) == late  # computed twice: the first result stays
    redone = [JobResult(i, True, '{"by": "rescuer"}') for i in range(3)]
    assert [r.index for r in rescuer.put_results(job.id, redone)] == [2]
    assert not rescuer.finish(job.id)
    alive.put_results(job.id, [JobResult(i, True, '{"by": "alive"}') for i in range(3, 6)])
    assert alive.finish(job.id)
    assert [r.body for r in alive.results(job.id)] == [
        '{"by": "dying"}'] * 2 + ['{"by": "rescuer"}'] + ['{"by": "alive"}'] * 3
    record = alive.get(job.id)
    assert record is not None and (record.succeeded, record.state) == (6, JobState.DONE)


def test_two_concurrent_claimers_compute_every_input_exactly_once(
        stores: Callable[..., PostgresJobStore], database: str) -> None:
    first, second = stores(), stores()
    job = first.create("detect", {"classes": CLASSES}, [JobInput(data=b"x")] * 200)
    assert first.set_state(job.id, JobState.RUNNING)
    claimed: dict[str, list[int]] = {first.worker: [], second.worker: []}
    finished: list[bool] = []
    start = threading.Barrier(2)

    def work(store: PostgresJobStore) -> None:
        start.wait()
        while window := store.claim(job.id, 4):
            claimed[store.worker] += window
            time.sleep(0.002)  # "inference": lets the other worker interleave
            store.put_results(job.id, [JobResult(i, True, "{}") for i in window])
        finished.append(store.finish(job.id))

    threads = [threading.Thread(target=work, args=(store,)) for store in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    both = claimed[first.worker] + claimed[second.worker]
    assert sorted(both) == list(range(200))  # no input claimed twice, none left out
    assert claimed[first.worker] and claimed[second.worker]
    assert sorted(finished) == [False, True]  # one of them marked it done
    assert [r.index for r in first.results(job.id, limit=500)] == list(range(200))
    assert workers(database, job.id) == {w: len(c) for w, c in claimed.items()}
    record = first.get(job.id)
    assert record is not None and (record.state, record.done) == (JobState.DONE, 200)


def test_cancel_on_one_worker_stops_the_others(stores: Callable[..., PostgresJobStore]) -> None:
    worker, canceller = stores(), stores()
    job = worker.create("caption", {}, [JobInput(data=b"x")] * 8)
    assert worker.set_state(job.id, JobState.RUNNING)
    window = worker.claim(job.id, 4)
    assert worker.renew(job.id)
    assert canceller.set_state(job.id, JobState.CANCELLED)
    assert not worker.renew(job.id)  # the runner drops its window at its next renewal
    assert worker.put_results(job.id, [JobResult(i, True, "{}") for i in window]) == []
    assert canceller.claim(job.id, 4) == [] and not worker.finish(job.id)
    record = canceller.get(job.id)
    assert record is not None and (record.state, record.done) == (JobState.CANCELLED, 0)
    assert not worker.set_state(job.id, JobState.RUNNING)  # finished jobs stay finished


def test_migrations_are_versioned_and_a_newer_database_is_refused(
        stores: Callable[..., PostgresJobStore], database: str) -> None:
    store = stores()
    with psycopg.connect(database) as connection:
        assert connection.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION,)]
    job = store.create("caption", {}, [JobInput(data=b"x")])
    stores()  # a second start migrates nothing and keeps the jobs
    assert store.get(job.id) is not None
    with psycopg.connect(database) as connection:
        connection.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(JobSchemaError, match=rf"schema version {SCHEMA_VERSION + 1}, newer than "
                                             rf"this service's {SCHEMA_VERSION}"):
        PostgresJobStore(database)
    with pytest.raises(JobSchemaError):  # the service refuses it before starting its engines
        open_job_store(ServiceSettings(jobs_database_url=database))


# --- the REST resource on two replicas ------------------------------------------------------------


def test_two_apps_on_one_database_share_jobs_and_cancels(tiny_model: Glipv2Model,
                                                          database: str) -> None:
    settings = ServiceSettings(model_name="tiny", api_keys=[], jobs_database_url=database,
                               job_lease_timeout_s=0.6, job_concurrency=2)
    image = b64(world_png(0))
    with TestClient(create_app(settings, TorchRuntime(tiny_model))) as first, \
            TestClient(create_app(settings, TorchRuntime(tiny_model))) as second:
        inputs = [{"image": image}, {"image": "not base64 !!"}, {"image": b64(world_png(1))}]
        submitted = first.post("/v1/jobs", json={"task": "detect",
                                                 "params": {"classes": CLASSES},
                                                 "inputs": inputs})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        deadline = time.monotonic() + 60
        while (status := second.get(f"/v1/jobs/{job_id}").json())["state"] != "done":
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert status["progress"] | {"rate_per_s": None, "eta_s": None} == {
            "total": 3, "done": 3, "succeeded": 2, "failed": 1, "rate_per_s": None,
            "eta_s": None}
        lines = [json.loads(line) for line in
                 second.get(f"/v1/jobs/{job_id}/results").text.splitlines()]
        assert [line["index"] for line in lines] == [0, 1, 2]
        assert lines[1]["error"]["code"] == "bad_image"
        online = first.post("/v1/detect", json={"image": image, "classes": CLASSES}).json()
        assert sorted(d["label"] for d in lines[0]["result"]["detections"]) == sorted(
            d["label"] for d in online["detections"])

        long = first.post("/v1/jobs", json={"task": "detect", "params": {"classes": CLASSES},
                                             "inputs": [{"image": image}] * 200})
        long_id = long.json()["id"]
        deadline = time.monotonic() + 60
        while first.get(f"/v1/jobs/{long_id}").json()["progress"]["done"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        cancelled = second.delete(f"/v1/jobs/{long_id}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        done_then = cancelled.json()["progress"]["done"]
        time.sleep(1.0)  # past a lease renewal on every replica
        after = first.get(f"/v1/jobs/{long_id}").json()
        assert after["state"] == "cancelled" and after["progress"]["done"] == done_then
        assert first.delete(f"/v1/jobs/{long_id}").status_code == 409


# --- two real servers, one killed -----------------------------------------------------------------


@pytest.mark.slow
def test_two_servers_share_a_job_and_one_killed_mid_job_loses_nothing(
        tiny_model: Glipv2Model, database: str, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    save_model(tiny_model, model_dir, external_language=True)
    env = {"GLIPV2_JOBS_DATABASE_URL": database, "GLIPV2_JOB_LEASE_TIMEOUT_S": "3",
           "GLIPV2_THREADS": "1"}
    args = ["--model", str(model_dir), "--runtime", "pytorch"]
    images = [world_png(i) for i in range(200)]
    survivor, base = start_server(args, env, ready_timeout_s=120)
    victim, _ = start_server(args, env, ready_timeout_s=120)
    victim_tag = f":{victim.pid}:"
    try:
        with httpx.Client(base_url=base, timeout=60) as http, \
                psycopg.connect(database, autocommit=True) as db:
            submitted = http.post("/v1/jobs", json={
                "task": "detect", "params": {"classes": CLASSES},
                "inputs": [{"image": b64(d)} for d in images]})
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            deadline = time.monotonic() + 120
            while True:  # both replicas at work, the victim holding leases: kill it
                by = workers(database, job_id)
                held = db.execute("SELECT count(*) FROM job_inputs WHERE lease_owner LIKE %s",
                                  (f"%{victim_tag}%",)).fetchone()
                if len(by) == 2 and min(by.values()) >= 10 and held and held[0]:
                    break
                assert time.monotonic() < deadline, by
                time.sleep(0.01)
            victim.kill()  # SIGKILL: no drain, its leases stay until they expire
            victim.wait()
            killed_at = time.monotonic()
            orphans = [row[0] for row in db.execute(
                "SELECT idx FROM job_inputs WHERE lease_owner LIKE %s", (f"%{victim_tag}%",))]
            assert orphans  # a window died with it
            status = http.get(f"/v1/jobs/{job_id}").json()
            assert status["state"] == "running" and status["progress"]["done"] < 200
            while (status := http.get(f"/v1/jobs/{job_id}").json())["state"] != "done":
                assert time.monotonic() < killed_at + 120, status
                time.sleep(0.1)
            assert status["progress"]["done"] == status["progress"]["succeeded"] == 200
            lines = http.get(f"/v1/jobs/{job_id}/results").text.splitlines()
            assert [line.startswith(f'{{"index": {i}, "result": ') for i, line in
                    enumerate(lines)] == [True] * 200  # once each, in input order
            by = workers(database, job_id)
            assert len(by) == 2 and sum(by.values()) == 200  # both computed some
            survivor_worker = next(w for w in by if victim_tag not in w)
            redone = db.execute("SELECT count(*) FROM job_results WHERE job_id = %s AND "
                                "idx = ANY(%s) AND worker = %s",
                                (job_id, orphans, survivor_worker)).fetchone()
            assert redone == (len(orphans),)  # the dead replica's window, redone
    finally:
        for process in (survivor, victim):
            if process.poll() is None:
                process.terminate()
                process.wait(30)
