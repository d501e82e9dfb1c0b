"""Caption decoding scheduled per step, as LLM servers schedule it (Orca's iteration-level
batching, vLLM's continuous batching).

Every iteration of one worker thread: requests past their deadline leave (504) and stop costing
work; waiting requests join while the row budget allows (their image side computed once,
batched with the other arrivals of the same padded shape, then the [CLS] prefill); one
`caption_step` runs the live beams of every in-flight caption as one batch, each row taking its
prefix's cached keys and values; finished captions leave at once (their grounding pass batched)
and their rows go to whoever waits. A caption that arrives while others decode waits for one
step, not for their whole captions (no head-of-line blocking).

Load shedding: an online request whose expected completion (the captions ahead of it, at the
recent caption time and the concurrency the row budget allows, then its own at that time plus
twice its recent spread: captions differ in length, and one that joins busy rows is as slow as
they are) is past its deadline gets `OverloadedError` (429 + Retry-After) at once, before any
work is spent on it, instead of a 504 after it; requests ask (`admit`) before their image's
vision work too. An idle decoder takes every caption.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, Self, TypeVar

from torch import Tensor

from service.batching import (
    PRIORITY_ONLINE,
    BatcherStoppedError,
    BatchExecutionError,
    DeadlineExceededError,
    FailureKind,
    OverloadedError,
    QueueFullError,
)
from service.pipeline.caption_search import BeamState, CaptionGrammar, CaptionSearch

log = logging.getLogger(__name__)

WorkT = TypeVar("WorkT", contravariant=True)
ImageT = TypeVar("ImageT")
ResultT = TypeVar("ResultT")
CacheT = TypeVar("CacheT", bound="CacheRows")
W = TypeVar("W")
I = TypeVar("I")  # noqa: E741 - the image side's type, beside W(ork) and R(esult)
R = TypeVar("R")
C = TypeVar("C", bound="CacheRows")

_EMA_WEIGHT = 0.2


class CacheRows(Protocol):
    """A prefix cache (keys and values) of some rows, one row per live beam."""

    def select(self, rows: Sequence[int]) -> Self:
        """The cache of these rows, in this order (a gather: beams reordered or dropped)."""
        ...


class CaptionModel(Protocol[WorkT, ImageT, CacheT, ResultT]):
    """What the decoder needs of the model (`ModelRunner` implements it; tests fake it)."""

    cls_id: int
    sep_id: int
    grammar: CaptionGrammar | None

    def caption_images(self, works: Sequence[WorkT]) -> list[ImageT]:
        """The image side of works of one padded shape, computed once (one batch)."""
        ...

    def caption_prefill(self, images: Sequence[ImageT]) -> tuple[Tensor, list[CacheT]]:
        """[CLS] on each image: (images, vocab) logits and each image's one-row cache."""
        ...

    def caption_step(self, parts: Sequence[tuple[ImageT, list[list[int]], CacheT]]
                     ) -> list[tuple[Tensor, CacheT]]:
        """One decoding step of every part (an image, its live prefixes, their cache) as one
        batch: per part, its rows' next-token logits and the cache extended by their newest
        token."""
        ...

    def caption_results(self, works: Sequence[WorkT], images: Sequence[ImageT],
                        ranked: Sequence[list[list[int]]]) -> list[ResultT]:
        """Finished searches (`BeamState.results`) -> each request's answer."""
        ...


@dataclass(frozen=True)
class DecoderConfig:
    """Knobs of the caption decoder.

    max_rows: most beams in one decoding step (`caption_step` batch rows); a caption takes up to
        `beams` of them, so it bounds the captions decoded at once. max_queue_size: most
        captions waiting to join; beyond, 429. default_deadline_ms: for requests that bring
        none (None: no deadline).
    """

    max_rows: int = 64
    max_queue_size: int = 64
    default_deadline_ms: float | None = None

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_queue_size < 1:
            raise ValueError(f"max_rows and max_queue_size must be >= 1: {self}")


@dataclass(frozen=True)
class DecoderCallbacks:
    """Metric hooks, called from the decoder's thread (Prometheus collectors are thread-safe).

    on_step(rows, seconds) per decoding step; on_live(captions) when the in-flight count
    changes; on_tokens(n) per step, the tokens it generated; on_first_token(seconds) from
    submission to a caption's first token; on_admit(seconds) from submission to joining;
    on_shed() per request turned away by load shedding; on_failure(kind) per failed iteration
    (`error`, or `nan` for non-finite outputs).
    """

    on_step: Callable[[int, float], None] | None = None
    on_live: Callable[[int], None] | None = None
    on_tokens: Callable[[int], None] | None = None
    on_first_token: Callable[[float], None] | None = None
    on_admit: Callable[[float], None] | None = None
    on_shed: Callable[[], None] | None = None
    on_failure: Callable[[FailureKind], None] | None = None


@dataclass(eq=False)
class _Caption(Generic[W, I, C, R]):
    """One request in the decoder: queued, then decoding."""

    work: W
    search: CaptionSearch
    shape: tuple[int, ...]  # what its image side stacks by
    future: asyncio.Future[R]
    loop: asyncio.AbstractEventLoop
    submitted_s: float
    deadline_s: float | None
    priority: int
    seq: int
    beams: BeamState | None = None
    image: I | None = None
    cache: C | None = None
    started_s: float = 0.0
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = self.search.beams

    def order(self) -> tuple[int, int]:
        return (self.priority, self.seq)

    def expired(self, now_s: float) -> bool:
        return self.deadline_s is not None and now_s >= self.deadline_s

    def settle(self, result: R) -> None:
        """Answer the waiting coroutine (from the decoder's thread, on its loop)."""
        def answer() -> None:
            if not self.future.done():
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(answer)

    def fail(self, error: BaseException) -> None:
        def answer() -> None:
            if not self.future.done():
                self.future.set_exception(error)

        self.loop.call_soon_threadsafe(answer)


class CaptionDecoder(Generic[W, I, C, R]):
    """Iteration-level scheduling of caption decoding over a `CaptionModel`.

    `submit(work, search, shape, ...)` from the event loop; `start()`/`stop()` on it. `clock`
    (seconds, monotonic) is injectable for tests, as in `DynamicBatcher`.
    """

    def __init__(self, model: CaptionModel[W, I, C, R], config: DecoderConfig, *,
                 clock: Callable[[], float] | None = None,
                 callbacks: DecoderCallbacks | None = None, name: str = "caption") -> None:
        self.model = model
        self.config = config
        self.name = name
        self._clock = time.monotonic if clock is None else clock
        self._callbacks = callbacks or DecoderCallbacks()
        self._lock = threading.Condition()
        self._queue: list[_Caption[W, I, C, R]] = []
        self._running: list[_Caption[W, I, C, R]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stopping = False
        self._caption_ema_s: float | None = None
        self._caption_spread_s = 0.0  # moving mean of |caption time - its moving mean|

    # --- event-loop side ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._accepting, self._stopping = True, False
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-decoder",
                                        daemon=True)
        self._thread.start()

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting; `drain` finishes queued and in-flight captions first, otherwise they
        fail with `BatcherStoppedError`."""
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._accepting = False
            if not drain:
                stopped = BatcherStoppedError(f"{self.name} stopped before answering")
                for caption in [*self._queue, *self._running]:
                    caption.fail(stopped)
                self._queue.clear()
                self._running.clear()
            self._stopping = True
            self._lock.notify_all()
        await asyncio.to_thread(thread.join)
        self._thread = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def live(self) -> int:
        return len(self._running)

    async def submit(self, work: W, search: CaptionSearch, shape: tuple[int, ...], *,
                     deadline_ms: float | None = None, priority: int = PRIORITY_ONLINE) -> R:
        """Decode one caption. Raises `QueueFullError` when too many wait, `OverloadedError`
        when it is expected to finish past its deadline, `DeadlineExceededError` when the
        deadline passes (it then stops costing work), `BatcherStoppedError` when stopping, or
        `BatchExecutionError` when the model raised for a step it was in."""
        if deadline_ms is None and priority == PRIORITY_ONLINE:
            deadline_ms = self.config.default_deadline_ms
        loop = asyncio.get_running_loop()
        now = self._clock()
        with self._lock:
            self._admit(search, deadline_ms, priority)
            caption: _Caption[W, I, C, R] = _Caption(
                work=work, search=search, shape=shape, future=loop.create_future(), loop=loop,
                submitted_s=now,
                deadline_s=None if deadline_ms is None else now + deadline_ms / 1000.0,
                priority=priority, seq=next(self._seq))
            self._queue.append(caption)
            self._lock.notify_all()
        try:
            return await self._answer(caption)
        except asyncio.CancelledError:
            with self._lock:  # the caller left: stop costing work
                if caption in self._queue:
                    self._queue.remove(caption)
            raise

    def admit(self, search: CaptionSearch, *, deadline_ms: float | None = None,
              priority: int = PRIORITY_ONLINE) -> None:
        """Raise what `submit` would raise for this caption now, as if its image side took no
        time (`BatcherStoppedError`, `QueueFullError`, `OverloadedError`): a request asks before
        its image's vision work, so a caption turned away costs none. What it is then told
        holds at `submit` a fortiori unless the captions ahead finish first."""
        if deadline_ms is None and priority == PRIORITY_ONLINE:
            deadline_ms = self.config.default_deadline_ms
        with self._lock:
            self._admit(search, deadline_ms, priority)

    def _admit(self, search: CaptionSearch, deadline_ms: float | None, priority: int) -> None:
        """Under the lock: refuse a caption when stopping, when its queue is full, or (online,
        with a deadline) when it is expected to finish past its deadline."""
        if not self._accepting:
            raise BatcherStoppedError(f"{self.name} is not accepting requests")
        depth = sum(c.priority == priority for c in self._queue)
        if depth >= self.config.max_queue_size:
            raise QueueFullError(f"{self.name} queue is full ({depth} captions waiting)",
                                 retry_after_s=self._wait_s(depth, search))
        if deadline_ms is not None and priority == PRIORITY_ONLINE:
            expected_s = self._expected_s(depth, search)
            if expected_s is not None and expected_s * 1000.0 > deadline_ms:
                _call(self._callbacks.on_shed)
                raise OverloadedError(
                    f"{self.name}: {len(self._queue)} captions waiting and "
                    f"{len(self._running)} decoding are expected to take "
                    f"{expected_s * 1000.0:.0f} ms with this one, past its deadline "
                    f"({deadline_ms:.0f} ms left)", retry_after_s=self._wait_s(depth, search))

    async def _answer(self, caption: _Caption[W, I, C, R]) -> R:
        """The caption's answer. Its deadline is also kept here, on the event loop: a decoding
        step that hangs cannot hold the caller past it (the decoder's thread drops the caption
        when it looks next, as it drops any expired one)."""
        while caption.deadline_s is not None and not caption.future.done():
            left_s = caption.deadline_s - self._clock()
            if left_s <= 0:
                caption.future.set_exception(DeadlineExceededError(
                    f"{self.name}: deadline passed while waiting for a decoding step "
                    f"({(self._clock() - caption.submitted_s) * 1000.0:.0f} ms after "
                    "submission)"))
                break
            await asyncio.wait([caption.future], timeout=left_s)
        return await caption.future

    def _rounds_ahead(self, depth: int, search: CaptionSearch) -> int:
        """Full rounds of captions that decode before a new arrival behind `depth` waiting
        ones: the row budget decodes `max_rows // beams` captions at once."""
        slots = max(1, self.config.max_rows // search.beams)
        return (len(self._running) + depth) // slots

    def _wait_s(self, depth: int, search: CaptionSearch) -> float:
        """Seconds until a new arrival would join (for Retry-After)."""
        per_caption = self._caption_ema_s or 1.0
        return max(0.001, self._rounds_ahead(depth, search) * per_caption)

    def _expected_s(self, depth: int, search: CaptionSearch) -> float | None:
        """Expected seconds to a new arrival's answer: the rounds ahead, then its own, with
        room for a slower one than the mean. None when the decoder is idle (so a slow spell
        cannot make it refuse everything) or before any caption finished (nothing to estimate
        from)."""
        if self._caption_ema_s is None or not (self._running or self._queue):
            return None
        own_s = self._caption_ema_s + 2.0 * self._caption_spread_s
        return self._rounds_ahead(depth, search) * self._caption_ema_s + own_s

    # --- the decoder's thread: expire, admit, step, finish ------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._running and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self._queue and not self._running:
                    return
            try:
                self._iteration()
            except Exception as exc:  # the model failed: fail what it was working on, go on
                log.exception("%s: decoding step failed", self.name)
                _call(self._callbacks.on_failure, FailureKind.of(exc))
                with self._lock:
                    failed, self._running = self._running, []
                _call(self._callbacks.on_live, 0)
                for caption in failed:
                    error = BatchExecutionError(f"{self.name} failed: {exc!r}")
                    error.__cause__ = exc
                    caption.fail(error)

    def _iteration(self) -> None:
        now = self._clock()
        joining = self._expire_and_admit(now)
        if joining:
            self._join(joining, now)
        stepping = [c for c in self._running if c.beams is not None and not c.beams.finished]
        if stepping:
            self._step(stepping)
        self._finish([c for c in self._running if c.beams is not None and c.beams.finished])

    def _expire_and_admit(self, now: float) -> list[_Caption[W, I, C, R]]:
        with self._lock:
            gone = [c for c in (*self._queue, *self._running)
                    if c.expired(now) or c.future.cancelled()]
            for caption in gone:
                if caption in self._queue:
                    self._queue.remove(caption)
                else:
                    self._running.remove(caption)
                where = "in the queue" if caption.beams is None else "while decoding"
                caption.fail(DeadlineExceededError(
                    f"{self.name}: deadline passed {where} "
                    f"({(now - caption.submitted_s) * 1000.0:.0f} ms after submission)"))
            rows = sum(c.rows for c in self._running)
            joining: list[_Caption[W, I, C, R]] = []
            for caption in sorted(self._queue, key=_Caption.order):
                if rows + caption.rows > self.config.max_rows and (self._running or joining):
                    break
                joining.append(caption)
                rows += caption.rows
            for caption in joining:
                self._queue.remove(caption)
            self._running.extend(joining)
        if gone or joining:
            _call(self._callbacks.on_live, len(self._running))
        return joining

    def _join(self, joining: list[_Caption[W, I, C, R]], now: float) -> None:
        """Image side (batched per shape), then the [CLS] prefill, then the first token."""
        for caption in joining:
            caption.started_s = now
            _call(self._callbacks.on_admit, now - caption.submitted_s)
            caption.beams = BeamState(caption.search, self.model.cls_id, self.model.sep_id,
                                      self.model.grammar)
        by_shape: dict[tuple[int, ...], list[_Caption[W, I, C, R]]] = {}
        for caption in joining:
            by_shape.setdefault(caption.shape, []).append(caption)
        for group in by_shape.values():
            images = self.model.caption_images([c.work for c in group])
            for caption, image in zip(group, images, strict=True):
                caption.image = image
        starting = [c for c in joining if c.beams is not None and not c.beams.finished]
        if not starting:
            return
        logits, caches = self.model.caption_prefill([_image(c) for c in starting])
        first_token = self._clock()
        for row, (caption, cache) in enumerate(zip(starting, caches, strict=True)):
            assert caption.beams is not None
            parents = caption.beams.advance(logits[row:row + 1])
            caption.cache = cache.select(parents)
            _call(self._callbacks.on_first_token, first_token - caption.submitted_s)
        _call(self._callbacks.on_tokens, len(starting))

    def _step(self, stepping: list[_Caption[W, I, C, R]]) -> None:
        started = self._clock()
        parts = []
        for caption in stepping:
            assert caption.beams is not None and caption.cache is not None
            parts.append((_image(caption), caption.beams.prefixes(), caption.cache))
        outputs = self.model.caption_step(parts)
        rows = 0
        for caption, (logits, cache) in zip(stepping, outputs, strict=True):
            assert caption.beams is not None
            rows += logits.shape[0]
            parents = caption.beams.advance(logits)
            caption.cache = cache.select(parents) if parents else None
        _call(self._callbacks.on_step, rows, self._clock() - started)
        _call(self._callbacks.on_tokens, len(stepping))

    def _finish(self, finished: list[_Caption[W, I, C, R]]) -> None:
        if not finished:
            return
        ranked = [c.beams.results() for c in finished if c.beams is not None]
        results = self.model.caption_results([c.work for c in finished],
                                             [_image(c) for c in finished], ranked)
        now = self._clock()
        with self._lock:
            for caption in finished:
                self._running.remove(caption)
        _call(self._callbacks.on_live, len(self._running))
        for caption, result in zip(finished, results, strict=True):
            caption.settle(result)
            took = now - caption.started_s
            if self._caption_ema_s is None:
                self._caption_ema_s = took
                continue
            self._caption_spread_s += _EMA_WEIGHT * (abs(took - self._caption_ema_s)
                                                     - self._caption_spread_s)
            self._caption_ema_s += _EMA_WEIGHT * (took - self._caption_ema_s)


def _image(caption: _Caption[W, I, C, R]) -> I:
    assert caption.image is not None, "a caption decodes only once its image side is computed"
    return caption.image


def _call(callback: Callable[..., None] | None, *args: object) -> None:
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:
        log.exception("caption decoder metric callback %r failed", callback)

