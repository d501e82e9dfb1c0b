"""The caption model on a `Runtime`, as the caption decoder drives it (`CaptionModel`).

Graphs (`engines.graphs`): `caption_image` computes an image's side once (its regions'
projections for every fusion layer, and the fused levels for grounding); `caption_prefix` runs
whole prefixes (the [CLS] prefill, and the finished captions' fused tokens for grounding) and
returns their self-attention keys and values; `caption_step` runs one new token per beam
against its prefix's cached keys and values (the region projections folded onto the token side,
so a step costs the same at any caption length); `caption_ground` grounds a caption's phrases.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from engines.graphs import LEVELS, REGION_CENTRES
from engines.runtimes import Runtime
from model_export.processing.prompt import CharToToken, tokenize
from service.model_runner import HeadOutputs, VisionFeatures, head_row
from service.pipeline.caption_search import CaptionGrammar, CaptionSearch


@dataclass(frozen=True)
class CaptionWork:
    """One image to caption: its vision features and how to search for its caption.

    object_boxes: with `search.objects`, each object's box (K, 4), model-input frame,
    end-exclusive: the tokens of phrase k attend to the image inside box k only.
    """

    visual: VisionFeatures
    search: CaptionSearch
    object_boxes: Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """What its image side stacks by: the padded image's P3 size."""
        return tuple(self.visual[0].shape[-2:])


@dataclass(frozen=True)
class CaptionDecoded:
    """A decoded caption and what grounding its phrases needs.

    caption: decoded text; encoding: its tokenisation ([CLS] caption [SEP]) for character to
    token maps; head: the ATSS head on the fused caption tokens. Both None for a caption of
    given objects (`CaptionSearch.objects`), whose phrases are grounded to those objects.
    """

    caption: str
    encoding: CharToToken | None = None
    head: HeadOutputs | None = None


@dataclass(frozen=True)
class CaptionImage:
    """One image's caption side, computed once: the step graphs' per-image inputs (batch 1),
    the fused levels its phrases are grounded on, and its objects' boxes, if any."""

    states: dict[str, Tensor]
    fused: dict[str, Tensor]
    object_boxes: Tensor | None


@dataclass(frozen=True)
class KVCache:
    """The self-attention keys and values of some prefixes of one length t, one row each:
    (rows, layers, heads, t, head_dim), every text self-attention layer in order."""

    keys: Tensor
    values: Tensor

    def select(self, rows: Sequence[int]) -> KVCache:
        """These rows, in this order: one gather per step reorders a caption's beams."""
        index = torch.tensor(list(rows), dtype=torch.long)
        return KVCache(self.keys.index_select(0, index), self.values.index_select(0, index))

    @property
    def length(self) -> int:
        return int(self.keys.shape[3])


class CaptionRunner:
    """`CaptionModel` over a runtime's caption graphs. Called from the decoder's thread only;
    decoding token ids to text shares the tokenizer under `tokenizer_lock`."""

    def __init__(self, runtime: Runtime, tokenizer: PreTrainedTokenizerBase,
                 tokenizer_lock: threading.Lock, grammar: CaptionGrammar | None,
                 vision_names: Sequence[str]) -> None:
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.tokenizer_lock = tokenizer_lock
        self.grammar = grammar
        self.vision_names = list(vision_names)
        self.max_tokens = runtime.config.language.max_query_len
        cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        assert isinstance(cls_id, int) and isinstance(sep_id, int), "a BERT tokenizer has both"
        self.cls_id, self.sep_id = cls_id, sep_id

    def caption_images(self, works: Sequence[CaptionWork]) -> list[CaptionImage]:
        inputs = {name: torch.cat([w.visual[i] for w in works])
                  for i, name in enumerate(self.vision_names)}
        out = self.runtime.run("caption_image", inputs)
        return [CaptionImage(
            states={n: t[i:i + 1] for n, t in out.items() if not n.startswith("fused_")},
            fused={n: t[i:i + 1] for n, t in out.items() if n.startswith("fused_")},
            object_boxes=work.object_boxes) for i, work in enumerate(works)]

    def caption_prefill(self, images: Sequence[CaptionImage]) -> tuple[Tensor, list[KVCache]]:
        ids = torch.full((len(images), 1), self.cls_id, dtype=torch.long)
        out = self._prefix(images, ids, torch.ones_like(ids), torch.zeros(len(images), 1, 4))
        caches = [KVCache(out["keys"][i:i + 1], out["values"][i:i + 1])
                  for i in range(len(images))]
        return out["next_token_logits"], caches

    def caption_step(self, parts: Sequence[tuple[CaptionImage, list[list[int]], KVCache]]
                     ) -> list[tuple[Tensor, KVCache]]:
        """Every part's beams as rows of one batch, caches right-padded to the longest."""
        counts = [len(prefixes) for _, prefixes, _ in parts]
        past = max(cache.length for _, _, cache in parts)
        first = parts[0][2].keys
        rows = sum(counts)
        ids = torch.zeros(rows, 1, dtype=torch.long)
        boxes = torch.zeros(rows, 1, 4)
        mask = torch.zeros(rows, past, dtype=torch.long)
        keys = first.new_zeros(rows, *first.shape[1:3], past, first.shape[4])
        values = torch.zeros_like(keys)
        row = 0
        for (image, prefixes, cache), count in zip(parts, counts, strict=True):
            length = cache.length
            ids[row:row + count, 0] = torch.tensor([prefix[-1] for prefix in prefixes])
            boxes[row:row + count, 0] = self._newest_token_boxes(image.object_boxes, prefixes)
            mask[row:row + count, :length] = 1
            keys[row:row + count, :, :, :length] = cache.keys
            values[row:row + count, :, :, :length] = cache.values
            row += count
        states = _stack_states([image for image, _, _ in parts], counts, boxes)
        out = self.runtime.run("caption_step", {
            "input_ids": ids, "past_mask": mask, "token_boxes": boxes, "past_keys": keys,
            "past_values": values, **states})
        results = []
        row = 0
        for (_, _, cache), count in zip(parts, counts, strict=True):
            results.append((out["next_token_logits"][row:row + count], KVCache(
                torch.cat([cache.keys, out["new_keys"][row:row + count]], dim=3),
                torch.cat([cache.values, out["new_values"][row:row + count]], dim=3))))
            row += count
        return results

    def caption_results(self, works: Sequence[CaptionWork], images: Sequence[CaptionImage],
                        ranked: Sequence[list[list[int]]]) -> list[list[CaptionDecoded]]:
        """Per image, its best finished captions, best first, each with the head its phrases
        are grounded from (one pass for all of them); for an image with given objects only the
        best caption, whose phrases are grounded to those objects."""
        with self.tokenizer_lock:
            texts = [[self.tokenizer.decode(s, skip_special_tokens=True).strip()
                      for s in (sequences[:1] if work.search.objects is not None else sequences)]
                     for work, sequences in zip(works, ranked, strict=True)]
        out: list[list[CaptionDecoded]] = [
            [CaptionDecoded(captions[0])] if work.search.objects is not None else []
            for work, captions in zip(works, texts, strict=True)]
        owners = [image for image, work in enumerate(works) if work.search.objects is None
                  for _ in texts[image]]
        if not owners:
            return out
        captions = [c for work, captions in zip(works, texts, strict=True)
                    if work.search.objects is None for c in captions]
        with self.tokenizer_lock:
            ids, mask, encodings = tokenize(self.tokenizer, captions, self.max_tokens)
        rows = [images[image] for image in owners]
        fused_text = self._prefix(rows, ids, mask, torch.zeros(*ids.shape, 4))["fused_text"]
        head = self.runtime.run("caption_ground", {
            **{f"fused_{level}": torch.cat([r.fused[f"fused_{level}"] for r in rows])
               for level in LEVELS},
            "fused_text": fused_text})
        lengths = mask.sum(dim=1).tolist()
        for row, image in enumerate(owners):
            out[image].append(CaptionDecoded(caption=captions[row], encoding=encodings[row],
                                             head=head_row(head, row, lengths[row])))
        return out

    def _prefix(self, images: Sequence[CaptionImage], ids: Tensor, mask: Tensor,
                boxes: Tensor) -> dict[str, Tensor]:
        """`caption_prefix` on whole prefixes, one row per image entry."""
        states = _stack_states(images, [1] * len(images), boxes)
        return self.runtime.run("caption_prefix", {
            "input_ids": ids, "attention_mask": mask, "token_boxes": boxes, **states})

    def _newest_token_boxes(self, object_boxes: Tensor | None, prefixes: list[list[int]]
                            ) -> Tensor:
        """(rows, 4): the box of the object phrase each prefix's newest token is in (its
        attention over regions stays inside it), zeros (anywhere) for the joints and for a
        search without objects (`CaptionGrammar.phrase_of_tokens`)."""
        out = torch.zeros(len(prefixes), 4)
        if object_boxes is None or self.grammar is None:
            return out
        for row, prefix in enumerate(prefixes):
            phrase = self.grammar.phrase_of_tokens(prefix)[-1]
            if 0 <= phrase < len(object_boxes):
                out[row] = object_boxes[phrase]
        return out


# Where padded regions sit, and the box of a token about no box once regions are padded: every
# real region centre is inside it, no padded one is.
_NOWHERE = -1e6
_EVERYWHERE = (-1e5, -1e5, 1e5, 1e5)


def _stack_states(images: Sequence[CaptionImage], counts: Sequence[int], boxes: Tensor
                  ) -> dict[str, Tensor]:
    """The images' states as one batch, image i repeated `counts[i]` times (its rows).

    Images of different padded shapes have different region counts R; they still decode in one
    batch: regions are zero-padded to the largest R, padded centres put far outside the image,
    and `boxes` (rows, T, 4) of tokens about no box (zeros) are set, in place, to a box holding
    every real region, so each token's attention over padded regions is
    `box_bias`'s outside-the-box score (-1e4: a weight of exactly 0 in float32) and over the
    real ones what it was."""
    regions = max(int(image.states[REGION_CENTRES].shape[1]) for image in images)
    padded = any(int(image.states[REGION_CENTRES].shape[1]) != regions for image in images)
    out = {}
    for name in images[0].states:
        parts = []
        for image, count in zip(images, counts, strict=True):
            state = image.states[name]
            missing = regions - int(state.shape[1])
            if missing:
                fill = _NOWHERE if name == REGION_CENTRES else 0.0
                pad = state.new_full((1, missing, *state.shape[2:]), fill)
                state = torch.cat([state, pad], dim=1)
            parts.append(state.expand(count, *state.shape[1:]))
        out[name] = torch.cat(parts)
    if padded:
        free = (boxes[..., 2] <= boxes[..., 0]) | (boxes[..., 3] <= boxes[..., 1])
        boxes[free] = torch.tensor(_EVERYWHERE, dtype=boxes.dtype)
    return out
