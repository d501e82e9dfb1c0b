"""Referring segmentation: prepare -> run -> respond.

prepare: each expression within the token limit. run: `vision` once, one `fusion` row per
expression, that row's boxes over the threshold (scored on the words naming the referent), the
`mask` engine for the boxes of the expressions that found any. respond: per expression its
segments with COCO RLE masks in the client's pixels (encoded in a worker thread).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from model_export.modeling.mask_head import masks_for_image
from model_export.processing.box_coding import to_exclusive
from model_export.processing.rle import encode_mask
from model_export.processing.spatial import ReferringQuery, on_side, referring_query
from service.batching import PRIORITY_ONLINE
from service.engine_client import Engine
from service.model_runner import FusionResult, MaskWork
from service.pipeline.model_input import PreparedImage
from service.schemas import (
    RleMask,
    Segment,
    SegmentParams,
    SegmentResponse,
    SegmentResult,
)
from service.tasks.common import TaskContext, image_info, rounded_box, rounded_score


@dataclass(frozen=True)
class Thresholds:
    """Scores a segment needs: `phrase` (an expression's words, a geometric relation's anchor)
    and `relation` (the noun of a referent resolved by geometry)."""

    phrase: float
    relation: float


@dataclass
class EncodedSegment:
    """A segment with its mask already COCO-RLE encoded (in a worker thread, not the loop)."""

    box: list[float]
    score: float
    size: list[int]
    counts: str


@dataclass(frozen=True)
class SegmentCandidates:
    """An expression's boxes (model-input frame, legacy +1 convention), scores, and the
    mask-head work for them."""

    work: MaskWork
    boxes: torch.Tensor
    scores: torch.Tensor


class SegmentTask:
    """Referring segmentation over a `TaskContext`; at most `max_segments` per expression."""

    def __init__(self, context: TaskContext, max_segments: int) -> None:
        self.context = context
        self.max_segments = max_segments

    def prepare(self, params: SegmentParams) -> None:
        self.context.require("segment")
        for index, expression in enumerate(params.expressions):
            self.context.check_tokens(f"expressions[{index}]",
                                      self.context.count_tokens(expression))

    async def run(self, params: SegmentParams, image: Image.Image,
                  priority: int = PRIORITY_ONLINE) -> SegmentResponse:
        request = self.context.engines.request(image, priority)
        prepared, visual = await request.encode_image()
        expressions = list(params.expressions)
        rows = await request.fuse(visual, await request.encode_texts(expressions),
                                  for_masks=True)
        post = self.context.config.postprocess
        queries = [(expression, referring_query(expression, post.relations == "geometry"))
                   for expression in expressions]
        thresholds = Thresholds(
            post.segment_threshold if params.threshold is None else params.threshold,
            post.relation_threshold if params.relation_threshold is None
            else params.relation_threshold)
        candidates = await asyncio.to_thread(self._candidates, queries, rows, prepared,
                                             thresholds)
        logits = await request.all(request.submit(Engine.MASK, c.work)
                                   for c in candidates if c is not None)
        encoded = await asyncio.to_thread(self._encode, candidates, logits, prepared)
        return self.respond(expressions, encoded, image)

    def _candidates(self, queries: list[tuple[str, ReferringQuery]],
                    rows: Sequence[FusionResult],
                    image: PreparedImage, thresholds: Thresholds
                    ) -> list[SegmentCandidates | None]:
        """Per expression, its boxes over the threshold (the best `max_segments`) with the
        mask-head work for them, or None when it names nothing. Scored on the words naming the
        referent ("circle left of" of "circle left of the red square") and, for a relation,
        capped by its anchor's best score ("red square"), so that where the anchor is not found
        the expression names nothing. Where the query names a side (`relations` "geometry"),
        the referent's noun ("circle") needs `thresholds.relation` and only boxes wholly on
        that side of the anchor's best box count, the anchor needing `thresholds.phrase`."""
        anchors = self.context.anchors(rows[0].head)
        out: list[SegmentCandidates | None] = []
        for (expression, query), row in zip(queries, rows, strict=True):
            spans = [query.referent] if query.anchor is None else [query.referent, query.anchor]
            pmap, found = self.context.phrase_detections(expression, spans, row, image, anchors)
            referent = found.labels == 0
            scores, boxes = found.scores[referent], found.boxes[referent]
            anchor = found.labels == 1
            anchor_scores, anchor_boxes = found.scores[anchor], found.boxes[anchor]
            best = int(anchor_scores.argmax()) if len(anchor_scores) else None
            if query.side is not None:
                passed = scores >= thresholds.relation
                if best is None or float(anchor_scores[best]) < thresholds.phrase:
                    passed = torch.zeros_like(passed)
                else:
                    passed &= on_side(to_exclusive(boxes), to_exclusive(anchor_boxes[best]),
                                      query.side)
            else:
                if query.anchor is not None:
                    scores = scores.clamp(max=0.0 if best is None else float(anchor_scores[best]))
                passed = scores >= thresholds.phrase
            keep = passed.nonzero().flatten()[: self.max_segments]
            if not len(keep):
                out.append(None)
                continue
            boxes = boxes[keep]
            phrase = pmap[:1]  # (1, T): the referent's words
            work = MaskWork(
                fused_visual=row.fused_visual, fused_text=row.fused_text,
                phrase_map=phrase / phrase.sum(dim=1, keepdim=True).clamp(min=1.0),
                boxes=to_exclusive(boxes)[None],  # (1, K, 4)
                box_valid=torch.ones(1, len(keep), dtype=torch.bool))
            out.append(SegmentCandidates(work, boxes, scores[keep]))
        return out

    def _encode(self, candidates: Sequence[SegmentCandidates | None],
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
            out.append([encode_segment(b, float(s), m)
                        for b, s, m in zip(boxes, candidate.scores, masks, strict=True)])
        return out

    def respond(self, expressions: list[str], encoded: list[list[EncodedSegment]],
                image: Image.Image) -> SegmentResponse:
        results = [
            SegmentResult(expression=expression, segments=[
                Segment(score=s.score, box=s.box, mask=RleMask(size=s.size, counts=s.counts))
                for s in segments])
            for expression, segments in zip(expressions, encoded, strict=True)
        ]
        return SegmentResponse(model=self.context.model_id, image=image_info(image),
                               results=results)


def encode_segment(box: Sequence[float] | torch.Tensor, score: float, mask: torch.Tensor
                   ) -> EncodedSegment:
    rle = encode_mask(mask.numpy())
    return EncodedSegment(box=rounded_box([float(v) for v in box]), score=rounded_score(score),
                          size=rle["size"], counts=rle["counts"])
