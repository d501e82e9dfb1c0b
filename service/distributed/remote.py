"""The engines as an ingress replica sees them under Ray Serve: each stage one engine call.

`RemoteEngineClient` is the ingress's `Engines`, `RemoteEngineRequest` a request's
`EngineStages`: the tasks of `service.tasks` await the same stages as in one process, and each
is one call through the engine deployment's `DeploymentHandle` (`language`, `fuse`, `head`,
`decode_caption` of `engine.Glipv2Engine`), except `encode_image`: the image is prepared here,
and `vision` runs on the engine inside the first stage that needs its features (the call
carries the pixels), saving a round trip per request.

What crosses the network per request: the prepared pixels once (ingress to engine), prompt
features the ingress's text cache lacks (engine to ingress) and each fusion row's prompt
features (ingress to engine, small), and back the results post-processing reads (head outputs,
fused tokens, mask and answer logits, decoded captions). Image features never come to the
ingress: the engine keeps them in its node's object store and returns a `RemoteFeatures`
reference, which later stages hand back; the router sends those stages to the replica that
holds them (`routing.py`), so they cross the network only when that replica is full and
another node's takes the stage. Fused levels likewise, only for the mask engine.

Failures keep the single-process contract: an engine's own error (deadline, queue full, failed
batch) is re-raised here as itself; a replica that died, or the features it owned, become
`EngineUnavailableError` (503 + Retry-After, after the serving layer's one re-run); a call that
outlives the request's deadline is cancelled (504), so nothing hangs on a lost node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from PIL import Image
from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from model_export.modeling.config import PreprocessConfig
from service.batching import PRIORITY_ONLINE, DeadlineExceededError
from service.caption_runner import CaptionDecoded, CaptionWork
from service.distributed.messages import EngineInfo, Pixels, RemoteFeatures, Stage, StageResult
from service.distributed.wire import from_wire, to_wire
from service.engine_client import TEXT_BUCKET, Engine, EngineStages
from service.errors import EngineUnavailableError
from service.model_runner import FusionResult, VisionFeatures
from service.pipeline.caption_search import CaptionSearch
from service.pipeline.model_input import PreparedImage, image_bucket, prepare_image
from service.pipeline.text_cache import PromptFeatures, TextFeatureCache
from service.serving import ServedModel
from service.telemetry import ServiceMetrics

# Past the request's deadline an engine answers 504 itself; this much later the ingress stops
# waiting for an answer that is not coming (a replica on a lost node).
CALL_GRACE_S = 2.0
# Ray's errors meaning the replica (or what it owned) is gone, not that the request was bad.
_GONE = (RayActorError, ActorUnavailableError, ObjectLostError, BackPressureError,
         DeploymentUnavailableError)


class RemoteEngineClient:
    """The engine deployment behind `handle`, with this ingress's text-feature cache and the
    request deadline (`request_timeout_ms` for online work, none for job work).

    The cache is per ingress replica, as in one process: a hit costs no engine call at all.
    """

    def __init__(self, handle: DeploymentHandle, *, text_cache_bytes: int,
                 request_timeout_ms: float, metrics: ServiceMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.handle = handle
        self.request_timeout_ms = request_timeout_ms
        self.clock = clock
        self.text_cache = TextFeatureCache(
            text_cache_bytes, on_lookup=metrics.on_text_cache_lookup if metrics else None)
        self._preprocess: PreprocessConfig | None = None

    async def connect(self) -> ServedModel:
        """Waits for an engine replica (Serve queues the call until one has loaded the model)."""
        info: EngineInfo = await self.handle.describe.remote()
        self._preprocess = info.config.preprocess
        return await asyncio.to_thread(ServedModel.describe, info.runtime_name, info.config,
                                       info.graphs)

    async def start(self) -> None:
        """Nothing runs here: the batchers are the engine replicas' own."""

    async def stop(self, drain: bool = True) -> None:
        """Nothing to drain here: each engine replica drains its batchers when Serve stops it."""

    def stalled(self) -> dict[str, float]:
        """None seen from here: a stalled engine replica refuses online stages itself
        (`EngineStalledError`, a 503 here too), and Serve's health check replaces it."""
        return {}

    @property
    def preprocess(self) -> PreprocessConfig:
        if self._preprocess is None:
            raise RuntimeError("not connected to the engines yet")
        return self._preprocess

    def request(self, image: Image.Image, priority: int = PRIORITY_ONLINE
                ) -> RemoteEngineRequest:
        deadline_s = (self.clock() + self.request_timeout_ms / 1000.0
                      if priority == PRIORITY_ONLINE else None)
        return RemoteEngineRequest(self, image, priority, deadline_s)


class RemoteEngineRequest(EngineStages):
    """One request's stages as engine calls. `home`: the replica holding its image features,
    carried by every call after the one that computed them, for the router."""

    def __init__(self, client: RemoteEngineClient, image: Image.Image, priority: int,
                 deadline_s: float | None) -> None:
        super().__init__(client.clock, image_bucket(image, client.preprocess), priority,
                         deadline_s)
        self.client = client
        self.image = image
        self.home: str | None = None
        self._pixels: torch.Tensor | None = None
        self._features: RemoteFeatures | None = None
        self._features_token = object()  # what the tasks hold as this request's features
        self._first_image_stage = asyncio.Lock()

    async def encode_image(self) -> tuple[PreparedImage, VisionFeatures]:
        """The prepared image; its features come with the first stage that needs them."""
        prepared = await asyncio.to_thread(prepare_image, self.image, self.client.preprocess)
        self._pixels = prepared.pixels
        # Typed as what it stands for: the tasks only hand it back to the stages.
        return prepared, cast(VisionFeatures, self._features_token)

    async def encode_texts(self, texts: list[str]) -> list[PromptFeatures]:
        async def compute(missing: list[str]) -> list[PromptFeatures]:
            features: list[PromptFeatures] = await self._call("language", missing,
                                                              bucket=TEXT_BUCKET)
            return features

        return await self.client.text_cache.get(texts, compute)

    async def fuse(self, visual: VisionFeatures, texts: Sequence[PromptFeatures],
                   for_masks: bool = False) -> list[FusionResult]:
        rows: list[FusionResult] = await self._image_stage(
            "fuse", visual, lambda image: (image, list(texts), for_masks))
        return rows

    async def submit(self, engine: Engine, payload: object, bucket: object = None) -> Any:
        return await self._call("head", engine, payload, bucket=bucket)

    def admit_caption(self, search: CaptionSearch) -> None:
        """Asked on the engine replica instead, by `Glipv2Engine.decode_caption` before the
        vision work that call runs (asking from here would cost one more call per caption)."""

    async def decode_caption(self, work: CaptionWork) -> list[CaptionDecoded]:
        decoded: list[CaptionDecoded] = await self._image_stage(
            "decode_caption", work.visual,
            lambda image: (dataclasses.replace(work, visual=cast(VisionFeatures, image)),))
        return decoded

    async def _image_stage(self, method: str, visual: VisionFeatures,
                           arguments: Callable[[Pixels | RemoteFeatures], tuple[object, ...]]
                           ) -> Any:
        """`method` with this request's image in `arguments`: a reference to its features once
        an engine holds them; the first such call carries the pixels instead (a second one
        waits for it, then takes the reference)."""
        if visual is not self._features_token or self._pixels is None:
            raise ValueError("a stage was given image features this request did not encode")
        async with self._first_image_stage:
            if self._features is None:
                first: StageResult = await self._call(method, *arguments(Pixels(self._pixels)))
                self._features = first.features
                self.home = first.features.replica if first.features else None
                return first.value
        result: StageResult = await self._call(method, *arguments(self._features))
        return result.value

    async def _call(self, method: str, *args: object, bucket: object = None) -> Any:
        """`method` of an engine replica; Ray's failures mapped onto the service's errors."""
        stage = Stage(self.bucket if bucket is None else bucket, self.priority,
                      self.remaining_ms(), self.home)
        response = getattr(self.client.handle, method).remote(stage, *to_wire(args))
        timeout_s = None if stage.deadline_ms is None else stage.deadline_ms / 1000 + CALL_GRACE_S
        try:
            return from_wire(await asyncio.wait_for(response, timeout_s))
        except TimeoutError:
            response.cancel()
            raise DeadlineExceededError(f"the {method} engine did not answer in time") from None
        except asyncio.CancelledError:
            response.cancel()  # a sibling stage failed: withdraw this one from the replica
            raise
        except RayTaskError as exc:  # raised by the replica: the engine's own error, or Ray's
            cause = exc.cause
            if isinstance(cause, _GONE):
                raise EngineUnavailableError(_gone_message(method, cause)) from None
            if isinstance(cause, Exception):
                raise cause from None
            raise
        except _GONE as exc:
            raise EngineUnavailableError(_gone_message(method, exc)) from None


def _gone_message(method: str, exc: BaseException) -> str:
    return (f"the engine replica serving {method} went away ({type(exc).__name__}); "
            "retry: another replica takes the request")
