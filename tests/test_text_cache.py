"""The text-feature cache: hits and misses, byte-bounded LRU eviction, one computation for
concurrent misses of the same text, and failures that are neither cached nor swallowed."""

from __future__ import annotations

import asyncio

import pytest
import torch

from service.pipeline.text_cache import PromptFeatures, TextFeatureCache


def features(text: str, tokens: int = 4) -> PromptFeatures:
    return PromptFeatures(input_ids=torch.zeros(tokens, dtype=torch.long),
                        hidden=torch.full((tokens, 8), float(len(text))))


ENTRY_BYTES = features("x").nbytes  # 4 * 8 (ids) + 4 * 8 * 4 (hidden) = 160


class Encoder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, texts: list[str]) -> list[PromptFeatures]:
        self.calls.append(list(texts))
        if self.gate is not None:
            await self.gate.wait()
        return [features(t) for t in texts]


def test_hits_misses_and_lru_eviction_by_bytes() -> None:
    lookups: list[tuple[int, int]] = []
    cache = TextFeatureCache(max_bytes=2 * ENTRY_BYTES, on_lookup=lambda h, m: lookups.append(
        (h, m)))
    encoder = Encoder()

    async def scenario() -> None:
        first = await cache.get(["a", "bb", "a"], encoder)
        assert [f.hidden[0, 0].item() for f in first] == [1.0, 2.0, 1.0]
        await cache.get(["a"], encoder)  # hit; "bb" is now the least recently used
        await cache.get(["ccc"], encoder)  # evicts "bb"
        await cache.get(["a", "bb"], encoder)  # "a" hit, "bb" recomputed

    asyncio.run(scenario())
    assert encoder.calls == [["a", "bb"], ["ccc"], ["bb"]]
    assert lookups == [(0, 2), (1, 0), (0, 1), (1, 1)]
    assert len(cache) == 2 and cache.nbytes == 2 * ENTRY_BYTES


def test_concurrent_misses_compute_once() -> None:
    cache = TextFeatureCache(max_bytes=10**6)
    encoder = Encoder()

    async def scenario() -> None:
        encoder.gate = asyncio.Event()
        first = asyncio.create_task(cache.get(["red circle"], encoder))
        await asyncio.sleep(0)
        second = asyncio.create_task(cache.get(["red circle", "star"], encoder))
        await asyncio.sleep(0)
        encoder.gate.set()
        a, b = await first, await second
        assert a[0] is b[0]

    asyncio.run(scenario())
    assert encoder.calls == [["red circle"], ["star"]]


def test_failures_reach_every_waiter_and_are_not_cached() -> None:
    cache = TextFeatureCache(max_bytes=10**6)

    async def broken(texts: list[str]) -> list[PromptFeatures]:
        await asyncio.sleep(0.01)
        raise RuntimeError("engine down")

    async def scenario() -> None:
        first = asyncio.create_task(cache.get(["a"], broken))
        await asyncio.sleep(0)
        second = asyncio.create_task(cache.get(["a"], broken))
        for task in (first, second):
            with pytest.raises(RuntimeError, match="engine down"):
                await task
        assert len(cache) == 0
        assert (await cache.get(["a"], Encoder()))[0].hidden.shape == (4, 8)

    asyncio.run(scenario())


def test_zero_bytes_disables_caching() -> None:
    cache = TextFeatureCache(max_bytes=0)
    encoder = Encoder()
    asyncio.run(cache.get(["a"], encoder))
    asyncio.run(cache.get(["a"], encoder))
    assert encoder.calls == [["a"], ["a"]] and len(cache) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        TextFeatureCache(max_bytes=-1)
