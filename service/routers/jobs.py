"""`/v1/jobs`: batch work over REST. Submit many inputs for one task, watch progress, stream the
results as JSON Lines (in input order, partial while running), cancel. Jobs live in the durable
store (`service/jobs/`) and survive restarts; their work runs behind online traffic. While the
store cannot be read or written (disk full, read-only, database away) every route answers 503
`jobs_unavailable` with Retry-After; the online endpoints are not affected."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute

from service.dependencies import JobsDep, ServingDep, StateDep
from service.errors import (
    ConflictError,
    FeatureDisabledError,
    InvalidRequestError,
    JobsUnavailableError,
    NotFoundError,
    TooManyJobsError,
)
from service.jobs.runner import JobRunner, resolve_input_path, validate_params
from service.jobs.store import JobInput, JobRecord, JobState, JobStoreUnavailableError
from service.routers.common import read_json, request_body
from service.schemas import JobList, JobProgress, JobRequest, JobStatus, error_responses


class _StoreErrorsAre503(APIRoute):
    """A route whose `JobStoreUnavailableError` (from the store, anywhere in the handler or its
    dependencies) answers 503 `jobs_unavailable` instead of a 500."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except JobStoreUnavailableError as exc:
                raise JobsUnavailableError(f"batch jobs are unavailable now ({exc}); online "
                                           "requests are served, retry the jobs API later"
                                           ) from exc

        return route


router = APIRouter(tags=["jobs"], route_class=_StoreErrorsAre503)

_RESULTS_PAGE = 200
_RETRY_AFTER_S = 30


def job_status(job: JobRecord, now_s: float | None = None) -> JobStatus:
    rate = eta = None
    if job.state == JobState.RUNNING and job.started_s is not None:
        elapsed = (time.time() if now_s is None else now_s) - job.started_s
        if elapsed > 0 and job.done_since_start:
            rate = job.done_since_start / elapsed
            eta = (job.total - job.done) / rate
    return JobStatus(
        id=job.id, task=job.task, state=job.state.value,
        created_s=job.created_s, finished_s=job.finished_s, error=job.error,
        progress=JobProgress(total=job.total, done=job.done, succeeded=job.succeeded,
                             failed=job.failed, rate_per_s=_round(rate), eta_s=_round(eta)))


@router.post(
    "/v1/jobs", operation_id="submitJob",
    status_code=202, response_model=JobStatus, response_model_exclude_none=True,
    summary="Submit a batch job (many inputs, one task)",
    responses=error_responses(400, 401, 403, 404, 413, 422, 429, 503),
    openapi_extra=request_body(JobRequest),
)
async def submit_job(request: Request, response: Response, state: StateDep,
                     serving: ServingDep, jobs: JobsDep) -> JobStatus:
    settings = state.settings
    job = (await read_json(request, JobRequest)).root
    params = job.params.model_dump(exclude_unset=True)  # as sent: what the job replays
    if len(job.inputs) > settings.max_job_inputs:
        raise InvalidRequestError(f"inputs has {len(job.inputs)} items, more than the limit of "
                                  f"{settings.max_job_inputs} per job")
    validate_params(job.task, params, serving)
    inputs = []
    for index, item in enumerate(job.inputs):
        if item.path is not None:
            if settings.job_input_dir is None:
                raise FeatureDisabledError(f"inputs[{index}].path: file inputs are not enabled "
                                          "on this server; send the image inline")
            try:
                resolve_input_path(settings.job_input_dir, item.path)
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"inputs[{index}].{exc.message}") from None
            inputs.append(JobInput(path=item.path))
        else:
            assert item.image is not None  # the schema guarantees exactly one source
            inputs.append(JobInput(data=item.image.encode("utf-8")))
    counts = await asyncio.to_thread(jobs.store.counts)
    active = counts[JobState.QUEUED] + counts[JobState.RUNNING]
    if active >= settings.max_active_jobs:
        raise TooManyJobsError(f"{active} jobs are queued or running, the limit; retry when "
                               "one has finished", headers={"Retry-After": str(_RETRY_AFTER_S)})
    record = await asyncio.to_thread(jobs.store.create, job.task, params, inputs)
    jobs.wake()
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    return job_status(record)


@router.get("/v1/jobs", operation_id="listJobs",
            response_model=JobList, response_model_exclude_none=True,
            summary="List jobs, newest first", responses=error_responses(401, 503))
async def list_jobs(jobs: JobsDep) -> JobList:
    records = await asyncio.to_thread(jobs.store.recent, 100)
    return JobList(jobs=[job_status(r) for r in records])


@router.get("/v1/jobs/{job_id}", operation_id="getJob",
            response_model=JobStatus, response_model_exclude_none=True,
            summary="A job's state and progress", responses=error_responses(401, 404, 503))
async def get_job(job_id: str, jobs: JobsDep) -> JobStatus:
    return job_status(await _job(jobs, job_id))


@router.get(
    "/v1/jobs/{job_id}/results", operation_id="getJobResults",
    summary="A job's results as JSON Lines, in input order",
    description="One line per input that has a result: `{\"index\", \"result\"}` with the online "
                "endpoint's response, or `{\"index\", \"error\": {\"code\", \"message\"}}` for a "
                "bad input. While the job runs, the lines finished so far.",
    responses={200: {"content": {"application/x-ndjson": {}}},
               **error_responses(401, 404, 503)},
    response_class=StreamingResponse,
)
async def job_results(job_id: str, jobs: JobsDep) -> StreamingResponse:
    await _job(jobs, job_id)
    # The first page is read before the status line goes out: a store that fails now is a 503
    # like every jobs route's. One that fails later, mid-stream, can no longer change the
    # status: the stream then ends without its closing chunk, which HTTP clients report as an
    # incomplete body, never as a shorter list of results.
    first = await asyncio.to_thread(jobs.store.results, job_id, -1, _RESULTS_PAGE)

    async def lines() -> AsyncIterator[bytes]:
        page = first
        while page:
            chunk = []
            for result in page:
                key = "result" if result.ok else "error"
                chunk.append(f'{{"index": {result.index}, "{key}": {result.body}}}\n')
            yield "".join(chunk).encode()
            page = await asyncio.to_thread(jobs.store.results, job_id, page[-1].index,
                                           _RESULTS_PAGE)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.delete("/v1/jobs/{job_id}", operation_id="cancelJob",
               response_model=JobStatus, response_model_exclude_none=True,
               summary="Cancel a queued or running job (its results so far stay)",
               responses=error_responses(401, 404, 409, 503))
async def cancel_job(job_id: str, jobs: JobsDep) -> JobStatus:
    job = await _job(jobs, job_id)
    if job.state.finished:
        raise ConflictError(f"job {job_id} is already {job.state.value}")
    await jobs.cancel(job_id)
    return job_status(await _job(jobs, job_id))


async def _job(jobs: JobRunner, job_id: str) -> JobRecord:
    record = await asyncio.to_thread(jobs.store.get, job_id)
    if record is None:
        raise NotFoundError(f"no job {job_id!r} (unknown, or its results expired)")
    return record


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 3)


