"""The dynamic batcher's semantics, with no model: a fake clock where timing matters.

Each test runs its own event loop via `asyncio.run` (no pytest plugin). With a fake clock the
batcher's real-time waits never fire early (the fake time does not move by itself), so whether a
batch has gone is decided only by the clock moves a test makes; `wake()` makes a move seen at once.
`run_batch` runs in the batcher's worker thread, so results arrive after real (sub-millisecond)
hand-offs: tests wait for them with `wait_until` / `finish`, bounded by a few seconds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import pytest

from service.batching import (
    PRIORITY_BATCH,
    BatcherConfig,
    BatcherStoppedError,
    BatchExecutionError,
    BatchPlan,
    DeadlineExceededError,
    DynamicBatcher,
    OverloadedError,
    QueueFullError,
)

LONG_DELAY_MS = 10_000.0  # fake milliseconds: a partial batch never goes unless a test says so


class FakeClock:
    """Seconds that move only when told to."""

    def __init__(self, start_s: float = 100.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance_ms(self, ms: float) -> None:
        self.now_s += ms / 1000.0


class Engine:
    """A stand-in `run_batch`: records plans and threads, answers `result(payload)` per slot.

    With `gated=True` the first batch blocks until `release` is set, to hold work in flight.
    """

    def __init__(
        self,
        result: Callable[[Any], Any] = lambda p: f"r{p}",
        gated: bool = False,
        on_run: Callable[[BatchPlan[Any]], None] | None = None,
    ) -> None:
        self.result = result
        self.gated = gated
        self.on_run = on_run
        self.plans: list[BatchPlan[Any]] = []
        self.threads: set[int] = set()
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, plan: BatchPlan[Any]) -> list[Any]:
        self.plans.append(plan)
        self.threads.add(threading.get_ident())
        if self.gated and len(self.plans) == 1:
            self.entered.set()
            assert self.release.wait(5.0), "test never released the gate"
        if self.on_run is not None:
            self.on_run(plan)
        return [self.result(p) for p in plan.payloads]

    @property
    def batches(self) -> list[list[Any]]:
        return [plan.payloads for plan in self.plans]

    def seen(self) -> list[Any]:
        return [p for plan in self.plans for p in plan.payloads]


def run(coro: Awaitable[None]) -> None:
    """Run one test's coroutine; a hang fails the test instead of freezing the suite."""
    asyncio.run(asyncio.wait_for(coro, 10.0))


async def settle(rounds: int = 20) -> None:
    """Let every ready coroutine (including the scheduler) take its turns."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not condition():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.001)


async def finish(tasks: list[asyncio.Task[Any]]) -> list[Any]:
    """Results or exceptions of `tasks`, in order."""
    return list(await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 3.0))


def submit_all(
    batcher: DynamicBatcher[Any, Any], payloads: list[Any], bucket: Hashable = "b"
) -> list[asyncio.Task[Any]]:
    return [asyncio.create_task(batcher.submit(p, bucket)) for p in payloads]


async def started(
    engine: Engine, clock: FakeClock | None = None, **config: Any
) -> DynamicBatcher[Any, Any]:
    config.setdefault("max_queue_delay_ms", LONG_DELAY_MS)
    batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
        BatcherConfig(**config), engine, clock=clock or FakeClock()
    )
    await batcher.start()
    return batcher


# --- config ------------------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = BatcherConfig()
    assert (config.max_batch_size, config.max_queue_delay_ms, config.max_queue_size) == (8, 0.0, 64)
    assert config.default_deadline_ms is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 2.5}, "max_batch_size"),
        ({"max_queue_delay_ms": -1.0}, "max_queue_delay_ms"),
        ({"max_queue_delay_ms": float("nan")}, "max_queue_delay_ms"),
        ({"max_queue_size": 4}, "max_queue_size"),  # smaller than max_batch_size=8
        ({"default_deadline_ms": 0}, "default_deadline_ms"),
        ({"default_deadline_ms": float("inf")}, "default_deadline_ms"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatcherConfig(**kwargs)


# --- when a batch goes -------------------------------------------------------------------------


def test_full_batch_goes_at_once_without_waiting_for_the_delay() -> None:
    async def main() -> None:
        engine = Engine()
        batcher = await started(engine, max_batch_size=4)
        tasks = submit_all(batcher, [0, 1, 2])
        await settle()
        assert engine.plans == []  # partial, and the (fake) delay never passes
        tasks += submit_all(batcher, [3])  # the arrival that completes the batch sends it
        assert await finish(tasks) == ["r0", "r1", "r2", "r3"]
        assert engine.batches == [[0, 1, 2, 3]]
        assert engine.plans[0].queue_waits_s == [0.0] * 4
        await batcher.stop()

    run(main())


def test_partial_batch_goes_when_its_oldest_request_has_waited_the_delay() -> None:
    async def main() -> None:
        engine = Engine()
        clock = FakeClock()
        batcher = await started(engine, clock, max_batch_size=8, max_queue_delay_ms=5.0)
        tasks = submit_all(batcher, ["old"])
        await settle()  # a task enqueues when it first runs, not when it is created
        clock.advance_ms(3.0)
        tasks += submit_all(batcher, ["young"])
        await settle()
        clock.advance_ms(1.0)  # oldest has waited 4 ms
        batcher.wake()
        await settle()
        assert engine.plans == []
        clock.advance_ms(2.0)  # oldest has waited 6 ms >= 5 ms; the young one only 3 ms
        batcher.wake()
        assert await finish(tasks) == ["rold", "ryoung"]
        assert engine.batches == [["old", "young"]]
        assert engine.plans[0].queue_waits_s == pytest.approx([0.006, 0.003])
        await batcher.stop()

    run(main())


def test_zero_delay_sends_whatever_is_queued() -> None:
    async def main() -> None:
        engine = Engine()
        batcher = await started(engine, max_batch_size=8, max_queue_delay_ms=0.0)
        assert await finish(submit_all(batcher, ["alone"])) == ["ralone"]
        await batcher.stop()

    run(main())


# --- buckets and order -------------------------------------------------------------------------


def test_different_buckets_never_share_a_batch() -> None:
    async def main() -> None:
        engine = Engine()
        clock = FakeClock()
        batcher = await started(engine, clock, max_batch_size=2)
        shapes = [(800, 1344), (1344, 800), (800, 1344), (1344, 800), (608, 608)]
        tasks = [asyncio.create_task(batcher.submit(i, shape)) for i, shape in enumerate(shapes)]
        await wait_until(lambda: len(engine.plans) == 2)  # the two full buckets went at once
        assert batcher.queue_depth == 1
        clock.advance_ms(LONG_DELAY_MS)
        batcher.wake()
        assert await finish(tasks) == ["r0", "r1", "r2", "r3", "r4"]
        assert [(plan.bucket, plan.payloads) for plan in engine.plans] == [
            ((800, 1344), [0, 2]),
            ((1344, 800), [1, 3]),
            ((608, 608), [4]),
        ]
        await batcher.stop()

    run(main())


def test_bucket_with_the_oldest_request_goes_first() -> None:
    async def main() -> None:
        engine = Engine()
        clock = FakeClock()
        batcher = await started(engine, clock, max_batch_size=4, max_queue_delay_ms=5.0)
        tasks = submit_all(batcher, ["b0"], bucket="b")
        await settle()
        clock.advance_ms(1.0)
        tasks += submit_all(batcher, ["a0"], bucket="a")
        await settle()
        clock.advance_ms(10.0)  # both are due: the older bucket ("b") goes first
        batcher.wake()
        await finish(tasks)
        assert [plan.bucket for plan in engine.plans] == ["b", "a"]
        await batcher.stop()

    run(main())


def test_full_bucket_does_not_wait_behind_an_older_partial_one() -> None:
    async def main() -> None:
        engine = Engine()
        clock = FakeClock()
        batcher = await started(engine, clock, max_batch_size=3)
        waiting = submit_all(batcher, ["old"], bucket="small")
        full = submit_all(batcher, [1, 2, 3], bucket="large")
        assert await finish(full) == ["r1", "r2", "r3"]
        assert not waiting[0].done() and batcher.queue_depth == 1
        clock.advance_ms(LONG_DELAY_MS)
        batcher.wake()
        assert await finish(waiting) == ["rold"]
        await batcher.stop()

    run(main())


def test_fifo_within_a_bucket_and_each_caller_gets_its_own_result() -> None:
    async def main() -> None:
        engine = Engine(result=lambda p: p * 10)
        clock = FakeClock()
        batcher = await started(engine, clock, max_batch_size=3)
        tasks = submit_all(batcher, list(range(7)))
        await wait_until(lambda: len(engine.plans) == 2)
        clock.advance_ms(LONG_DELAY_MS)
        batcher.wake()
        assert await finish(tasks) == [0, 10, 20, 30, 40, 50, 60]
        assert engine.batches == [[0, 1, 2], [3, 4, 5], [6]]
        await batcher.stop()

    run(main())


# --- back-pressure and deadlines ---------------------------------------------------------------


def test_queue_full_is_rejected_at_once_with_retry_after_and_the_batcher_recovers() -> None:
    async def main() -> None:
        engine = Engine(gated=True)
        batcher = await started(engine, max_batch_size=2, max_queue_size=2)
        in_flight = submit_all(batcher, [0, 1])
        await wait_until(engine.entered.is_set)
        queued = submit_all(batcher, [2, 3])  # a full batch, but the engine is busy
        await settle()
        assert batcher.queue_depth == 2
        with pytest.raises(QueueFullError) as raised:
            await batcher.submit(4, "b")
        assert raised.value.retry_after_s > 0
        assert batcher.queue_depth == 2  # the rejected request was not queued
        engine.release.set()
        assert await finish(in_flight + queued) == ["r0", "r1", "r2", "r3"]
        assert await finish(submit_all(batcher, [5, 6])) == ["r5", "r6"]
        assert 4 not in engine.seen()
        await batcher.stop()

    run(main())


def test_deadline_passing_in_the_queue_drops_the_request_uncomputed() -> None:
    async def main() -> None:
        engine = Engine()
        clock = FakeClock()
        batcher = await started(engine, clock, max_batch_size=4, max_queue_delay_ms=100.0)
        doomed = asyncio.create_task(batcher.submit("doomed", "b", deadline_ms=10.0))
        patient = submit_all(batcher, ["patient"])
        await settle()
        clock.advance_ms(11.0)
        batcher.wake()
        with pytest.raises(DeadlineExceededError):
            await asyncio.wait_for(doomed, 3.0)
        assert batcher.queue_depth == 1
        clock.advance_ms(100.0)
        batcher.wake()
        assert await finish(patient) == ["rpatient"]
        assert engine.seen() == ["patient"]
        await batcher.stop()

    run(main())


def test_deadline_passing_while_another_batch_computes_is_reported_at_once() -> None:
    async def main() -> None:
        engine = Engine(gated=True)
        clock = FakeClock()
        batcher = await started(engine, clock, max_batch_size=1, max_queue_size=4)
        first = submit_all(batcher, ["first"])
        await wait_until(engine.entered.is_set)
        doomed = asyncio.create_task(batcher.submit("doomed", "b", deadline_ms=10.0))
        await settle()
        clock.advance_ms(20.0)
        batcher.wake()
        with pytest.raises(DeadlineExceededError):
            await asyncio.wait_for(doomed, 3.0)
        assert not engine.release.is_set()  # answered while the engine was still busy
        engine.release.set()
        assert await finish(first) == ["rfirst"]
        await settle()
        assert engine.seen() == ["first"]
        await batcher.stop()

    run(main())


def test_result_computed_past_its_deadline_is_discarded() -> None:
    async def main() -> None:
        clock = FakeClock()
        engine = Engine(on_run=lambda plan: clock.advance_ms(20.0))  # the batch takes 20 ms
        batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
            BatcherConfig(
                max_batch_size=2, max_queue_delay_ms=LONG_DELAY_MS, default_deadline_ms=10
            ),
            engine,
            clock=clock,
        )
        await batcher.start()
        late = asyncio.create_task(batcher.submit("default-deadline", "b"))
        on_time = asyncio.create_task(batcher.submit("own-deadline", "b", deadline_ms=50.0))
        results = await finish([late, on_time])
        assert isinstance(results[0], DeadlineExceededError)
        assert results[1] == "rown-deadline"
        assert engine.seen() == ["default-deadline", "own-deadline"]
        await batcher.stop()

    run(main())


def test_deadline_passing_during_compute_is_reported_before_the_batch_ends() -> None:
    async def main() -> None:
        engine = Engine(gated=True)
        clock = FakeClock()
        batcher = await started(engine, clock, max_batch_size=1)
        computing = asyncio.create_task(batcher.submit("slow", "b", deadline_ms=10.0))
        await wait_until(engine.entered.is_set)
        clock.advance_ms(20.0)
        batcher.wake()
        with pytest.raises(DeadlineExceededError):
            await asyncio.wait_for(computing, 3.0)
        assert not engine.release.is_set()  # the caller did not wait for the batch to end
        engine.release.set()
        assert await finish(submit_all(batcher, ["next"])) == ["rnext"]
        await batcher.stop()

    run(main())


def test_cancelled_caller_is_taken_out_of_the_queue() -> None:
    async def main() -> None:
        engine = Engine()
        clock = FakeClock()
        batcher = await started(engine, clock, max_batch_size=4)
        gone, stays = submit_all(batcher, ["gone", "stays"])
        await settle()
        gone.cancel()
        await settle()
        assert batcher.queue_depth == 1
        clock.advance_ms(LONG_DELAY_MS)
        batcher.wake()
        assert await finish([stays]) == ["rstays"]
        assert engine.seen() == ["stays"]
        await batcher.stop()

    run(main())


def test_submit_rejects_a_bad_deadline_and_needs_a_running_batcher() -> None:
    async def main() -> None:
        batcher: DynamicBatcher[Any, Any] = DynamicBatcher(BatcherConfig(), Engine())
        with pytest.raises(BatcherStoppedError):
            await batcher.submit(0, "b")
        await batcher.start()
        with pytest.raises(ValueError, match="deadline_ms"):
            await batcher.submit(0, "b", deadline_ms=0.0)
        await batcher.stop()

    run(main())


# --- failures ----------------------------------------------------------------------------------


def test_exception_in_one_result_slot_fails_only_that_request() -> None:
    def result(payload: str) -> Any:
        return ValueError(f"cannot decode {payload}") if payload == "bad" else payload.upper()

    async def main() -> None:
        batcher = await started(Engine(result=result), max_batch_size=3)
        results = await finish(submit_all(batcher, ["ok", "bad", "fine"]))
        assert results[0] == "OK" and results[2] == "FINE"
        assert isinstance(results[1], ValueError) and "bad" in str(results[1])
        await batcher.stop()

    run(main())


def test_run_batch_crash_fails_only_its_batch_and_later_requests_succeed() -> None:
    def result(payload: str) -> str:
        if payload == "boom":
            raise RuntimeError("engine crashed")
        return payload

    async def main() -> None:
        batcher = await started(Engine(result=result), max_batch_size=2)
        crashed = await finish(submit_all(batcher, ["ok", "boom"]))
        assert all(isinstance(error, BatchExecutionError) for error in crashed)
        assert all(isinstance(error.__cause__, RuntimeError) for error in crashed)
        assert crashed[0] is not crashed[1]  # each caller gets its own exception
        assert await finish(submit_all(batcher, ["later", "still"])) == ["later", "still"]
        await batcher.stop()

    run(main())


def test_wrong_number_of_results_fails_the_batch() -> None:
    async def main() -> None:
        batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
            BatcherConfig(max_batch_size=2, max_queue_delay_ms=0.0),
            lambda plan: ["only one"],
        )
        await batcher.start()
        results = await finish(submit_all(batcher, [1, 2]))
        assert all(isinstance(error, BatchExecutionError) for error in results)
        assert "1 results for 2 payloads" in str(results[0])
        await batcher.stop()

    run(main())


# --- shutdown ----------------------------------------------------------------------------------


def test_stop_with_drain_finishes_queued_and_in_flight_work() -> None:
    async def main() -> None:
        engine = Engine(gated=True)
        batcher = await started(engine, max_batch_size=2)
        in_flight = submit_all(batcher, [0, 1])
        await wait_until(engine.entered.is_set)
        queued = submit_all(batcher, [2])  # partial; the (fake) delay never passes
        await settle()
        stopping = asyncio.create_task(batcher.stop(drain=True))
        await settle()
        with pytest.raises(BatcherStoppedError):
            await batcher.submit(3, "b")
        assert not stopping.done()
        engine.release.set()
        await asyncio.wait_for(stopping, 3.0)
        assert await finish(in_flight + queued) == ["r0", "r1", "r2"]
        assert engine.batches == [[0, 1], [2]]  # drained without waiting for the delay

    run(main())


def test_stop_without_drain_fails_pending_requests_at_once() -> None:
    async def main() -> None:
        engine = Engine(gated=True)
        batcher = await started(engine, max_batch_size=2)
        pending = submit_all(batcher, [0, 1, 2])
        await wait_until(engine.entered.is_set)
        await batcher.stop(drain=False)
        results = await finish(pending)
        assert all(isinstance(error, BatcherStoppedError) for error in results)
        engine.release.set()  # let the worker thread finish; its results go nowhere

    run(main())


# --- metrics and the event loop ----------------------------------------------------------------


def test_metric_callbacks_see_batches_larger_than_one_under_concurrent_submits() -> None:
    async def main() -> None:
        batches: list[tuple[int, list[float], float]] = []
        depths: list[int] = []
        clock = FakeClock()
        engine = Engine(on_run=lambda plan: clock.advance_ms(2.0))
        batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
            BatcherConfig(max_batch_size=8, max_queue_delay_ms=LONG_DELAY_MS),
            engine,
            clock=clock,
            on_batch=lambda size, waits, compute_s: batches.append((size, waits, compute_s)),
            on_queue_depth=depths.append,
        )
        await batcher.start()
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(i, "b") for i in range(16))), 3.0
        )
        assert results == [f"r{i}" for i in range(16)]
        assert [size for size, _, _ in batches] == [8, 8]
        assert all(len(waits) == size for size, waits, _ in batches)
        assert [compute_s for _, _, compute_s in batches] == pytest.approx([0.002, 0.002])
        assert batches[1][1] == pytest.approx([0.002] * 8)  # waited for the first batch
        assert max(depths) > 1 and depths[-1] == 0
        await batcher.stop()

    run(main())


def test_batches_larger_than_one_with_the_real_clock() -> None:
    async def main() -> None:
        sizes: list[int] = []
        batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
            BatcherConfig(max_batch_size=4, max_queue_delay_ms=2.0),
            Engine(),
            on_batch=lambda size, waits, compute_s: sizes.append(size),
        )
        await batcher.start()
        await asyncio.wait_for(asyncio.gather(*(batcher.submit(i, "b") for i in range(12))), 3.0)
        assert sum(sizes) == 12 and max(sizes) > 1
        await batcher.stop()

    run(main())


def test_failing_metric_callback_does_not_fail_requests() -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("exporter down")

    async def main() -> None:
        batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
            BatcherConfig(max_batch_size=2, max_queue_delay_ms=0.0),
            Engine(),
            on_batch=broken,
            on_queue_depth=broken,
        )
        await batcher.start()
        assert await finish(submit_all(batcher, [1, 2])) == ["r1", "r2"]
        await batcher.stop()

    run(main())


def test_event_loop_stays_responsive_while_run_batch_computes() -> None:
    # run_batch blocks until a coroutine on the event loop opens the gate: were compute on the
    # loop, the coroutine could never run and the gate would time out.
    async def main() -> None:
        engine = Engine(gated=True)
        batcher = await started(engine, max_batch_size=2, max_queue_delay_ms=0.0)
        work = submit_all(batcher, [0, 1])
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            await wait_until(engine.entered.is_set)
            for _ in range(5):
                ticks += 1
                await asyncio.sleep(0)
            engine.release.set()

        await asyncio.wait_for(ticker(), 3.0)
        assert ticks == 5
        assert await finish(work) == ["r0", "r1"]
        assert await finish(submit_all(batcher, [2])) == ["r2"]
        assert len(engine.threads) == 1  # one dedicated worker thread
        assert threading.get_ident() not in engine.threads
        await batcher.stop()

    run(main())


# --- priorities (online requests before batch-job work) ---------------------------------------


def test_online_requests_go_before_queued_job_work_and_job_work_fills_spare_slots() -> None:
    async def main() -> None:
        engine = Engine(gated=True)
        batcher = await started(engine, max_batch_size=3, max_queue_delay_ms=0.0)
        first = submit_all(batcher, ["j0"])  # holds the engine
        await wait_until(engine.entered.is_set)
        jobs = [asyncio.create_task(batcher.submit(f"j{i}", "b", priority=PRIORITY_BATCH))
                for i in range(1, 5)]
        await settle()
        online = submit_all(batcher, ["o1", "o2"])  # arrive after four job items
        await settle()
        engine.release.set()
        await finish(first + jobs + online)
        # the next batch: both online requests, then the oldest job item in the spare slot
        assert engine.batches[1] == ["o1", "o2", "j1"]
        assert engine.batches[2] == ["j2", "j3", "j4"]
        await batcher.stop()

    run(main())


def test_job_work_has_its_own_queue_bound_and_never_fills_the_online_one() -> None:
    async def main() -> None:
        engine = Engine(gated=True)
        batcher = await started(engine, max_batch_size=2, max_queue_size=2,
                                max_queue_delay_ms=0.0)
        first = submit_all(batcher, [0])
        await wait_until(engine.entered.is_set)
        jobs = [asyncio.create_task(batcher.submit(f"j{i}", "b", priority=PRIORITY_BATCH))
                for i in range(2)]
        await settle()
        with pytest.raises(QueueFullError):  # the job lane is full...
            await batcher.submit("j2", "b", priority=PRIORITY_BATCH)
        online = submit_all(batcher, ["o1", "o2"])  # ...the online lane is not
        await settle()
        assert batcher.queue_depth == 4
        with pytest.raises(ValueError, match="unknown priority"):
            await batcher.submit("x", "b", priority=7)
        engine.release.set()
        assert await finish(first + online + jobs) == ["r0", "ro1", "ro2", "rj0", "rj1"]
        await batcher.stop()

    run(main())


def test_job_work_waiting_past_batch_max_wait_is_served_like_online_work() -> None:
    """Aging: a job bucket behind a steady online stream of another shape still runs."""
    async def main() -> None:
        engine = Engine(gated=True)
        clock = FakeClock()
        batcher = await started(engine, clock, max_batch_size=2, max_queue_delay_ms=0.0,
                                batch_max_wait_ms=100.0)
        first = submit_all(batcher, ["o0"], bucket="online")
        await wait_until(engine.entered.is_set)
        job = [asyncio.create_task(batcher.submit("j0", "job", priority=PRIORITY_BATCH))]
        await settle()
        clock.advance_ms(50.0)
        online = submit_all(batcher, ["o1"], bucket="online")  # newer, but online
        await settle()
        engine.release.set()
        await finish(first + online + job)
        assert engine.batches == [["o0"], ["o1"], ["j0"]]  # not aged yet: online first

        engine2 = Engine(gated=True)
        batcher2 = await started(engine2, clock, max_batch_size=2, max_queue_delay_ms=0.0,
                                 batch_max_wait_ms=100.0)
        first = submit_all(batcher2, ["o0"], bucket="online")
        await wait_until(engine2.entered.is_set)
        job = [asyncio.create_task(batcher2.submit("j0", "job", priority=PRIORITY_BATCH))]
        await settle()
        clock.advance_ms(150.0)  # the job item has waited past batch_max_wait_ms
        online = submit_all(batcher2, ["o1"], bucket="online")
        await settle()
        engine2.release.set()
        await finish(first + online + job)
        assert engine2.batches == [["o0"], ["j0"], ["o1"]]
        await batcher.stop()
        await batcher2.stop()

    run(main())


def test_aged_job_batches_alternate_with_online_ones() -> None:
    """Online work waits for at most one aged job batch at a time."""
    async def main() -> None:
        engine = Engine(gated=True)
        clock = FakeClock()
        batcher = await started(engine, clock, max_batch_size=1, max_queue_delay_ms=0.0,
                                batch_max_wait_ms=100.0)
        first = submit_all(batcher, ["o0"], bucket="online")
        await wait_until(engine.entered.is_set)
        jobs = [asyncio.create_task(batcher.submit(f"j{i}", f"job{i}", priority=PRIORITY_BATCH))
                for i in range(3)]
        await settle()
        clock.advance_ms(150.0)  # every job item is aged
        online = submit_all(batcher, ["o1", "o2"], bucket="online")
        await settle()
        engine.release.set()
        await finish(first + online + jobs)
        assert engine.batches == [["o0"], ["j0"], ["o1"], ["j1"], ["o2"], ["j2"]]
        await batcher.stop()

    run(main())


# --- load shedding -----------------------------------------------------------------------------


def test_load_shedding_refuses_what_would_wait_past_its_deadline_and_takes_what_fits() -> None:
    """Once a batch's compute time is known (2 s, by the fake clock), a request behind a busy
    engine and a full batch expects 3 batches x 2 s: with 5 s left it is refused at once
    (OverloadedError, 429) and never computed; with 7 s left it is queued and served."""
    clock = FakeClock()
    shed: list[int] = []

    def slow(plan: BatchPlan[Any]) -> None:
        clock.advance_ms(2000.0)

    async def main() -> None:
        engine = Engine(gated=True, on_run=slow)
        batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
            BatcherConfig(max_batch_size=2, max_queue_delay_ms=0.0), engine, clock=clock,
            on_shed=lambda: shed.append(1))
        await batcher.start()
        with_no_estimate = submit_all(batcher, [0])  # nothing to estimate from: taken
        await wait_until(engine.entered.is_set)
        engine.release.set()
        assert await finish(with_no_estimate) == ["r0"]
        engine.gated, engine.plans = True, []
        engine.entered.clear()
        engine.release.clear()
        busy = submit_all(batcher, [1])
        await wait_until(engine.entered.is_set)
        queued = submit_all(batcher, [2, 3])
        await settle()
        with pytest.raises(OverloadedError) as refused:
            await batcher.submit(4, "b", deadline_ms=5000.0)
        assert refused.value.retry_after_s == pytest.approx(4.0)
        fits = asyncio.create_task(batcher.submit(5, "b", deadline_ms=7000.0))
        await settle()
        engine.release.set()
        assert await finish(busy + queued + [fits]) == ["r1", "r2", "r3", "r5"]
        assert 4 not in engine.seen()
        await batcher.stop()

    run(main())
    assert shed == [1]
