"""Prometheus metrics of DESIGN.md: per endpoint and per engine, in one registry per app.

A registry per app (not the process-global default) so that several apps in one process (tests)
never collide, and `/metrics` shows exactly this service. Names:

- `glipv2_requests_total{endpoint, status}`: HTTP requests answered, by route template and status.
- `glipv2_request_duration_seconds{endpoint}`: end-to-end latency histogram.
- `glipv2_engine_queue_wait_seconds{engine}`: submission to batch start, per request.
- `glipv2_engine_compute_seconds{engine}`: one `run_batch`, per batch.
- `glipv2_engine_batch_size{engine}`: requests per batch.
- `glipv2_engine_queue_depth{engine}`: requests waiting now.
- `glipv2_engine_failures_total{engine, kind}`: engine batches that failed whole, by kind:
  `error` (the runtime raised), `nan` (NaN or infinity in its outputs), `timeout` (it ran past
  every deadline in it: stalled, counted once however long it hangs).
- `glipv2_prompt_chunks{}`: prompt chunks per detection request (histogram).
- `glipv2_text_cache_lookups_total{result}`: text-feature cache lookups, `hit` or `miss`.
- `glipv2_model_ready`: 1 once the model is loaded and the engines run (0 again while draining).
- `glipv2_requests_in_flight`: /v1 requests admitted and not yet answered (what a drain waits for).
- `process_*`: the process's resident memory, CPU seconds and open files (Prometheus' own).

Engines are the exported graphs' batchers: `vision`, `language`, `fusion`, `mask`, `vqa` and
`caption` (the decoding loop over the caption graphs). A batch counts its items: images for
`vision`, (image, prompt) rows for `fusion`.

Under Ray Serve a replica's registry is not what Prometheus scrapes: each collector then also
feeds a `MetricsExport` (`service.distributed.metrics`: Ray's metrics, same names and labels),
so the Grafana dashboard reads both modes.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from service.batching import FailureKind, OnBatch, OnFailure, OnQueueDepth, OnShed
from service.caption_decoder import DecoderCallbacks

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
StateT = TypeVar("StateT", bound=str)  # a job state (a StrEnum), as the store counts them
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Seconds: from a cached small detect (~10 ms) to a long caption on a busy CPU.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CHUNK_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
UNMATCHED = "unmatched"  # endpoint label of paths no route serves (bounded label values)


MetricKind = Literal["counter", "gauge", "histogram"]


class MetricsExport(Protocol):
    """A second destination of every metric update, beside this process's registry."""

    def declare(self, kind: MetricKind, name: str, documentation: str,
                labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        """A collector exists: its Prometheus name (a counter's without `_total`), label names
        and, for a histogram, bucket bounds."""

    def update(self, name: str, labels: Mapping[str, str], value: float) -> None:
        """A counter went up by `value`, a gauge was set to it, a histogram observed it."""


class Collector:
    """One Prometheus collector (or one labelled child of it), mirrored into the export."""

    def __init__(self, collector: Counter | Gauge | Histogram, export: MetricsExport | None,
                 name: str, labelnames: Sequence[str] = (),
                 labels: Mapping[str, str] | None = None) -> None:
        self._collector = collector
        self._export = export
        self._name = name
        self._labelnames = tuple(labelnames)
        self._labels = dict(labels or {})

    def labels(self, *values: str) -> Collector:
        return Collector(self._collector.labels(*values), self._export, self._name,
                         labels=dict(zip(self._labelnames, values, strict=True)))

    def inc(self, amount: float = 1.0) -> None:
        assert isinstance(self._collector, Counter)
        self._collector.inc(amount)
        self._exported(amount)

    def set(self, value: float) -> None:
        assert isinstance(self._collector, Gauge)
        self._collector.set(value)
        self._exported(value)

    def observe(self, value: float) -> None:
        assert isinstance(self._collector, Histogram)
        self._collector.observe(value)
        self._exported(value)

    def _exported(self, value: float) -> None:
        if self._export is not None:
            self._export.update(self._name, self._labels, value)


@dataclass(frozen=True)
class EngineCallbacks:
    """What a `DynamicBatcher` reports through."""

    on_batch: OnBatch
    on_queue_depth: OnQueueDepth
    on_shed: OnShed
    on_failure: OnFailure


class ServiceMetrics:
    """The service's collectors, and the callbacks that feed them.

    export: where every update also goes (Ray's metrics under Ray Serve); None in one process.
    """

    def __init__(self, registry: CollectorRegistry | None = None,
                 export: MetricsExport | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        # process_* (resident memory, CPU seconds, open files): what a soak watches for leaks.
        ProcessCollector(registry=self.registry)
        self.export = export
        self.requests = self._counter("glipv2_requests", "HTTP requests answered, by endpoint "
                                      "and status.", ["endpoint", "status"])
        self.latency = self._histogram("glipv2_request_duration_seconds",
                                       "End-to-end HTTP latency.", ["endpoint"],
                                       LATENCY_BUCKETS_S)
        self.queue_wait = self._histogram("glipv2_engine_queue_wait_seconds", "Time from "
                                          "submission to batch start.", ["engine"],
                                          LATENCY_BUCKETS_S)
        self.compute = self._histogram("glipv2_engine_compute_seconds", "Time of one engine "
                                       "batch.", ["engine"], LATENCY_BUCKETS_S)
        self.batch_size = self._histogram("glipv2_engine_batch_size", "Requests per engine "
                                          "batch.", ["engine"], BATCH_SIZE_BUCKETS)
        self.queue_depth = self._gauge("glipv2_engine_queue_depth", "Requests waiting per "
                                       "engine.", ["engine"])
        self.load_shed = self._counter("glipv2_load_shed", "Requests turned away at once (429) "
                                       "because their expected wait exceeded their deadline, "
                                       "by engine.", ["engine"])
        self.engine_failures = self._counter(
            "glipv2_engine_failures", "Engine batches that failed whole, by engine and kind "
            "(error: the runtime raised; nan: non-finite outputs; timeout: past every deadline "
            "in it).", ["engine", "kind"])
        self.decode_steps = self._counter("glipv2_caption_decode_steps", "Caption decoding "
                                          "steps (one caption-step batch each).")
        self.live_captions = self._gauge("glipv2_caption_live", "Captions being decoded now.")
        self.caption_tokens = self._counter("glipv2_caption_tokens", "Caption tokens generated "
                                            "(one per caption per step; rate() is tokens/s).")
        self.time_to_first_token = self._histogram(
            "glipv2_caption_time_to_first_token_seconds", "From a caption's submission to the "
            "decoder to its first token.", [], LATENCY_BUCKETS_S)
        self.prompt_chunks = self._histogram("glipv2_prompt_chunks", "Prompt chunks per "
                                             "detection request.", [], CHUNK_BUCKETS)
        self.text_cache = self._counter("glipv2_text_cache_lookups", "Text-feature cache "
                                        "lookups, by result.", ["result"])
        for result in ("hit", "miss"):
            self.text_cache.labels(result)  # both series exist (at 0) from the start
        self.model_ready = self._gauge("glipv2_model_ready", "1 when the model is loaded and "
                                       "serving.")
        self.requests_in_flight = self._gauge("glipv2_requests_in_flight", "/v1 requests "
                                              "admitted and not yet answered.")
        self.jobs = self._gauge("glipv2_jobs", "Batch jobs, by state.", ["state"])
        for state in ("queued", "running", "done", "failed", "cancelled"):
            self.jobs.labels(state)
        self.job_inputs = self._counter("glipv2_job_inputs", "Job inputs processed, by result.",
                                        ["result"])
        for result in ("ok", "error"):
            self.job_inputs.labels(result)

    def _counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()
                 ) -> Collector:
        """`name` without the `_total` the counter is exposed with (Prometheus adds it)."""
        self._declare("counter", name, documentation, labelnames, ())
        return Collector(Counter(name, documentation, labelnames, registry=self.registry),
                         self.export, name, labelnames)

    def _gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()
               ) -> Collector:
        self._declare("gauge", name, documentation, labelnames, ())
        return Collector(Gauge(name, documentation, labelnames, registry=self.registry),
                         self.export, name, labelnames)

    def _histogram(self, name: str, documentation: str, labelnames: Sequence[str],
                   buckets: Sequence[float]) -> Collector:
        self._declare("histogram", name, documentation, labelnames, buckets)
        return Collector(Histogram(name, documentation, labelnames, buckets=buckets,
                                   registry=self.registry), self.export, name, labelnames)

    def _declare(self, kind: MetricKind, name: str, documentation: str,
                 labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        if self.export is not None:
            self.export.declare(kind, name, documentation, labelnames, buckets)

    def engine_callbacks(self, engine: str) -> EngineCallbacks:
        """The metric callbacks of the `DynamicBatcher` of `engine`."""
        wait = self.queue_wait.labels(engine)
        compute = self.compute.labels(engine)
        size = self.batch_size.labels(engine)
        depth = self.queue_depth.labels(engine)
        shed = self.load_shed.labels(engine)
        on_failure = self._failure_callback(engine)

        def on_batch(batch_size: int, queue_waits_s: list[float], compute_s: float) -> None:
            size.observe(batch_size)
            compute.observe(compute_s)
            for waited_s in queue_waits_s:
                wait.observe(waited_s)

        def on_queue_depth(value: int) -> None:
            depth.set(value)

        depth.set(0)  # the series exists (at 0) before the first request
        return EngineCallbacks(on_batch, on_queue_depth, shed.inc, on_failure)

    def _failure_callback(self, engine: str) -> OnFailure:
        """Counts `engine`'s failed batches by kind; every kind's series exists (at 0) at once."""
        failures = {kind: self.engine_failures.labels(engine, kind.value) for kind in FailureKind}

        def on_failure(kind: FailureKind) -> None:
            failures[kind].inc()

        return on_failure

    def caption_callbacks(self) -> DecoderCallbacks:
        """The metric callbacks of the caption decoder (engine label "caption": a decoding
        step is its batch, admission its queue wait)."""
        engine = "caption"
        rows = self.batch_size.labels(engine)
        compute = self.compute.labels(engine)

        def on_step(step_rows: int, seconds: float) -> None:
            self.decode_steps.inc()
            rows.observe(step_rows)
            compute.observe(seconds)

        return DecoderCallbacks(
            on_step=on_step, on_live=self.live_captions.set, on_tokens=self.caption_tokens.inc,
            on_first_token=self.time_to_first_token.observe,
            on_admit=self.queue_wait.labels(engine).observe,
            on_shed=self.load_shed.labels(engine).inc,
            on_failure=self._failure_callback(engine))

    def on_text_cache_lookup(self, hits: int, misses: int) -> None:
        self.text_cache.labels("hit").inc(hits)
        self.text_cache.labels("miss").inc(misses)

    def on_job_counts(self, counts: Mapping[StateT, int]) -> None:
        for state, count in counts.items():
            self.jobs.labels(str(state)).set(count)

    def on_job_input(self, ok: bool) -> None:
        self.job_inputs.labels("ok" if ok else "error").inc()

    def observe_request(self, endpoint: str, status: int, duration_s: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(duration_s)


class HttpMetricsMiddleware:
    """Counts every HTTP response by route template and status, and times it (pure ASGI).

    The endpoint label is the matched route's path template (`/v1/detect`), never the raw path,
    so random URLs cannot blow up label cardinality. A request that fails without a response
    counts as 500 (the error middleware outside answers it so).
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or UNMATCHED
            self.metrics.observe_request(endpoint, status, time.perf_counter() - started)
