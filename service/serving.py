"""Serving logic: validated requests + decoded images -> engine work -> response models.

One hop per layer (vLLM's split): routers parse HTTP and call `Glipv2Serving`; it checks what needs
the model (token limits, available heads), turns a request into work for the engines and awaits
it; each engine's `DynamicBatcher` hands a `BatchPlan` to the `ModelRunner`, which computes and
never sees a queue; results come back here and become response models.

A request flows through the engines of DESIGN.md, each batching across requests and tasks:
`vision` once per image; `language` once per distinct prompt text (the text-feature cache);
`fusion` once per (image, prompt chunk) row, rows of any prompts and tasks batched together; then
`mask`, `vqa` or the `caption` decoder. Pre- and post-processing run in worker threads, never on
the event loop. A request's deadline spans all its stages; when a stage fails (deadline, queue
full), the request's other queued work is withdrawn, not computed for nobody.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import torch
from PIL import Image

from engines.runtimes import Runtime
from model_export.checkpoints.tuned_prompts import TunedPrompt
from model_export.inference import caption_phrase_spans, to_exclusive
from model_export.modeling.mask_head import masks_for_image
from model_export.processing.anchors import AnchorGenerator
from model_export.processing.box_coding import BoxCoder, rescale_boxes
from model_export.processing.postprocess import (
    Detections,
    ground_phrases,
    merge_detections,
    postprocess_detections,
)
from model_export.processing.preprocess import batch_images, preprocess_image, resized_size
from model_export.processing.prompt import build_detection_prompt, clean_name, positive_map
from model_export.processing.referring import referent_span
from model_export.processing.rle import encode_mask
from service.batching import (
    PRIORITY_ONLINE,
    BatcherConfig,
    DeadlineExceededError,
    DynamicBatcher,
)
from service.errors import InvalidRequestError, TaskUnavailableError
from service.model_runner import (
    CaptionDecoded,
    CaptionWork,
    FusionResult,
    FusionWork,
    HeadOutputs,
    MaskWork,
    ModelRunner,
)
from service.pipeline.caption_search import (
    DEFAULT_SEARCH,
    CaptionSearch,
    left_to_right,
    names_a_region_twice,
    object_phrase_spans,
)
from service.pipeline.chunking import ChunkingError, name_token_counts, pack_chunks
from service.pipeline.text_cache import TextFeatureCache, TextFeatures
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
    ScoredBox,
    Segment,
    SegmentParams,
    SegmentResponse,
    SegmentResult,
    VqaParams,
    VqaResponse,
    rounded,
)
from service.telemetry import ServiceMetrics

log = logging.getLogger(__name__)

TASKS = ("detect", "segment", "vqa", "caption")
ENGINES = ("vision", "language", "fusion", "mask", "vqa", "caption")
# Graphs each task needs beyond vision, language and fusion.
TASK_GRAPHS = {"detect": (), "segment": ("mask",), "vqa": ("vqa",),
               "caption": ("caption_image", "caption_step", "caption_ground")}
VQA_TOP_K = 5
VQA_GROUNDING_THRESHOLD = 0.4  # detection score a question phrase's box needs to be returned
SCORE_DIGITS = 6
BOX_DIGITS = 2
# A request fans out into several items of the engines after `vision` (chunks, expressions), so
# their queues hold this many times the admission queue; admission is bounded at `vision`.
FAN_OUT_QUEUE_FACTOR = 16

T = TypeVar("T")


# --- prepared requests: what is known before the image is decoded -----------------------------


@dataclass(frozen=True)
class PreparedChunk:
    """One prompt chunk: its caption, the request's class index of each of its labels, and its
    (C_chunk, T) class-to-token map."""

    caption: str
    class_indices: tuple[int, ...]
    positive_map: torch.Tensor


@dataclass(frozen=True)
class DetectQuery:
    """A detection request the model can take.

    names: the class names (the classes, or the prompt's phrases); a label indexes it.
    spans: phrase grounding only: per name, its [start, end) in the client's prompt.
    chunks: the prompts the names are packed into (one, unless the vocabulary is large).
    """

    names: list[str]
    spans: list[tuple[int, int]] | None
    chunks: tuple[PreparedChunk, ...]
    threshold: float
    max_detections: int
    offset: torch.Tensor | None = None  # a tuned prompt's (T, D) text-feature offset


@dataclass
class EncodedSegment:
    """A segment with its mask already COCO-RLE encoded (in a worker thread, not the loop)."""

    box: list[float]
    score: float
    size: list[int]
    counts: str


@dataclass(frozen=True)
class _SegmentCandidates:
    """An expression's boxes (model-input frame, legacy +1 convention), scores, and the
    mask-head work for them."""

    work: MaskWork
    boxes: torch.Tensor
    scores: torch.Tensor


@dataclass(frozen=True)
class PreparedImage:
    """An image as the engines take it: (3, H, W) padded pixels and the sizes to map back."""

    pixels: torch.Tensor
    resized_hw: tuple[int, int]
    original_hw: tuple[int, int]

    @property
    def padded_hw(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])

    def to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """Model-input-frame boxes (legacy +1) -> end-exclusive boxes in original pixels."""
        return to_exclusive(rescale_boxes(boxes, self.resized_hw, self.original_hw))

    def to_input(self, boxes: torch.Tensor) -> torch.Tensor:
        """Original-pixel boxes (legacy +1, as `Detections` carry them) -> end-exclusive boxes
        in the model-input frame: `to_original`'s rescaling the other way."""
        return to_exclusive(rescale_boxes(boxes, self.original_hw, self.resized_hw))


# --- phrases of free text ---------------------------------------------------------------------

_PHRASE = re.compile(r"[^.,;\n]+")
_WORD = re.compile(r"[A-Za-z0-9_-]+")
# Words that never start or end a grounded phrase of a question: question words, auxiliaries,
# determiners, relations and the attribute names a question asks about.
_QUESTION_STOPWORDS = frozenset({
    "what", "which", "who", "whom", "whose", "where", "when", "why", "how", "many", "much", "is",
    "are", "was", "were", "be", "been", "do", "does", "did", "there", "here", "the", "a", "an",
    "of", "to", "in", "on", "at", "by", "for", "with", "from", "into", "and", "or", "this",
    "that", "these", "those", "it", "its", "left", "right", "above", "below", "under", "over",
    "next", "near", "color", "colour", "shape", "size", "object", "objects", "thing", "things",
    "one", "ones", "any", "some", "kind", "type",
})


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


_NOT_OBJECTS = frozenset({"yes", "no", "none", "nothing", "zero"})


def answer_names_something(answer: str) -> bool:
    """Whether an answer can be pointed at: not a count, not yes/no."""
    text = answer.strip().lower()
    return bool(text) and text not in _NOT_OBJECTS and not text.replace(".", "").isdigit()


def question_phrases(question: str) -> list[tuple[int, int]]:
    """Spans of the noun phrases a question names: maximal runs of words that are not question
    words, relations or attribute names ("what shape is left of the red square?" -> "red
    square"). The phrases grounded VQA returns boxes for."""
    spans: list[tuple[int, int]] = []
    start = end = None
    for match in _WORD.finditer(question):
        if match.group().lower() in _QUESTION_STOPWORDS:
            if start is not None:
                spans.append((start, end))
                start = None
            continue
        if start is None:
            start = match.start()
        end = match.end()
    if start is not None:
        spans.append((start, end))
    return spans


# --- the serving layer ------------------------------------------------------------------------


class Glipv2Serving:
    """The four tasks over one runtime: checks, the engines' batchers, responses.

    `start()`/`stop()` run on the event loop (the app's lifespan). Every request method is a
    coroutine that awaits its engines without blocking the loop. `caption_objects`: a caption
    names the detected objects of the model's `tasks.caption_classes`, one phrase each, left to
    right, each phrase ending in its object's class name, its tokens attending inside its
    object's box (`CaptionWork.object_boxes`) and grounded to that box
    (`CaptionSearch.objects`); off, or without such classes, the decoder picks the phrases.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        model_id: str,
        batcher_config: BatcherConfig,
        metrics: ServiceMetrics | None = None,
        caption_search: CaptionSearch = DEFAULT_SEARCH,
        caption_objects: bool = True,
        text_cache_bytes: int = 256 * 1024 * 1024,
        max_segments: int = 20,
        prompts: Mapping[str, TunedPrompt] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.runtime = runtime
        self.model_id = model_id
        self.config = runtime.config
        self.max_prompt_tokens = self.config.language.max_query_len
        self.caption_search = caption_search
        self.max_segments = max_segments
        self.prompts = dict(prompts or {})
        self.metrics = metrics
        self.runner = ModelRunner(runtime)
        # The Rust tokenizer directly: counting and char-to-token maps never touch the Python
        # wrapper's truncation/padding state, which the runner's `tokenize` calls set.
        self._tokenizer = self.runner.tokenizer.backend_tokenizer
        self.anchor_generator = AnchorGenerator.from_config(self.config.head)
        self.box_coder = BoxCoder.from_config(self.config.head)
        self.text_cache = TextFeatureCache(
            text_cache_bytes, on_lookup=metrics.on_text_cache_lookup if metrics else None)
        self._clock = time.monotonic if clock is None else clock
        runs: dict[str, Callable[..., Any]] = {
            "vision": self.runner.vision, "language": self.runner.language,
            "fusion": self.runner.fusion, "mask": self.runner.mask, "vqa": self.runner.vqa,
            "caption": self.runner.caption,
        }
        engines = ["vision", "language", "fusion"]
        engines += [e for e, task in (("mask", "segment"), ("vqa", "vqa"),
                                      ("caption", "caption")) if task in self.tasks]
        self.batchers: dict[str, DynamicBatcher[Any, Any]] = {}
        for engine in engines:
            config = batcher_config
            if engine != "vision":
                config = dataclasses.replace(
                    batcher_config,
                    max_queue_size=batcher_config.max_queue_size * FAN_OUT_QUEUE_FACTOR)
            on_batch, on_depth = (metrics.engine_callbacks(engine) if metrics is not None
                                  else (None, None))
            self.batchers[engine] = DynamicBatcher(
                config, runs[engine], clock=clock, on_batch=on_batch, on_queue_depth=on_depth,
                name=engine)
        self._default_deadline_ms = batcher_config.default_deadline_ms
        self._chunk_plan = lru_cache(maxsize=256)(self._plan_chunks)
        # What finds a caption's objects (`CaptionSearch.objects`), if anything.
        classes = self.config.tasks.caption_classes
        self._caption_objects = (self.prepare_detect(DetectParams(
            classes=list(classes), threshold=self.config.postprocess.caption_object_threshold))
            if caption_objects and classes and "caption" in self.tasks else None)
        grammar = self.runner.caption_grammar
        self._caption_class_texts = ([self.runner.tokenizer.decode(ids) for ids in grammar.classes]
                                     if grammar is not None else [])

    @property
    def tasks(self) -> list[str]:
        """Tasks the runtime has graphs for (detection always)."""
        graphs = self.runtime.graphs
        return [t for t in TASKS if all(g in graphs for g in TASK_GRAPHS[t])]

    async def start(self) -> None:
        for batcher in self.batchers.values():
            await batcher.start()

    async def stop(self, drain: bool = True) -> None:
        """`drain=True` finishes queued and in-flight work first (SIGTERM). Engines stop in
        flow order, so a request between two stages still finds the next one running."""
        for batcher in self.batchers.values():
            await batcher.stop(drain=drain)

    def info(self) -> ModelInfo:
        pre = self.config.preprocess
        return ModelInfo(
            id=self.model_id, preset=self.config.preset, runtime=self.runtime.name,
            tasks=self.tasks,  # type: ignore[arg-type]  # names checked by TASKS
            max_prompt_tokens=self.max_prompt_tokens, image_min_size=pre.min_size,
            image_max_size=pre.max_size, vqa_answers=list(self.config.tasks.vqa_answers),
            segment_threshold=self.config.postprocess.segment_threshold,
            prompt_ids=sorted(self.prompts))

    # --- checks before the image is decoded ---------------------------------------------------

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` as the model gets it, [CLS] and [SEP] included."""
        return len(self._tokenizer.encode(text).ids)

    def prepare_detect(self, params: DetectParams) -> DetectQuery:
        """Raises `InvalidRequestError` (422) for what only the model can tell is invalid."""
        if params.prompt_id is not None:
            return self._tuned_query(params)
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
            caption = build_detection_prompt(names).caption
            tokens = max(self.count_tokens(prompt), self.count_tokens(caption))
            if tokens > self.max_prompt_tokens:
                raise InvalidRequestError(
                    f"prompt is {tokens} tokens long, more than the model's limit of "
                    f"{self.max_prompt_tokens} (special tokens included)")
            chunks = self._chunk_plan(tuple(names), None)
        else:
            assert params.classes is not None  # the schema guarantees exactly one query
            names = list(params.classes)
            try:
                chunks = self._chunk_plan(tuple(names), params.chunk_size)
            except ChunkingError as exc:
                raise InvalidRequestError(str(exc)) from None
        return DetectQuery(names=names, spans=spans, chunks=chunks, threshold=params.threshold,
                           max_detections=params.max_detections)

    def _tuned_query(self, params: DetectParams) -> DetectQuery:
        tuned = self.prompts.get(params.prompt_id or "")
        if tuned is None:
            registered = ", ".join(sorted(self.prompts)) or "none"
            raise InvalidRequestError(f"unknown prompt_id {params.prompt_id!r}; registered on "
                                      f"this server: {registered} (see /v1/models)")
        chunks = self._chunk_plan(tuple(tuned.classes), None)
        # The offset is bound to the tuned caption's token positions: one chunk, that caption.
        if len(chunks) != 1 or chunks[0].caption != tuned.caption:
            raise RuntimeError(f"tuned prompt {tuned.name!r} does not pack into its own caption")
        return DetectQuery(names=list(tuned.classes), spans=None, chunks=chunks,
                           threshold=params.threshold, max_detections=params.max_detections,
                           offset=tuned.offset)

    def _plan_chunks(self, names: tuple[str, ...], chunk_size: int | None
                     ) -> tuple[PreparedChunk, ...]:
        """Names -> prompt chunks with their positive maps (cached: class lists repeat)."""
        counts = name_token_counts(self._tokenizer, names)
        prepared = []
        for chunk in pack_chunks(names, counts, self.max_prompt_tokens, chunk_size):
            encoding = self._tokenizer.encode(chunk.prompt.caption)
            if len(encoding.ids) != chunk.num_tokens:  # the packing's additivity, checked
                raise ChunkingError(f"chunk {chunk.prompt.caption[:60]!r} is "
                                    f"{len(encoding.ids)} tokens, packed as {chunk.num_tokens}")
            pmap = positive_map(encoding, chunk.prompt.spans, len(encoding.ids))
            prepared.append(PreparedChunk(chunk.prompt.caption, chunk.class_indices, pmap))
        return tuple(prepared)

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

    async def detections(self, query: DetectQuery, image: Image.Image,
                         priority: int = PRIORITY_ONLINE) -> Detections:
        """All detections after NMS, unthresholded: original-image pixels (legacy +1 boxes),
        labels indexing `query.names`, scores descending."""
        request = _Request(self, image, priority)
        prepared, visual = await request.encode_image()
        found = await self._detect_encoded(request, query, prepared, visual)
        if self.metrics is not None:
            self.metrics.prompt_chunks.observe(len(query.chunks))
        return found

    async def _detect_encoded(self, request: _Request, query: DetectQuery,
                              prepared: PreparedImage, visual: list[torch.Tensor]
                              ) -> Detections:
        texts = await request.encode_texts([c.caption for c in query.chunks])
        if query.offset is not None:  # after the cache, which holds the plain encoder features
            texts = [TextFeatures(t.input_ids, t.hidden + query.offset) for t in texts]
        rows = await request.fuse(visual, texts)
        return await asyncio.to_thread(self._merge_chunks, query, rows, prepared)

    async def detect(self, query: DetectQuery, image: Image.Image,
                     priority: int = PRIORITY_ONLINE) -> DetectResponse:
        """`priority`: `PRIORITY_BATCH` for job work (no deadline, after online requests)."""
        found = await self.detections(query, image, priority)
        detections: list[Detection] = []
        for box, score, label in zip(to_exclusive(found.boxes).tolist(), found.scores.tolist(),
                                     found.labels.tolist(), strict=True):
            if score < query.threshold:
                continue
            span = query.spans[label] if query.spans is not None else None
            detections.append(Detection(
                label=query.names[label], score=rounded(score, SCORE_DIGITS),
                box=[rounded(v, BOX_DIGITS) for v in box],
                span=list(span) if span is not None else None))
        return DetectResponse(model=self.model_id, image=_info(image),
                              detections=detections[: query.max_detections])

    def _merge_chunks(self, query: DetectQuery, rows: Sequence[FusionResult],
                      image: PreparedImage) -> Detections:
        """Per chunk post-processing, labels mapped to the request's classes, one NMS."""
        anchors = self._anchors(rows[0].head)
        parts = []
        for chunk, row in zip(query.chunks, rows, strict=True):
            found = self._postprocess(row.head, anchors, chunk.positive_map, image)
            labels = torch.tensor(chunk.class_indices, dtype=torch.long)[found.labels]
            parts.append(Detections(found.boxes, found.scores, labels))
        merged = merge_detections(parts, self.config.postprocess)
        return Detections(rescale_boxes(merged.boxes, image.resized_hw, image.original_hw),
                          merged.scores, merged.labels)

    async def segment(self, params: SegmentParams, image: Image.Image,
                      priority: int = PRIORITY_ONLINE) -> SegmentResponse:
        request = _Request(self, image, priority)
        prepared, visual = await request.encode_image()
        expressions = list(params.expressions)
        rows = await request.fuse(visual, await request.encode_texts(expressions))
        threshold = (self.config.postprocess.segment_threshold if params.threshold is None
                     else params.threshold)
        candidates = await asyncio.to_thread(self._segment_candidates, expressions, rows,
                                             prepared, threshold)
        logits = await request.all(request.submit("mask", c.work)
                                   for c in candidates if c is not None)
        encoded = await asyncio.to_thread(self._encode_segments, candidates, logits, prepared)
        results = [
            SegmentResult(expression=expression, segments=[
                Segment(score=s.score, box=s.box, mask=RleMask(size=s.size, counts=s.counts))
                for s in segments])
            for expression, segments in zip(expressions, encoded, strict=True)
        ]
        return SegmentResponse(model=self.model_id, image=_info(image), results=results)

    def _segment_candidates(self, expressions: list[str], rows: Sequence[FusionResult],
                            image: PreparedImage, threshold: float
                            ) -> list[_SegmentCandidates | None]:
        """Per expression, its boxes over `threshold` (the best `max_segments`) with the
        mask-head work for them, or None when it names nothing. Scored on the words naming the
        referent (`referent_span`: "circle left of" of "circle left of the red square")."""
        anchors = self._anchors(rows[0].head)
        out: list[_SegmentCandidates | None] = []
        for expression, row in zip(expressions, rows, strict=True):
            pmap, found = self._phrase_detections(expression, [referent_span(expression)], row,
                                                  image, anchors)
            keep = (found.scores >= threshold).nonzero().flatten()[: self.max_segments]
            if not len(keep):
                out.append(None)
                continue
            boxes = found.boxes[keep]
            work = MaskWork(
                fused_visual=row.fused_visual[:3], fused_text=row.fused_text,
                phrase_map=pmap / pmap.sum(dim=1, keepdim=True).clamp(min=1.0),  # (1, T)
                boxes=to_exclusive(boxes)[None],  # (1, K, 4)
                box_valid=torch.ones(1, len(keep), dtype=torch.bool))
            out.append(_SegmentCandidates(work, boxes, found.scores[keep]))
        return out

    def _encode_segments(self, candidates: Sequence[_SegmentCandidates | None],
                         logits: Sequence[torch.Tensor], image: PreparedImage
                         ) -> list[list[EncodedSegment]]:
        """Mask logits -> binary masks in original pixels -> COCO RLE, per expression."""
        per_image = iter(logits)
        out: list[list[EncodedSegment]] = []
        for candidate in candidates:
            if candidate is None:
                out.append([])
                continue
            masks = masks_for_image(next(per_image)[0], image.resized_hw, image.padded_hw,
                                    image.original_hw)
            boxes = image.to_original(candidate.boxes)
            out.append([_encode_segment(b, float(s), m)
                        for b, s, m in zip(boxes, candidate.scores, masks, strict=True)])
        return out

    async def vqa(self, params: VqaParams, image: Image.Image,
                  priority: int = PRIORITY_ONLINE) -> VqaResponse:
        request = _Request(self, image, priority)
        prepared, visual = await request.encode_image()
        (row,) = await request.fuse(visual, await request.encode_texts([params.question]))
        logits = await request.submit("vqa", row.fused_text)
        probs = logits.sigmoid()
        vocab = self.config.tasks.vqa_answers
        order = torch.argsort(probs, descending=True)[:VQA_TOP_K].tolist()
        answers = [AnswerScore(answer=vocab[i], score=rounded(float(probs[i]), SCORE_DIGITS))
                   for i in order]
        grounding = await asyncio.to_thread(self._ground_question, params.question, row,
                                            prepared)
        answer = answers[0].answer
        answer_boxes: list[ScoredBox] = []
        if answer_names_something(answer):  # one more fusion row: the answer as a prompt
            (answer_row,) = await request.fuse(visual, await request.encode_texts([answer]))
            answer_boxes = await asyncio.to_thread(self._ground_answer, answer, answer_row,
                                                   prepared)
        return VqaResponse(model=self.model_id, image=_info(image), answer=answer,
                           score=answers[0].score, answers=answers, grounding=grounding,
                           answer_grounding=answer_boxes)

    def _phrase_detections(self, text: str, spans: Sequence[tuple[int, int]], row: FusionResult,
                           image: PreparedImage, anchors: list[torch.Tensor] | None = None
                           ) -> tuple[torch.Tensor, Detections]:
        """Detections of each span of `text` as one phrase (labels index `spans`), from the
        fusion row of `text`; and the (P, T) phrase-to-token map."""
        pmap = positive_map(self._tokenizer.encode(text), [[span] for span in spans],
                            row.fused_text.shape[1])
        if anchors is None:
            anchors = self._anchors(row.head)
        return pmap, self._postprocess(row.head, anchors, pmap, image)

    def _ground_answer(self, answer: str, row: FusionResult, image: PreparedImage
                       ) -> list[ScoredBox]:
        """Boxes of what the answer names, as a one-phrase detection prompt (over threshold)."""
        _, found = self._phrase_detections(answer, [(0, len(answer))], row, image)
        boxes = image.to_original(found.boxes)
        return [ScoredBox(box=[rounded(v, BOX_DIGITS) for v in box],
                          score=rounded(score, SCORE_DIGITS))
                for box, score in zip(boxes.tolist(), found.scores.tolist(), strict=True)
                if score >= VQA_GROUNDING_THRESHOLD]

    def _ground_question(self, question: str, row: FusionResult, image: PreparedImage
                         ) -> list[GroundedPhrase]:
        """Boxes of the objects the question's noun phrases name (score over the threshold)."""
        spans = question_phrases(question)
        if not spans:
            return []
        _, found = self._phrase_detections(question, spans, row, image)
        boxes = image.to_original(found.boxes)
        return [GroundedPhrase(phrase=question[spans[label][0]:spans[label][1]],
                               span=list(spans[label]),
                               box=[rounded(v, BOX_DIGITS) for v in box],
                               score=rounded(score, SCORE_DIGITS))
                for box, score, label in zip(boxes.tolist(), found.scores.tolist(),
                                             found.labels.tolist(), strict=True)
                if score >= VQA_GROUNDING_THRESHOLD]

    async def caption(self, image: Image.Image,
                      priority: int = PRIORITY_ONLINE) -> CaptionResponse:
        request = _Request(self, image, priority)
        prepared, visual = await request.encode_image()
        work = CaptionWork(visual, self.caption_search)
        objects = None
        if self._caption_objects is not None:
            found = left_to_right(await self._detect_encoded(
                request, self._caption_objects, prepared, visual), self._caption_objects.threshold)
            if len(found.labels):  # nothing found: the decoder picks the phrases
                objects = found
                work = CaptionWork(
                    visual, dataclasses.replace(work.search, objects=tuple(found.labels.tolist())),
                    prepared.to_input(found.boxes))
        candidates: list[CaptionDecoded] = await request.submit("caption", work)
        if objects is not None:
            caption = candidates[0].caption
            phrases = self._object_phrases(caption, objects)
        else:
            caption, phrases = await asyncio.to_thread(self._ground_caption, candidates, prepared)
        return CaptionResponse(model=self.model_id, image=_info(image), caption=caption,
                               phrases=phrases)

    def _object_phrases(self, caption: str, objects: Detections) -> list[GroundedPhrase]:
        """A caption of given objects, each phrase grounded to the object it was made for (a
        caption cut short at `max_tokens` has fewer phrases)."""
        names = [self._caption_class_texts[label] for label in objects.labels.tolist()]
        boxes = to_exclusive(objects.boxes).tolist()
        return [GroundedPhrase(phrase=caption[start:end], span=[start, end],
                               box=[rounded(v, BOX_DIGITS) for v in box],
                               score=rounded(score, SCORE_DIGITS))
                for (start, end), box, score in zip(object_phrase_spans(caption, names), boxes,
                                                    objects.scores.tolist(), strict=False)]

    def _ground_caption(self, candidates: Sequence[CaptionDecoded], image: PreparedImage
                        ) -> tuple[str, list[GroundedPhrase]]:
        """The best-scoring candidate that does not name one region twice with the same words
        (`names_a_region_twice`), else the best one, with its grounded phrases."""
        grounded = ((d.caption, self._ground_phrases(d, image)) for d in candidates)
        best = next(grounded)  # grounded lazily: most answers are the first candidate
        for caption, phrases in itertools.chain([best], grounded):
            if not names_a_region_twice([p.phrase for p in phrases], [p.box for p in phrases]):
                return caption, phrases
        return best

    def _ground_phrases(self, decoded: CaptionDecoded, image: PreparedImage
                        ) -> list[GroundedPhrase]:
        caption = decoded.caption
        spans = caption_phrase_spans(caption)
        if not spans:
            return []
        head = decoded.head
        pmap = positive_map(decoded.encoding, [[s] for s in spans],
                            head.token_logits[0].shape[2])
        found = ground_phrases(head.box_regression, head.centerness, head.token_logits,
                               self._anchors(head), pmap, image.resized_hw, self.box_coder)
        boxes = image.to_original(found.boxes)
        return [GroundedPhrase(phrase=caption[start:end], span=[start, end],
                               box=[rounded(v, BOX_DIGITS) for v in box],
                               score=rounded(float(score), SCORE_DIGITS))
                for (start, end), box, score in zip(spans, boxes.tolist(), found.scores,
                                                    strict=True)]

    # --- helpers ------------------------------------------------------------------------------

    def _postprocess(self, head: HeadOutputs, anchors: list[torch.Tensor],
                     positive_map: torch.Tensor, image: PreparedImage) -> Detections:
        """ATSS post-processing of one fusion row against a (C, T) map: model-input frame."""
        (found,) = postprocess_detections(
            head.box_regression, head.centerness, head.token_logits, anchors, positive_map,
            [image.resized_hw], self.config.postprocess, self.box_coder)
        return found

    def _anchors(self, head: HeadOutputs) -> list[torch.Tensor]:
        sizes = [tuple(level.shape[-2:]) for level in head.box_regression]
        return self.anchor_generator.grid_anchors(sizes)

    def prepare_image(self, image: Image.Image) -> PreparedImage:
        """Resize, normalise and pad to the image's bucket (a multiple of 32), as the reference."""
        pre = self.config.preprocess
        pixels, resized_hw = preprocess_image(image, pre)
        batch, _ = batch_images([pixels], pre.size_divisibility)
        return PreparedImage(pixels=batch[0], resized_hw=resized_hw,
                             original_hw=(image.height, image.width))

    def bucket(self, image: Image.Image) -> tuple[int, int]:
        """The padded (H, W) the image runs at: only same-shape images stack into one tensor."""
        pre = self.config.preprocess
        height, width = resized_size(image.width, image.height, pre.min_size, pre.max_size)
        step = pre.size_divisibility
        return math.ceil(height / step) * step, math.ceil(width / step) * step


class _Request:
    """One request's trip through the engines: its deadline, and its work withdrawn from every
    queue when any part of it fails."""

    def __init__(self, serving: Glipv2Serving, image: Image.Image,
                 priority: int = PRIORITY_ONLINE) -> None:
        self.serving = serving
        self.image = image
        self.priority = priority
        # Job work has no deadline: nobody waits on the line for it.
        deadline_ms = serving._default_deadline_ms if priority == PRIORITY_ONLINE else None
        self.deadline_s = (None if deadline_ms is None
                           else serving._clock() + deadline_ms / 1000.0)
        self.bucket = serving.bucket(image)

    def remaining_ms(self) -> float | None:
        if self.deadline_s is None:
            return None
        left = (self.deadline_s - self.serving._clock()) * 1000.0
        if left <= 0:
            raise DeadlineExceededError("request deadline passed between engines")
        return left

    async def submit(self, engine: str, payload: object, bucket: object = None) -> Any:
        batcher = self.serving.batchers[engine]
        return await batcher.submit(payload, bucket=bucket if bucket is not None else self.bucket,
                                    deadline_ms=self.remaining_ms(), priority=self.priority)

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

    async def encode_image(self) -> tuple[PreparedImage, list[torch.Tensor]]:
        prepared = await asyncio.to_thread(self.serving.prepare_image, self.image)
        return prepared, await self.submit("vision", prepared.pixels)

    async def encode_texts(self, texts: list[str]) -> list[TextFeatures]:
        async def compute(missing: list[str]) -> list[TextFeatures]:
            return await self.all(self.submit("language", text, bucket="text")
                                  for text in missing)

        return await self.serving.text_cache.get(texts, compute)

    async def fuse(self, visual: list[torch.Tensor], texts: Sequence[TextFeatures]
                   ) -> list[FusionResult]:
        return await self.all(self.submit("fusion", FusionWork(visual, text)) for text in texts)


def _encode_segment(box: Sequence[float] | torch.Tensor, score: float, mask: torch.Tensor
                    ) -> EncodedSegment:
    rle = encode_mask(mask.numpy())
    return EncodedSegment(box=[rounded(float(v), BOX_DIGITS) for v in box],
                          score=rounded(score, SCORE_DIGITS),
                          size=rle["size"], counts=rle["counts"])


def _info(image: Image.Image) -> ImageInfo:
    return ImageInfo(width=image.width, height=image.height)
