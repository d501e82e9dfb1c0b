"""`glipv2 bench batch`: images/s of bulk inference on Ray Data (`glipv2 batch run`) against a
`/v1/jobs` job over the same world images, on the same model and runtime, side by side.

The job first: `glipv2 serve` is started (not timed) and warmed with one request, and the job is
timed from its submission (the images going up as base64 in one request) to done. The server
is stopped, then the same images, written as PNG files to a folder, go through `run_bulk` (what
`glipv2 batch run` runs) on a local Ray started for it, timed whole: Ray's start and the actors'
model loading are in it, and its pace after the first answers is given too. Every input must be
answered without an error on both sides.
"""

from __future__ import annotations

import base64
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.load import world_pngs
from benchmarks.local_server import local_server
from engines.kinds import RuntimeKind
from model_export.data.world import SHAPES
from service.bulk.output import read_results
from service.bulk.run import BulkOptions, BulkSummary, run_bulk
from service.jobs.client import JobClient
from service.settings import ServiceSettings

_PARAMS = {"classes": list(SHAPES)}
_POLL_S = 0.1


@dataclass
class BatchBench:
    images: int
    job_s: float
    batch: BulkSummary
    options: BulkOptions


def bench_batch(images: int = 500, model_dir: str | None = None,
                runtime: RuntimeKind | None = None, engines: str | None = None,
                threads: int | None = None, options: BulkOptions | None = None) -> BatchBench:
    options = options or BulkOptions(progress=False)
    pngs = world_pngs(images, 3000)
    serve_args = [str(part) for flag, value in (("--runtime", runtime), ("--engines", engines),
                                                 ("--threads", threads))
                  if value is not None for part in (flag, value)]
    with local_server(model_dir, serve_args) as url:
        httpx.post(f"{url}/v1/detect", json={"image": base64.b64encode(pngs[0]).decode(),
                                             **_PARAMS}, timeout=300).raise_for_status()
        jobs = JobClient(url)
        try:
            started = time.perf_counter()
            job = jobs.submit("detect", _PARAMS, pngs)
            status = jobs.wait(job["id"], poll_s=_POLL_S, progress=False)
            job_s = time.perf_counter() - started
        finally:
            jobs.close()
        if status["state"] != "done" or status["progress"]["failed"]:
            raise RuntimeError(f"the job did not finish cleanly: {status}")
    overrides = {key: value for key, value in {
        "model_dir": model_dir, "runtime": runtime, "engine_dir": engines,
        "threads": threads}.items() if value is not None}
    settings = ServiceSettings(**overrides)  # type: ignore[arg-type]  # pydantic converts them
    with tempfile.TemporaryDirectory(prefix="glipv2-bench-batch-") as folder:
        inputs, out = Path(folder) / "images", Path(folder) / "out"
        inputs.mkdir()
        for index, data in enumerate(pngs):
            (inputs / f"{index:05d}.png").write_bytes(data)
        summary = run_bulk(str(inputs), "detect", _PARAMS, out, settings, options)
        rows = read_results(out)
        if rows.num_rows != images or rows.column("error").null_count != images:
            raise RuntimeError(f"the batch run answered {rows.num_rows} of {images} images, "
                               f"{images - rows.column('error').null_count} with an error")
    return BatchBench(images, job_s, summary, options)


def format_batch(bench: BatchBench) -> str:
    job_rate = bench.images / bench.job_s
    batch, options = bench.batch, bench.options
    steady = batch.steady_rate_per_s
    lines = [f"{bench.images} world images, detection of the {len(SHAPES)} shapes",
             "path | wall s | images/s | vs the job", "--- | --- | --- | ---",
             f"/v1/jobs job (server warm; submit to done) | {bench.job_s:.1f} | {job_rate:.2f} "
             "| 1.00x",
             f"glipv2 batch run (actors {options.min_actors}:{options.max_actors or ''}, "
             f"{options.num_cpus:g} CPU each; Ray start and model loading included) | "
             f"{batch.elapsed_s:.1f} | "
             f"{batch.rate_per_s:.2f} | {batch.rate_per_s / job_rate:.2f}x"]
    if steady is not None and batch.first_answer_s is not None:
        lines.append(f"glipv2 batch run after its first answers (at {batch.first_answer_s:.1f} "
                     f"s) | {batch.elapsed_s - batch.first_answer_s:.1f} | {steady:.2f} | "
                     f"{steady / job_rate:.2f}x")
    return "\n".join(lines)
