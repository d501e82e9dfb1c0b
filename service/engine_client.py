"""The engines as the tasks see them: one dynamic batcher per engine, and each request's trip.

`EngineClient` owns the batchers (one per engine, over the `ModelRunner`), the text-feature
cache and the request deadline. A task opens an `EngineRequest` per HTTP request (or job input)
and awaits its stages on it: `encode_image` (vision), `encode_texts` (language, through the
cache), `fuse` (fusion), then `submit` to a head's engine. The deadline spans all stages; when a
stage fails (deadline, queue full), the request's other queued work is withdrawn, not computed
for nobody.

The tasks see the engines only through `Engines` and `EngineStages`, so the same task code runs
over engines in other processes: under Ray Serve (`service.distributed`) each stage is a call to
an engine replica, which runs it on its own `EngineClient` (`EngineClient.resume`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from PIL import Image

from model_export.modeling.config import PreprocessConfig
from service.batching import (
    PRIORITY_ONLINE,
    BatcherConfig,
    DeadlineExceededError,
    DynamicBatcher,
)
from service.caption_decoder import CaptionDecoder, DecoderConfig
from service.caption_runner import (
    CaptionDecoded,
    CaptionImage,
    CaptionRunner,
    CaptionWork,
    KVCache,
)
from service.model_runner import FusionResult, FusionWork, ModelRunner, VisionFeatures
from service.pipeline.caption_search import CaptionSearch
from service.pipeline.model_input import PreparedImage, image_bucket, prepare_image
from service.pipeline.text_cache import PromptFeatures, TextFeatureCache
from service.request_context import current_request
from service.telemetry import ServiceMetrics

T = TypeVar("T")

# A request fans out into several items of the engines after `vision` (chunks, expressions), so
# their queues hold this many times the admission queue; admission is bounded at `vision`.
FAN_OUT_QUEUE_FACTOR = 16
TEXT_BUCKET = "text"  # texts batch together whatever their images' shapes


class Engine(StrEnum):
    """The engines of DESIGN.md, each with its own batcher (the heads only when served)."""

    VISION = "vision"
    LANGUAGE = "language"
    FUSION = "fusion"
    MASK = "mask"
    VQA = "vqa"
    CAPTION = "caption"


class EngineStages(ABC):
    """One request's trip through the engines, as a task awaits it, wherever the engines run:
    its deadline (on this process's clock), its image's bucket, and its stages.

    `EngineRequest` runs the stages on this process's batchers; under Ray Serve each stage is a
    call to an engine replica (`service.distributed`). What a stage returns that only another
    stage reads (image features, the fused levels of `fuse(..., for_masks=True)`) is passed back
    as it came, never looked into, so it may be a reference to tensors kept elsewhere.
    """

    def __init__(self, clock: Callable[[], float], bucket: object, priority: int,
                 deadline_s: float | None) -> None:
        self.clock = clock
        self.bucket = bucket
        self.priority = priority
        self.deadline_s = deadline_s

    def remaining_ms(self) -> float | None:
        if self.deadline_s is None:
            return None
        left = (self.deadline_s - self.clock()) * 1000.0
        if left <= 0:
            raise DeadlineExceededError("request deadline passed between engines")
        return left

    async def all(self, awaitables: Iterable[Awaitable[T]]) -> list[T]:
        """Await all; on the first failure, cancel the rest (leaving their queues) and raise."""
        tasks = [asyncio.ensure_future(a) for a in awaitables]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    @abstractmethod
    async def encode_image(self) -> tuple[PreparedImage, VisionFeatures]:
        """`vision` on the request's image: the prepared image and its features."""

    @abstractmethod
    async def encode_texts(self, texts: list[str]) -> list[PromptFeatures]:
        """`language` on each text (through the text-feature cache)."""

    @abstractmethod
    async def fuse(self, visual: VisionFeatures, texts: Sequence[PromptFeatures],
                   for_masks: bool = False) -> list[FusionResult]:
        """One `fusion` row per text. `for_masks`: the rows feed the `mask` engine, so their
        `fused_visual` must be kept (otherwise a remote engine leaves it empty)."""

    @abstractmethod
    async def submit(self, engine: Engine, payload: object, bucket: object = None) -> Any:
        """One item of a head's engine (`mask`, `vqa`)."""

    @abstractmethod
    def admit_caption(self, search: CaptionSearch) -> None:
        """Raise now what the caption decoder would refuse this caption with (429 `overloaded`,
        `queue_full`), before any work is spent on its image (`CaptionDecoder.admit`)."""

    @abstractmethod
    async def decode_caption(self, work: CaptionWork) -> list[CaptionDecoded]:
        """The caption decoder's answer for one image (see `CaptionRunner.caption_results`)."""


class Engines(Protocol):
    """What the tasks and the serving layer use of the engines: start, stop, and one
    `EngineStages` per request (`EngineClient` here; a remote client under Ray Serve), and
    which engines are stalled now (readiness)."""

    async def start(self) -> None: ...

    async def stop(self, drain: bool = True) -> None: ...

    def stalled(self) -> dict[str, float]:
        """Engine -> seconds its batch in flight has been stalled (past every deadline in it);
        empty when none is."""
        ...

    def request(self, image: Image.Image, priority: int = PRIORITY_ONLINE) -> EngineStages: ...


class EngineClient:
    """The batchers of `engines` over one `ModelRunner`, the caption decoder (iteration-level
    scheduling, `service.caption_decoder`) when `Engine.CAPTION` is served, the text cache,
    and the deadline.

    `start()`/`stop()` run on the event loop. `clock` (seconds, monotonic) is shared with the
    batchers and the decoder, so tests drive deadlines with a fake one.
    """

    def __init__(self, runner: ModelRunner, engines: Sequence[Engine], *,
                 batcher_config: BatcherConfig, metrics: ServiceMetrics | None = None,
                 text_cache_bytes: int = 256 * 1024 * 1024, caption_max_rows: int = 64,
                 clock: Callable[[], float] | None = None) -> None:
        self.runner = runner
        self.preprocess: PreprocessConfig = runner.config.preprocess
        self.clock = time.monotonic if clock is None else clock
        self.default_deadline_ms = batcher_config.default_deadline_ms
        self.text_cache = TextFeatureCache(
            text_cache_bytes, on_lookup=metrics.on_text_cache_lookup if metrics else None)
        runs: dict[Engine, Callable[..., Any]] = {
            Engine.VISION: runner.vision, Engine.LANGUAGE: runner.language,
            Engine.FUSION: runner.fusion, Engine.MASK: runner.mask, Engine.VQA: runner.vqa,
        }
        self.decoder: CaptionDecoder[CaptionWork, CaptionImage, KVCache,
                                     list[CaptionDecoded]] | None = None
        if Engine.CAPTION in engines:
            self.decoder = CaptionDecoder(
                CaptionRunner(runner.runtime, runner.tokenizer, runner.tokenizer_lock,
                              runner.caption_grammar, runner.vision_names),
                DecoderConfig(max_rows=caption_max_rows,
                              max_queue_size=batcher_config.max_queue_size,
                              default_deadline_ms=batcher_config.default_deadline_ms),
                clock=clock, name=Engine.CAPTION,
                callbacks=metrics.caption_callbacks() if metrics is not None else None)
        self.batchers: dict[Engine, DynamicBatcher[Any, Any]] = {}
        for engine in engines:
            if engine == Engine.CAPTION:
                continue
            config = batcher_config
            if engine != Engine.VISION:
                config = dataclasses.replace(
                    batcher_config,
                    max_queue_size=batcher_config.max_queue_size * FAN_OUT_QUEUE_FACTOR)
            callbacks = metrics.engine_callbacks(engine) if metrics is not None else None
            self.batchers[engine] = DynamicBatcher(
                config, runs[engine], clock=clock, name=engine,
                on_batch=callbacks.on_batch if callbacks else None,
                on_queue_depth=callbacks.on_queue_depth if callbacks else None,
                on_shed=callbacks.on_shed if callbacks else None,
                on_failure=callbacks.on_failure if callbacks else None)

    async def start(self) -> None:
        for batcher in self.batchers.values():
            await batcher.start()
        if self.decoder is not None:
            await self.decoder.start()

    async def stop(self, drain: bool = True) -> None:
        """`drain=True` finishes queued and in-flight work first (SIGTERM). Engines stop in
        flow order, so a request between two stages still finds the next one running."""
        for batcher in self.batchers.values():
            await batcher.stop(drain=drain)
        if self.decoder is not None:
            await self.decoder.stop(drain=drain)

    def stalled(self) -> dict[str, float]:
        return {str(engine): stalled_s for engine, batcher in self.batchers.items()
                if (stalled_s := batcher.stalled_s) is not None}

    def request(self, image: Image.Image, priority: int = PRIORITY_ONLINE) -> EngineRequest:
        """One request's trip through the engines, its deadline starting now."""
        # Job work has no deadline: nobody waits on the line for it.
        deadline_ms = self.default_deadline_ms if priority == PRIORITY_ONLINE else None
        deadline_s = None if deadline_ms is None else self.clock() + deadline_ms / 1000.0
        return EngineRequest(self, image_bucket(image, self.preprocess), priority, deadline_s,
                             image)

    def resume(self, bucket: object, priority: int, deadline_ms: float | None
               ) -> EngineRequest:
        """A stage of a request another process opened (a Ray Serve ingress replica): its
        image's bucket, and what is left of its deadline (None: none). It has no image: the
        caller sends the prepared pixels to `Engine.VISION` itself."""
        deadline_s = None if deadline_ms is None else self.clock() + deadline_ms / 1000.0
        return EngineRequest(self, bucket, priority, deadline_s)


class EngineRequest(EngineStages):
    """One request's trip through this process's batchers: its work withdrawn from every queue
    when any part of it fails. Opened while an HTTP request is served, it records the size of
    every batch its items go in on that request's context (its access-log line)."""

    def __init__(self, client: EngineClient, bucket: object, priority: int,
                 deadline_s: float | None, image: Image.Image | None = None) -> None:
        super().__init__(client.clock, bucket, priority, deadline_s)
        self.client = client
        self.image = image
        self.http_request = current_request()

    async def submit(self, engine: Engine, payload: object, bucket: object = None) -> Any:
        batcher = self.client.batchers[engine]
        on_batched = (None if self.http_request is None
                      else self.http_request.batch_recorder(str(engine)))
        return await batcher.submit(payload, bucket=bucket if bucket is not None else self.bucket,
                                    deadline_ms=self.remaining_ms(), priority=self.priority,
                                    on_batched=on_batched)

    def admit_caption(self, search: CaptionSearch) -> None:
        self._decoder().admit(search, deadline_ms=self.remaining_ms(), priority=self.priority)

    async def decode_caption(self, work: CaptionWork) -> list[CaptionDecoded]:
        return await self._decoder().submit(work, work.search, work.shape,
                                            deadline_ms=self.remaining_ms(),
                                            priority=self.priority)

    def _decoder(self) -> CaptionDecoder[CaptionWork, CaptionImage, KVCache,
                                         list[CaptionDecoded]]:
        decoder = self.client.decoder
        if decoder is None:
            raise RuntimeError("this engine client serves no caption engine")
        return decoder

    async def encode_image(self) -> tuple[PreparedImage, VisionFeatures]:
        if self.image is None:
            raise RuntimeError("a resumed request has no image; submit its pixels to vision")
        prepared = await asyncio.to_thread(prepare_image, self.image, self.client.preprocess)
        return prepared, await self.submit(Engine.VISION, prepared.pixels)

    async def encode_texts(self, texts: list[str]) -> list[PromptFeatures]:
        async def compute(missing: list[str]) -> list[PromptFeatures]:
            return await self.all(self.submit(Engine.LANGUAGE, text, bucket=TEXT_BUCKET)
                                  for text in missing)

        return await self.client.text_cache.get(texts, compute)

    async def fuse(self, visual: VisionFeatures, texts: Sequence[PromptFeatures],
                   for_masks: bool = False) -> list[FusionResult]:
        # In one process the fused levels are slices of the batch output: kept at no cost.
        return await self.all(self.submit(Engine.FUSION, FusionWork(visual, text))
                              for text in texts)
