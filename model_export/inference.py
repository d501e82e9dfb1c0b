"""End-to-end PyTorch detection for one image, in-process, as the reference GLIP computes it.

The development and parity path (CLI `glipv2 detect`, the reference-vector tests); the service
runs the same pre- and post-processing functions around its engines, and `glipv2 eval` scores
the service's own path (`service.offline`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from model_export.checkpoints.weights import load_model
from model_export.modeling.model import Glipv2Model, Glipv2Output
from model_export.processing.anchors import AnchorGenerator
from model_export.processing.box_coding import BoxCoder, rescale_boxes, to_exclusive
from model_export.processing.postprocess import Detections, postprocess_detections
from model_export.processing.preprocess import batch_images, preprocess_image
from model_export.processing.prompt import (
    DetectionPrompt,
    build_detection_prompt,
    load_tokenizer,
    tokenize,
)
from model_export.processing.prompt import positive_map as build_positive_map


@dataclass
class DetectionRun:
    """Everything one detection produced, for callers that check intermediate results.

    detections: boxes xyxy in ORIGINAL image pixels, scores descending, labels index
    `prompt.class_names`.
    """

    prompt: DetectionPrompt
    input_ids: Tensor  # (1, T)
    positive_map: Tensor  # (C, T) 0/1
    resized_hw: tuple[int, int]
    padded_hw: tuple[int, int]
    outputs: Glipv2Output
    detections: Detections

    def as_dicts(self) -> list[dict[str, object]]:
        names = self.prompt.class_names
        return [
            {"label": names[int(label)], "score": round(float(score), 6),
             "box": [round(float(v), 2) for v in box]}
            for box, score, label in zip(to_exclusive(self.detections.boxes),
                                         self.detections.scores,
                                         self.detections.labels, strict=True)
        ]


class Glipv2Detector:
    """Model + tokenizer + processing; `pad_to` pads prompts like the reference (256) if set."""

    def __init__(self, model: Glipv2Model, pad_to: int | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = load_tokenizer(self.config.language.tokenizer)
        self.pad_to = pad_to
        self.anchor_generator = AnchorGenerator.from_config(self.config.head)
        self.box_coder = BoxCoder.from_config(self.config.head)

    @classmethod
    def from_dir(cls, model_dir: str | Path, pad_to: int | None = None) -> Glipv2Detector:
        return cls(load_model(model_dir), pad_to=pad_to)

    @torch.no_grad()
    def detect(self, image: Image.Image, class_names: Sequence[str]) -> DetectionRun:
        prompt = build_detection_prompt(class_names)
        input_ids, attention_mask, encodings = tokenize(
            self.tokenizer, [prompt.caption], self.config.language.max_query_len, self.pad_to
        )
        pmap = build_positive_map(encodings[0], prompt.spans, input_ids.shape[1])

        pixels, resized_hw = preprocess_image(image, self.config.preprocess)
        batch, sizes = batch_images([pixels], self.config.preprocess.size_divisibility)
        outputs = self.model(batch, input_ids, attention_mask)

        feature_sizes = [tuple(level.shape[-2:]) for level in outputs.box_regression]
        anchors = self.anchor_generator.grid_anchors(feature_sizes, device=batch.device)
        (found,) = postprocess_detections(
            outputs.box_regression, outputs.centerness, outputs.token_logits, anchors,
            pmap.to(batch.device), sizes, self.config.postprocess, self.box_coder,
        )
        original_hw = (image.height, image.width)
        in_original = Detections(
            boxes=rescale_boxes(found.boxes, resized_hw, original_hw),
            scores=found.scores,
            labels=found.labels,
        )
        return DetectionRun(
            prompt=prompt, input_ids=input_ids, positive_map=pmap, resized_hw=resized_hw,
            padded_hw=(int(batch.shape[-2]), int(batch.shape[-1])), outputs=outputs,
            detections=in_original,
        )
