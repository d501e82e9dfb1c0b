"""What the app holds between requests: settings, metrics, and the serving layer once loaded.

The model loads in the background after startup, so the process answers `/healthz` at once and
`/readyz` says 503 until the engines run (an orchestrator then routes traffic only to ready
replicas); on onnxruntime without an engine folder a first start's loading includes exporting the
model to ONNX (`engines.cache`, tens of seconds). A load failure is logged and reported by both
probes rather than crashing the loop. Under Ray Serve (`remote` engines) loading is waiting for
an engine replica to answer: the model loads there.

Draining (SIGTERM; `service.http_server` calls `drain()`) lives here too, in one place: from the
signal on, `/readyz` and every new /v1 request answer 503 `shutting_down` (`admit`), the requests
admitted before it and the job window in flight finish with the engines still running, bounded by
`shutdown_timeout_s`; what is left then is answered 503 (the engines stop without draining).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping

from PIL import Image

from engines.runtimes import Runtime, open_runtime
from model_export.checkpoints.tuned_prompts import TunedPrompt, load_tuned_prompts
from model_export.modeling.config import Glipv2Config
from service.errors import (
    FeatureDisabledError,
    NotReadyError,
    ShuttingDownError,
)
from service.jobs.runner import JobRunner
from service.jobs.store import JobStore, SqliteJobStore
from service.pipeline.caption_search import CaptionSearch
from service.pipeline.image_urls import ImageUrlFetcher
from service.pipeline.images import decode_image_source
from service.serving import Glipv2Serving, RemoteEngines, ServedModel
from service.settings import ServiceSettings
from service.telemetry import ServiceMetrics

log = logging.getLogger(__name__)

RuntimeLoader = Callable[[], Runtime]


class ServiceState:
    """Lifecycle of the serving layer, and the image-decoding gate shared by all requests."""

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics,
                 runtime: Runtime | None = None,
                 loader: RuntimeLoader | None = None,
                 remote: RemoteEngines | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._runtime = runtime
        self._remote = remote
        self._loader = loader if loader is not None else (
            lambda: open_runtime(settings.runtime_options()))
        self.serving: Glipv2Serving | None = None
        self.jobs: JobRunner | None = None
        self.load_error: str | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._decode_gate: asyncio.Semaphore | None = None
        self._url_fetcher: ImageUrlFetcher | None = None
        # Draining: set once, by `drain()`; `_admitted` counts /v1 requests not yet answered.
        self.draining = False
        self._admitted = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain_task: asyncio.Task[None] | None = None
        self._end_drain = asyncio.Event()

    # --- lifecycle (the app's lifespan) -------------------------------------------------------

    async def startup(self) -> None:
        self._decode_gate = asyncio.Semaphore(self.settings.max_concurrent_decodes)
        if self._runtime is not None:
            await self._start_serving(self._runtime)
        else:
            self._load_task = asyncio.create_task(self._load(), name="glipv2-model-load")

    async def shutdown(self) -> None:
        """Drain the engines (bounded by `shutdown_timeout_s`), then stop them. After a
        `drain()` (SIGTERM) this only closes: the drain let the work finish or failed it."""
        if self._drain_task is not None:
            self._end_drain.set()  # a second signal may have cut the drain short: end it now
            with contextlib.suppress(Exception):  # logged by whoever awaited it first
                await asyncio.shield(self._drain_task)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()  # the loading thread finishes unseen; nothing serves it
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task
        serving, self.serving = self.serving, None
        runner, self.jobs = self.jobs, None
        self.metrics.model_ready.set(0)
        if runner is not None:  # first: its window in flight is redone after the restart
            await runner.stop()
            runner.store.close()
        if serving is None:
            return
        try:
            await asyncio.wait_for(serving.stop(drain=True), self.settings.shutdown_timeout_s)
        except TimeoutError:
            log.warning("drain took longer than %.0f s; stopping the engines",
                        self.settings.shutdown_timeout_s)
            await serving.stop(drain=False)

    async def _load(self) -> None:
        log.info("loading the %s runtime", self.settings.runtime)
        try:
            if self._remote is not None:
                await self._start_serving(await self._remote.connect())
            else:
                await self._start_serving(await asyncio.to_thread(self._loader))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the %s runtime failed", self.settings.runtime)
            return
        log.info("model %s ready", self.settings.model_id)

    async def _start_serving(self, source: Runtime | ServedModel) -> None:
        """Serve `source`: a runtime here, or the model remote engines serve."""
        settings = self.settings
        prompts = await asyncio.to_thread(tuned_prompts, settings, source.config)
        store = await asyncio.to_thread(open_job_store, settings)  # fails before the engines
        serving = build_serving(settings, source, self.metrics, prompts, self._remote)
        runner = JobRunner(
            store, serving, self.decode_image,
            concurrency=settings.job_concurrency,
            input_dir=settings.job_input_dir, results_ttl_s=settings.job_results_ttl_s,
            on_change=self.metrics.on_job_counts, on_input=self.metrics.on_job_input)
        try:
            await serving.start()
            await runner.start()
        except BaseException:
            await asyncio.to_thread(store.close)
            raise
        self.serving, self.jobs = serving, runner
        self.metrics.model_ready.set(1)

    # --- draining (SIGTERM) -------------------------------------------------------------------

    async def drain(self) -> None:
        """Stop taking work and let what is in flight finish, with the engines running.

        At once: `draining` (new /v1 requests and `/readyz` answer 503 `shutting_down`), and the
        job runner claims no more inputs. Then it waits for the admitted requests and the job
        window in flight, and for `shutdown_grace_s` since the call (load balancers see the
        503s meanwhile), all bounded by `shutdown_timeout_s` or by `end_drain()`. Work still
        unfinished then is failed: the engines stop without draining, so each such request
        answers 503 `unavailable`, and the job window is dropped unstored (redone after the
        restart). Afterwards the server may close its listener. Safe to call more than once.
        """
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(), name="glipv2-drain")
        await asyncio.shield(self._drain_task)

    def end_drain(self) -> None:
        """Stop waiting now (a second SIGTERM or Ctrl-C): what is left fails as at the timeout."""
        self._end_drain.set()

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Count a /v1 request in flight until it is answered; 503 `shutting_down` instead
        while draining (the one place new work is refused)."""
        if self.draining:
            raise ShuttingDownError("the server is shutting down and takes no new requests; "
                                    "retry (another replica, or this one once restarted)")
        self._admitted += 1
        self._idle.clear()
        self.metrics.requests_in_flight.set(self._admitted)
        try:
            yield
        finally:
            self._admitted -= 1
            self.metrics.requests_in_flight.set(self._admitted)
            if self._admitted == 0:
                self._idle.set()

    @property
    def requests_in_flight(self) -> int:
        """/v1 requests admitted and not yet answered."""
        return self._admitted

    async def _drain(self) -> None:
        settings = self.settings
        started = time.monotonic()
        self.draining = True
        self.metrics.model_ready.set(0)
        log.info("draining: %d requests in flight, %.0f s to finish them",
                 self._admitted, settings.shutdown_timeout_s)
        runner = self.jobs
        finished = asyncio.create_task(self._finish_work(runner, started))
        cut_short = asyncio.create_task(self._end_drain.wait())
        done, _ = await asyncio.wait([finished, cut_short], timeout=settings.shutdown_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        cut_short.cancel()
        if finished in done:
            finished.result()  # a failure in there is a bug: let it show
            log.info("drained in %.1f s", time.monotonic() - started)
            return
        finished.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await finished
        log.warning("drain ended after %.1f s: the %d requests still in flight are answered 503",
                    time.monotonic() - started, self._admitted)
        if runner is not None:  # its window is dropped unstored, redone after the restart
            await runner.stop()
        serving, self.serving = self.serving, None
        if serving is not None:
            await serving.stop(drain=False)

    async def _finish_work(self, runner: JobRunner | None, started: float) -> None:
        """Until the admitted requests are answered, the job window in flight is stored, and
        `shutdown_grace_s` has passed since `started`."""
        settings = self.settings
        jobs = (asyncio.create_task(runner.stop(grace_s=settings.shutdown_timeout_s))
                if runner is not None else None)
        try:
            await self._idle.wait()
            if jobs is not None:
                await jobs
        finally:
            if jobs is not None:
                jobs.cancel()  # cut short: `_drain` stops the runner at once
        grace_s = min(settings.shutdown_grace_s, settings.shutdown_timeout_s)
        await asyncio.sleep(max(0.0, started + grace_s - time.monotonic()))

    # --- per request --------------------------------------------------------------------------

    def require_jobs(self) -> JobRunner:
        """The job runner (it starts with the serving layer), or 503 while loading."""
        self.require_serving()
        assert self.jobs is not None
        return self.jobs

    def require_serving(self) -> Glipv2Serving:
        """The serving layer, or 503 + Retry-After while loading (or after a failed load)."""
        if self.serving is not None:
            return self.serving
        if self.load_error is not None:
            raise NotReadyError(f"the model failed to load: {self.load_error}")
        raise NotReadyError(f"model {self.settings.model_id!r} is loading; retry shortly")

    async def decode_image(self, source: bytes | str) -> Image.Image:
        """Base64 text, an image URL (when enabled) or raw bytes -> RGB image, off the event
        loop, a bounded number at once."""
        settings = self.settings
        if self._decode_gate is None:  # no lifespan (a bare TestClient): still bounded
            self._decode_gate = asyncio.Semaphore(settings.max_concurrent_decodes)

        if isinstance(source, str) and source.startswith(("http://", "https://")):
            source = await self._fetch_url(source)
        async with self._decode_gate:
            return await asyncio.to_thread(decode_image_source, source,
                                           settings.max_image_pixels, settings.max_body_bytes)

    async def _fetch_url(self, url: str) -> bytes:
        settings = self.settings
        if not settings.allow_image_urls:
            raise FeatureDisabledError("image URLs are not enabled on this server; send the "
                                       "image as base64 or as a file")
        if self._url_fetcher is None:
            self._url_fetcher = ImageUrlFetcher(
                settings.image_url_hosts, max_bytes=settings.max_body_bytes,
                timeout_s=settings.image_url_timeout_s,
                max_redirects=settings.image_url_max_redirects)
        return await self._url_fetcher.fetch(url)


def tuned_prompts(settings: ServiceSettings, config: Glipv2Config) -> dict[str, TunedPrompt]:
    """The tuned prompts of `settings.prompts_dir` by `prompt_id` (none without one)."""
    if settings.prompts_dir is None:
        return {}
    language = config.language
    return load_tuned_prompts(settings.prompts_dir, language.hidden_size,
                              language.max_query_len, language.tokenizer)


def build_serving(settings: ServiceSettings, source: Runtime | ServedModel,
                  metrics: ServiceMetrics | None, prompts: Mapping[str, TunedPrompt],
                  remote: RemoteEngines | None = None) -> Glipv2Serving:
    """The serving layer `settings` describe, on `source`'s runtime in this process, or over
    `remote` engines serving the model `source` describes. The app and bulk inference
    (`service.bulk`) build theirs here, so both answer alike."""
    search = CaptionSearch(settings.caption_max_tokens, settings.caption_beams,
                           settings.caption_length_penalty)
    if isinstance(source, ServedModel):
        assert remote is not None
        return Glipv2Serving.over(
            source, remote, model_id=settings.model_id, metrics=metrics,
            caption_search=search, caption_objects=settings.caption_objects,
            max_segments=settings.max_segments, prompts=prompts)
    return Glipv2Serving(
        source, model_id=settings.model_id,
        batcher_config=settings.batcher.to_config(settings.request_timeout_ms),
        metrics=metrics, caption_search=search, caption_objects=settings.caption_objects,
        caption_max_rows=settings.caption_max_rows,
        text_cache_bytes=settings.text_cache_bytes, max_segments=settings.max_segments,
        prompts=prompts)


def open_job_store(settings: ServiceSettings) -> JobStore:
    """PostgreSQL when `jobs_database_url` is set (every replica shares it), else SQLite."""
    if settings.jobs_database_url is None:
        return SqliteJobStore(settings.jobs_dir)
    try:  # psycopg is the optional `postgres` extra: only this configuration needs it
        from service.jobs.postgres import PostgresJobStore
    except ImportError as exc:
        raise RuntimeError("jobs_database_url needs psycopg: pip install -e '.[postgres]'"
                           ) from exc
    log.info("batch jobs in PostgreSQL (lease timeout %.0f s)", settings.job_lease_timeout_s)
    return PostgresJobStore(settings.jobs_database_url.get_secret_value(),
                            lease_timeout_s=settings.job_lease_timeout_s)
