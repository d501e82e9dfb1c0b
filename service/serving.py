"""Serving logic: validated requests + decoded images -> engine work -> response models.

One hop per layer (vLLM's split): routers parse HTTP and call `Glipv2Serving`; it checks what needs
the model (token limits, available heads), turns a request into a work item and submits it to the
task's `DynamicBatcher`; the batcher hands a `BatchPlan` to the `PredictorRunner`, which computes
and never sees a queue; results come back here and become response models.

Seams for the next increments, kept explicit:
- `PredictorRunner` runs each plan item by item on the PyTorch `Glipv2Predictor`. Batching the
  model itself (vision once per image, chunks through fusion as a batch, padded token batches)
  replaces this class, under the same `BatchPlan -> results` contract.
- There is one batcher per *task* now; with exported graphs there is one per *engine* (vision,
  language, fusion, heads). Buckets are already the padded image shape.
- `DetectQuery` is one prompt; prompt chunking makes it a list of chunks packed by token budget
  (`chunk_size` is accepted and validated, and honoured once chunking lands).
- `split_phrases` is how a free-text prompt becomes phrases; a noun-phrase chunker can replace it.
- VQA `grounding` is empty until the predictor grounds the question's phrases.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from model_export.inference import (
    CaptionResult,
    Glipv2Predictor,
    VqaAnswer,
    to_exclusive,
)
from model_export.postprocess import Detections
from model_export.preprocess import resized_size
from model_export.prompt import build_detection_prompt, clean_name
from service.batching import BatcherConfig, BatchPlan, DynamicBatcher
from service.errors import InvalidRequestError, ServiceError, TaskUnavailableError
from service.metrics import ServiceMetrics
from service.schemas import (
    AnswerScore,
    CaptionResponse,
    Detection,
    DetectParams,
    DetectResponse,
    GroundedPhrase,
    ImageInfo,
    ModelInfo,
    RleMask,
    Segment,
    SegmentParams,
    SegmentResponse,
    SegmentResult,
    VqaParams,
    VqaResponse,
    rounded,
)

log = logging.getLogger(__name__)

TASKS = ("detect", "segment", "vqa", "caption")
VQA_TOP_K = 5
SCORE_DIGITS = 6
BOX_DIGITS = 2

PayloadT = TypeVar("PayloadT")


# --- work items: what crosses from serving into the engine -----------------------------------


@dataclass(frozen=True)
class DetectQuery:
    """A detection request the model can take, built before the image is decoded.

    names: the class names the model is prompted with (the classes, or the prompt's phrases);
        a detection's label is `names[label]`.
    spans: phrase grounding only: per name, its [start, end) in the client's prompt.
    """

    names: list[str]
    spans: list[tuple[int, int]] | None
    threshold: float
    max_detections: int


@dataclass
class DetectWork:
    image: Image.Image
    names: list[str]


@dataclass
class SegmentWork:
    image: Image.Image
    expressions: list[str]
    threshold: float


@dataclass
class VqaWork:
    image: Image.Image
    question: str


@dataclass
class CaptionWork:
    image: Image.Image


@dataclass
class EncodedSegment:
    """A segment with its mask already COCO-RLE encoded (in the worker thread, not the loop)."""

    box: list[float]
    score: float
    size: list[int]
    counts: str


class InferenceError(ServiceError):
    """The model raised for one request; the cause is logged, the client gets a 500."""

    status_code = 500
    code = "inference_failed"


# --- the runner: computes a plan, never sees a queue -----------------------------------------


class PredictorRunner:
    """Runs each task's `BatchPlan` on the PyTorch predictor, one item at a time.

    A failure of one item fills only that item's slot (an `InferenceError`), so one bad request
    never fails its batch-mates. Runs in the batchers' worker threads.
    """

    def __init__(self, predictor: Glipv2Predictor, caption_max_tokens: int) -> None:
        self.predictor = predictor
        self.caption_max_tokens = caption_max_tokens

    def detect(self, plan: BatchPlan[DetectWork]) -> list[Detections | Exception]:
        return _each(plan, lambda w: self.predictor.detect(w.image, w.names).detections)

    def segment(self, plan: BatchPlan[SegmentWork]) -> list[list[list[EncodedSegment]]
                                                            | Exception]:
        def one(work: SegmentWork) -> list[list[EncodedSegment]]:
            per_expression = self.predictor.segment(work.image, work.expressions, work.threshold)
            return [[_encode_segment(s.box, s.score, s.mask) for s in segments]
                    for segments in per_expression]

        return _each(plan, one)

    def vqa(self, plan: BatchPlan[VqaWork]) -> list[VqaAnswer | Exception]:
        return _each(plan, lambda w: self.predictor.vqa(w.image, w.question, top_k=VQA_TOP_K))

    def caption(self, plan: BatchPlan[CaptionWork]) -> list[CaptionResult | Exception]:
        return _each(plan, lambda w: self.predictor.caption(w.image, self.caption_max_tokens))


def _each(plan: BatchPlan[PayloadT], fn: Callable[[PayloadT], Any]) -> list[Any]:
    results: list[Any] = []
    for payload in plan.payloads:
        try:
            results.append(fn(payload))
        except Exception as exc:
            log.exception("inference failed for one request")
            error = InferenceError("inference failed; see the server log")
            error.__cause__ = exc
            results.append(error)
    return results


def _encode_segment(box: Sequence[float], score: float, mask: torch.Tensor) -> EncodedSegment:
    """(H, W) bool mask -> COCO RLE with `counts` as str (pycocotools wants Fortran uint8)."""
    rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return EncodedSegment(box=[rounded(float(v), BOX_DIGITS) for v in box],
                          score=rounded(float(score), SCORE_DIGITS),
                          size=[int(v) for v in rle["size"]],
                          counts=rle["counts"].decode("ascii"))


# --- phrases of a free-text prompt ------------------------------------------------------------

_PHRASE = re.compile(r"[^.,;\n]+")


def split_phrases(prompt: str) -> list[tuple[int, int]]:
    """Character spans of the phrases of a free-text prompt, in order.

    Phrases are separated by '.', ',', ';' or new lines (how grounding prompts are written in
    training: "red circle. large blue star"), with surrounding whitespace left out of the span.
    """
    spans = []
    for match in _PHRASE.finditer(prompt):
        text = match.group()
        start = match.start() + len(text) - len(text.lstrip())
        end = match.end() - (len(text) - len(text.rstrip()))
        if end > start:
            spans.append((start, end))
    return spans


# --- the serving layer ------------------------------------------------------------------------


class Glipv2Serving:
    """The four tasks over one predictor: checks, submission to the batchers, responses.

    `start()`/`stop()` run on the event loop (the app's lifespan). Every request method is a
    coroutine that waits for its batch without blocking the loop.
    """

    def __init__(
        self,
        predictor: Glipv2Predictor,
        *,
        model_id: str,
        batcher_config: BatcherConfig,
        metrics: ServiceMetrics | None = None,
        runtime: str = "pytorch",
        caption_max_tokens: int = 64,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.predictor = predictor
        self.model_id = model_id
        self.runtime = runtime
        self.config = predictor.config
        self.max_prompt_tokens = self.config.language.max_query_len
        self.runner = PredictorRunner(predictor, caption_max_tokens)
        # The Rust tokenizer directly: counting tokens then never touches the Python wrapper's
        # truncation/padding state, which the worker threads' `tokenize` calls also use.
        self._count_tokenizer = predictor.tokenizer.backend_tokenizer
        runs: dict[str, Callable[[BatchPlan[Any]], Sequence[Any]]] = {
            "detect": self.runner.detect, "segment": self.runner.segment,
            "vqa": self.runner.vqa, "caption": self.runner.caption,
        }
        self.batchers: dict[str, DynamicBatcher[Any, Any]] = {}
        for task in self.tasks:
            on_batch, on_depth = (metrics.engine_callbacks(task) if metrics is not None
                                  else (None, None))
            self.batchers[task] = DynamicBatcher(
                batcher_config, runs[task], clock=clock, on_batch=on_batch,
                on_queue_depth=on_depth, name=task)

    @property
    def tasks(self) -> list[str]:
        """Tasks the loaded model has heads for (detection always)."""
        model = self.predictor.model
        heads = {"detect": True, "segment": model.mask_head is not None,
                 "vqa": model.vqa_head is not None, "caption": model.mlm_head is not None}
        return [task for task in TASKS if heads[task]]

    async def start(self) -> None:
        for batcher in self.batchers.values():
            await batcher.start()

    async def stop(self, drain: bool = True) -> None:
        """`drain=True` finishes queued and in-flight work first (SIGTERM)."""
        for batcher in self.batchers.values():
            await batcher.stop(drain=drain)

    def info(self) -> ModelInfo:
        pre = self.config.preprocess
        return ModelInfo(
            id=self.model_id, preset=self.config.preset, runtime=self.runtime,
            tasks=self.tasks,  # type: ignore[arg-type]  # names checked by TASKS
            max_prompt_tokens=self.max_prompt_tokens, image_min_size=pre.min_size,
            image_max_size=pre.max_size, vqa_answers=list(self.config.tasks.vqa_answers),
            prompt_ids=[])

    # --- checks before the image is decoded ---------------------------------------------------

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` as the model gets it, [CLS] and [SEP] included."""
        return len(self._count_tokenizer.encode(text).ids)

    def prepare_detect(self, params: DetectParams) -> DetectQuery:
        """Raises `InvalidRequestError` (422) for what only the model can tell is invalid."""
        if params.prompt_id is not None:
            raise InvalidRequestError(
                f"unknown prompt_id {params.prompt_id!r}: no tuned prompts are registered on "
                "this server (see /v1/models)")
        spans: list[tuple[int, int]] | None = None
        if params.prompt is not None:
            prompt = params.prompt
            spans = split_phrases(prompt)
            if not spans:
                raise InvalidRequestError("prompt has no phrases (only separators)")
            names = [prompt[start:end] for start, end in spans]
            for name in names:
                if not clean_name(name).strip():
                    raise InvalidRequestError(f"prompt phrase {name!r} is empty once cleaned "
                                              "(parenthesised text and underscores are removed)")
            tokens = max(self.count_tokens(prompt),
                         self.count_tokens(build_detection_prompt(names).caption))
            if tokens > self.max_prompt_tokens:
                raise InvalidRequestError(
                    f"prompt is {tokens} tokens long, more than the model's limit of "
                    f"{self.max_prompt_tokens} (special tokens included)")
        else:
            assert params.classes is not None  # the schema guarantees exactly one query
            names = list(params.classes)
            tokens = self.count_tokens(build_detection_prompt(names).caption)
            if tokens > self.max_prompt_tokens:
                raise InvalidRequestError(
                    f"the {len(names)} classes make a prompt of {tokens} tokens, more than the "
                    f"model's limit of {self.max_prompt_tokens}; splitting large vocabularies "
                    "into prompt chunks is not available yet: send fewer classes per request")
        return DetectQuery(names=names, spans=spans, threshold=params.threshold,
                           max_detections=params.max_detections)

    def prepare_segment(self, params: SegmentParams) -> None:
        self._require("segment")
        for index, expression in enumerate(params.expressions):
            self._check_tokens(f"expressions[{index}]", expression)

    def prepare_vqa(self, params: VqaParams) -> None:
        self._require("vqa")
        self._check_tokens("question", params.question)

    def prepare_caption(self) -> None:
        self._require("caption")

    def _require(self, task: str) -> None:
        if task not in self.tasks:
            raise TaskUnavailableError(f"model {self.model_id!r} has no {task} head")

    def _check_tokens(self, name: str, text: str) -> None:
        tokens = self.count_tokens(text)
        if tokens > self.max_prompt_tokens:
            raise InvalidRequestError(
                f"{name} is {tokens} tokens long, more than the model's limit of "
                f"{self.max_prompt_tokens} (special tokens included)")

    # --- requests -----------------------------------------------------------------------------

    async def detect(self, query: DetectQuery, image: Image.Image) -> DetectResponse:
        found: Detections = await self._submit("detect", DetectWork(image, query.names), image)
        detections: list[Detection] = []
        boxes = to_exclusive(found.boxes)
        for box, score, label in zip(boxes.tolist(), found.scores.tolist(),
                                     found.labels.tolist(), strict=True):
            if score < query.threshold:
                continue
            index = int(label)
            span = query.spans[index] if query.spans is not None else None
            detections.append(Detection(
                label=query.names[index], score=rounded(score, SCORE_DIGITS),
                box=[rounded(v, BOX_DIGITS) for v in box],
                span=list(span) if span is not None else None))
        detections.sort(key=lambda d: d.score, reverse=True)
        return DetectResponse(model=self.model_id, image=_info(image),
                              detections=detections[: query.max_detections])

    async def segment(self, params: SegmentParams, image: Image.Image) -> SegmentResponse:
        work = SegmentWork(image, list(params.expressions), params.threshold)
        per_expression: list[list[EncodedSegment]] = await self._submit("segment", work, image)
        results = [
            SegmentResult(expression=expression, segments=[
                Segment(score=s.score, box=s.box, mask=RleMask(size=s.size, counts=s.counts))
                for s in sorted(segments, key=lambda s: s.score, reverse=True)])
            for expression, segments in zip(params.expressions, per_expression, strict=True)
        ]
        return SegmentResponse(model=self.model_id, image=_info(image), results=results)

    async def vqa(self, params: VqaParams, image: Image.Image) -> VqaResponse:
        answer: VqaAnswer = await self._submit("vqa", VqaWork(image, params.question), image)
        return VqaResponse(
            model=self.model_id, image=_info(image), answer=answer.answer,
            score=rounded(answer.score, SCORE_DIGITS),
            answers=[AnswerScore(answer=a, score=rounded(s, SCORE_DIGITS))
                     for a, s in answer.answers],
            grounding=[])

    async def caption(self, image: Image.Image) -> CaptionResponse:
        result: CaptionResult = await self._submit("caption", CaptionWork(image), image)
        return CaptionResponse(
            model=self.model_id, image=_info(image), caption=result.caption,
            phrases=[GroundedPhrase(phrase=p.phrase, span=list(p.span),
                                    box=[rounded(v, BOX_DIGITS) for v in p.box],
                                    score=rounded(p.score, SCORE_DIGITS))
                     for p in result.phrases])

    async def _submit(self, task: str, work: object, image: Image.Image) -> Any:
        return await self.batchers[task].submit(work, bucket=self.bucket(image))

    def bucket(self, image: Image.Image) -> tuple[int, int]:
        """The padded (H, W) the image runs at: only same-shape images stack into one tensor."""
        pre = self.config.preprocess
        height, width = resized_size(image.width, image.height, pre.min_size, pre.max_size)
        step = pre.size_divisibility
        return math.ceil(height / step) * step, math.ceil(width / step) * step


def _info(image: Image.Image) -> ImageInfo:
    return ImageInfo(width=image.width, height=image.height)
