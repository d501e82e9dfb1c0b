"""What the batcher queues and hands over: work items, the `BatchPlan` an engine receives, the
callbacks it reports through, and the errors callers can see."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar

from service.batching.config import PRIORITY_ONLINE

PayloadT = TypeVar("PayloadT")
ResultT = TypeVar("ResultT")


class QueueFullError(Exception):
    """The queue holds `max_queue_size` requests; nothing was queued.

    `retry_after_s` estimates when the backlog will have drained (for a `Retry-After` header).
    """

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type[QueueFullError], tuple[str, float]]:
        # Picklable with its retry time: under Ray Serve an engine replica raises it to the
        # ingress, which answers the 429 (Exception's default pickling passes `message` only).
        return type(self), (str(self), self.retry_after_s)


class OverloadedError(QueueFullError):
    """Load shedding: the work ahead is expected to outlast the request's deadline, so it is
    turned away at once (429 + Retry-After) instead of waiting only to time out (504)."""


class DeadlineExceededError(Exception):
    """The request's deadline passed before it was answered (its result, if any, was dropped)."""


class EngineStalledError(Exception):
    """The engine's batch in flight has run past every deadline in it (hung, or far slower
    than the deadlines allow): online requests are refused at once (503 + Retry-After), so they
    go to another replica instead of queueing only to time out, until the batch returns."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type[EngineStalledError], tuple[str, float]]:
        return type(self), (str(self), self.retry_after_s)  # picklable, as QueueFullError


class NonFiniteOutputError(RuntimeError):
    """`run_batch` found NaN or infinity in an engine's outputs: every answer of the batch
    would be garbage (or fail to encode), so the whole batch fails instead."""


class BatcherStoppedError(RuntimeError):
    """The batcher is not running (not started yet, or stopping): the request was not served."""


class BatchExecutionError(RuntimeError):
    """`run_batch` raised (or broke its contract) for a whole batch; `__cause__` is the reason.

    Each caller of the batch gets its own instance, so tracebacks of concurrent callers do not
    pile onto one shared exception object.
    """


@dataclass(eq=False)  # identity equality: payloads may be tensors, which do not compare to bool
class WorkItem(Generic[PayloadT, ResultT]):
    """One queued request: what the scheduler knows about it, and where its answer goes.

    Times are in seconds of the batcher's clock. `seq` orders arrivals (the clock may tie).
    """

    payload: PayloadT
    bucket: Hashable
    enqueued_s: float
    deadline_s: float | None
    future: asyncio.Future[ResultT]
    seq: int
    priority: int = PRIORITY_ONLINE
    on_batched: OnBatched | None = None

    def order(self, now_s: float, promote_after_s: float) -> tuple[int, int]:
        """Scheduling order: priority first (job work that waited `promote_after_s` counts as
        online), then arrival."""
        aged = self.priority != PRIORITY_ONLINE and now_s - self.enqueued_s >= promote_after_s
        return (PRIORITY_ONLINE if aged else self.priority, self.seq)

    def expired(self, now_s: float) -> bool:
        return self.deadline_s is not None and now_s >= self.deadline_s


@dataclass
class BatchPlan(Generic[PayloadT]):
    """The batching decision handed to the engine's `run_batch`, the only thing it receives.

    - `payloads`: the requests' payloads, oldest first; `run_batch` returns one result per payload,
      in the same order (an `Exception` instance in a slot fails only that request).
    - `bucket`: the key every payload shares (e.g. padded image shape), so they stack into one
      tensor.
    - `queue_waits_s`: per payload, seconds from submission to the start of this batch.
    """

    payloads: list[PayloadT]
    bucket: Hashable
    queue_waits_s: list[float] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.payloads)


class FailureKind(StrEnum):
    """Why an engine's batch failed as a whole (the `kind` of the failure metric)."""

    ERROR = "error"  # run_batch raised
    NAN = "nan"  # the outputs held NaN or infinity (`NonFiniteOutputError`)
    TIMEOUT = "timeout"  # the batch ran past every deadline in it (`EngineStalledError`)

    @classmethod
    def of(cls, error: BaseException) -> FailureKind:
        return cls.NAN if isinstance(error, NonFiniteOutputError) else cls.ERROR


RunBatch = Callable[[BatchPlan[PayloadT]], Sequence[ResultT | Exception]]
OnBatch = Callable[[int, list[float], float], None]  # (size, queue_waits_s, compute_s)
OnQueueDepth = Callable[[int], None]
OnShed = Callable[[], None]
OnFailure = Callable[[FailureKind], None]
OnBatched = Callable[[int], None]  # (size of the batch a request is in), as the batch starts


def fail(item: WorkItem[Any, Any], error: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(error)


def deadline_error(item: WorkItem[Any, Any], now_s: float, where: str) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"deadline passed {where} after {(now_s - item.enqueued_s) * 1000.0:.1f} ms"
    )
