"""One fusion layer's bidirectional image-text cross-attention (`vl_fuse`) and its region geometry.

All FPN positions attend to the tokens and the tokens to them, as one sequence of regions in
`flatten_levels` order; `LevelPositions` optionally adds each region's absolute position to what
the attention sees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.modeling.config import FusionConfig

# Additive score for padded tokens when regions attend to text (reference value).
_TEXT_PAD_SCORE = -9e15


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
                image: Tensor | None = None, colours: Tensor | None = None
                ) -> tuple[Tensor | None, Tensor]:
        """v: (N, R, Cv) regions, lang: (N, T, Cl) tokens, mask: (N, T) -> (delta_v, delta_l).

        With `update_visual` False (captioning: the image never attends to text) delta_v is
        None and only tokens attend to regions. `image` (N, R, Cv), with `image_values`: the
        regions as they entered the tower, which tokens also read with the same attention;
        `colours` (N, R, 3), with `pixel_colours`: each region's mean input pixel, read with them.
        """
        n, regions, _ = v.shape
        tokens = lang.shape[1]
        query = self._heads(self.v_proj(v) * self.scale)  # (N*h, R, d)
        key = self._heads(self.l_proj(lang))  # (N*h, T, d)
        value_v = self._heads(self.values_v_proj(v))  # (N*h, R, d)
        value_l = self._heads(self.values_l_proj(lang))  # (N*h, T, d)

        scores = torch.bmm(query, key.transpose(1, 2))  # (N*h, R, T)
        scores = scores.clamp(min=-self.clamp, max=self.clamp)

        probs_l = self._token_probs(scores.transpose(1, 2), n)  # (N*h, T, R)
        delta_l = self.out_l_proj(self._merge(torch.bmm(probs_l, value_v), n))
        if self.values_image_proj is not None and self.out_image_proj is not None:
            image, colours = self._image_inputs(image, colours)
            value_image = self.values_image_proj(image)
            if self.values_colour_proj is not None and colours is not None:
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

    def _image_inputs(self, image: Tensor | None, colours: Tensor | None
                      ) -> tuple[Tensor, Tensor | None]:
        """The inputs of the image values, checked: the input regions, and the colours when
        the fusion reads `pixel_colours` (else None)."""
        if image is None:
            raise ValueError("a fusion with image_values needs the tower's input regions")
        if self.values_colour_proj is not None and colours is None:
            raise ValueError("a fusion with pixel_colours needs the regions' colours")
        return image, colours

    def _token_probs(self, scores_t: Tensor, n: int, region_bias: Tensor | None = None
                     ) -> Tensor:
        """(N*h, T, R) clamped token-to-region scores -> attention over regions, (N*h, T, R).

        Max-subtracted before the second clamp (no image mask); `region_bias` (N, T, R) is added
        per head (`box_bias`).
        """
        tokens, regions = scores_t.shape[1:]
        scores_t = scores_t - scores_t.max(dim=-1, keepdim=True).values
        scores_t = scores_t.clamp(min=-self.clamp, max=self.clamp)
        if region_bias is not None:  # (N, T, R) -> (N, h, T, R) over (N*h, T, R)
            scores_t = (scores_t.view(n, self.num_heads, tokens, regions)
                        + region_bias[:, None]).view(n * self.num_heads, tokens, regions)
        probs = scores_t.softmax(dim=-1)
        if self.text_attention is not None:
            self.text_attention.append(probs.view(n, self.num_heads, tokens, regions))
        return F.dropout(probs, p=self.dropout, training=self.training)

    def attend_regions(self, regions: Tensor, lang: Tensor, image: Tensor | None = None,
                       colours: Tensor | None = None, region_bias: Tensor | None = None
                       ) -> Tensor:
        """Tokens attend to regions, the regions never to tokens: `forward`'s delta_l with
        `update_visual` False, with the region projections folded onto the token side.

        regions: (N, R, Cv) what the layer attends (`Glipv2VLFuse.attended`); lang: (N, T, Cl)
        normalised tokens; image (N, R, Cv): the input regions as this layer normalises them
        (`image_values`); colours (N, R, 3) (`pixel_colours`); region_bias: (N, T, R)
        (`box_bias`). -> delta_l (N, T, Cl).

        Why: the query and value projections are affine maps of each region, so a head's score
        (W v_r + b) . k = v_r . (W^T k) + b . k, and its attention-weighted value
        sum_r p_r (W v_r + b) = W (sum_r p_r v_r) + b (the p_r sum to 1). A caption step then
        maps its one token's key into region space and pools the regions before projecting,
        O(R Cv h) per token, instead of projecting all R regions three times, O(R Cv E); and
        what an image keeps for its whole caption is the normalised regions (R x Cv per layer),
        not three R x E projections (E = 4 Cv in `small`, 8 Cv in GLIP-T).
        """
        n, count, _ = regions.shape
        tokens, heads = lang.shape[1], self.num_heads
        key = self.l_proj(lang).view(n, tokens, heads, self.head_dim)  # (N, T, h, d)
        weight = self.v_proj.weight.view(heads, self.head_dim, -1)  # (h, d, Cv)
        key_regions = torch.einsum("nthd,hdc->nhtc", key, weight) * self.scale  # (N, h, T, Cv)
        key_bias = torch.einsum("nthd,hd->nht", key, self.v_proj.bias.view(heads, -1))
        scores = torch.bmm(regions, key_regions.reshape(n, heads * tokens, -1).transpose(1, 2))
        scores = scores + key_bias.reshape(n, 1, heads * tokens) * self.scale  # (N, R, h*T)
        scores = scores.clamp(min=-self.clamp, max=self.clamp)
        scores_t = scores.transpose(1, 2).reshape(n * heads, tokens, count)  # (N*h, T, R)
        probs = self._token_probs(scores_t, n, region_bias).view(n, heads * tokens, count)
        delta_l = self.out_l_proj(self._project_pooled(torch.bmm(probs, regions),
                                                       self.values_v_proj, tokens))
        if self.values_image_proj is not None and self.out_image_proj is not None:
            image, colours = self._image_inputs(image, colours)
            value_image = self._project_pooled(torch.bmm(probs, image), self.values_image_proj,
                                               tokens)
            if self.values_colour_proj is not None and colours is not None:
                value_image = value_image + self._project_pooled(
                    torch.bmm(probs, colours), self.values_colour_proj, tokens)
            delta_l = delta_l + self.out_image_proj(value_image)
        return delta_l

    def _project_pooled(self, pooled: Tensor, linear: nn.Linear, tokens: int) -> Tensor:
        """Each head's attention-pooled inputs through that head's rows of a value projection:
        (N, h*T, C) -> (N, T, E), heads merged as `_merge` does."""
        n = pooled.shape[0]
        pooled = pooled.view(n, self.num_heads, tokens, -1)  # (N, h, T, C)
        weight = linear.weight.view(self.num_heads, self.head_dim, -1)  # (h, d, C)
        value = torch.einsum("nhtc,hdc->nthd", pooled, weight) + linear.bias.view(
            self.num_heads, self.head_dim)  # (N, T, h, d)
        return value.reshape(n, tokens, self.num_heads * self.head_dim)


class LevelPositions(nn.Module):
    """Absolute 2-D positions of every region of every level, as features of width `channels`.

    The cross-attention compares contents only, and convolutional features carry little absolute
    position, so without this a token cannot find "the object left of the blue square" or the
    next object of a left-to-right caption. Each cell centre, in resized-image pixels (padding
    and batching never move it), becomes sinusoids of wavelengths 8 to 4096 px per axis, then
    a linear layer initialised to zero, so a model grown from one without positions starts out
    computing exactly what it did.
    """

    angular: Tensor  # (channels / 4,) radians per pixel of each sinusoid: a buffer

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

    def forward(self, sizes: Sequence[tuple[int, ...]]) -> Tensor:
        """Per level (H_l, W_l), in `flatten_levels` order -> (1, R, channels)."""
        centres = region_centres(sizes, self.strides, self.angular.device)  # (R, 2) x, y
        y = _sinusoids(centres[:, 1], self.angular)
        x = _sinusoids(centres[:, 0], self.angular)
        return self.proj(torch.cat([y, x], dim=-1)).unsqueeze(0)


def region_centres(sizes: Sequence[tuple[int, ...]], strides: Sequence[int],
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

    def attended(self, v: Tensor, sizes: Sequence[tuple[int, ...]]) -> Tensor:
        """What the cross-attention sees of the normalised regions: plus positions, if any."""
        return v if self.positions is None else v + self.positions(sizes).to(v.dtype)


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
