"""Language-guided detection and phrase grounding: prepare -> run -> respond.

prepare: class names (any number: packed into prompt chunks), a free-text prompt (its phrases
with their spans) or a registered tuned prompt -> a `DetectQuery`, 422 for what only the model
can tell is invalid. run: `vision` once, `language` once per distinct chunk (cached), `fusion`
once per chunk, post-processing per chunk, labels mapped back to the request's classes, one
NMS. respond: thresholded detections in the client's pixels.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from PIL import Image

from model_export.checkpoints.tuned_prompts import TunedPrompt
from model_export.processing.box_coding import rescale_boxes, to_exclusive
from model_export.processing.chunking import ChunkingError, name_token_counts, pack_chunks
from model_export.processing.postprocess import Detections, merge_detections
from model_export.processing.prompt import positive_map
from service.batching import PRIORITY_ONLINE
from service.engine_client import EngineStages
from service.errors import InvalidRequestError, NotFoundError
from service.model_runner import FusionResult
from service.pipeline.model_input import PreparedImage
from service.pipeline.phrases import split_phrases
from service.pipeline.text_cache import PromptFeatures
from service.schemas import Detection, DetectParams, DetectResponse
from service.tasks.common import TaskContext, image_info, rounded_box, rounded_score


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


class DetectTask:
    """Detection over a `TaskContext`; `prompts` are the registered tuned prompts."""

    def __init__(self, context: TaskContext, prompts: Mapping[str, TunedPrompt]) -> None:
        self.context = context
        self.prompts = dict(prompts)
        self._chunk_plan = lru_cache(maxsize=256)(self._plan_chunks)

    # --- prepare ------------------------------------------------------------------------------

    def prepare(self, params: DetectParams) -> DetectQuery:
        """Raises `InvalidRequestError` (422) for what only the model can tell is invalid,
        `NotFoundError` (404) for a prompt_id not registered here."""
        if params.prompt_id is not None:
            return self._tuned_query(params)
        spans: list[tuple[int, int]] | None = None
        if params.prompt is not None:  # its phrases are packed into chunks as classes are
            spans = split_phrases(params.prompt)  # the schema guarantees one at least
            names = [params.prompt[start:end] for start, end in spans]
        else:
            assert params.classes is not None  # the schema guarantees exactly one query
            names = list(params.classes)
        try:
            chunks = self._chunk_plan(tuple(names), params.chunk_size
                                      or self.context.config.language.max_prompt_phrases)
        except ChunkingError as exc:
            raise InvalidRequestError(str(exc)) from None
        return DetectQuery(names=names, spans=spans, chunks=chunks, threshold=params.threshold,
                           max_detections=params.max_detections)

    def _tuned_query(self, params: DetectParams) -> DetectQuery:
        tuned = self.prompts.get(params.prompt_id or "")
        if tuned is None:
            registered = ", ".join(sorted(self.prompts)) or "none"
            raise NotFoundError(f"unknown prompt_id {params.prompt_id!r}; registered on "
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
        tokenizer = self.context.tokenizer
        counts = name_token_counts(tokenizer, names)
        prepared = []
        for chunk in pack_chunks(names, counts, self.context.max_prompt_tokens, chunk_size):
            encoding = tokenizer.encode(chunk.prompt.caption)
            if len(encoding.ids) != chunk.num_tokens:  # the packing's additivity, checked
                raise ChunkingError(f"chunk {chunk.prompt.caption[:60]!r} is "
                                    f"{len(encoding.ids)} tokens, packed as {chunk.num_tokens}")
            pmap = positive_map(encoding, chunk.prompt.spans, len(encoding.ids))
            prepared.append(PreparedChunk(chunk.prompt.caption, chunk.class_indices, pmap))
        return tuple(prepared)

    # --- run ----------------------------------------------------------------------------------

    async def detections(self, query: DetectQuery, image: Image.Image,
                         priority: int = PRIORITY_ONLINE) -> Detections:
        """All detections after NMS, unthresholded: original-image pixels (legacy +1 boxes),
        labels indexing `query.names`, scores descending."""
        request = self.context.engines.request(image, priority)
        prepared, visual = await request.encode_image()
        return await self.detect_encoded(request, query, prepared, visual)

    async def detect_encoded(self, request: EngineStages, query: DetectQuery,
                             prepared: PreparedImage, visual: list[torch.Tensor]
                             ) -> Detections:
        """`detections` for an image whose vision features a request already has."""
        if not query.chunks:  # no name has a token to match: nothing can be found
            return Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
        texts = await request.encode_texts([c.caption for c in query.chunks])
        if query.offset is not None:  # after the cache, which holds the plain encoder features
            texts = [PromptFeatures(t.input_ids, t.hidden + query.offset) for t in texts]
        rows = await request.fuse(visual, texts)
        return await asyncio.to_thread(self._merge_chunks, query, rows, prepared)

    def _merge_chunks(self, query: DetectQuery, rows: Sequence[FusionResult],
                      image: PreparedImage) -> Detections:
        """Per chunk post-processing, labels mapped to the request's classes, one NMS."""
        anchors = self.context.anchors(rows[0].head)
        parts = []
        for chunk, row in zip(query.chunks, rows, strict=True):
            found = self.context.postprocess(row.head, anchors, chunk.positive_map, image)
            labels = torch.tensor(chunk.class_indices, dtype=torch.long)[found.labels]
            parts.append(Detections(found.boxes, found.scores, labels))
        merged = merge_detections(parts, self.context.config.postprocess)
        return Detections(rescale_boxes(merged.boxes, image.resized_hw, image.original_hw),
                          merged.scores, merged.labels)

    # --- respond ------------------------------------------------------------------------------

    def respond(self, query: DetectQuery, found: Detections, image: Image.Image
                ) -> DetectResponse:
        detections: list[Detection] = []
        for box, score, label in zip(to_exclusive(found.boxes).tolist(), found.scores.tolist(),
                                     found.labels.tolist(), strict=True):
            if score < query.threshold:
                continue
            span = query.spans[label] if query.spans is not None else None
            detections.append(Detection(
                label=query.names[label], score=rounded_score(score), box=rounded_box(box),
                span=list(span) if span is not None else None))
        return DetectResponse(model=self.context.model_id, image=image_info(image),
                              detections=detections[: query.max_detections])
