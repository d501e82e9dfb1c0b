"""What every task shares: the model's config and tokenizer, token limits, the engines, and
ATSS post-processing of one fusion row.

Each task module (`detect`, `segment`, `vqa`, `caption`) runs prepare -> run -> respond on a
`TaskContext`; `service.serving` composes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from tokenizers import Tokenizer

from model_export.modeling.config import Glipv2Config
from model_export.processing.anchors import AnchorGenerator
from model_export.processing.box_coding import BoxCoder
from model_export.processing.postprocess import Detections, postprocess_detections
from model_export.processing.prompt import positive_map
from service.engine_client import Engines
from service.errors import InvalidRequestError, TaskUnavailableError
from service.model_runner import FusionResult, HeadOutputs
from service.pipeline.model_input import PreparedImage
from service.schemas import ImageInfo, rounded

SCORE_DIGITS = 6
BOX_DIGITS = 2


class TaskContext:
    """The model as every task sees it, and the engines it runs on.

    tasks: the tasks the runtime has graphs for; tokenizer: the Rust tokenizer itself, so
    counting and char-to-token maps never touch the Python wrapper's truncation and padding
    state, which the runner's tokenisation sets.
    """

    def __init__(self, model_id: str, config: Glipv2Config, engines: Engines,
                 tokenizer: Tokenizer, tasks: Sequence[str]) -> None:
        self.model_id = model_id
        self.config = config
        self.engines = engines
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.max_prompt_tokens = config.language.max_query_len
        self.question_stopwords = frozenset(config.tasks.question_stopwords)
        self.anchor_generator = AnchorGenerator.from_config(config.head)
        self.box_coder = BoxCoder.from_config(config.head)

    def require(self, task: str) -> None:
        if task not in self.tasks:
            raise TaskUnavailableError(f"model {self.model_id!r} has no {task} head")

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` as the model gets it, [CLS] and [SEP] included."""
        return len(self.tokenizer.encode(text).ids)

    def check_tokens(self, name: str, tokens: int) -> None:
        """422 for a text over the text encoder's limit: the one place that limit is checked."""
        if tokens > self.max_prompt_tokens:
            raise InvalidRequestError(
                f"{name} is {tokens} tokens long, more than the model's limit of "
                f"{self.max_prompt_tokens} (special tokens included)")

    def anchors(self, head: HeadOutputs) -> list[torch.Tensor]:
        sizes = [(int(level.shape[-2]), int(level.shape[-1])) for level in head.box_regression]
        return self.anchor_generator.grid_anchors(sizes)

    def postprocess(self, head: HeadOutputs, anchors: list[torch.Tensor],
                    class_map: torch.Tensor, image: PreparedImage) -> Detections:
        """ATSS post-processing of one fusion row against a (C, T) map: model-input frame."""
        (found,) = postprocess_detections(
            head.box_regression, head.centerness, head.token_logits, anchors, class_map,
            [image.resized_hw], self.config.postprocess, self.box_coder)
        return found

    def phrase_detections(self, text: str, spans: Sequence[tuple[int, int]], row: FusionResult,
                          image: PreparedImage, anchors: list[torch.Tensor] | None = None
                          ) -> tuple[torch.Tensor, Detections]:
        """Detections of each span of `text` as one phrase (labels index `spans`), from the
        fusion row of `text`; and the (P, T) phrase-to-token map."""
        pmap = positive_map(self.tokenizer.encode(text), [[span] for span in spans],
                            row.fused_text.shape[1])
        if anchors is None:
            anchors = self.anchors(row.head)
        return pmap, self.postprocess(row.head, anchors, pmap, image)


def rounded_box(box: Sequence[float]) -> list[float]:
    return [rounded(float(v), BOX_DIGITS) for v in box]


def rounded_score(score: float) -> float:
    return rounded(float(score), SCORE_DIGITS)


def image_info(image: Image.Image) -> ImageInfo:
    return ImageInfo(width=image.width, height=image.height)
