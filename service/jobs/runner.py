"""The job runner: works through stored jobs on the online path at low priority.

Each input goes through the same serving methods as the online endpoints, with
`PRIORITY_BATCH`: the engines' batchers put online requests first and fill spare batch slots with
job work, so a running job costs online traffic little latency. The runner claims one window of
inputs at a time (`concurrency`, a batch's worth) from the oldest job that has inputs nobody
holds, keeps their leases alive while they run, and stores the window's results when it
completes.

Several replicas sharing one store each run a runner: they claim different windows of the same
job, and whichever finds every input answered marks the job done. Restarts and deaths: everything
is read back from the store. An input without a result is claimable once no live lease holds it,
so a replica killed mid-window loses only that window (redone after its leases expire, by any
replica), and the store's (job, index) key keeps every input at exactly one result. A bad input
gets an error result (the code and message the online endpoint would have answered) and the job
goes on.
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
from service.errors import (
    FeatureDisabledError,
    InvalidRequestError,
    ServiceError,
    error_body,
    format_validation_errors,
)
from service.jobs.store import (
    JobRecord,
    JobResult,
    JobState,
    JobStore,
    JobStoreUnavailableError,
)
from service.schemas import TASK_PARAMS
from service.serving import Glipv2Serving

log = logging.getLogger(__name__)

Decode = Callable[[bytes | str], Awaitable[Image.Image]]
_QUEUE_FULL_BACKOFF_S = 0.05
_PURGE_EVERY_S = 60.0


def parse_params(task: str, params: dict[str, Any]) -> BaseModel:
    """The task's parameters as the online endpoint's schema reads them (what needs no model);
    raises InvalidRequestError."""
    try:
        return TASK_PARAMS[task].model_validate(params)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        for error in errors:
            error["loc"] = ("params", *error["loc"])
        raise InvalidRequestError(format_validation_errors(errors)) from None


def validate_params(task: str, params: dict[str, Any], serving: Glipv2Serving) -> Any:
    """The task's parameters as the online endpoint checks them, the model's limits included
    (prepared for `answer_input`); raises InvalidRequestError."""
    parsed = parse_params(task, params)
    prepare: dict[str, Callable[[Any], Any]] = {
        "detect": serving.prepare_detect, "segment": serving.prepare_segment,
        "vqa": serving.prepare_vqa, "caption": lambda _: serving.prepare_caption()}
    query = prepare[task](parsed)
    return query if task == "detect" else parsed


class JobRunner:
    """Owns the background loop; routes call `wake()` after a submit and `cancel()` on DELETE.

    While the store is unavailable (`JobStoreUnavailableError`: disk full, read-only, database
    away) the loop backs off, `store_retry_s` (first wait, doubled per failure up to the
    second) and tries again; a window already computed keeps its results in memory and retries
    storing them, so nothing is computed twice and nothing stored before is touched.
    """

    store_retry_s: tuple[float, float] = (0.5, 30.0)

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
        # Prepared parameters of the unfinished jobs this runner has (re)started.
        self._prepared: dict[str, Any] = {}
        self._last_purge_s = 0.0
        self._stopping = False  # claim nothing more (the window in flight may finish)

    async def start(self) -> None:
        await self._publish()
        self._task = asyncio.create_task(self._run(), name="glipv2-job-runner")

    async def stop(self, grace_s: float = 0.0) -> None:
        """Claim no more inputs; the window in flight gets `grace_s` to finish and store its
        results (SIGTERM's drain), then is dropped unstored: its inputs are claimed again after
        a restart, or by another replica once the store is closed (or its leases expire).
        Results already stored stay; 0 stops at once."""
        task = self._task
        if task is None:
            return
        self._stopping = True
        self._wakeup.set()  # an idle loop looks again, sees `_stopping` and returns
        if grace_s > 0:
            await asyncio.wait([task], timeout=grace_s)  # on timeout, still running
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._task = None

    def wake(self) -> None:
        self._wakeup.set()

    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; its window in flight here is withdrawn from the
        queues, other replicas drop theirs at their next lease renewal."""
        cancelled = await asyncio.to_thread(self.store.set_state, job_id, JobState.CANCELLED)
        if cancelled and self._current == job_id:
            for task in self._window:
                task.cancel()
        await self._publish()
        return cancelled

    # --- the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        store_failures = 0
        while not self._stopping:
            try:
                await self._purge_if_due()
                self._wakeup.clear()  # before looking: a submit from now on wakes the wait
                if not await self._work_any():
                    await self._publish()  # other replicas may have moved jobs meanwhile
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), self.store.idle_poll_s)
                store_failures = 0
            except asyncio.CancelledError:
                raise
            except JobStoreUnavailableError as exc:
                delay_s = self._store_retry_after_s(store_failures)
                store_failures += 1
                log.warning("job store unavailable (%s); retrying in %.1f s", exc, delay_s)
                await asyncio.sleep(delay_s)
            except BatcherStoppedError:
                return  # the engines are stopping: what is left resumes after the restart
            except Exception:  # a bug, or the database away, must not end job processing
                log.exception("job runner failed; retrying in 1 s")
                await asyncio.sleep(1.0)

    async def _work_any(self) -> bool:
        """Work on the oldest job with claimable inputs until it has none; False when no job had
        any (all done, or held by other replicas' leases)."""
        jobs = await asyncio.to_thread(self.store.unfinished)
        self._prepared = {job.id: self._prepared[job.id] for job in jobs
                          if job.id in self._prepared}
        for job in jobs:
            if await self._work(job):
                return True
        return False

    async def _work(self, job: JobRecord) -> bool:
        """Run windows of `job` while this runner can claim inputs, then mark the job done if
        every input has a result; True if it claimed any."""
        if self._stopping:
            return False
        if job.id not in self._prepared:
            if not await asyncio.to_thread(self.store.set_state, job.id, JobState.RUNNING):
                return False  # cancelled meanwhile
            await self._publish()
            try:
                self._prepared[job.id] = validate_params(job.task, job.params, self.serving)
            except ServiceError as exc:  # e.g. a tuned prompt no longer registered
                await asyncio.to_thread(self.store.set_state, job.id, JobState.FAILED,
                                        exc.message)
                await self._publish()
                return False
        prepared, worked = self._prepared[job.id], False
        self._current = job.id
        try:
            while not self._stopping and (claimed := await asyncio.to_thread(
                    self.store.claim, job.id, self.concurrency)):
                worked = True
                await self._run_window(job, prepared, claimed)
        finally:
            self._current = None
        if await asyncio.to_thread(self.store.finish, job.id):
            await self._publish()
        return worked

    async def _run_window(self, job: JobRecord, prepared: Any, claimed: list[int]) -> None:
        """Run the claimed inputs, their leases renewed meanwhile, and store their results."""
        self._window = [asyncio.create_task(self._one(job, index, prepared))
                        for index in claimed]
        heartbeat = asyncio.create_task(self._heartbeat(job.id))
        try:
            outcomes = await asyncio.gather(*self._window, return_exceptions=True)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self._window = []
        for outcome in outcomes:
            if isinstance(outcome, BatcherStoppedError):
                raise outcome
        results = [o for o in outcomes if isinstance(o, JobResult)]
        stored = await self._store_results(job.id, results)
        if self._on_input is not None:
            for result in stored:
                self._on_input(result.ok)

    async def _store_results(self, job_id: str, results: list[JobResult]) -> list[JobResult]:
        """`put_results`, retried with back-off while the store is unavailable: the window's
        results wait here instead of being computed again (a stop drops them; they are redone
        after the restart)."""
        failures = 0
        while True:
            try:
                return await asyncio.to_thread(self.store.put_results, job_id, results)
            except JobStoreUnavailableError as exc:
                delay_s = self._store_retry_after_s(failures)
                failures += 1
                log.warning("storing %d results of job %s failed (%s); retrying in %.1f s",
                            len(results), job_id, exc, delay_s)
                await asyncio.sleep(delay_s)

    def _store_retry_after_s(self, failures: int) -> float:
        first_s, most_s = self.store_retry_s
        return min(most_s, first_s * 2.0 ** min(failures, 30))

    async def _heartbeat(self, job_id: str) -> None:
        """Renew the window's leases a few times per lease timeout; drop the window once the
        job stops running (a cancel on another replica)."""
        while True:
            await asyncio.sleep(self.store.lease_timeout_s / 3)
            try:
                running = await asyncio.to_thread(self.store.renew, job_id)
            except Exception:  # the lease may lapse; the result's key still keeps it once
                log.warning("renewing the leases of job %s failed", job_id, exc_info=True)
                continue
            if not running:
                for task in self._window:
                    task.cancel()
                return

    async def _one(self, job: JobRecord, index: int, prepared: Any) -> JobResult | None:
        """One input through the online path; an error result for a bad input."""

        async def image() -> Image.Image:
            return await self.decode(await self._source(job.id, index))

        ok, body = await answer_input(self.serving, job.task, prepared, image,
                                      f"job {job.id} input {index}")
        return JobResult(index=index, ok=ok, body=body)

    async def _source(self, job_id: str, index: int) -> bytes | str:
        item = await asyncio.to_thread(self.store.read_input, job_id, index)
        if item.data is not None:
            return item.data.decode("utf-8")  # the `image` string, as the online body has it
        if self.input_dir is None:
            raise FeatureDisabledError("file inputs are not enabled on this server")
        path = resolve_input_path(self.input_dir, item.path or "")
        try:
            return await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise InvalidRequestError(f"cannot read {item.path!r}: {exc.strerror}") from None

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


async def answer_input(serving: Glipv2Serving, task: str, prepared: Any,
                       image: Callable[[], Awaitable[Image.Image]], label: str
                       ) -> tuple[bool, str]:
    """One input of batch work through the online path at batch priority (no deadline, after
    online requests): `(True, the response JSON as the online endpoint answers it)`, or `(False,
    the error object {"code", "message"} JSON)` for a bad input, never raised. The job runner and
    bulk inference (`service.bulk`) both answer each input here. `image` reads and decodes the
    input (its `ServiceError`s are the input's error); `label` names it in the log."""
    try:
        decoded = await image()
        while True:
            try:
                response = await _infer(serving, task, prepared, decoded)
                break
            except QueueFullError:
                await asyncio.sleep(_QUEUE_FULL_BACKOFF_S)
    except ServiceError as exc:
        return False, error_json(exc.code, exc.message)
    except BatchExecutionError:
        log.exception("%s: inference failed", label)
        return False, error_json("inference_failed", "inference failed; see the log")
    return True, response.model_dump_json(exclude_none=True)


async def _infer(serving: Glipv2Serving, task: str, prepared: Any, image: Image.Image
                 ) -> BaseModel:
    if task == "detect":
        return await serving.detect(prepared, image, PRIORITY_BATCH)
    if task == "segment":
        return await serving.segment(prepared, image, PRIORITY_BATCH)
    if task == "vqa":
        return await serving.vqa(prepared, image, PRIORITY_BATCH)
    return await serving.caption(image, PRIORITY_BATCH)


def error_json(code: str, message: str) -> str:
    """A bad input's result: the error object of the service's error bodies, as JSON."""
    return json.dumps(error_body(code, message)["error"])
