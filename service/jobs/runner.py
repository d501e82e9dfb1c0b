"""The job runner: works through stored jobs, one at a time, on the online path at low priority.

Each input goes through the same serving methods as the online endpoints, with
`PRIORITY_BATCH`: the engines' batchers put online requests first and fill spare batch slots with
job work, so a running job costs online traffic little latency. The runner keeps one window of
inputs in flight (`concurrency`, a batch's worth); results are stored as each window completes.

Restarts: everything is read back from the store. Inputs without a result are simply pending, so
a job killed mid-window redoes only that window, and the store's (job, index) key keeps every
input at exactly one result. A bad input gets an error result (the code and message the online
endpoint would have answered) and the job goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, ValidationError

from service.batching import (
    PRIORITY_BATCH,
    BatcherStoppedError,
    BatchExecutionError,
    QueueFullError,
)
from service.errors import InvalidRequestError, ServiceError, format_validation_errors
from service.jobs.store import JobRecord, JobResult, JobState, JobStore
from service.schemas import TASK_PARAMS
from service.serving import Glipv2Serving

log = logging.getLogger(__name__)

Decode = Callable[[bytes | str], Awaitable[Image.Image]]
_QUEUE_FULL_BACKOFF_S = 0.05
_PURGE_EVERY_S = 60.0


def validate_params(task: str, params: dict[str, Any], serving: Glipv2Serving) -> Any:
    """The task's parameters as the online endpoint checks them; raises InvalidRequestError."""
    try:
        parsed = TASK_PARAMS[task].model_validate(params)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        for error in errors:
            error["loc"] = ("params", *error["loc"])
        raise InvalidRequestError(format_validation_errors(errors)) from None
    prepare: dict[str, Callable[[Any], Any]] = {
        "detect": serving.prepare_detect, "segment": serving.prepare_segment,
        "vqa": serving.prepare_vqa, "caption": lambda _: serving.prepare_caption()}
    query = prepare[task](parsed)
    return query if task == "detect" else parsed


class JobRunner:
    """Owns the background loop; routes call `wake()` after a submit and `cancel()` on DELETE."""

    def __init__(self, store: JobStore, serving: Glipv2Serving, decode: Decode, *,
                 concurrency: int, input_dir: Path | None, results_ttl_s: float,
                 on_change: Callable[[dict[JobState, int]], None] | None = None,
                 on_input: Callable[[bool], None] | None = None) -> None:
        self.store = store
        self.serving = serving
        self.decode = decode
        self.concurrency = concurrency
        self.input_dir = input_dir
        self.results_ttl_s = results_ttl_s
        self._on_change = on_change
        self._on_input = on_input
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._current: str | None = None
        self._window: list[asyncio.Task[JobResult | None]] = []
        self._last_purge_s = 0.0

    async def start(self) -> None:
        await self._publish()
        self._task = asyncio.create_task(self._run(), name="glipv2-job-runner")

    async def stop(self) -> None:
        """Stop at once: the window in flight is dropped unstored and redone after a restart."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def wake(self) -> None:
        self._wakeup.set()

    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; its window in flight is withdrawn from the queues."""
        cancelled = await asyncio.to_thread(self.store.set_state, job_id, JobState.CANCELLED)
        if cancelled and self._current == job_id:
            for task in self._window:
                task.cancel()
        await self._publish()
        return cancelled

    # --- the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._purge_if_due()
                jobs = await asyncio.to_thread(self.store.unfinished)
                if not jobs:
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), _PURGE_EVERY_S)
                    continue
                await self._work(jobs[0])
            except asyncio.CancelledError:
                raise
            except BatcherStoppedError:
                return  # the engines are stopping: what is left resumes after the restart
            except Exception:  # a bug must not end job processing for good
                log.exception("job runner failed; retrying in 1 s")
                await asyncio.sleep(1.0)

    async def _work(self, job: JobRecord) -> None:
        await asyncio.to_thread(self.store.set_state, job.id, JobState.RUNNING)
        await self._publish()
        try:
            prepared = validate_params(job.task, job.params, self.serving)
        except ServiceError as exc:  # e.g. a tuned prompt no longer registered after a restart
            await asyncio.to_thread(self.store.set_state, job.id, JobState.FAILED, exc.message)
            await self._publish()
            return
        self._current = job.id
        try:
            while True:
                pending = await asyncio.to_thread(self.store.pending, job.id, self.concurrency)
                if not pending:
                    await asyncio.to_thread(self.store.set_state, job.id, JobState.DONE)
                    break
                self._window = [asyncio.create_task(self._one(job, index, prepared))
                                for index in pending]
                outcomes = await asyncio.gather(*self._window, return_exceptions=True)
                for outcome in outcomes:
                    if isinstance(outcome, BatcherStoppedError):
                        raise outcome
                stored = [o for o in outcomes if isinstance(o, JobResult)]
                if not await asyncio.to_thread(self._store_results, job.id, stored):
                    break  # cancelled (or purged) meanwhile
        finally:
            self._current, self._window = None, []
            await self._publish()

    def _store_results(self, job_id: str, results: list[JobResult]) -> bool:
        """Store a window's results; False (nothing stored) once the job is no longer running:
        a cancelled job keeps what it had."""
        job = self.store.get(job_id)
        if job is None or job.state != JobState.RUNNING:
            return False
        for result in results:
            if self.store.put_result(job_id, result) and self._on_input is not None:
                self._on_input(result.ok)
        return True

    async def _one(self, job: JobRecord, index: int, prepared: Any) -> JobResult | None:
        """One input through the online path; an error result for a bad input."""
        try:
            image = await self.decode(await self._source(job.id, index))
            while True:
                try:
                    response = await self._infer(job.task, prepared, image)
                    break
                except QueueFullError:
                    await asyncio.sleep(_QUEUE_FULL_BACKOFF_S)
        except ServiceError as exc:
            return _error_result(index, exc.code, exc.message)
        except BatchExecutionError:
            log.exception("job %s input %d: inference failed", job.id, index)
            return _error_result(index, "inference_failed", "inference failed; see the log")
        return JobResult(index=index, ok=True,
                         body=response.model_dump_json(exclude_none=True))

    async def _source(self, job_id: str, index: int) -> bytes | str:
        item = await asyncio.to_thread(self.store.read_input, job_id, index)
        if item.data is not None:
            return item.data.decode("utf-8")  # the `image` string, as the online body has it
        if self.input_dir is None:
            raise InvalidRequestError("file inputs are not enabled on this server")
        path = resolve_input_path(self.input_dir, item.path or "")
        try:
            return await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise InvalidRequestError(f"cannot read {item.path!r}: {exc.strerror}") from None

    async def _infer(self, task: str, prepared: Any, image: Image.Image) -> BaseModel:
        serving, priority = self.serving, PRIORITY_BATCH
        if task == "detect":
            return await serving.detect(prepared, image, priority)
        if task == "segment":
            return await serving.segment(prepared, image, priority)
        if task == "vqa":
            return await serving.vqa(prepared, image, priority)
        return await serving.caption(image, priority)

    async def _purge_if_due(self) -> None:
        now = time.time()
        if now - self._last_purge_s < _PURGE_EVERY_S:
            return
        self._last_purge_s = now
        purged = await asyncio.to_thread(self.store.purge, now - self.results_ttl_s)
        if purged:
            log.info("purged %d finished jobs older than %.0f s", purged, self.results_ttl_s)
            await self._publish()

    async def _publish(self) -> None:
        if self._on_change is not None:
            self._on_change(await asyncio.to_thread(self.store.counts))


def resolve_input_path(input_dir: Path, relative: str) -> Path:
    """`relative` under `input_dir`, refusing absolute paths and any escape (.., symlinks)."""
    root = input_dir.resolve()
    if not relative or Path(relative).is_absolute():
        raise InvalidRequestError(f"path {relative!r} must be relative to the input folder")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise InvalidRequestError(f"path {relative!r} leaves the input folder")
    return path


def _error_result(index: int, code: str, message: str) -> JobResult:
    return JobResult(index=index, ok=False,
                     body=json.dumps({"code": code, "message": message}))
