"""The serving path without HTTP, one image at a time: what `glipv2 eval` scores.

`ServingPredictor` offers the four tasks as `model_export.evaluation.evaluate.Predictor`, so
the metrics of any runtime (PyTorch, ONNX Runtime, a reduced-precision variant, TensorRT) are
measured through exactly the code the service runs: chunking, the engines' batchers,
post-processing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from PIL import Image

from engines.runtimes import Runtime
from model_export.evaluation.evaluate import (
    CaptionPhrase,
    CaptionResult,
    PredictedSegment,
    VqaAnswer,
)
from model_export.processing.postprocess import Detections
from model_export.processing.rle import decode_mask
from service.batching import BatcherConfig
from service.pipeline.caption_search import DEFAULT_SEARCH, CaptionSearch
from service.schemas import DetectParams, SegmentParams, VqaParams
from service.serving import Glipv2Serving

T = TypeVar("T")


@dataclass
class OfflineDetection:
    """What evaluation reads of a detection run: boxes in original pixels (legacy +1)."""

    detections: Detections


class ServingPredictor:
    """`Glipv2Serving` on its own event loop thread, called synchronously."""

    def __init__(self, runtime: Runtime, caption_search: CaptionSearch = DEFAULT_SEARCH,
                 caption_objects: bool = True) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="serving-loop")
        self._thread.start()
        self.serving = Glipv2Serving(
            runtime, model_id="offline", caption_search=caption_search,
            caption_objects=caption_objects,
            batcher_config=BatcherConfig())
        self._call(self.serving.start())

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        self._call(self.serving.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def detect(self, image: Image.Image, class_names: Sequence[str]) -> OfflineDetection:
        query = self.serving.prepare_detect(DetectParams(classes=list(class_names)))
        return OfflineDetection(self._call(self.serving.detections(query, image)))

    def segment(self, image: Image.Image, expressions: Sequence[str],
                threshold: float | None = None, relation_threshold: float | None = None
                ) -> list[list[PredictedSegment]]:
        """Segments per expression over the thresholds (None: the model's calibrated ones)."""
        response = self._call(self.serving.segment(
            SegmentParams(expressions=list(expressions), threshold=threshold,
                          relation_threshold=relation_threshold), image))
        return [[PredictedSegment(box=s.box, score=s.score, mask=torch.from_numpy(decode_mask(
                    {"size": s.mask.size, "counts": s.mask.counts})))
                 for s in result.segments]
                for result in response.results]

    def vqa(self, image: Image.Image, question: str, top_k: int = 5) -> VqaAnswer:
        response = self._call(self.serving.vqa(VqaParams(question=question), image))
        return VqaAnswer(answer=response.answer, score=response.score,
                         answers=[(a.answer, a.score) for a in response.answers[:top_k]])

    def caption(self, image: Image.Image) -> CaptionResult:
        response = self._call(self.serving.caption(image))
        return CaptionResult(caption=response.caption, phrases=[
            CaptionPhrase(phrase=p.phrase, span=(p.span[0], p.span[1]), box=p.box,
                          score=p.score) for p in response.phrases])
