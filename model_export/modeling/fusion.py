"""Enc_VL: the DyHead tower with language-aware deep fusion (GLIP's VLDyHead tower).

Each layer runs, in order: bidirectional cross-attention between all FPN positions and the tokens
(`vl_fuse`), a BERT encoder layer on the text (`text_layer`), and DyConv on every level (`dyconv`).
Parameter names inside each part follow the reference so released checkpoints load by renaming
prefixes only (`rpn.head.dyhead_tower.{3i, 3i+1, 3i+2}` -> `layers.{i}.{vl_fuse, text_layer,
dyconv}`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.modeling.config import FusionConfig, HeadConfig, LanguageConfig
from model_export.modeling.dyconv import Glipv2DyConv
from model_export.modeling.language import TextFeatures, extended_attention_mask

# Additive score for padded tokens when regions attend to text (reference value).
_TEXT_PAD_SCORE = -9e15
# Additive score, in captioning, for the regions outside the box a token is about (`box_bias`):
# exp(-1e4) is 0 in fp32 and fp16 alike, and -1e4 is within fp16's range.
_OUTSIDE_BOX_SCORE = -1e4


class Glipv2BiAttention(nn.Module):
    """Multi-head attention in both directions: regions attend to tokens and tokens to regions.

    One score matrix is shared: softmax over tokens (with the text padding mask) updates regions;
    softmax over regions (no image mask, max-subtracted) updates tokens.
    """

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float,
                 clamp: float, image_values: bool = False, pixel_colours: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.clamp = clamp
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        # Training only: a list to append each forward's token-to-region attention to.
        self.text_attention: list[Tensor] | None = None
        for linear in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj,
                       self.out_v_proj, self.out_l_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.values_image_proj = self.out_image_proj = None
        if image_values:
            self.values_image_proj = nn.Linear(v_dim, embed_dim)
            self.out_image_proj = nn.Linear(embed_dim, l_dim)
            nn.init.xavier_uniform_(self.values_image_proj.weight)
            nn.init.zeros_(self.values_image_proj.bias)
            nn.init.zeros_(self.out_image_proj.weight)  # a grown model starts out unchanged
            nn.init.zeros_(self.out_image_proj.bias)
        self.values_colour_proj = None
        if pixel_colours:
            if not image_values:
                raise ValueError("pixel colours are read beside the image values: enable both")
            self.values_colour_proj = nn.Linear(3, embed_dim)
            nn.init.zeros_(self.values_colour_proj.weight)  # a grown model starts out unchanged
            nn.init.zeros_(self.values_colour_proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        # (N, L, E) -> (N * heads, L, E / heads)
        n, length, _ = x.shape
        x = x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        return x.reshape(n * self.num_heads, length, self.head_dim)

    def _merge(self, x: Tensor, n: int) -> Tensor:
        # (N * heads, L, E / heads) -> (N, L, E)
        length = x.shape[1]
        x = x.view(n, self.num_heads, length, self.head_dim).transpose(1, 2)
        return x.reshape(n, length, self.num_heads * self.head_dim)

    def forward(self, v: Tensor, lang: Tensor, mask: Tensor, update_visual: bool = True,
                image: Tensor | None = None, colours: Tensor | None = None,
                region_bias: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
        """v: (N, R, Cv) regions, lang: (N, T, Cl) tokens, mask: (N, T) -> (delta_v, delta_l).

        With `update_visual` False (captioning: the image never attends to text) delta_v is
        None and only tokens attend to regions. `image` (N, R, Cv), with `image_values`: the
        regions as they entered the tower, which tokens also read with the same attention;
        `colours` (N, R, 3), with `pixel_colours`: each region's mean input pixel, read with them.
        `region_bias` (N, T, R): added to the tokens' scores over regions (`box_bias`).
        """
        n, regions, _ = v.shape
        tokens = lang.shape[1]
        query = self._heads(self.v_proj(v) * self.scale)  # (N*h, R, d)
        key = self._heads(self.l_proj(lang))  # (N*h, T, d)
        value_v = self._heads(self.values_v_proj(v))  # (N*h, R, d)
        value_l = self._heads(self.values_l_proj(lang))  # (N*h, T, d)

        scores = torch.bmm(query, key.transpose(1, 2))  # (N*h, R, T)
        scores = scores.clamp(min=-self.clamp, max=self.clamp)

        scores_t = scores.transpose(1, 2)  # (N*h, T, R)
        scores_t = scores_t - scores_t.max(dim=-1, keepdim=True).values
        scores_t = scores_t.clamp(min=-self.clamp, max=self.clamp)
        if region_bias is not None:  # (N, T, R) -> (N, h, T, R) over (N*h, T, R)
            scores_t = (scores_t.view(n, self.num_heads, tokens, regions)
                        + region_bias[:, None]).view(n * self.num_heads, tokens, regions)
        probs_l = scores_t.softmax(dim=-1)
        if self.text_attention is not None:
            self.text_attention.append(probs_l.view(n, self.num_heads, tokens, regions))
        probs_l = F.dropout(probs_l, p=self.dropout, training=self.training)
        delta_l = self.out_l_proj(self._merge(torch.bmm(probs_l, value_v), n))
        if self.values_image_proj is not None and self.out_image_proj is not None:
            if image is None:
                raise ValueError("a fusion with image_values needs the tower's input regions")
            value_image = self.values_image_proj(image)
            if self.values_colour_proj is not None:
                if colours is None:
                    raise ValueError("a fusion with pixel_colours needs the regions' colours")
                value_image = value_image + self.values_colour_proj(colours)
            value_image = self._heads(value_image)
            delta_l = delta_l + self.out_image_proj(
                self._merge(torch.bmm(probs_l, value_image), n))
        if not update_visual:
            return None, delta_l

        # Reference quirk kept for bit-faithfulness: real tokens get +1 (a softmax no-op).
        additive = torch.where(mask == 0, _TEXT_PAD_SCORE, 1.0).to(scores.dtype)
        scores_v = scores.view(n, self.num_heads, regions, tokens) + additive[:, None, None, :]
        probs_v = scores_v.view(n * self.num_heads, regions, tokens).softmax(dim=-1)

        probs_v = F.dropout(probs_v, p=self.dropout, training=self.training)
        delta_v = self.out_v_proj(self._merge(torch.bmm(probs_v, value_l), n))
        return delta_v, delta_l


class LevelPositions(nn.Module):
    """Absolute 2-D positions of every region of every level, as features of width `channels`.

    The cross-attention compares contents only, and convolutional features carry little absolute
    position, so without this a token cannot find "the object left of the blue square" or the
    next object of a left-to-right caption. Each cell centre, in resized-image pixels (padding
    and batching never move it), becomes sinusoids of wavelengths 8 to 4096 px per axis, then
    a linear layer initialised to zero, so a model grown from one without positions starts out
    computing exactly what it did.
    """

    def __init__(self, channels: int, strides: Sequence[int]) -> None:
        super().__init__()
        if channels % 4:
            raise ValueError("position encoding needs channels divisible by 4")
        self.strides = tuple(strides)
        frequencies = channels // 4  # per axis: a sine and a cosine each
        wavelengths = 8.0 * (4096.0 / 8.0) ** (torch.arange(frequencies) / max(1, frequencies - 1))
        self.register_buffer("angular", 2 * math.pi / wavelengths, persistent=False)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, sizes: Sequence[tuple[int, int]]) -> Tensor:
        """Per level (H_l, W_l), in `flatten_levels` order -> (1, R, channels)."""
        centres = region_centres(sizes, self.strides, self.angular.device)  # (R, 2) x, y
        y = _sinusoids(centres[:, 1], self.angular)
        x = _sinusoids(centres[:, 0], self.angular)
        return self.proj(torch.cat([y, x], dim=-1)).unsqueeze(0)


def region_centres(sizes: Sequence[tuple[int, int]], strides: Sequence[int],
                   device: torch.device | None = None) -> Tensor:
    """The centre (x, y) of every region of every level, in resized-image pixels, in
    `flatten_levels` order: cell (i, j) of a level of stride s is at ((j + 0.5) s, (i + 0.5) s).
    -> (R, 2)."""
    levels = []
    for (height, width), stride in zip(sizes, strides, strict=True):
        ys = (torch.arange(height, device=device) + 0.5) * stride
        xs = (torch.arange(width, device=device) + 0.5) * stride
        levels.append(torch.stack([xs[None].expand(height, -1), ys[:, None].expand(-1, width)],
                                  dim=-1).reshape(height * width, 2))
    return torch.cat(levels)


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


def _sinusoids(positions: Tensor, angular: Tensor) -> Tensor:
    angles = positions[:, None].float() * angular[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Glipv2VLFuse(nn.Module):
    """Pre-norm bidirectional fusion with layer scale: x = LN(x) + gamma * delta (both sides).

    With `positions`, the attention sees each region's normalised features plus its position;
    the residual stream (what DyConv and the head get) stays free of it.
    """

    def __init__(self, v_dim: int, l_dim: int, config: FusionConfig,
                 strides: Sequence[int] = ()) -> None:
        super().__init__()
        self.positions = LevelPositions(v_dim, strides) if config.position_encoding else None
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.layer_norm_image = nn.LayerNorm(v_dim) if config.image_values else None
        self.attn = Glipv2BiAttention(v_dim, l_dim, config.embed_dim, config.num_heads,
                                      config.dropout, config.attention_clamp,
                                      config.image_values, config.pixel_colours)
        self.gamma_v = nn.Parameter(torch.full((v_dim,), 1.0 / config.num_layers))
        self.gamma_l = nn.Parameter(torch.full((l_dim,), 1.0 / config.num_layers))

    def forward(self, visual: list[Tensor], text: Tensor, mask: Tensor, causal: bool = False,
                image: Tensor | None = None, colours: Tensor | None = None
                ) -> tuple[list[Tensor], Tensor]:
        """visual: per level (N, C, H_l, W_l); text: (N, T, D). Levels attend as one sequence.

        `causal` (captioning): regions are not updated from text, so the image side of every
        layer is the same whatever the caption so far. `image`: the tower's input regions
        (`flatten_levels`), read with `config.image_values`; `colours`: the regions' mean
        pixels (`colour_regions`), read with `config.pixel_colours`.
        """
        sizes = [feature.shape[-2:] for feature in visual]
        v = self.layer_norm_v(flatten_levels(visual))
        lang = self.layer_norm_l(text)
        delta_v, delta_l = self.attn(self.attended(v, sizes), lang, mask,
                                     update_visual=not causal, image=self.image_regions(image),
                                     colours=colours)
        if delta_v is not None:
            v = v + self.gamma_v * delta_v
        lang = lang + self.gamma_l * delta_l
        return unflatten_levels(v, sizes), lang

    def image_regions(self, image: Tensor | None) -> Tensor | None:
        """The tower's input regions as this layer's tokens read them (normalised), if at all."""
        if self.layer_norm_image is None or image is None:
            return None
        return self.layer_norm_image(image)

    def attended(self, v: Tensor, sizes: Sequence[tuple[int, int]]) -> Tensor:
        """What the cross-attention sees of the normalised regions: plus positions, if any."""
        return v if self.positions is None else v + self.positions(sizes).to(v.dtype)


def colour_regions(colours: Tensor, sizes: Sequence[tuple[int, int]]) -> Tensor:
    """The mean input pixel under every region of every level, in `flatten_levels` order.

    P3-P5 as `colour_maps` gives them; P6 and P7 cells (64 and 128 px) mostly mix an object
    with its background and get zeros: the objects whose colour is asked about are read at
    P3-P5. -> (N, R, 3).
    """
    levels = [pooled.flatten(2).transpose(1, 2) for pooled in colour_maps(colours, sizes)]
    for height, width in sizes[len(levels):]:
        levels.append(colours.new_zeros(colours.shape[0], height * width, 3))
    return torch.cat(levels, dim=1)


def colour_maps(colours: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
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
        nn.init.zeros_(self.embed[2].weight)
        nn.init.zeros_(self.embed[2].bias)

    def forward(self, visual: list[Tensor], colours: Tensor) -> list[Tensor]:
        """visual: fused levels (N, C, H_l, W_l); colours: (N, 3, H_3, W_3) (`image_colours`)."""
        sizes = [tuple(feature.shape[-2:]) for feature in visual]
        coloured = [feature + self.embed(pooled).to(feature.dtype)
                    for feature, pooled in zip(visual, colour_maps(colours, sizes), strict=False)]
        return coloured + visual[len(coloured):]


def flatten_levels(visual: list[Tensor]) -> Tensor:
    """Per level (N, C, H, W) -> (N, R, C): every location of every level, one sequence."""
    return torch.cat([feature.flatten(2).transpose(1, 2) for feature in visual], dim=1)


def unflatten_levels(v: Tensor, sizes: list[torch.Size]) -> list[Tensor]:
    """Inverse of `flatten_levels`: (N, R, C) -> per level (N, C, H, W)."""
    fused: list[Tensor] = []
    start = 0
    for height, width in sizes:
        count = height * width
        per_level = v[:, start:start + count].transpose(1, 2)  # (N, HW, C) -> (N, C, HW)
        fused.append(per_level.reshape(v.shape[0], -1, height, width))
        start += count
    return fused


class Glipv2TextLayer(nn.Module):
    """A BERT encoder layer on the tokens, with the reference's +-clamps against fp16 overflow.

    Submodule names follow `transformers`' BertLayer (`attention.self.query`, ...), as the
    reference does.
    """

    def __init__(self, config: LanguageConfig, clamp: float) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = hidden // config.num_heads
        self.clamp = clamp
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.query = nn.Linear(hidden, hidden)
        self.attention.self.key = nn.Linear(hidden, hidden)
        self.attention.self.value = nn.Linear(hidden, hidden)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(hidden, hidden)
        self.attention.output.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, config.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(config.intermediate_size, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(0.1)

    def _heads(self, x: Tensor) -> Tensor:
        # (N, T, D) -> (N, heads, T, D / heads)
        n, length, _ = x.shape
        return x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _clamp(self, x: Tensor) -> Tensor:
        return x.clamp(min=-self.clamp, max=self.clamp)

    def forward(self, hidden: Tensor, mask: Tensor, causal: bool = False) -> Tensor:
        """hidden: (N, T, D), mask: (N, T) -> (N, T, D); `causal` hides later tokens."""
        attn = self.attention.self
        query, key, value = (self._heads(proj(hidden))
                             for proj in (attn.query, attn.key, attn.value))
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = self._clamp(scores) + extended_attention_mask(mask, scores.dtype, causal)
        probs = self.dropout(scores.softmax(dim=-1))
        context = torch.matmul(probs, value).transpose(1, 2)  # (N, T, heads, d)
        context = context.reshape(hidden.shape)
        out = self.attention.output
        attended = out.LayerNorm(self.dropout(out.dense(context)) + hidden)

        inner = self._clamp(F.gelu(self._clamp(self.intermediate.dense(attended))))
        projected = self._clamp(self.dropout(self.output.dense(inner)))
        return self._clamp(self.output.LayerNorm(projected + attended))


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

    @property
    def image_values(self) -> bool:
        return self.layers[0].vl_fuse.layer_norm_image is not None

    @property
    def pixel_colours(self) -> bool:
        return self.layers[0].vl_fuse.attn.values_colour_proj is not None

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
        for layer in self.layers:
            layer.vl_fuse.attn.text_attention = maps
        try:
            yield maps
        finally:
            for layer in self.layers:
                layer.vl_fuse.attn.text_attention = None

    def caption_image_states(self, visual: list[Tensor], colours: Tensor | None = None
                             ) -> tuple[list[Tensor], list[Tensor]]:
        """The causal mode's image side, computed once per image for a whole caption.

        Returns the region sequence (N, R, C) each layer's text attends to (normalised, plus
        positions if any), then with `image_values` the tower's input regions (one more
        state), with `pixel_colours` the regions' colours (N, R, 3, one more), then the regions'
        centres (N, R, 2, `region_centres`, for `caption_text`'s token boxes), and the final
        fused levels; `caption_text` then runs only the text side per decoding step.
        """
        image = flatten_levels(visual) if self.image_values else None
        regions = self._colour_regions(visual, colours)
        sizes = [feature.shape[-2:] for feature in visual]
        centres = region_centres(sizes, self.strides, visual[0].device).to(visual[0].dtype)
        states = []
        for layer in self.layers:
            v = layer.vl_fuse.layer_norm_v(flatten_levels(visual))
            states.append(layer.vl_fuse.attended(v, sizes))
            visual = layer.dyconv(unflatten_levels(v, sizes))
        if image is not None:
            states.append(image)
        if regions is not None:
            states.append(regions)
        states.append(centres.unsqueeze(0).expand(visual[0].shape[0], -1, -1))
        return states, self._with_colours(visual, colours)

    def caption_text(self, states: list[Tensor], text: TextFeatures,
                     token_boxes: Tensor | None = None) -> Tensor:
        """Causal text side against cached image states -> fused tokens (N, T, D).

        token_boxes (N, T, 4): a box per token, in resized-image pixels, that its attention
        over regions stays inside (`box_bias`; zeros: anywhere). Captioning given objects
        puts each phrase's tokens on its object's box, so "a small red" reads the colour
        and size of that object and not of another one the decoder also looks at.
        """
        extra = iter(states[len(self.layers):])
        image = next(extra) if self.image_values else None
        colours = next(extra) if self.pixel_colours else None
        centres = next(extra)
        bias = box_bias(centres, token_boxes) if token_boxes is not None else None
        hidden = text.hidden
        for layer, v in zip(self.layers, states[:len(self.layers)], strict=True):
            fuse = layer.vl_fuse
            lang = fuse.layer_norm_l(hidden)
            _, delta_l = fuse.attn(v, lang, text.mask, update_visual=False,
                                   image=fuse.image_regions(image), colours=colours,
                                   region_bias=bias)
            hidden = layer.text_layer(lang + fuse.gamma_l * delta_l, text.mask, causal=True)
        return hidden
