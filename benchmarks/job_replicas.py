"""`glipv2 bench job-replicas`: one batch job on 1 and on 2 replicas sharing a PostgreSQL job
store, and the time the survivor takes to reclaim a killed replica's leases.

Each phase starts its servers (`glipv2 serve` on `model`, `GLIPV2_JOBS_DATABASE_URL` set), warms
each with one online request, submits a job of `job_images` world images to the first and times
it from submission to done; `rounds` alternate 1 and 2 replicas, so the machine's slow spells
fall on both sides of the ratio. The reclaim phase starts two servers, submits a job, SIGKILLs the
second while it holds leases, and reads the database until every input it held was claimed by
the survivor (and until those inputs had results): about the lease timeout after the victim's
last renewal, plus the survivor's poll interval and the window it was running.
"""

from __future__ import annotations

import base64
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import psycopg

from benchmarks.load import world_pngs
from benchmarks.local_server import spawn_server
from model_export.data.world import SHAPES
from service.jobs.client import JobClient

_POLL_S = 0.05


@dataclass
class ReplicaBench:
    job_images: int
    lease_timeout_s: float
    rates_per_s: dict[int, list[float]]  # replicas -> job inputs per second, per round
    reclaimed_s: float  # SIGKILL -> every input the victim held claimed by the survivor
    redone_s: float  # SIGKILL -> every input the victim held answered
    orphans: int  # inputs the victim held when it died


def bench_job_replicas(database_url: str, job_images: int = 200, lease_timeout_s: float = 30.0,
                       model_dir: str | None = None, serve_args: Sequence[str] = (),
                       rounds: int = 2) -> ReplicaBench:
    args = [*serve_args, *(["--model", model_dir] if model_dir else [])]
    env = {"GLIPV2_JOBS_DATABASE_URL": database_url,
           "GLIPV2_JOB_LEASE_TIMEOUT_S": str(lease_timeout_s)}
    images = world_pngs(job_images, 2000)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for replicas, measured in rates.items():
            servers = _start(args, env, replicas)
            try:
                started = time.perf_counter()
                _run_job(servers[0][1], images, wait=True)
                measured.append(job_images / (time.perf_counter() - started))
            finally:
                _stop(servers)
    servers = _start(args, env, 2)
    try:
        reclaimed, redone, orphans = _kill_mid_job(database_url, servers, images)
    finally:
        _stop(servers)
    return ReplicaBench(job_images, lease_timeout_s, rates, reclaimed, redone, orphans)


def format_replicas(bench: ReplicaBench) -> str:
    means = {n: sum(rates) / len(rates) for n, rates in bench.rates_per_s.items()}
    lines = [f"one {bench.job_images}-image detection job, replicas sharing PostgreSQL",
             "replicas | job inputs/s per round | mean | vs 1 replica", "--- | --- | --- | ---"]
    for replicas, rates in bench.rates_per_s.items():
        each = ", ".join(f"{rate:.2f}" for rate in rates)
        lines.append(f"{replicas} | {each} | {means[replicas]:.2f} | "
                     f"{means[replicas] / means[1]:.2f}x")
    lines.append(f"a replica killed holding {bench.orphans} inputs (lease timeout "
                 f"{bench.lease_timeout_s:g} s): reclaimed after {bench.reclaimed_s:.1f} s, "
                 f"answered after {bench.redone_s:.1f} s")
    return "\n".join(lines)


def _start(args: list[str], env: dict[str, str], count: int
           ) -> list[tuple[subprocess.Popen[str], str]]:
    servers = []
    try:
        for _ in range(count):
            process, url = spawn_server(args, {**os.environ, **env})
            servers.append((process, url))
            image = base64.b64encode(world_pngs(1)[0]).decode()
            httpx.post(f"{url}/v1/detect", json={"image": image, "classes": list(SHAPES)},
                       timeout=120).raise_for_status()  # warm-up
    except BaseException:
        _stop(servers)
        raise
    return servers


def _stop(servers: list[tuple[subprocess.Popen[str], str]]) -> None:
    for process, _ in servers:
        if process.poll() is None:
            process.terminate()
            process.wait(60)


def _run_job(url: str, images: list[bytes], wait: bool) -> str:
    jobs = JobClient(url)
    try:
        job_id: str = jobs.submit("detect", {"classes": list(SHAPES)}, images)["id"]
        if wait:
            status = jobs.wait(job_id, poll_s=_POLL_S, progress=False)
            if status["state"] != "done" or status["progress"]["failed"]:
                raise RuntimeError(f"the job did not finish cleanly: {status}")
    finally:
        jobs.close()
    return job_id


def _kill_mid_job(database_url: str, servers: list[tuple[subprocess.Popen[str], str]],
                  images: list[bytes]) -> tuple[float, float, int]:
    (_, url), (victim, _) = servers
    job_id = _run_job(url, images, wait=False)
    victim_tag = f"%:{victim.pid}:%"  # worker ids are host:pid:random
    with psycopg.connect(database_url, autocommit=True) as db:
        def victim_inputs(table: str, column: str) -> list[int]:
            return [row[0] for row in db.execute(
                f"SELECT idx FROM {table} WHERE job_id = %s AND {column} LIKE %s",
                (job_id, victim_tag))]

        while not victim_inputs("job_results", "worker"):
            time.sleep(_POLL_S)  # the victim is at work
        while not victim_inputs("job_inputs", "lease_owner"):
            time.sleep(0.005)  # ... and holds a window
        victim.kill()
        victim.wait()
        killed = time.perf_counter()
        orphans = victim_inputs("job_inputs", "lease_owner")
        while victim_inputs("job_inputs", "lease_owner"):
            time.sleep(_POLL_S)
        reclaimed = time.perf_counter() - killed
        while db.execute("SELECT count(*) FROM job_inputs WHERE job_id = %s AND idx = ANY(%s) "
                         "AND NOT done", (job_id, orphans)).fetchone() != (0,):
            time.sleep(_POLL_S)
        redone = time.perf_counter() - killed
    return reclaimed, redone, len(orphans)
