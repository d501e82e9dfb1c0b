"""Dynamic batching with Triton's semantics, one batcher per engine, independent of any model.

Requests wait in a bounded queue, grouped by a `bucket` key (e.g. the padded image shape): only
requests of the same bucket can be stacked into one tensor, so only they batch together. A batch
goes when it is full, or when its oldest request has waited `max_queue_delay_ms`; an arrival that
completes a batch sends it at once. The decision crosses into the engine as a `BatchPlan`; the
engine's `run_batch` never sees a queue (vLLM's split between scheduler and model runner).

Two priorities share each queue: online requests (`PRIORITY_ONLINE`) and batch-job work
(`PRIORITY_BATCH`). A batch takes online requests first and fills spare slots with job work, and
the bucket served next is the one holding the oldest online request; job work never counts
against the online queue bound (it has its own), so a running job cannot make clients see 429.
Job work that has waited `batch_max_wait_ms` is served as online (aging), at most every other
batch: under a steady online load of other image shapes it would otherwise never run, and online
requests then wait for at most one job batch at a time.

Compute runs in one dedicated worker thread, so the event loop keeps accepting, rejecting and
expiring requests while an engine runs. One thread, because an engine instance runs one batch at a
time; the next batch is formed when it is free, which is when the most requests have gathered.

Errors callers can see, and what the HTTP layer makes of them:
`QueueFullError` (429/503 with Retry-After), `OverloadedError` (429 with Retry-After: load
shedding, the expected wait — batches ahead x recent compute per batch — exceeds the request's
deadline), `DeadlineExceededError` (504),
`BatcherStoppedError` (503: not started, or shutting down), `BatchExecutionError` (500: the engine
raised for the whole batch, or `run_batch` raised `NonFiniteOutputError` for NaN or infinity in its
outputs), `EngineStalledError` (503 with Retry-After: the batch in flight has run past every
deadline in it, so online requests are turned away until it returns), or the exception
`run_batch` returned for that one request.

A batch in flight cannot be interrupted (the engine runs in its thread), so a hung one is
handled around it: its requests hear `DeadlineExceededError` at their deadlines, not when it
returns; once it has run a whole default deadline (`default_deadline_ms`; without one, never)
and every deadline in it has passed, the engine counts as stalled (`stalled_s`, reported by
`/readyz`) and refuses online requests at once; job work still queues, and serving resumes when
the batch returns. Every batch failure is reported through `on_failure(kind)` (`FailureKind`):
`error`, `nan` or `timeout` (a stall, once per batch).
"""

from service.batching.batcher import DynamicBatcher
from service.batching.config import PRIORITY_BATCH, PRIORITY_ONLINE, BatcherConfig
from service.batching.work import (
    BatcherStoppedError,
    BatchExecutionError,
    BatchPlan,
    DeadlineExceededError,
    EngineStalledError,
    FailureKind,
    NonFiniteOutputError,
    OnBatch,
    OnBatched,
    OnFailure,
    OnQueueDepth,
    OnShed,
    OverloadedError,
    QueueFullError,
    WorkItem,
)

__all__ = [
    "PRIORITY_BATCH",
    "PRIORITY_ONLINE",
    "BatchExecutionError",
    "BatchPlan",
    "BatcherConfig",
    "BatcherStoppedError",
    "DeadlineExceededError",
    "DynamicBatcher",
    "EngineStalledError",
    "FailureKind",
    "NonFiniteOutputError",
    "OnBatch",
    "OnBatched",
    "OnFailure",
    "OnQueueDepth",
    "OnShed",
    "OverloadedError",
    "QueueFullError",
    "WorkItem",
]
