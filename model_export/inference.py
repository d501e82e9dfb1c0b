"""End-to-end PyTorch detection for one image: the reference evaluation path, in-process.

This is the development and parity path (CLI `glipv2 detect`, reference-vector tests); the service
runs the same pre- and post-processing functions around its engines.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from model_export.anchors import AnchorGenerator
from model_export.box_coding import BoxCoder, rescale_boxes
from model_export.mask_head import masks_for_image
from model_export.model import Glipv2Model, Glipv2Output
from model_export.postprocess import Detections, ground_phrases, postprocess_detections
from model_export.preprocess import batch_images, preprocess_image
from model_export.prompt import DetectionPrompt, build_detection_prompt, load_tokenizer, tokenize
from model_export.prompt import positive_map as build_positive_map
from model_export.weights import load_model


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


def to_exclusive(boxes: Tensor) -> Tensor:
    """Legacy boxes (x1, y1 = last pixel) -> the API's end-exclusive [x0, y0, x1, y1]."""
    return boxes + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=boxes.dtype)


@dataclass
class Segment:
    """One segment of a referring expression, in original-image pixels (end-exclusive box)."""

    box: list[float]
    score: float
    mask: Tensor  # (H0, W0) bool


@dataclass
class VqaAnswer:
    answer: str
    score: float
    answers: list[tuple[str, float]]  # top answers, best first


@dataclass
class CaptionPhrase:
    phrase: str
    span: tuple[int, int]  # characters of the caption, end exclusive
    box: list[float]  # original-image pixels, end exclusive
    score: float


@dataclass
class CaptionResult:
    caption: str
    phrases: list[CaptionPhrase]


_CAPTION_PHRASE = re.compile(r"\ba (?:small|large) \w+ \w+")


def caption_phrase_spans(caption: str) -> list[tuple[int, int]]:
    """Character spans of a caption's object phrases ("a small red circle"), to ground."""
    return [(m.start(), m.end()) for m in _CAPTION_PHRASE.finditer(caption)]


class Glipv2Predictor(Glipv2Detector):
    """All GLIPv2 tasks on one image with the PyTorch model: the reference path for evaluation
    and for parity checks of the exported engines."""

    def _image(self, image: Image.Image) -> tuple[Tensor, tuple[int, int], tuple[int, int]]:
        pixels, resized_hw = preprocess_image(image, self.config.preprocess)
        batch, _ = batch_images([pixels], self.config.preprocess.size_divisibility)
        return batch, resized_hw, (int(batch.shape[-2]), int(batch.shape[-1]))

    def _texts(self, texts: Sequence[str], causal: bool = False):
        ids, mask, encodings = tokenize(self.tokenizer, list(texts),
                                        self.config.language.max_query_len, self.pad_to)
        return ids, mask, encodings, self.model.encode_text(ids, mask, causal=causal)

    @torch.no_grad()
    def segment(self, image: Image.Image, expressions: Sequence[str], threshold: float = 0.3
                ) -> list[list[Segment]]:
        """Per expression, its segments (score >= threshold); none when it names nothing."""
        if self.model.mask_head is None:
            raise ValueError("this model has no mask head")
        batch, resized_hw, padded_hw = self._image(image)
        ids, _, encodings, text = self._texts(expressions)
        visual = [level.expand(len(expressions), -1, -1, -1)
                  for level in self.model.encode_image(batch)]
        out = self.model.fuse(visual, text)
        sizes = [tuple(level.shape[-2:]) for level in out.box_regression]
        anchors = self.anchor_generator.grid_anchors(sizes)
        results: list[list[Segment]] = []
        for e, expression in enumerate(expressions):
            pmap = build_positive_map(encodings[e], [[(0, len(expression))]], ids.shape[1])
            (found,) = postprocess_detections(
                [b[e:e + 1] for b in out.box_regression], [c[e:e + 1] for c in out.centerness],
                [t[e:e + 1] for t in out.token_logits], anchors, pmap, [resized_hw],
                self.config.postprocess, self.box_coder)
            keep = found.scores >= threshold
            boxes, scores = found.boxes[keep], found.scores[keep]
            if not len(scores):
                results.append([])
                continue
            phrase = (pmap / pmap.sum(dim=1, keepdim=True).clamp(min=1.0))[None]  # (1, 1, T)
            exclusive = to_exclusive(boxes)
            logits = self.model.mask_head(
                [level[e:e + 1] for level in out.fused_visual], out.fused_text[e:e + 1], phrase,
                exclusive[None, None], torch.ones(1, 1, len(scores), dtype=torch.bool))
            masks = masks_for_image(logits[0, 0], resized_hw, padded_hw,
                                    (image.height, image.width))
            original = to_exclusive(rescale_boxes(boxes, resized_hw, (image.height, image.width)))
            results.append([Segment(box=b.tolist(), score=float(s), mask=m)
                            for b, s, m in zip(original, scores, masks, strict=True)])
        return results

    @torch.no_grad()
    def vqa(self, image: Image.Image, question: str, top_k: int = 5) -> VqaAnswer:
        if self.model.vqa_head is None:
            raise ValueError("this model has no VQA head")
        batch, _, _ = self._image(image)
        _, mask, _, text = self._texts([question])
        out = self.model.fuse(self.model.encode_image(batch), text)
        probs = self.model.vqa_head(out.fused_text, mask)[0].sigmoid()
        vocab = self.config.tasks.vqa_answers
        order = torch.argsort(probs, descending=True)[:top_k].tolist()
        answers = [(vocab[i], float(probs[i])) for i in order]
        return VqaAnswer(answer=answers[0][0], score=answers[0][1], answers=answers)

    @torch.no_grad()
    def caption(self, image: Image.Image, max_tokens: int = 64) -> CaptionResult:
        """Greedy decoding; the image side of the causal fusion is computed once."""
        if self.model.mlm_head is None:
            raise ValueError("this model has no language-model head")
        batch, resized_hw, _ = self._image(image)
        states, fused_visual = self.model.fusion.caption_image_states(
            self.model.encode_image(batch))
        ids = [self.tokenizer.cls_token_id]
        for _ in range(max_tokens):
            tokens = torch.tensor([ids])
            text = self.model.encode_text(tokens, torch.ones_like(tokens), causal=True)
            fused = self.model.fusion.caption_text(states, text)
            next_id = int(self.model.lm_logits(fused[:, -1:])[0, -1].argmax())
            if next_id == self.tokenizer.sep_token_id:
                break
            ids.append(next_id)
        caption = self.tokenizer.decode(ids[1:], skip_special_tokens=True).strip()
        return CaptionResult(caption=caption,
                             phrases=self._ground_caption(caption, states, fused_visual,
                                                          resized_hw, image))

    def _ground_caption(self, caption: str, states: list[Tensor], fused_visual: list[Tensor],
                        resized_hw: tuple[int, int], image: Image.Image) -> list[CaptionPhrase]:
        """Each phrase goes to its best region (`postprocess.ground_phrases`)."""
        spans = caption_phrase_spans(caption)
        if not spans:
            return []
        ids, mask, encodings = tokenize(self.tokenizer, [caption],
                                        self.config.language.max_query_len)
        text = self.model.encode_text(ids, mask, causal=True)
        fused_text = self.model.fusion.caption_text(states, text)
        box_regression, centerness, token_logits = self.model.head(fused_visual, fused_text)
        sizes = [tuple(level.shape[-2:]) for level in box_regression]
        anchors = self.anchor_generator.grid_anchors(sizes)
        pmap = build_positive_map(encodings[0], [[s] for s in spans], ids.shape[1])
        grounded = ground_phrases(box_regression, centerness, token_logits, anchors, pmap,
                                  resized_hw, self.box_coder)
        boxes = to_exclusive(rescale_boxes(grounded.boxes, resized_hw,
                                           (image.height, image.width)))
        phrases = [CaptionPhrase(phrase=caption[start:end], span=(start, end), box=box.tolist(),
                                 score=float(score))
                   for (start, end), box, score in zip(spans, boxes, grounded.scores, strict=True)]
        return phrases
