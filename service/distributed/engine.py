"""The engine deployment: the runtime and the per-engine batchers of one replica.

Each replica opens the runtime (PyTorch, ONNX Runtime or TensorRT: `ServiceSettings`, as in one
process) and runs an `EngineClient` over it: the same batchers, caption decoder and deadlines.
Every method is one stage of one request, sent by an ingress replica's `RemoteEngineRequest`;
it resumes that request's trip on the local `EngineClient` (`EngineClient.resume`), so requests
from every ingress replica batch together here.

A request's first stage that needs its image's features (`fuse`, or `decode_caption`) brings
the prepared pixels (`Pixels`): `vision` runs first, through its batcher, in the same call. The
features, and the fused levels the mask engine reads, then stay in this node's object store
(`RemoteFeatures`); what goes back is what the ingress post-processes. Tensors travel as NumPy
arrays both ways (`wire.py`).

Serve routes to a replica once `__init__` has returned, that is once the model is loaded;
`check_health` runs a tiny forward through the language batcher and fails while any engine's
batch is stalled, so a wedged runtime or batcher gets the replica replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any, cast

import ray
from ray import serve

from engines.runtimes import open_runtime
from service.batching import PRIORITY_ONLINE, QueueFullError
from service.caption_runner import CaptionDecoded, CaptionWork
from service.distributed.messages import EngineInfo, Pixels, RemoteFeatures, Stage, StageResult
from service.distributed.metrics import RayMetricsExport
from service.distributed.wire import from_wire, to_wire
from service.engine_client import TEXT_BUCKET, Engine, EngineClient, EngineRequest
from service.model_runner import Levels, MaskWork, ModelRunner, VisionFeatures
from service.pipeline.text_cache import PromptFeatures
from service.serving import available_tasks, task_engines
from service.settings import ServiceSettings
from service.telemetry import ServiceMetrics

HEALTH_TEXT = "health check"


class Glipv2Engine:
    """One engine replica (`@serve.deployment` is applied in `app.py`, with its options).

    settings: `ServiceSettings` keyword arguments (GLIPV2_* variables of the replica's
    environment fill in the rest): the runtime, the batcher and the caption decoder's knobs.
    """

    async def __init__(self, settings: dict[str, Any]) -> None:  # type: ignore[misc]
        # (Serve awaits an async constructor: the batchers start on the replica's loop.)
        self.settings = ServiceSettings(**settings)
        self.metrics = ServiceMetrics(export=RayMetricsExport())
        runtime = await asyncio.to_thread(open_runtime, self.settings.runtime_options())
        tasks = available_tasks(runtime.graphs)
        self.info = EngineInfo(runtime.name, runtime.config, runtime.graphs)
        # The text cache is the ingress replicas' (a hit there costs no call here).
        self.engines = EngineClient(
            ModelRunner(runtime), task_engines(tasks),
            batcher_config=self.settings.batcher.to_config(), metrics=self.metrics,
            text_cache_bytes=0, caption_max_rows=self.settings.caption_max_rows)
        await self.engines.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.metrics.model_ready.set(1)

    async def describe(self) -> EngineInfo:
        return self.info

    async def language(self, stage: Stage, texts: list[str]) -> Any:
        """Texts -> their `PromptFeatures` (for the ingress's text cache)."""
        request = self._resume(stage)
        return to_wire(await request.all(
            request.submit(Engine.LANGUAGE, text, bucket=TEXT_BUCKET) for text in texts))

    async def fuse(self, stage: Stage, image: Pixels | RemoteFeatures, texts: Any,
                   for_masks: bool) -> StageResult:
        """One `FusionResult` per text; each row's fused levels kept here for the mask engine,
        or dropped (`for_masks` False: nobody reads them)."""
        request = self._resume(stage)
        visual, kept = await self._image(request, image)
        features: list[PromptFeatures] = from_wire(texts)
        rows = await request.fuse(visual, features)
        return StageResult(to_wire([dataclasses.replace(
                                        row, fused_visual=(cast(Levels, self._keep(
                                            row.fused_visual)) if for_masks else []))
                                    for row in rows]), kept)

    async def head(self, stage: Stage, engine: Engine, payload: Any) -> Any:
        """One item of a head's engine (`mask`: its fused levels resolved here first)."""
        payload = from_wire(payload)
        if isinstance(payload, MaskWork):
            payload = dataclasses.replace(
                payload, fused_visual=await self._resolve(payload.fused_visual))
        return to_wire(await self._resume(stage).submit(engine, payload))

    async def decode_caption(self, stage: Stage, work: Any) -> StageResult:
        """A `CaptionWork` (its `visual` the request's image) -> the decoder's
        `CaptionDecoded` candidates."""
        request = self._resume(stage)
        caption: CaptionWork = from_wire(work)
        request.admit_caption(caption.search)  # before the vision work it may need
        visual, kept = await self._image(request, cast(Pixels | RemoteFeatures, caption.visual))
        decoded: list[CaptionDecoded] = await request.decode_caption(
            dataclasses.replace(caption, visual=visual))
        return StageResult(to_wire(decoded), kept)

    async def check_health(self) -> None:
        """A tiny forward: one short text through the language batcher, behind what is queued
        at online priority. Serve replaces the replica when this raises or outlasts
        `health_check_timeout_s`; a full queue is a busy replica, not a broken one (replacing
        it would only push its load onto the others). An engine whose batch in flight has
        outlived every deadline in it (stalled: a hung runtime cannot be interrupted) makes
        the replica unhealthy too, whichever engine it is: its online requests are refused
        at once meanwhile, and a new replica serves them sooner than the hang may end."""
        stalled = self.engines.stalled()
        if stalled:
            raise RuntimeError("stalled: " + ", ".join(
                f"{engine} (batch in flight past its deadlines for {seconds:.0f} s)"
                for engine, seconds in sorted(stalled.items())))
        request = self.engines.resume(TEXT_BUCKET, PRIORITY_ONLINE, None)
        with contextlib.suppress(QueueFullError):
            await request.submit(Engine.LANGUAGE, HEALTH_TEXT)
        # Re-stated at every check: a gauge set once, at start, was once missing from Ray's
        # export for over a minute on a loaded machine (its first point lost on the way).
        self.metrics.model_ready.set(1)

    async def __del__(self) -> None:
        """Serve's graceful shutdown: queued and in-flight work finishes first. A replica
        stopped while its constructor still loads the model has no engines to stop."""
        engines: EngineClient | None = getattr(self, "engines", None)
        if engines is not None:
            await engines.stop(drain=True)

    def _resume(self, stage: Stage) -> EngineRequest:
        return self.engines.resume(stage.bucket, stage.priority, stage.deadline_ms)

    async def _image(self, request: EngineRequest, image: Pixels | RemoteFeatures
                     ) -> tuple[VisionFeatures, RemoteFeatures | None]:
        """The image's features: computed here from its pixels (then also kept, for the
        request's later stages), or resolved from where an earlier stage kept them."""
        if isinstance(image, Pixels):
            visual = await request.submit(Engine.VISION, from_wire(image.pixels))
            return visual, self._keep(visual)
        return await self._resolve(image), None

    def _keep(self, tensors: VisionFeatures) -> RemoteFeatures:
        return RemoteFeatures(ray.put(to_wire(tensors)), self.replica)

    async def _resolve(self, features: Any) -> Any:
        """A `RemoteFeatures`' tensors (from this node's object store, or fetched once from the
        node that holds them)."""
        if isinstance(features, RemoteFeatures):
            return from_wire(await features.ref)
        return features

