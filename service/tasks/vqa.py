"""Grounded VQA: prepare -> run -> respond.

prepare: the question within the token limit. run: `vision` once, one `fusion` row for the
question, the `vqa` engine on its fused tokens; the question's noun phrases grounded from that
row; when the answer names something (not a count, not yes/no), one more fusion row with the
answer as a prompt, to box it. respond: the top answers with scores and both groundings.
"""

from __future__ import annotations

import asyncio

import torch
from PIL import Image

from service.batching import PRIORITY_ONLINE
from service.engine_client import Engine
from service.model_runner import FusionResult
from service.pipeline.model_input import PreparedImage
from service.pipeline.phrases import answer_names_something, question_phrases
from service.schemas import AnswerScore, GroundedPhrase, ScoredBox, VqaParams, VqaResponse
from service.tasks.common import TaskContext, image_info, rounded_box, rounded_score

VQA_TOP_K = 5
VQA_GROUNDING_THRESHOLD = 0.4  # detection score a question phrase's box needs to be returned


class VqaTask:
    """Grounded VQA over a `TaskContext`."""

    def __init__(self, context: TaskContext) -> None:
        self.context = context

    def prepare(self, params: VqaParams) -> None:
        self.context.require("vqa")
        self.context.check_tokens("question", self.context.count_tokens(params.question))

    async def run(self, params: VqaParams, image: Image.Image,
                  priority: int = PRIORITY_ONLINE) -> VqaResponse:
        request = self.context.engines.request(image, priority)
        prepared, visual = await request.encode_image()
        (row,) = await request.fuse(visual, await request.encode_texts([params.question]))
        logits = await request.submit(Engine.VQA, row.fused_text)
        probs = logits.sigmoid()
        vocab = self.context.config.tasks.vqa_answers
        order = torch.argsort(probs, descending=True)[:VQA_TOP_K].tolist()
        answers = [AnswerScore(answer=vocab[i], score=rounded_score(float(probs[i])))
                   for i in order]
        grounding = await asyncio.to_thread(self._ground_question, params.question, row,
                                            prepared)
        answer = answers[0].answer
        answer_boxes: list[ScoredBox] = []
        if answer_names_something(answer):  # one more fusion row: the answer as a prompt
            (answer_row,) = await request.fuse(visual, await request.encode_texts([answer]))
            answer_boxes = await asyncio.to_thread(self._ground_answer, answer, answer_row,
                                                   prepared)
        return VqaResponse(model=self.context.model_id, image=image_info(image), answer=answer,
                           score=answers[0].score, answers=answers, grounding=grounding,
                           answer_grounding=answer_boxes)

    def _ground_answer(self, answer: str, row: FusionResult, image: PreparedImage
                       ) -> list[ScoredBox]:
        """Boxes of what the answer names, as a one-phrase detection prompt (over threshold)."""
        _, found = self.context.phrase_detections(answer, [(0, len(answer))], row, image)
        boxes = image.to_original(found.boxes)
        return [ScoredBox(box=rounded_box(box), score=rounded_score(score))
                for box, score in zip(boxes.tolist(), found.scores.tolist(), strict=True)
                if score >= VQA_GROUNDING_THRESHOLD]

    def _ground_question(self, question: str, row: FusionResult, image: PreparedImage
                         ) -> list[GroundedPhrase]:
        """Boxes of the objects the question's noun phrases name (score over the threshold)."""
        spans = question_phrases(question, self.context.question_stopwords)
        if not spans:
            return []
        _, found = self.context.phrase_detections(question, spans, row, image)
        boxes = image.to_original(found.boxes)
        return [GroundedPhrase(phrase=question[spans[label][0]:spans[label][1]],
                               span=list(spans[label]), box=rounded_box(box),
                               score=rounded_score(score))
                for box, score, label in zip(boxes.tolist(), found.scores.tolist(),
                                             found.labels.tolist(), strict=True)
                if score >= VQA_GROUNDING_THRESHOLD]
