"""`glipv2 bench jobs`: online latency with and without a batch job running, side by side.

Phase 1 sends `requests` detection requests at `concurrency` (closed loop: each worker sends
the next when its answer arrives) to an idle server. Phase 2 submits a job of `job_images` world
images, waits until it is running, and sends the same online load while it runs. Both phases use
the same images and prompt; the report gives p50 / p90 / p99 per phase, their ratio (the
target: p99 with the job <= 2x without) and the job's throughput meanwhile.

Without `--url` it starts `glipv2 serve` on the default model (a temporary job store) and stops
it afterwards.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from benchmarks.load import online_load, world_pngs
from model_export.data.world import SHAPES
from service.jobs.client import JobClient


@dataclass
class Phase:
    name: str
    latencies_s: list[float]
    job_rate_per_s: float | None = None

    def quantile_ms(self, q: float) -> float:
        return float(np.quantile(np.asarray(self.latencies_s), q)) * 1000.0


def bench_jobs(url: str, requests: int = 80, concurrency: int = 4, job_images: int = 500
               ) -> tuple[Phase, Phase]:
    online_images = world_pngs(16)
    alone = Phase("online alone", asyncio.run(online_load(url, online_images, requests,
                                                          concurrency))[0])
    jobs = JobClient(url)
    try:
        job = jobs.submit("detect", {"classes": list(SHAPES)}, world_pngs(job_images, 1000))
        while jobs.status(job["id"])["progress"]["done"] == 0:
            time.sleep(0.1)
        before = jobs.status(job["id"])["progress"]["done"]
        started = time.perf_counter()
        latencies, _ = asyncio.run(online_load(url, online_images, requests, concurrency))
        status = jobs.status(job["id"])
        elapsed = time.perf_counter() - started
        if status["state"] == "done":
            raise RuntimeError("the job finished before the online load did: raise job_images")
        with_job = Phase(f"online + {job_images}-image job", latencies,
                         job_rate_per_s=(status["progress"]["done"] - before) / elapsed)
        jobs.cancel(job["id"])
    finally:
        jobs.close()
    return alone, with_job


def format_phases(alone: Phase, with_job: Phase, concurrency: int) -> str:
    lines = [f"online detection at concurrency {concurrency}, {len(alone.latencies_s)} requests "
             "per phase (ms)", "phase | p50 | p90 | p99 | job inputs/s",
             "--- | --- | --- | --- | ---"]
    for phase in (alone, with_job):
        rate = "-" if phase.job_rate_per_s is None else f"{phase.job_rate_per_s:.2f}"
        lines.append(f"{phase.name} | {phase.quantile_ms(0.5):.0f} | {phase.quantile_ms(0.9):.0f} "
                     f"| {phase.quantile_ms(0.99):.0f} | {rate}")
    ratio = with_job.quantile_ms(0.99) / alone.quantile_ms(0.99)
    lines.append(f"p99 with the job / alone: {ratio:.2f}x (target <= 2x)")
    return "\n".join(lines)
