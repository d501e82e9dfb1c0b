"""`DynamicBatcher`: queues requests per bucket, forms batches, runs them off the event loop,
routes results (the policy is described in `service.batching`)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, Generic

from service.batching.config import PRIORITY_BATCH, PRIORITY_ONLINE, BatcherConfig, is_number
from service.batching.work import (
    BatcherStoppedError,
    BatchExecutionError,
    BatchPlan,
    EngineStalledError,
    FailureKind,
    OnBatch,
    OnBatched,
    OnFailure,
    OnQueueDepth,
    OnShed,
    OverloadedError,
    PayloadT,
    QueueFullError,
    ResultT,
    RunBatch,
    WorkItem,
    deadline_error,
    fail,
)

log = logging.getLogger(__name__)

_COMPUTE_EMA_WEIGHT = 0.2
_STALLED_RETRY_AFTER_S = 1.0  # a stalled replica is not ready: the retry goes to another one


class DynamicBatcher(Generic[PayloadT, ResultT]):
    """Queues requests per bucket, forms batches, runs them off the event loop, routes results.

    `run_batch` is synchronous compute; it runs in a single dedicated worker thread. `clock`
    returns seconds (default `time.monotonic`); tests inject a fake one and call `wake()` after
    moving it. Metric callbacks run on the event loop, so Prometheus wiring stays outside:
    `on_batch(size, queue_waits_s, compute_s)` for every executed batch (failed ones too) and
    `on_queue_depth(depth)` whenever the number of waiting requests changes, `on_shed()` for
    every request turned away because its expected wait exceeds its deadline (load shedding),
    `on_failure(kind)` for every batch that failed whole (`FailureKind`; a stall counts once).
    """

    def __init__(
        self,
        config: BatcherConfig,
        run_batch: RunBatch[PayloadT, ResultT],
        *,
        clock: Callable[[], float] | None = None,
        on_batch: OnBatch | None = None,
        on_queue_depth: OnQueueDepth | None = None,
        on_shed: OnShed | None = None,
        on_failure: OnFailure | None = None,
        name: str = "batcher",
    ) -> None:
        self.config = config
        self.name = name
        self._run_batch = run_batch
        self._clock = time.monotonic if clock is None else clock
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._on_shed = on_shed
        self._on_failure = on_failure
        # A bucket is deleted when it empties, so shapes seen once do not pile up.
        self._buckets: dict[Hashable, deque[WorkItem[PayloadT, ResultT]]] = {}
        self._seq = itertools.count()
        self._in_flight: asyncio.Task[None] | None = None
        self._in_flight_items: list[WorkItem[PayloadT, ResultT]] = []
        # When the batch in flight counts as stalled (every deadline in it passed), and since
        # when it is (None: not stalled).
        self._stall_due_s: float | None = None
        self._stalled_since_s: float | None = None
        self._compute_ema_s: float | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False
        self._aged_last = False  # the last batch went ahead of online work by aging

    # --- public API ---------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (the batch being computed is not counted)."""
        return sum(len(queue) for queue in self._buckets.values())

    @property
    def running(self) -> bool:
        return self._task is not None and not self._stopping

    @property
    def stalled_s(self) -> float | None:
        """Seconds the batch in flight has been stalled (past every deadline in it), or None.
        While stalled, online requests are refused with `EngineStalledError`."""
        if self._stalled_since_s is None:
            return None
        return self._clock() - self._stalled_since_s

    async def start(self) -> None:
        """Start the scheduling loop on the running event loop (e.g. in the app's lifespan)."""
        if self._task is not None or self._stopping:
            raise RuntimeError(f"{self.name}: start() after start() or stop()")
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-scheduler")

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting requests, then shut down.

        `drain=True` (SIGTERM): queued requests are sent without waiting for the delay (nothing
        new can join them), in-flight work finishes, then the loop exits. Bound it with
        `asyncio.wait_for` if needed; a cancelled drain leaves the batcher running its backlog, and
        `stop(drain=False)` then ends it. `drain=False`: every pending caller gets
        `BatcherStoppedError` now; a batch already in the worker thread finishes there, unseen.
        """
        self._stopping = True
        if self._task is None:
            return
        self._wake()
        if drain:
            await asyncio.shield(self._task)  # a cancelled stop() must not kill the drain
        else:
            self._task.cancel()
            if self._in_flight is not None:
                self._in_flight.cancel()
            for item in [*self._in_flight_items, *self._take_all_queued()]:
                fail(item, BatcherStoppedError(f"{self.name} stopped before answering"))
            with suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        """Re-evaluate the schedule now (call from the event loop's thread).

        The loop already wakes itself at each due time measured with `clock`; this is for when the
        clock jumps (a fake clock in tests) so the jump is seen at once.
        """
        self._wake()

    async def submit(
        self, payload: PayloadT, bucket: Hashable, deadline_ms: float | None = None,
        priority: int = PRIORITY_ONLINE, on_batched: OnBatched | None = None,
    ) -> ResultT:
        """Queue one request and wait for its result.

        `deadline_ms` (default: `config.default_deadline_ms`) counts from now. Raises
        `QueueFullError` at once when the queue is full, `OverloadedError` at once (load
        shedding) when the work ahead is expected to take longer than the request's deadline,
        so it is not computed only to expire, `DeadlineExceededError` when the deadline
        passes before the result is ready (if before its batch started, it is never computed),
        `BatcherStoppedError` when not running, `BatchExecutionError` when `run_batch` raised, or
        the exception `run_batch` put in this request's slot; `EngineStalledError` at once for
        an online request while the batch in flight is stalled. A cancelled caller's request is
        taken out of the queue. `priority` (`PRIORITY_ONLINE` or `PRIORITY_BATCH`) picks the lane;
        each lane is bounded by `max_queue_size` on its own. `on_batched(size)` is called (on
        the event loop, best effort like the metric callbacks) when the batch this request is
        in starts, once per batch for the same callable: items that pass one callable (those of
        one HTTP request) count a batch they share once. What the access log reports.
        """
        if self._task is None or self._stopping:
            raise BatcherStoppedError(f"{self.name} is not accepting requests")
        if deadline_ms is None:
            deadline_ms = self.config.default_deadline_ms
        if deadline_ms is not None and (not is_number(deadline_ms) or deadline_ms <= 0):
            raise ValueError(f"deadline_ms must be a finite number > 0, got {deadline_ms!r}")
        if priority not in (PRIORITY_ONLINE, PRIORITY_BATCH):
            raise ValueError(f"unknown priority {priority!r}")
        stalled_s = self.stalled_s
        if stalled_s is not None and priority == PRIORITY_ONLINE:
            raise EngineStalledError(
                f"{self.name} is stalled: its batch in flight has run past every deadline in "
                f"it ({stalled_s:.1f} s ago)", retry_after_s=_STALLED_RETRY_AFTER_S)
        depth = sum(item.priority == priority for queue in self._buckets.values()
                    for item in queue)
        if depth >= self.config.max_queue_size:
            raise QueueFullError(
                f"{self.name} queue is full ({depth} requests waiting)",
                retry_after_s=self._retry_after_s(depth),
            )
        if deadline_ms is not None and priority == PRIORITY_ONLINE:
            expected_s = self._expected_wait_s(depth)
            if expected_s is not None and expected_s * 1000.0 > deadline_ms:
                self._call_metric(self._on_shed)
                raise OverloadedError(
                    f"{self.name}: the {depth} requests ahead are expected to take "
                    f"{expected_s * 1000.0:.0f} ms, past this request's deadline "
                    f"({deadline_ms:.0f} ms left)", retry_after_s=self._retry_after_s(depth))
        now = self._clock()
        item: WorkItem[PayloadT, ResultT] = WorkItem(
            payload=payload,
            bucket=bucket,
            enqueued_s=now,
            deadline_s=None if deadline_ms is None else now + deadline_ms / 1000.0,
            future=asyncio.get_running_loop().create_future(),
            seq=next(self._seq),
            priority=priority,
            on_batched=on_batched,
        )
        self._buckets.setdefault(bucket, deque()).append(item)
        self._emit_queue_depth()
        self._wake()
        try:
            return await item.future
        except asyncio.CancelledError:
            self._forget(item)  # the caller left: do not compute for nobody
            raise

    # --- scheduling loop: schedule, execute, update -------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                now = self._clock()
                self._expire(now)
                self._check_stall(now)
                if self._in_flight is None:
                    batch = self._schedule(now)
                    if batch:
                        self._in_flight_items = batch
                        self._stall_due_s = self._stall_due(batch, now)
                        self._in_flight = asyncio.create_task(self._execute(batch))
                if self._stopping and self._in_flight is None and not self._buckets:
                    return
                await self._sleep_until(self._next_due_s())
        except Exception as exc:  # a bug here must not leave callers waiting forever
            log.exception("%s: scheduling loop failed", self.name)
            self._stopping = True
            for item in [*self._in_flight_items, *self._take_all_queued()]:
                fail(item, BatchExecutionError(f"{self.name} scheduling loop failed: {exc!r}"))

    def _schedule(self, now_s: float) -> list[WorkItem[PayloadT, ResultT]]:
        """Take the next batch: among ready buckets, the one holding the first request in
        (priority, arrival) order; within it, requests in that order (online ones first). Job
        work past `batch_max_wait_ms` ranks as online."""
        max_size = self.config.max_batch_size
        delay_s = self.config.max_queue_delay_s
        ready = [
            queue
            for queue in self._buckets.values()
            if len(queue) >= max_size or now_s - queue[0].enqueued_s >= delay_s or self._stopping
        ]
        if not ready:
            return []
        # Aging applies to every other batch at most: never two aged job batches in a row.
        promote_s = math.inf if self._aged_last else self.config.batch_max_wait_ms / 1000.0

        def order(item: WorkItem[PayloadT, ResultT]) -> tuple[int, int]:
            return item.order(now_s, promote_s)

        queue = min(ready, key=lambda q: min(order(item) for item in q))
        batch = sorted(queue, key=order)[:max_size]
        head = batch[0]
        self._aged_last = (head.priority != PRIORITY_ONLINE
                           and order(head)[0] == PRIORITY_ONLINE)
        taken = {id(item) for item in batch}
        rest = deque(item for item in queue if id(item) not in taken)  # arrival order kept
        if rest:
            self._buckets[batch[0].bucket] = rest
        else:
            del self._buckets[batch[0].bucket]
        self._emit_queue_depth()
        return batch

    async def _execute(self, batch: list[WorkItem[PayloadT, ResultT]]) -> None:
        started_s = self._clock()
        plan = BatchPlan(
            payloads=[item.payload for item in batch],
            bucket=batch[0].bucket,
            queue_waits_s=[started_s - item.enqueued_s for item in batch],
        )
        told: list[OnBatched] = []
        for item in batch:
            if item.on_batched is not None and not any(item.on_batched is t for t in told):
                told.append(item.on_batched)
                self._call_metric(item.on_batched, len(batch))
        loop = asyncio.get_running_loop()
        try:
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, plan)
                if len(results) != len(batch):
                    raise BatchExecutionError(
                        f"run_batch returned {len(results)} results for {len(batch)} payloads"
                    )
            except Exception as exc:
                compute_s = self._clock() - started_s
                for item in batch:
                    error = BatchExecutionError(f"{self.name}: batch failed: {exc!r}")
                    error.__cause__ = exc
                    fail(item, error)
                self._call_metric(self._on_failure, FailureKind.of(exc))
            else:
                compute_s = self._clock() - started_s
                self._deliver(batch, results, self._clock())
            if self._stalled_since_s is not None and self._stall_due_s is not None:
                # A hang is a fault, not the engine's speed: it counts as the least it took (a
                # whole deadline), so load shedding neither ignores it nor refuses requests
                # long after it.
                self._record_compute(min(compute_s, self._stall_due_s - started_s))
            else:
                self._record_compute(compute_s)
            self._call_metric(self._on_batch, len(batch), plan.queue_waits_s, compute_s)
        finally:
            if self._stalled_since_s is not None:
                log.warning("%s: the stalled batch returned after %.1f s; serving again",
                            self.name, self._clock() - started_s)
            self._in_flight = None
            self._in_flight_items = []
            self._stall_due_s = self._stalled_since_s = None
            self._wake()

    def _deliver(
        self,
        batch: list[WorkItem[PayloadT, ResultT]],
        results: Sequence[ResultT | Exception],
        now_s: float,
    ) -> None:
        for item, result in zip(batch, results, strict=True):
            if item.future.done():  # cancelled by its caller, or already told its deadline passed
                continue
            if item.expired(now_s):
                item.future.set_exception(deadline_error(item, now_s, "while computing"))
            elif isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _expire(self, now_s: float) -> None:
        """Drop queued requests whose deadline passed or whose caller left; tell in-flight ones.

        An in-flight request past its deadline hears so now rather than after the batch; its
        result is then discarded.
        """
        for item in self._in_flight_items:
            if not item.future.done() and item.expired(now_s):
                item.future.set_exception(deadline_error(item, now_s, "while computing"))
        changed = False
        for bucket, queue in list(self._buckets.items()):
            live: deque[WorkItem[PayloadT, ResultT]] = deque()
            for item in queue:
                if item.future.done():
                    continue
                if item.expired(now_s):
                    item.future.set_exception(deadline_error(item, now_s, "in the queue"))
                    continue
                live.append(item)
            if len(live) != len(queue):
                changed = True
                if live:
                    self._buckets[bucket] = live
                else:
                    del self._buckets[bucket]
        if changed:
            self._emit_queue_depth()

    def _stall_due(self, batch: list[WorkItem[PayloadT, ResultT]], now_s: float
                   ) -> float | None:
        """When a batch starting now counts as stalled: once it has run a whole default
        deadline and every deadline in it has passed (no caller can use it any more, and a
        request arriving then would wait longer than a whole deadline). None: never, without
        a default deadline (nothing says how long is too long)."""
        if self.config.default_deadline_ms is None:
            return None
        due = [item.deadline_s for item in batch if item.deadline_s is not None]
        return max([now_s + self.config.default_deadline_ms / 1000.0, *due])

    def _check_stall(self, now_s: float) -> None:
        """Mark the batch in flight stalled once it is due (`_stall_due`), counted once. It
        cannot be interrupted: online requests are refused until it returns."""
        due = self._stall_due_s
        if self._stalled_since_s is not None or due is None or now_s < due:
            return
        self._stalled_since_s = now_s
        log.error("%s: a batch of %d has run past every deadline in it; refusing online "
                  "requests until it returns", self.name, len(self._in_flight_items))
        self._call_metric(self._on_failure, FailureKind.TIMEOUT)

    def _next_due_s(self) -> float | None:
        """When the loop must look again: the earliest deadline, the batch in flight's stall
        time, and (engine free) batch delay."""
        due = [
            item.deadline_s
            for item in itertools.chain(self._in_flight_items, *self._buckets.values())
            if item.deadline_s is not None and not item.future.done()
        ]
        if self._stall_due_s is not None and self._stalled_since_s is None:
            due.append(self._stall_due_s)
        if self._in_flight is None:  # a ready bucket would have been scheduled already
            delay_s = self.config.max_queue_delay_s
            due.extend(queue[0].enqueued_s + delay_s for queue in self._buckets.values())
        return min(due, default=None)

    async def _sleep_until(self, due_s: float | None) -> None:
        assert self._wakeup is not None
        timeout = None if due_s is None else max(0.0, due_s - self._clock())
        with suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        self._wakeup.clear()

    # --- helpers ------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _forget(self, item: WorkItem[PayloadT, ResultT]) -> None:
        queue = self._buckets.get(item.bucket)
        if queue is None or item not in queue:
            return  # already batched (its result will be discarded) or already dropped
        queue.remove(item)
        if not queue:
            del self._buckets[item.bucket]
        self._emit_queue_depth()

    def _take_all_queued(self) -> list[WorkItem[PayloadT, ResultT]]:
        items = [item for queue in self._buckets.values() for item in queue]
        self._buckets.clear()
        self._emit_queue_depth()
        return items

    def _retry_after_s(self, depth: int) -> float:
        """Seconds until the work ahead has likely drained: batches ahead x compute per batch."""
        batches_ahead = math.ceil(depth / self.config.max_batch_size)
        if self._in_flight is not None:
            batches_ahead += 1
        per_batch_s = self._compute_ema_s or self.config.max_queue_delay_s
        return max(batches_ahead * per_batch_s, self.config.max_queue_delay_s, 0.001)

    def _expected_wait_s(self, depth: int) -> float | None:
        """Seconds until a request arriving behind `depth` waiting ones has its answer: the
        batches ahead and its own, at the recent compute time per batch. None when nothing is
        ahead of it (an idle engine always takes the request, so a slow spell cannot make it
        refuse everything) or before the first batch (nothing to estimate from)."""
        if self._compute_ema_s is None or (depth == 0 and self._in_flight is None):
            return None
        batches = math.ceil((depth + 1) / self.config.max_batch_size)
        if self._in_flight is not None:
            batches += 1
        return batches * self._compute_ema_s

    def _record_compute(self, compute_s: float) -> None:
        if self._compute_ema_s is None:
            self._compute_ema_s = compute_s
        else:
            w = _COMPUTE_EMA_WEIGHT
            self._compute_ema_s = (1.0 - w) * self._compute_ema_s + w * compute_s

    def _emit_queue_depth(self) -> None:
        self._call_metric(self._on_queue_depth, self.queue_depth)

    def _call_metric(self, callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # metrics are best effort; they must never fail a request
            log.exception("%s: metric callback %r failed", self.name, callback)
