"""Enc_VL: the DyHead tower with language-aware deep fusion (GLIP's VLDyHead tower).

Each layer runs, in order: bidirectional cross-attention between all FPN positions and the tokens
(`vl_fuse`, `cross_attention.py`), a BERT encoder layer on the text (`text_layer`,
`text_layer.py`), and DyConv on every level (`dyconv`, `dyconv.py`). Parameter names inside each
part follow the reference so released checkpoints load by renaming prefixes only
(`rpn.head.dyhead_tower.{3i, 3i+1, 3i+2}` -> `layers.{i}.{vl_fuse, text_layer, dyconv}`).
This module assembles the layers and runs the tower, its colour paths and its captioning mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.modeling.config import FusionConfig, HeadConfig, LanguageConfig
from model_export.modeling.cross_attention import (
    Glipv2VLFuse,
    flatten_levels,
    region_centres,
    unflatten_levels,
)
from model_export.modeling.dyconv import Glipv2DyConv
from model_export.modeling.language import (
    TextFeatures,
    extended_attention_mask,
    step_attention_mask,
)
from model_export.modeling.text_layer import Glipv2TextLayer

# Additive score, in captioning, for the regions outside the box a token is about (`box_bias`):
# exp(-1e4) is 0 in fp32 and fp16 alike, and -1e4 is within fp16's range.
_OUTSIDE_BOX_SCORE = -1e4


def box_bias(centres: Tensor, boxes: Tensor) -> Tensor:
    """Additive token-to-region scores that keep each token's attention inside its box.

    centres: (N, R, 2) regions' (x, y) (`region_centres`); boxes: (N, T, 4) each token's
    [x0, y0, x1, y1) in the same pixels, all zeros (x1 <= x0) for a token about no box. A
    region whose centre is outside its token's box gets `_OUTSIDE_BOX_SCORE`; a token with no
    box, or whose box holds no centre, gets the same score everywhere: its attention unchanged.
    -> (N, T, R).
    """
    x, y = centres[:, None, :, 0], centres[:, None, :, 1]  # (N, 1, R)
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))  # (N, T, 1)
    inside = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)  # (N, T, R)
    free = (x1 <= x0) | (y1 <= y0)
    return torch.where(inside | free, 0.0, _OUTSIDE_BOX_SCORE).to(centres.dtype)


@dataclass
class CaptionImageStates:
    """What a caption's decoding steps read of its image, computed once per image
    (`Glipv2FusionTower.caption_image_states`). R: every region of every level, in
    `flatten_levels` order.

    regions: per fusion layer (N, R, C), what its cross-attention attends (the normalised
        regions, plus positions if any); the attention's projections of them are folded onto
        the token side (`Glipv2BiAttention.attend_regions`).
    input_regions: per fusion layer (N, R, C), the tower's input regions under that layer's
        `layer_norm_image`, with `image_values`; else empty.
    colours: (N, R, 3) each region's mean input pixel (`colour_regions`) with
        `pixel_colours`; else None.
    centres: (N, R, 2) each region's (x, y) centre in resized-image pixels
        (`region_centres`), for token boxes.
    """

    regions: list[Tensor]
    input_regions: list[Tensor]
    colours: Tensor | None
    centres: Tensor

    def tensors(self) -> list[Tensor]:
        """Flat, batch first, as the caption graphs pass them (`Glipv2FusionTower.caption_states`
        is the inverse): regions, input regions, colours if any, centres."""
        colours = [] if self.colours is None else [self.colours]
        return [*self.regions, *self.input_regions, *colours, self.centres]


def colour_regions(colours: Tensor, sizes: Sequence[tuple[int, ...]]) -> Tensor:
    """The mean input pixel under every region of every level, in `flatten_levels` order.

    P3-P5 as `colour_maps` gives them; P6 and P7 cells (64 and 128 px) mostly mix an object
    with its background and get zeros: the objects whose colour is asked about are read at
    P3-P5. -> (N, R, 3).
    """
    levels = [pooled.flatten(2).transpose(1, 2) for pooled in colour_maps(colours, sizes)]
    for height, width in sizes[len(levels):]:
        levels.append(colours.new_zeros(colours.shape[0], height * width, 3))
    return torch.cat(levels, dim=1)


def colour_maps(colours: Tensor, sizes: Sequence[tuple[int, ...]]) -> list[Tensor]:
    """The mean input pixel of every P3, P4 and P5 cell: (N, 3, H_l, W_l) per level.

    colours: (N, 3, H_3, W_3), the normalised image averaged over each P3 cell
    (`Glipv2Model.image_colours`); P4 and P5 average 2x2 and 4x4 of them (their sides divide
    exactly).
    """
    maps = []
    for level, (height, width) in enumerate(sizes[:3]):
        pooled = F.avg_pool2d(colours, 2**level) if level else colours
        if tuple(pooled.shape[-2:]) != (height, width):
            raise ValueError(f"colour map {tuple(colours.shape[-2:])} does not match "
                             f"level P{level + 3} {(height, width)}")
        maps.append(pooled)
    return maps


class ColourLevels(nn.Module):
    """Each P3-P5 cell's mean input pixel, through a two-layer MLP, added to the fused level.

    The head's region-token logits and the mask head read the fused levels only, where colour
    survives weakly (probes 0.30 at the tower output): colour-shape phrases scored AP50 0.83
    against 0.997 for size-shape ones. A colour name is a non-linear region of pixel space
    (orange lies between red and yellow), hence the hidden layer. The output layer starts at
    zero, so a model grown with it computes exactly what it did. P6 and P7 cells (64 and
    128 px) mostly mix an object with its background and are left as they are.
    """

    def __init__(self, channels: int, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(3, hidden, 1), nn.GELU(),
                                   nn.Conv2d(hidden, channels, 1))
        output = cast(nn.Conv2d, self.embed[2])
        assert output.bias is not None  # built with a bias
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)

    def forward(self, visual: list[Tensor], colours: Tensor) -> list[Tensor]:
        """visual: fused levels (N, C, H_l, W_l); colours: (N, 3, H_3, W_3) (`image_colours`)."""
        sizes = [tuple(feature.shape[-2:]) for feature in visual]
        coloured = [feature + self.embed(pooled).to(feature.dtype)
                    for feature, pooled in zip(visual, colour_maps(colours, sizes), strict=False)]
        return coloured + visual[len(coloured):]


class Glipv2FusionLayer(nn.Module):
    """One deep-fusion layer: cross-modal attention, text self-attention, DyConv on the image."""

    def __init__(self, fusion: FusionConfig, language: LanguageConfig,
                 strides: Sequence[int] = ()) -> None:
        super().__init__()
        self.vl_fuse = Glipv2VLFuse(fusion.channels, language.hidden_size, fusion, strides)
        self.text_layer = Glipv2TextLayer(language, fusion.attention_clamp)
        self.dyconv = Glipv2DyConv(fusion.channels, fusion.group_norm_groups,
                                   fusion.dyrelu_reduction)

    def forward(self, visual: list[Tensor], text: Tensor, mask: Tensor, causal: bool = False,
                image: Tensor | None = None, colours: Tensor | None = None
                ) -> tuple[list[Tensor], Tensor]:
        visual, text = self.vl_fuse(visual, text, mask, causal, image, colours)
        text = self.text_layer(text, mask, causal)
        return self.dyconv(visual), text


class Glipv2FusionTower(nn.Module):
    """Enc_VL: `num_layers` fusion layers; returns fused FPN features and fused token features."""

    def __init__(self, fusion: FusionConfig, language: LanguageConfig,
                 strides: Sequence[int] = HeadConfig.anchor_strides) -> None:
        """strides: each level's stride in pixels (P3..P7), for `fusion.position_encoding` and
        the caption's region centres."""
        super().__init__()
        self.strides = tuple(strides)
        self.layers = nn.ModuleList(
            Glipv2FusionLayer(fusion, language, strides) for _ in range(fusion.num_layers)
        )
        self.colour_levels = ColourLevels(fusion.channels) if fusion.colour_levels else None

    def forward(self, visual: list[Tensor], text: TextFeatures, causal: bool = False,
                colours: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """visual: 5 levels (N, C, H_l, W_l) -> (5 fused levels, fused tokens (N, T, D)).

        `causal` runs the captioning mode: unidirectional text, image never attends to text.
        `colours` (N, 3, H_3, W_3): the image's mean pixel per P3 cell, which a tower with
        `pixel_colours` needs (`Glipv2Model.image_colours`); with `colour_levels` the fused
        P3-P5 levels also carry it (`ColourLevels`).
        """
        hidden = text.hidden
        image = flatten_levels(visual) if self.image_values else None
        regions = self._colour_regions(visual, colours)
        for layer in self.layers:
            visual, hidden = layer(visual, hidden, text.mask, causal, image, regions)
        return self._with_colours(visual, colours), hidden

    def _typed_layers(self) -> Sequence[Glipv2FusionLayer]:
        # nn.ModuleList types its items as plain modules.
        return cast(Sequence[Glipv2FusionLayer], self.layers)

    @property
    def image_values(self) -> bool:
        return self._typed_layers()[0].vl_fuse.layer_norm_image is not None

    @property
    def pixel_colours(self) -> bool:
        return self._typed_layers()[0].vl_fuse.attn.values_colour_proj is not None

    def _with_colours(self, visual: list[Tensor], colours: Tensor | None) -> list[Tensor]:
        """The fused levels, plus their cells' colours with `colour_levels`."""
        if self.colour_levels is None:
            return visual
        if colours is None:
            raise ValueError("this fusion reads pixel colours: pass the image's colour map")
        return self.colour_levels(visual, colours)

    def _colour_regions(self, visual: list[Tensor], colours: Tensor | None) -> Tensor | None:
        if not self.pixel_colours:
            return None
        if colours is None:
            raise ValueError("this fusion reads pixel colours: pass the image's colour map")
        return colour_regions(colours, [feature.shape[-2:] for feature in visual])

    @contextmanager
    def recording_text_attention(self) -> Iterator[list[Tensor]]:
        """Collect every layer's token-to-region attention (N, heads, T, R) while inside, for
        a loss on where tokens look (`losses.text_attention_loss`)."""
        maps: list[Tensor] = []
        for layer in self._typed_layers():
            layer.vl_fuse.attn.text_attention = maps
        try:
            yield maps
        finally:
            for layer in self._typed_layers():
                layer.vl_fuse.attn.text_attention = None

    def caption_image_states(self, visual: list[Tensor], colours: Tensor | None = None
                             ) -> tuple[CaptionImageStates, list[Tensor]]:
        """The causal mode's image side, computed once per image for a whole caption.

        visual: 5 levels (N, C, H_l, W_l); colours: as `forward` takes them. -> what every
        decoding step reads of the image (`CaptionImageStates`), and the final fused levels
        (what `forward` returns in causal mode, whatever the caption).
        """
        image = flatten_levels(visual) if self.image_values else None
        region_colours = self._colour_regions(visual, colours)
        sizes = [feature.shape[-2:] for feature in visual]
        centres = region_centres(sizes, self.strides, visual[0].device).to(visual[0].dtype)
        regions, input_regions = [], []
        for layer in self._typed_layers():
            fuse = layer.vl_fuse
            v = fuse.layer_norm_v(flatten_levels(visual))
            regions.append(fuse.attended(v, sizes))
            normalised = fuse.image_regions(image)
            if normalised is not None:
                input_regions.append(normalised)
            visual = layer.dyconv(unflatten_levels(v, sizes))
        states = CaptionImageStates(
            regions=regions, input_regions=input_regions, colours=region_colours,
            centres=centres.unsqueeze(0).expand(visual[0].shape[0], -1, -1))
        return states, self._with_colours(visual, colours)

    def caption_states(self, tensors: Sequence[Tensor]) -> CaptionImageStates:
        """`CaptionImageStates.tensors()` of this tower back into the states."""
        layers = len(self.layers)
        extra = list(tensors[2 * layers if self.image_values else layers:])
        colours = extra.pop(0) if self.pixel_colours else None
        (centres,) = extra
        return CaptionImageStates(
            regions=list(tensors[:layers]),
            input_regions=list(tensors[layers:2 * layers]) if self.image_values else [],
            colours=colours, centres=centres)

    def caption_prefix(self, states: CaptionImageStates, text: TextFeatures,
                       token_boxes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Causal text side of whole captions against their image's states.

        text: the causal token features (N, T, D), right padded; token_boxes (N, T, 4): a box
        per token, in resized-image pixels, that its attention over regions stays inside
        (`box_bias`; zeros: anywhere). Captioning given objects puts each phrase's tokens on
        its object's box, so "a small red" reads the colour and size of that object and not
        of another one the decoder also looks at.
        -> fused tokens (N, T, D) (`forward`'s in causal mode, with the boxes), and every
        fusion layer's text keys and values (N, layers, heads, T, d) for the caption's cache.
        """
        bias = box_bias(states.centres, token_boxes) if token_boxes is not None else None
        additive = extended_attention_mask(text.mask, text.hidden.dtype, causal=True)
        return self._caption_text(states, text.hidden, bias, additive)

    def caption_step(self, states: CaptionImageStates, hidden: Tensor, token_boxes: Tensor,
                     past_mask: Tensor, past_keys: Tensor, past_values: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """One new token per row against the caption's cache: `caption_prefix` for the last
        token only.

        hidden: (N, 1, D) the new tokens' causal features; token_boxes: (N, 1, 4) their boxes;
        past_mask: (N, P) 1 for real cached positions; past_keys, past_values:
        (N, layers, heads, P, d) of the fusion layers. -> fused new tokens (N, 1, D) and their
        keys and values (N, layers, heads, 1, d).
        """
        additive = step_attention_mask(past_mask, hidden.dtype)  # (N, 1, 1, P + 1)
        return self._caption_text(states, hidden, box_bias(states.centres, token_boxes),
                                  additive, (past_keys, past_values))

    def _caption_text(self, states: CaptionImageStates, hidden: Tensor, bias: Tensor | None,
                      additive: Tensor, past: tuple[Tensor, Tensor] | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """Each layer: tokens attend to the image states, then to the cache and themselves.
        -> fused tokens, and their text keys and values of every layer, stacked on dim 1."""
        keys, values = [], []
        for i, layer in enumerate(self._typed_layers()):
            fuse = layer.vl_fuse
            lang = fuse.layer_norm_l(hidden)
            delta_l = fuse.attn.attend_regions(
                states.regions[i], lang, states.input_regions[i] if states.input_regions else None,
                states.colours, bias)
            hidden = lang + fuse.gamma_l * delta_l
            query, key, value = layer.text_layer.project(hidden)
            keys.append(key)
            values.append(value)
            if past is not None:
                key = torch.cat([past[0][:, i], key], dim=2)  # (N, h, P + T, d)
                value = torch.cat([past[1][:, i], value], dim=2)
            hidden = layer.text_layer.attend(hidden, query, key, value, additive)
        return hidden, torch.stack(keys, dim=1), torch.stack(values, dim=1)
