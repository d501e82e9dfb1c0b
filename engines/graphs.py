"""The graph contract of the engines: graph names, tensor names, dynamic axes, torch wrappers.

GLIPv2 runs at serving time as separate graphs (DESIGN.md, "Engines"), each a thin `nn.Module`
over the model's own methods, so what every runtime runs is the model's math:

- `vision`: images (N, 3, H, W) -> P3..P7 (`Glipv2Model.encode_image`), and with
  `fusion.pixel_colours` the mean pixel per P3 cell, `colours` (`image_colours`): together the
  vision outputs (`vision_outputs`) that `fusion` and `caption_image` take.
- `language`: input_ids, attention_mask (N, T) -> hidden, embedded (N, T, D) (`encode_text`).
- `fusion`: vision outputs + hidden + attention_mask -> per level box regression, centerness,
  region-token logits and fused features, plus fused tokens (`fuse`, without the MLM logits).
- `mask`: fused P3..P5 + fused tokens + phrase map + boxes -> per-box mask logits (`mask_head`).
- `vqa`: fused tokens + attention_mask -> answer logits (`vqa_head`).
- captioning, decoded token by token with a key/value cache (DESIGN.md, "Caption decoding"):
  `caption_image` (vision outputs -> the image states every step reads, computed once per image,
  named by `caption_state_names`, then the final fused levels `fused_p3..p7`;
  `fusion.caption_image_states`); `caption_prefix` (input_ids, attention_mask, token_boxes
  (N, T[, 4]) + image states -> next-token logits at each row's last real token, fused tokens,
  and the self-attention keys and values of every text layer, (N, L, heads, T, d):
  `Glipv2Model.caption_prefix`), for the [CLS] prefill and the grounding pass over finished
  captions; `caption_step` (the newest token of each row (N, 1), past_mask (N, P), its box,
  past_keys, past_values (N, L, heads, P, d) + image states -> next-token logits and that
  token's keys and values, (N, L, heads, 1, d), for the caller to append:
  `Glipv2Model.caption_step`); and `caption_ground` (final fused levels + fused caption tokens
  -> the ATSS head's outputs, to ground the caption's phrases). Every caption_image output but
  the fused levels is an input of both caption_prefix and caption_step under the same name.

`graph_signatures(model)` is the contract: the PyTorch runtime runs these wrappers, the ONNX
export (`engines.export`) traces them, and the other runtimes feed and read the same tensor
names. Nothing here imports `onnx`: eager PyTorch serving needs only this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from model_export.modeling.config import Glipv2Config
from model_export.modeling.language import TextFeatures
from model_export.modeling.model import Glipv2Model

# The compute-heavy graphs (issue 4): the ones with reduced-precision variants (int8 ONNX,
# bf16 autocast) and, by default, native TensorRT engines.
HEAVY_GRAPHS = ("vision", "fusion")
LEVELS = ("p3", "p4", "p5", "p6", "p7")  # FPN levels, strides 8..128
REGION_CENTRES = "region_centres"  # caption_image's (N, R, 2) region centres, for token boxes
COLOURS = "colours"  # the vision graph's mean pixel per P3 cell, with fusion.pixel_colours


# --- the graph wrappers --------------------------------------------------------------------------


class VisionGraph(nn.Module):
    """images (N, 3, H, W) -> P3..P7, each (N, C, H_l, W_l), then the colour map if any."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        colours = self.model.image_colours(images)
        extra = () if colours is None else (colours,)
        return (*self.model.encode_image(images), *extra)


class LanguageGraph(nn.Module):
    """input_ids, attention_mask (N, T) int64 -> hidden, embedded (N, T, D); bidirectional."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        text = self.model.encode_text(input_ids, attention_mask)
        return text.hidden, text.embedded


class FusionGraph(nn.Module):
    """P3..P7, hidden (N, T, D), attention_mask (N, T) [, colours] -> box regression x5,
    centerness x5, region-token logits x5, fused levels x5, fused tokens (see `Glipv2Output`)."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, p3: Tensor, p4: Tensor, p5: Tensor, p6: Tensor, p7: Tensor, hidden: Tensor,
                attention_mask: Tensor, *colours: Tensor) -> tuple[Tensor, ...]:
        # The tower reads `hidden` and `mask` only; `embedded` is filled to satisfy the type
        # (the parity test compares against `fuse` on the real `encode_text` features).
        text = TextFeatures(hidden=hidden, embedded=hidden, mask=attention_mask)
        fused_visual, fused_text = self.model.fusion([p3, p4, p5, p6, p7], text,
                                                     colours=_optional(colours))
        box_regression, centerness, token_logits = self.model.head(fused_visual, fused_text)
        return (*box_regression, *centerness, *token_logits, *fused_visual, fused_text)


class MaskGraph(nn.Module):
    """fused P3..P5, fused tokens, phrase_map (N, P, T), boxes (N, P, K, 4), box_valid (N, P, K)
    -> mask logits (N, P, K, 2 H_3, 2 W_3) (see `Glipv2MaskHead.forward`).

    Known hazard (in `mask_head.py`): its `torch.full_like(logits, OUTSIDE_BOX_LOGIT)` branch is
    frozen to the export image size by the exporter; a scalar `torch.where` branch fixes it.
    """

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, fused_p3: Tensor, fused_p4: Tensor, fused_p5: Tensor, fused_text: Tensor,
                phrase_map: Tensor, boxes: Tensor, box_valid: Tensor) -> Tensor:
        assert self.model.mask_head is not None
        return self.model.mask_head([fused_p3, fused_p4, fused_p5], fused_text, phrase_map,
                                    boxes, box_valid)


class VqaGraph(nn.Module):
    """fused tokens (N, T, D), attention_mask (N, T) -> answer logits (N, A)."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, fused_text: Tensor, attention_mask: Tensor) -> Tensor:
        assert self.model.vqa_head is not None
        return self.model.vqa_head(fused_text, attention_mask)


class CaptionImageGraph(nn.Module):
    """P3..P7 [, colours] -> the caption image states (`CaptionImageStates.tensors()`, named by
    `caption_state_names`), then the final fused levels x5."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, p3: Tensor, p4: Tensor, p5: Tensor, p6: Tensor, p7: Tensor,
                *colours: Tensor) -> tuple[Tensor, ...]:
        states, fused_visual = self.model.fusion.caption_image_states(
            [p3, p4, p5, p6, p7], _optional(colours))
        return (*states.tensors(), *fused_visual)


def _optional(colours: tuple[Tensor, ...]) -> Tensor | None:
    """The graphs' optional trailing `colours` input (models with `fusion.pixel_colours`)."""
    return colours[0] if colours else None


class CaptionPrefixGraph(nn.Module):
    """input_ids, attention_mask (N, T), token_boxes (N, T, 4), image states -> next-token
    logits (N, vocab), fused caption tokens (N, T, D), keys and values (N, L, heads, T, d).

    token_boxes: the box each token's attention over regions stays inside, in resized-image
    pixels; zeros for none (`Glipv2FusionTower.caption_prefix`).

    The logits are those of each row's last real token (position sum(mask) - 1), so a batch of
    right-padded captions of different lengths runs together; with causal attention, padded
    slots never change the real tokens' features. Serves the first step ([CLS], whose keys and
    values start the cache) and the grounding pass over finished captions.
    """

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_boxes: Tensor,
                *states: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = self.model.caption_prefix(self.model.fusion.caption_states(states), input_ids,
                                        attention_mask, token_boxes)
        fused_text = out.fused_text
        last = attention_mask.sum(dim=1) - 1  # (N,) index of each row's last real token
        index = last.view(-1, 1, 1).expand(-1, 1, fused_text.shape[2])  # (N, 1, D)
        fused_last = fused_text.gather(1, index)[:, 0]  # (N, T, D) -> (N, 1, D) -> (N, D)
        return _next_token_logits(self.model, fused_last), fused_text, out.keys, out.values


class CaptionStepGraph(nn.Module):
    """input_ids (N, 1), past_mask (N, P), token_boxes (N, 1, 4), past_keys, past_values
    (N, L, heads, P, d), image states -> next-token logits (N, vocab), and the new token's
    keys and values (N, L, heads, 1, d), which the caller appends to its cache
    (`Glipv2Model.caption_step`). Rows' caches are right padded (past_mask 0)."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, past_mask: Tensor, token_boxes: Tensor,
                past_keys: Tensor, past_values: Tensor, *states: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model.caption_step(self.model.fusion.caption_states(states), input_ids,
                                      past_mask, token_boxes, past_keys, past_values)
        return _next_token_logits(self.model, out.fused_text[:, 0]), out.keys, out.values


def _next_token_logits(model: Glipv2Model, fused: Tensor) -> Tensor:
    """(N, D) fused tokens -> (N, vocab). 2-D input: the tied decoder exports as Gemm(transB) on
    the word-embedding initializer the encoder already holds, instead of a second, transposed
    copy of it."""
    return model.lm_logits(fused)


class CaptionGroundGraph(nn.Module):
    """Final fused levels x5 (from `caption_image`) + fused caption tokens (N, T, D) -> box
    regression x5, centerness x5, region-token logits x5 (the ATSS head, `Glipv2AtssHead`)."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, fused_p3: Tensor, fused_p4: Tensor, fused_p5: Tensor, fused_p6: Tensor,
                fused_p7: Tensor, fused_text: Tensor) -> tuple[Tensor, ...]:
        box_regression, centerness, token_logits = self.model.head(
            [fused_p3, fused_p4, fused_p5, fused_p6, fused_p7], fused_text)
        return (*box_regression, *centerness, *token_logits)


# --- signatures: names and dynamic axes ---------------------------------------------------------


@dataclass
class GraphSignature:
    """One graph: its wrapper module, tensor names and dynamic axes, all that running it needs."""

    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def vision_outputs(config: Glipv2Config) -> list[str]:
    """The vision graph's outputs, in order: P3..P7, then `colours` with `fusion.pixel_colours`.
    `fusion` and `caption_image` take them under the same names."""
    return [*LEVELS, *([COLOURS] if config.fusion.pixel_colours else [])]


def caption_state_names(model: Glipv2Model) -> list[str]:
    """caption_image's per-image outputs, in `CaptionImageStates.tensors()` order: each fusion
    layer's attended regions, with `fusion.image_values` each layer's normalised input regions,
    with `fusion.pixel_colours` the regions' colours, then the regions' centres. Every one is
    also an input of `caption_prefix` and `caption_step`, under the same name."""
    fusion = model.fusion
    layers = range(len(fusion.layers))
    return [*(f"regions_{i}" for i in layers),
            *(f"input_regions_{i}" for i in layers if fusion.image_values),
            *(["region_colours"] if fusion.pixel_colours else []), REGION_CENTRES]


def _level_axes(prefix: str = "") -> dict[str, dict[int, str]]:
    return {f"{prefix}{level}": {0: "batch", 2: f"h{level[1]}", 3: f"w{level[1]}"}
            for level in LEVELS}


def _head_axes() -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for level in LEVELS:
        size = {0: "batch", 2: f"h{level[1]}", 3: f"w{level[1]}"}
        axes[f"box_regression_{level}"] = size
        axes[f"centerness_{level}"] = size
        axes[f"token_logits_{level}"] = {0: "batch", 1: f"regions_{level}", 2: "tokens"}
    return axes


def _head_names() -> list[str]:
    return [f"{kind}_{level}" for kind in ("box_regression", "centerness", "token_logits")
            for level in LEVELS]


def graph_signatures(model: Glipv2Model) -> list[GraphSignature]:
    """Every graph `model` has, without running it (the PyTorch runtime's start-up)."""
    token_axes = {0: "batch", 1: "tokens"}
    fused_level_names = [f"fused_{level}" for level in LEVELS]
    fused_level_axes = _level_axes("fused_")
    vision_names = vision_outputs(model.config)
    vision_axes = {**_level_axes(), COLOURS: {0: "batch", 2: "h3", 3: "w3"}}
    vision_axes = {name: vision_axes[name] for name in vision_names}
    graphs = [
        GraphSignature("vision", VisionGraph(model), ["images"], vision_names,
                       {"images": {0: "batch", 2: "height", 3: "width"}, **vision_axes}),
        GraphSignature("language", LanguageGraph(model), ["input_ids", "attention_mask"],
                       ["hidden", "embedded"],
                       {name: token_axes for name in ("input_ids", "attention_mask", "hidden",
                                                      "embedded")}),
        GraphSignature("fusion", FusionGraph(model),
                       [*LEVELS, "hidden", "attention_mask", *vision_names[len(LEVELS):]],
                       [*_head_names(), *fused_level_names, "fused_text"],
                       {**vision_axes, "hidden": token_axes, "attention_mask": token_axes,
                        **_head_axes(), **fused_level_axes, "fused_text": token_axes}),
    ]
    if model.mask_head is not None:
        graphs.append(GraphSignature(
            "mask", MaskGraph(model),
            [*fused_level_names[:3], "fused_text", "phrase_map", "boxes", "box_valid"],
            ["mask_logits"],
            {**{k: v for k, v in fused_level_axes.items() if k in fused_level_names[:3]},
             "fused_text": token_axes, "phrase_map": {0: "batch", 1: "phrases", 2: "tokens"},
             "boxes": {0: "batch", 1: "phrases", 2: "boxes"},
             "box_valid": {0: "batch", 1: "phrases", 2: "boxes"},
             "mask_logits": {0: "batch", 1: "phrases", 2: "boxes", 3: "h_mask", 4: "w_mask"}}))
    if model.vqa_head is not None:
        graphs.append(GraphSignature(
            "vqa", VqaGraph(model), ["fused_text", "attention_mask"], ["answer_logits"],
            {"fused_text": token_axes, "attention_mask": token_axes,
             "answer_logits": {0: "batch"}}))
    if model.mlm_head is not None:
        state_names = caption_state_names(model)
        state_axes = {name: {0: "batch", 1: "regions"} for name in state_names}
        # (N, L, heads, T, d): the cache's positions are axis 3
        cache_axes = {0: "batch", 3: "tokens"}
        past_axes = {0: "batch", 3: "past"}
        graphs += [
            GraphSignature("caption_image", CaptionImageGraph(model), vision_names,
                           [*state_names, *fused_level_names],
                           {**vision_axes, **state_axes, **fused_level_axes}),
            GraphSignature("caption_prefix", CaptionPrefixGraph(model),
                           ["input_ids", "attention_mask", "token_boxes", *state_names],
                           ["next_token_logits", "fused_text", "keys", "values"],
                           {"input_ids": token_axes, "attention_mask": token_axes,
                            "token_boxes": token_axes, **state_axes,
                            "next_token_logits": {0: "batch"}, "fused_text": token_axes,
                            "keys": cache_axes, "values": cache_axes}),
            GraphSignature("caption_step", CaptionStepGraph(model),
                           ["input_ids", "past_mask", "token_boxes", "past_keys", "past_values",
                            *state_names],
                           ["next_token_logits", "new_keys", "new_values"],
                           {"input_ids": {0: "batch"}, "past_mask": {0: "batch", 1: "past"},
                            "token_boxes": {0: "batch"}, "past_keys": past_axes,
                            "past_values": past_axes, **state_axes,
                            "next_token_logits": {0: "batch"}, "new_keys": {0: "batch"},
                            "new_values": {0: "batch"}}),
            GraphSignature("caption_ground", CaptionGroundGraph(model),
                           [*fused_level_names, "fused_text"], _head_names(),
                           {**fused_level_axes, "fused_text": token_axes, **_head_axes()}),
        ]
    return graphs
