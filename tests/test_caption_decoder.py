"""The caption decoder's iteration-level scheduling, on a fake model and a fake clock.

The fake model decodes a caption of a given length (its work item) with one beam; its steps
wait for the test to let them run, so a test can submit between two steps and see who was in
each one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

from service.batching import (
    PRIORITY_BATCH,
    BatcherStoppedError,
    DeadlineExceededError,
    OverloadedError,
)
from service.caption_decoder import CaptionDecoder, DecoderCallbacks, DecoderConfig
from service.pipeline.caption_search import CaptionSearch

CLS, SEP, WORD, VOCAB = 0, 1, 2, 4
GREEDY = CaptionSearch(max_tokens=32, beams=1)


@dataclass(frozen=True)
class FakeCache:
    """One row per beam: the tokens it has seen (what a real cache holds keys and values of)."""

    rows: tuple[tuple[int, ...], ...]

    def select(self, rows: Sequence[int]) -> FakeCache:
        return FakeCache(tuple(self.rows[r] for r in rows))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeModel:
    """Captions of `length` WORD tokens then [SEP]; each step waits for a permit."""

    cls_id: int = CLS
    sep_id: int = SEP
    grammar: None = None
    steps: list[list[int]] = field(default_factory=list)  # per step, the lengths decoding
    permits: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    entered: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    fail_at_step: int | None = None

    def _logits(self, length: int, generated: int) -> Tensor:
        logits = torch.zeros(VOCAB)
        logits[WORD if generated < length else SEP] = 10.0
        return logits

    def caption_images(self, works: Sequence[int]) -> list[int]:
        return list(works)

    def caption_prefill(self, images: Sequence[int]) -> tuple[Tensor, list[FakeCache]]:
        logits = torch.stack([self._logits(length, 0) for length in images])
        return logits, [FakeCache(((CLS,),)) for _ in images]

    def caption_step(self, parts: Sequence[tuple[int, list[list[int]], FakeCache]]
                     ) -> list[tuple[Tensor, FakeCache]]:
        self.entered.release()
        assert self.permits.acquire(timeout=10), "the test never let the step run"
        self.steps.append([length for length, _, _ in parts])
        if self.fail_at_step is not None and len(self.steps) == self.fail_at_step:
            raise RuntimeError("engine fault")
        out = []
        for length, prefixes, cache in parts:
            assert [list(row) for row in cache.rows] == [p[:-1] for p in prefixes]
            logits = torch.stack([self._logits(length, len(p) - 1) for p in prefixes])
            out.append((logits, FakeCache(tuple(tuple(p) for p in prefixes))))
        return out

    def caption_results(self, works: Sequence[int], images: Sequence[int],
                        ranked: Sequence[list[list[int]]]) -> list[list[int]]:
        return [r[0] for r in ranked]


def _decoder(model: FakeModel, clock: FakeClock, **config: object
             ) -> CaptionDecoder[int, int, FakeCache, list[int]]:
    return CaptionDecoder(model, DecoderConfig(**config), clock=clock)  # type: ignore[arg-type]


async def _enter(model: FakeModel) -> None:
    """Wait until the decoder is inside a step (it then waits for `_release`)."""
    assert await asyncio.to_thread(model.entered.acquire, True, 10), "no step started"


def _release(model: FakeModel) -> None:
    model.permits.release()


async def _steps(model: FakeModel, count: int) -> None:
    for _ in range(count):
        await _enter(model)
        _release(model)


async def _drive(model: FakeModel, *tasks: asyncio.Task[object]) -> None:
    """Let steps run until every task is answered."""
    while not all(task.done() for task in tasks):
        if await asyncio.to_thread(model.entered.acquire, True, 0.01):
            _release(model)


def test_a_request_joins_at_the_next_step_without_waiting_for_others() -> None:
    """Orca's iteration-level scheduling: B arrives while A decodes, joins A's next step, and
    finishes first (it is shorter); A never waits for B nor B for A."""
    model, clock = FakeModel(), FakeClock()

    async def scenario() -> None:
        decoder = _decoder(model, clock)
        await decoder.start()
        a = asyncio.create_task(decoder.submit(12, GREEDY, (1,)))
        await _steps(model, 3)  # A alone
        await _enter(model)  # the decoder is inside A's fourth step when B arrives
        b = asyncio.create_task(decoder.submit(2, GREEDY, (1,)))
        await asyncio.sleep(0.05)
        _release(model)
        await _steps(model, 2)  # B's two steps, beside A
        assert (await asyncio.wait_for(b, 10)) == [WORD, WORD]
        assert not a.done()
        await _drive(model, a)
        assert a.result() == [WORD] * 12
        await decoder.stop()

    asyncio.run(scenario())
    assert model.steps[:4] == [[12]] * 4
    assert model.steps[4:6] == [[12, 2]] * 2  # one batch, both captions
    assert model.steps[6:] == [[12]] * (len(model.steps) - 6)  # B left at once
    assert len(model.steps) == 12


def test_a_request_past_its_deadline_leaves_mid_decode_and_stops_costing_steps() -> None:
    model, clock = FakeModel(), FakeClock()

    async def scenario() -> None:
        decoder = _decoder(model, clock)
        await decoder.start()
        late = asyncio.create_task(decoder.submit(20, GREEDY, (1,), deadline_ms=1000.0))
        other = asyncio.create_task(decoder.submit(6, GREEDY, (1,)))
        await _steps(model, 2)
        clock.now = 1.5  # past the first one's deadline, mid-decode
        await _drive(model, late)
        with pytest.raises(DeadlineExceededError, match="while decoding"):
            late.result()
        await _drive(model, other)
        assert other.result() == [WORD] * 6
        await decoder.stop()

    asyncio.run(scenario())
    assert any(20 in step for step in model.steps)
    assert len([step for step in model.steps if 20 in step]) <= 3  # then it stopped costing
    assert len(model.steps) < 20


def test_load_shedding_turns_away_what_would_finish_past_its_deadline() -> None:
    """Once a caption's time is known, a request that would wait rounds of captions past its
    deadline is refused at once (429 + Retry-After), and one that fits is taken."""
    model, clock = FakeModel(), FakeClock()
    shed: list[int] = []

    async def scenario() -> None:
        decoder = CaptionDecoder(model, DecoderConfig(max_rows=1), clock=clock,  # type: ignore[arg-type]
                                 callbacks=DecoderCallbacks(on_shed=lambda: shed.append(1)))
        await decoder.start()
        first = asyncio.create_task(decoder.submit(2, GREEDY, (1,)))
        await _steps(model, 1)
        clock.now = 4.0  # the caption took 4 s
        await _drive(model, first)
        busy = asyncio.create_task(decoder.submit(30, GREEDY, (1,)))  # one row: all of them
        await _enter(model)
        with pytest.raises(OverloadedError) as refused:
            await decoder.submit(2, GREEDY, (1,), deadline_ms=5000.0)  # 2 rounds x 4 s > 5 s
        assert refused.value.retry_after_s == pytest.approx(4.0)
        with pytest.raises(OverloadedError):  # asked before any work: the same answer
            decoder.admit(GREEDY, deadline_ms=5000.0)
        decoder.admit(GREEDY, deadline_ms=9000.0)
        decoder.admit(GREEDY, priority=PRIORITY_BATCH)  # job work is never shed
        taken = asyncio.create_task(decoder.submit(2, GREEDY, (1,), deadline_ms=9000.0))
        await asyncio.sleep(0.05)
        _release(model)
        await _drive(model, busy, taken)
        assert taken.result() == [WORD, WORD]
        await decoder.stop()

    asyncio.run(scenario())
    assert shed == [1, 1]


def test_a_caption_joining_busy_rows_is_shed_when_its_own_time_passes_its_deadline() -> None:
    """Room in the rows is no promise: beside busy rows a caption takes the recent caption time
    (4 s here), so with 3 s left it is refused at once (a 504 later otherwise); with 5 s it is
    taken. An idle decoder takes any caption."""
    model, clock = FakeModel(), FakeClock()

    async def scenario() -> None:
        decoder = CaptionDecoder(model, DecoderConfig(max_rows=2), clock=clock)  # type: ignore[arg-type]
        await decoder.start()
        first = asyncio.create_task(decoder.submit(2, GREEDY, (1,)))
        await _steps(model, 1)
        clock.now = 4.0  # the caption took 4 s
        await _drive(model, first)
        alone = asyncio.create_task(decoder.submit(2, GREEDY, (1,), deadline_ms=1000.0))
        await _drive(model, alone)  # idle: taken, however short its deadline
        busy = asyncio.create_task(decoder.submit(30, GREEDY, (1,)))  # one row of two
        await _enter(model)
        with pytest.raises(OverloadedError):
            await decoder.submit(2, GREEDY, (1,), deadline_ms=3000.0)
        taken = asyncio.create_task(decoder.submit(2, GREEDY, (1,), deadline_ms=5000.0))
        await asyncio.sleep(0.05)
        _release(model)
        await _drive(model, busy, taken)
        assert taken.result() == [WORD, WORD]
        await decoder.stop()

    asyncio.run(scenario())


def test_an_engine_fault_fails_the_captions_of_that_step_and_decoding_goes_on() -> None:
    model, clock = FakeModel(fail_at_step=2), FakeClock()

    async def scenario() -> None:
        decoder = _decoder(model, clock)
        await decoder.start()
        doomed = asyncio.create_task(decoder.submit(5, GREEDY, (1,)))
        await _drive(model, doomed)
        with pytest.raises(Exception, match="engine fault"):
            doomed.result()
        later = asyncio.create_task(decoder.submit(3, GREEDY, (1,)))
        await _drive(model, later)
        assert later.result() == [WORD] * 3
        await decoder.stop(drain=False)
        with pytest.raises(BatcherStoppedError):
            await decoder.submit(3, GREEDY, (1,))

    asyncio.run(scenario())


def test_the_row_budget_bounds_a_step_and_waiting_captions_join_as_rows_free() -> None:
    model, clock = FakeModel(), FakeClock()

    async def scenario() -> None:
        decoder = _decoder(model, clock, max_rows=2)
        await decoder.start()
        tasks = [asyncio.create_task(decoder.submit(n, GREEDY, (1,))) for n in (1, 4, 3)]
        await _drive(model, *tasks)
        assert [t.result() for t in tasks] == [[WORD], [WORD] * 4, [WORD] * 3]
        await decoder.stop()

    asyncio.run(scenario())
    assert max(len(step) for step in model.steps) == 2
    assert any(3 in step for step in model.steps)
