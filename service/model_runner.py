"""The model runner: one engine's batch of work in, one result per item out.

Each method takes the `BatchPlan` a `DynamicBatcher` formed for one engine and returns one result
per payload, in order; it stacks the items into tensors (padding tokens, boxes and phrases, with
masks), runs the graph on the `Runtime`, and splits the outputs back per item. It never sees a
queue, a request or a deadline (vLLM's model runner). Items of one plan share a bucket: images
of one padded shape, so their features stack without padding.

Per-item results keep a batch dimension of 1 (`(1, C, h, w)`, `(1, T, D)`), the shape the
post-processing functions of `model_export` take for one image.

Every graph output is checked for NaN and infinity as it leaves the runtime (`FiniteRuntime`,
which the caption runner shares): a batch with any fails whole (`NonFiniteOutputError`, a 500
`inference_failed` to its callers) instead of answering garbage boxes and scores, or failing
later to encode them as JSON. No graph outputs a non-finite value by design (masks fill with
-1e4, not -inf).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engines.graphs import LEVELS, vision_outputs
from engines.runtimes import Runtime
from model_export.processing.prompt import CharToToken, load_tokenizer, tokenize
from service.batching import BatchPlan, NonFiniteOutputError
from service.pipeline.caption_search import CaptionGrammar
from service.pipeline.text_cache import PromptFeatures

Levels = list[Tensor]  # per FPN level P3..P7, (1, C, h, w)
# The vision graph's outputs of one image (`engines.graphs.vision_outputs`): P3..P7, then
# the colour map (1, 3, h3, w3) for a fusion with `pixel_colours`.
VisionFeatures = list[Tensor]


@dataclass(frozen=True)
class FusionWork:
    """One row of the fusion engine: an image's features with one prompt's text features."""

    visual: VisionFeatures
    text: PromptFeatures


@dataclass(frozen=True)
class HeadOutputs:
    """The ATSS head of one row, per level: (1, 4, h, w), (1, 1, h, w), (1, h*w, T)."""

    box_regression: list[Tensor]
    centerness: list[Tensor]
    token_logits: list[Tensor]


@dataclass(frozen=True)
class FusionResult:
    """One fusion row: head outputs and fused features, T = the row's real token count."""

    head: HeadOutputs
    fused_visual: Levels  # (1, C, h, w) per level
    fused_text: Tensor  # (1, T, D)


@dataclass(frozen=True)
class MaskWork:
    """Mask-head input of one image: P phrases with K boxes each (model-input frame, exclusive).

    fused_visual: the row's fused levels, of which the mask head reads P3..P5 (the whole row
    as `fuse` gave it, so a remote engine's reference passes through unopened); fused_text
    (1, T, D); phrase_map (P, T) weights summing to 1 per phrase; boxes (P, K, 4); box_valid
    (P, K).
    """

    fused_visual: Levels
    fused_text: Tensor
    phrase_map: Tensor
    boxes: Tensor
    box_valid: Tensor


class FiniteRuntime(Runtime):
    """`runtime`, its every output checked for NaN and infinity (`NonFiniteOutputError`).

    The check is one sum per floating-point output, which NaN and infinity propagate into: one
    read of the output and nothing of its size allocated, no more than the copy that brought it
    to the CPU (4x cheaper than a float64 sum, 10x than `isfinite().all()`, measured on 34 M
    floats, a vision output of 8 images at 800x1333). Half-precision outputs sum in float32;
    only absurd finite values (sums past 3e38) could read as non-finite.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.inner = runtime
        self.name = runtime.name
        self.config = runtime.config
        self.graphs = runtime.graphs

    def run(self, graph: str, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        outputs = self.inner.run(graph, inputs)
        bad = [name for name, tensor in outputs.items()
               if tensor.is_floating_point() and not torch.isfinite(_checksum(tensor))]
        if bad:
            raise NonFiniteOutputError(f"graph {graph!r} returned non-finite values (NaN or "
                                       f"infinity) in {', '.join(bad)}")
        return outputs

    def close(self) -> None:
        self.inner.close()


class ModelRunner:
    """Batches of engine work on one `Runtime`. Thread-safe: each engine calls from its own
    worker thread; tokenisation is serialised (the fast tokenizer's settings are shared)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime: Runtime = FiniteRuntime(runtime)
        self.config = runtime.config
        self.tokenizer = load_tokenizer(self.config.language.tokenizer)
        classes = self.config.tasks.caption_classes
        self.caption_grammar = (CaptionGrammar.from_tokenizer(self.tokenizer, classes)
                                if classes else None)
        self.max_tokens = self.config.language.max_query_len
        self.vision_names = vision_outputs(self.config)
        self.tokenizer_lock = threading.Lock()

    def _tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, list[CharToToken]]:
        with self.tokenizer_lock:
            return tokenize(self.tokenizer, list(texts), self.max_tokens)

    # --- engines ------------------------------------------------------------------------------

    def vision(self, plan: BatchPlan[Tensor]) -> list[VisionFeatures]:
        """(3, H, W) padded images of one shape -> per image, the vision outputs."""
        out = self.runtime.run("vision", {"images": torch.stack(plan.payloads)})
        return [[out[name][i:i + 1] for name in self.vision_names] for i in range(plan.size)]

    def _stack_visual(self, works: Sequence[FusionWork]) -> dict[str, Tensor]:
        return {name: torch.cat([w.visual[i] for w in works])
                for i, name in enumerate(self.vision_names)}

    def language(self, plan: BatchPlan[str]) -> list[PromptFeatures]:
        """Texts -> token ids and bidirectional encoder features (unpadded, owned copies)."""
        ids, mask, _ = self._tokenize(plan.payloads)
        hidden = self.runtime.run("language", {"input_ids": ids, "attention_mask": mask})["hidden"]
        lengths = mask.sum(dim=1).tolist()
        return [PromptFeatures(input_ids=ids[i, :n].clone(), hidden=hidden[i, :n].clone())
                for i, n in enumerate(lengths)]

    def fusion(self, plan: BatchPlan[FusionWork]) -> list[FusionResult]:
        """Rows of (image features, prompt features), prompts of any lengths, one batch."""
        works = plan.payloads
        hidden, mask = _pad_tokens([w.text.hidden for w in works])
        out = self.runtime.run("fusion", {**self._stack_visual(works), "hidden": hidden,
                                          "attention_mask": mask})
        results = []
        for row, work in enumerate(works):
            tokens = work.text.hidden.shape[0]
            results.append(FusionResult(
                head=head_row(out, row, tokens),
                fused_visual=[out[f"fused_{level}"][row:row + 1] for level in LEVELS],
                fused_text=out["fused_text"][row:row + 1, :tokens]))
        return results

    def mask(self, plan: BatchPlan[MaskWork]) -> list[Tensor]:
        """Per image, (P, K, h4, w4) mask logits (padding of phrases, boxes, tokens removed)."""
        works = plan.payloads
        fused_text, _ = _pad_tokens([w.fused_text[0] for w in works])
        tokens, phrases = fused_text.shape[1], max(w.phrase_map.shape[0] for w in works)
        boxes_max = max(w.boxes.shape[1] for w in works)
        phrase_map = torch.zeros(len(works), phrases, tokens)
        boxes = torch.zeros(len(works), phrases, boxes_max, 4)
        valid = torch.zeros(len(works), phrases, boxes_max, dtype=torch.bool)
        for i, w in enumerate(works):
            p, t = w.phrase_map.shape
            k = w.boxes.shape[1]
            phrase_map[i, :p, :t] = w.phrase_map
            boxes[i, :p, :k] = w.boxes
            valid[i, :p, :k] = w.box_valid
        inputs = {f"fused_{level}": torch.cat([w.fused_visual[j] for w in works])
                  for j, level in enumerate(LEVELS[:3])}
        logits = self.runtime.run("mask", {**inputs, "fused_text": fused_text,
                                           "phrase_map": phrase_map, "boxes": boxes,
                                           "box_valid": valid})["mask_logits"]
        return [logits[i, :w.phrase_map.shape[0], :w.boxes.shape[1]]
                for i, w in enumerate(works)]

    def vqa(self, plan: BatchPlan[Tensor]) -> list[Tensor]:
        """(1, T, D) fused question tokens -> (A,) answer logits."""
        fused_text, mask = _pad_tokens([t[0] for t in plan.payloads])
        logits = self.runtime.run("vqa", {"fused_text": fused_text,
                                          "attention_mask": mask})["answer_logits"]
        return list(logits)


def _checksum(tensor: Tensor) -> Tensor:
    """The sum of a floating-point tensor, accumulated in at least float32 (a float16 sum of
    finite values overflows at 65504)."""
    return tensor.sum(dtype=torch.float32) if tensor.element_size() < 4 else tensor.sum()


def head_row(out: dict[str, Tensor], row: int, tokens: int) -> HeadOutputs:
    """One row of a head graph's outputs, its token logits cut to its `tokens` real tokens."""
    return HeadOutputs(
        box_regression=[out[f"box_regression_{level}"][row:row + 1] for level in LEVELS],
        centerness=[out[f"centerness_{level}"][row:row + 1] for level in LEVELS],
        token_logits=[out[f"token_logits_{level}"][row:row + 1, :, :tokens] for level in LEVELS])


def _pad_tokens(features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(T_i, D) per row -> (N, T, D) zero-padded and the (N, T) int64 attention mask."""
    longest = max(f.shape[0] for f in features)
    padded = features[0].new_zeros(len(features), longest, features[0].shape[1])
    mask = torch.zeros(len(features), longest, dtype=torch.long)
    for i, f in enumerate(features):
        padded[i, :f.shape[0]] = f
        mask[i, :f.shape[0]] = 1
    return padded, mask
