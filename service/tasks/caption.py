"""Grounded captioning: prepare -> run -> respond.

run: `vision` once; with `caption_objects`, detection of the model's caption classes first
(`DetectTask.detect_encoded` on the same features), so the caption names those objects left to
right, one phrase each, its tokens attending inside its object's box; then the `caption`
engine's beam search. respond: the caption and its phrases, each grounded to the object it was
made for, or (the decoder picking the phrases) to the caption head's best box for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Sequence

from PIL import Image

from model_export.data.world import caption_phrase_spans
from model_export.processing.box_coding import to_exclusive
from model_export.processing.postprocess import Detections, ground_phrases
from model_export.processing.prompt import positive_map
from service.batching import PRIORITY_ONLINE
from service.caption_runner import CaptionDecoded, CaptionWork
from service.pipeline.caption_search import (
    CaptionSearch,
    left_to_right,
    names_a_region_twice,
    object_phrase_spans,
)
from service.pipeline.model_input import PreparedImage
from service.schemas import CaptionResponse, DetectParams, GroundedPhrase
from service.tasks.common import TaskContext, image_info, rounded_box, rounded_score
from service.tasks.detect import DetectQuery, DetectTask


class CaptionTask:
    """Captioning over a `TaskContext`.

    `caption_objects`: a caption names the detected objects of the model's
    `tasks.caption_classes`, one phrase each, left to right, each phrase ending in its object's
    class name, its tokens attending inside its object's box (`CaptionWork.object_boxes`) and
    grounded to that box (`CaptionSearch.objects`); off, or without such classes, the decoder
    picks the phrases.
    """

    def __init__(self, context: TaskContext, detect: DetectTask, search: CaptionSearch,
                 caption_objects: bool, class_texts: Sequence[str]) -> None:
        self.context = context
        self.detect = detect
        self.search = search
        self.class_texts = list(class_texts)  # each caption class as the tokenizer decodes it
        classes = context.config.tasks.caption_classes
        self.objects_query: DetectQuery | None = (detect.prepare(DetectParams(
            classes=list(classes),
            threshold=context.config.postprocess.caption_object_threshold))
            if caption_objects and classes and "caption" in context.tasks else None)

    def prepare(self) -> None:
        self.context.require("caption")

    async def run(self, image: Image.Image, priority: int = PRIORITY_ONLINE) -> CaptionResponse:
        request = self.context.engines.request(image, priority)
        request.admit_caption(self.search)  # a caption the decoder would refuse costs no vision
        prepared, visual = await request.encode_image()
        work = CaptionWork(visual, self.search)
        objects = None
        if self.objects_query is not None:
            found = left_to_right(await self.detect.detect_encoded(
                request, self.objects_query, prepared, visual), self.objects_query.threshold)
            if len(found.labels):  # nothing found: the decoder picks the phrases
                objects = found
                work = CaptionWork(
                    visual, dataclasses.replace(work.search, objects=tuple(found.labels.tolist())),
                    prepared.to_input(found.boxes))
        candidates = await request.decode_caption(work)
        if objects is not None:
            caption = candidates[0].caption
            phrases = self.object_phrases(caption, objects)
        else:
            caption, phrases = await asyncio.to_thread(self._ground_caption, candidates, prepared)
        return CaptionResponse(model=self.context.model_id, image=image_info(image),
                               caption=caption, phrases=phrases)

    def object_phrases(self, caption: str, objects: Detections) -> list[GroundedPhrase]:
        """A caption of given objects, each phrase grounded to the object it was made for (a
        caption cut short at `max_tokens` has fewer phrases)."""
        names = [self.class_texts[label] for label in objects.labels.tolist()]
        boxes = to_exclusive(objects.boxes).tolist()
        return [GroundedPhrase(phrase=caption[start:end], span=[start, end],
                               box=rounded_box(box), score=rounded_score(score))
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
        head, encoding = decoded.head, decoded.encoding
        if not spans or head is None or encoding is None:
            return []
        pmap = positive_map(encoding, [[s] for s in spans],
                            head.token_logits[0].shape[2])
        found = ground_phrases(head.box_regression, head.centerness, head.token_logits,
                               self.context.anchors(head), pmap, image.resized_hw,
                               self.context.box_coder, self.context.config.postprocess.score_agg)
        boxes = image.to_original(found.boxes)
        return [GroundedPhrase(phrase=caption[start:end], span=[start, end],
                               box=rounded_box(box), score=rounded_score(float(score)))
                for (start, end), box, score in zip(spans, boxes.tolist(), found.scores,
                                                    strict=True)]
