"""Swin Transformer v1 image backbone of GLIP (`maskrcnn_benchmark/modeling/backbone/swint.py`).

Reproduces the reference math exactly, including its quirks:

- The input is zero-padded on the right/bottom to a multiple of the patch size, every block pads
  its (normalised) feature map to a multiple of the window size, and patch merging pads odd maps
  to an even size. Padded tokens are zeros after `norm1` and are NOT masked out: in unshifted
  blocks they take part in attention like any other token.
- The window is never clamped to the feature size (unlike the classification Swin): a 3x3 map is
  padded to a full 7x7 window and odd blocks still shift by `window // 2`.
- The shifted-window mask is computed from the padded size, with -100.0 (not -inf) between
  regions, and is applied only in shifted blocks.

Internally a stage works channels-last, on `(N, H, W, C)` maps; the reference works on token
sequences `(N, H*W, C)` with the same memory order, so every op sees the same numbers.
Parameter names equal the reference names under `backbone.body.`; the buffer
`relative_position_index` is not persistent (it is derived from the window size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.modeling.config import SwinConfig

# Added to scores between tokens of different shift regions (the reference's value, not -inf).
_SHIFT_MASK_FILL = -100.0


def relative_position_index(window_size: int) -> Tensor:
    """Index into the relative-position-bias table for every (query, key) pair of a window.

    Returns (ws*ws, ws*ws) int64: `(dr + ws - 1) * (2*ws - 1) + (dc + ws - 1)` where `dr`, `dc`
    are the row and column offsets of query minus key, tokens in row-major order.
    """
    coords = torch.arange(window_size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (ws, ws) each
    rows, cols = rows.flatten(), cols.flatten()  # (ws*ws,)
    d_row = rows[:, None] - rows[None, :] + window_size - 1  # (ws*ws, ws*ws), in [0, 2ws-2]
    d_col = cols[:, None] - cols[None, :] + window_size - 1
    return d_row * (2 * window_size - 1) + d_col


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """Split a padded map into windows: (N, Hp, Wp, C) -> (N*nW, ws*ws, C), windows row-major."""
    n, hp, wp, c = x.shape
    ws = window_size
    x = x.view(n, hp // ws, ws, wp // ws, ws, c)  # (N, Hp/ws, ws, Wp/ws, ws, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, Hp/ws, Wp/ws, ws, ws, C)
    return x.reshape(-1, ws * ws, c)  # (N*nW, ws*ws, C)


def window_reverse(windows: Tensor, window_size: int, n: int, hp: int, wp: int) -> Tensor:
    """Inverse of `window_partition`: (N*nW, ws*ws, C) -> (N, Hp, Wp, C)."""
    ws = window_size
    c = windows.shape[-1]
    x = windows.view(n, hp // ws, wp // ws, ws, ws, c)  # (N, Hp/ws, Wp/ws, ws, ws, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, Hp/ws, ws, Wp/ws, ws, C)
    return x.reshape(n, hp, wp, c)


def shifted_window_mask(
    hp: int, wp: int, window_size: int, shift_size: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Additive attention mask of the shifted windows of a padded (Hp, Wp) map.

    The cyclically shifted map is cut into 3 row bands and 3 column bands:
    `[0, Hp-ws)`, `[Hp-ws, Hp-shift)`, `[Hp-shift, Hp)` (likewise for columns); two tokens of
    one window may attend to each other only if they lie in the same band pair.
    Returns (nW, ws*ws, ws*ws): 0 where allowed, -100.0 elsewhere.
    Built from comparisons on `arange` (no in-place slice writes) so it traces with symbolic sizes.
    """
    rows = torch.arange(hp, device=device)
    cols = torch.arange(wp, device=device)
    band_row = (rows >= hp - window_size).long() + (rows >= hp - shift_size).long()  # (Hp,)
    band_col = (cols >= wp - window_size).long() + (cols >= wp - shift_size).long()  # (Wp,)
    region = band_row[:, None] * 3 + band_col[None, :]  # (Hp, Wp)
    region_windows = window_partition(region[None, :, :, None], window_size)  # (nW, ws*ws, 1)
    region_windows = region_windows.squeeze(-1)  # (nW, ws*ws)
    differ = region_windows[:, None, :] != region_windows[:, :, None]  # (nW, ws*ws, ws*ws)
    zeros = torch.zeros(differ.shape, device=device, dtype=dtype)
    return zeros.masked_fill(differ, _SHIFT_MASK_FILL)


class Glipv2DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for whole samples in training; identity in eval."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)  # one draw per sample
        keep = x.new_empty(shape).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Glipv2SwinMlp(nn.Module):
    """Linear -> GELU -> Linear on the last dimension: (..., C) -> (..., C)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Glipv2WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias."""

    relative_position_index: Tensor  # (ws*ws, ws*ws) rows of the bias table: a buffer

    def __init__(self, dim: int, window_size: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )  # ((2ws-1)^2, heads)
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )  # (ws*ws, ws*ws)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (N*nW, T, C) with T = ws*ws tokens; mask: (nW, T, T) additive or None.

        Returns (N*nW, T, C).
        """
        b, t, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b, t, 3, heads, c // heads)  # (B, T, 3, heads, Ch)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, heads, T, Ch)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, T, T)

        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(t, t, heads).permute(2, 0, 1)  # (heads, T, T)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(b // num_windows, num_windows, heads, t, t)  # (N, nW, heads, T, T)
            attn = attn + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(b, heads, t, t)
        attn = attn.softmax(dim=-1)

        out = (attn @ v).transpose(1, 2).reshape(b, t, c)  # (B, heads, T, Ch) -> (B, T, C)
        return self.proj(out)


class Glipv2SwinBlock(nn.Module):
    """Pre-norm Swin block: (shifted-)window attention and an MLP, each with a residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        drop_path: float,
        eps: float,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError("shift_size must be in [0, window_size)")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Glipv2WindowAttention(dim, window_size, num_heads)
        self.drop_path = Glipv2DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Glipv2SwinMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        """x: (N, H, W, C); attn_mask: (nW, T, T) of the padded map, used only if shifted.

        Returns (N, H, W, C).
        """
        n, h, w = x.shape[0], x.shape[1], x.shape[2]
        ws, shift = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x)
        # Pad after the norm: padded tokens are exact zeros and stay unmasked, as in the reference.
        pad_b = (ws - h % ws) % ws
        pad_r = (ws - w % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # (N, Hp, Wp, C)
        hp, wp = x.shape[1], x.shape[2]

        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(x, ws)  # (N*nW, T, C)
        windows = self.attn(windows, attn_mask if shift > 0 else None)  # (N*nW, T, C)
        x = window_reverse(windows, ws, n, hp, wp)  # (N, Hp, Wp, C)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :h, :w, :]  # (N, H, W, C)

        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Glipv2PatchMerging(nn.Module):
    """2x2 neighbourhood concat, LayerNorm(4C), Linear(4C -> 2C, no bias).

    (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), 2C); odd maps are zero-padded to even first.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1], x.shape[2]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))  # (N, H+H%2, W+W%2, C)
        # Reference order: (even row, even col), (odd, even), (even, odd), (odd, odd).
        x0 = x[:, 0::2, 0::2, :]  # (N, H/2, W/2, C)
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], dim=-1)  # (N, H/2, W/2, 4C)
        return self.reduction(self.norm(x))  # (N, H/2, W/2, 2C)


class Glipv2SwinStage(nn.Module):
    """One stage (reference `BasicLayer`): `depth` blocks, odd ones shifted, then an optional
    patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: list[float],
        downsample: bool,
        eps: float,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList(
            Glipv2SwinBlock(
                dim,
                num_heads,
                window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
                drop_path=drop_path[i],
                eps=eps,
            )
            for i in range(depth)
        )
        self.downsample = Glipv2PatchMerging(dim, eps) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (N, H, W, C) -> (stage output (N, H, W, C), input of the next stage).

        The second item is `(N, ceil(H/2), ceil(W/2), 2C)` after patch merging, or the stage
        output itself for the last stage.
        """
        ws = self.window_size
        hp = (x.shape[1] + ws - 1) // ws * ws
        wp = (x.shape[2] + ws - 1) // ws * ws
        mask = shifted_window_mask(hp, wp, ws, self.shift_size, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        if self.downsample is None:
            return x, x
        return x, self.downsample(x)


class Glipv2PatchEmbed(nn.Module):
    """Stem: 4x4 stride-4 conv then LayerNorm. (N, 3, H, W) -> (N, ceil(H/4), ceil(W/4), C)."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int, eps: float) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, images: Tensor) -> Tensor:
        p = self.patch_size
        h, w = images.shape[2], images.shape[3]
        images = F.pad(images, (0, (p - w % p) % p, 0, (p - h % p) % p))  # (N, 3, Hp, Wp)
        x = self.proj(images)  # (N, C, H/p, W/p)
        return self.norm(x.permute(0, 2, 3, 1))  # (N, H/p, W/p, C)


class Glipv2SwinBackbone(nn.Module):
    """Swin v1 backbone returning the normalised maps of `config.out_stages`.

    Stage i has `embed_dim * 2**i` channels at stride `patch_size * 2**i`, spatial size
    `ceil(H / stride)` (each padding step rounds up). For GLIP-T and an (N, 3, H, W) input:
    C3 (N, 192, H/8, W/8), C4 (N, 384, H/16, W/16), C5 (N, 768, H/32, W/32).
    """

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.config = config
        eps = config.layer_norm_eps
        num_stages = len(config.depths)
        self.out_stages = tuple(config.out_stages)
        self.patch_embed = Glipv2PatchEmbed(
            config.patch_size, config.in_channels, config.embed_dim, eps
        )
        # Stochastic depth rises linearly from 0 (first block) to drop_path_rate (last block).
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
        channels = config.stage_channels()
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            start = sum(config.depths[:i])
            self.layers.append(
                Glipv2SwinStage(
                    dim=channels[i],
                    depth=config.depths[i],
                    num_heads=config.num_heads[i],
                    window_size=config.window_size,
                    mlp_ratio=config.mlp_ratio,
                    drop_path=rates[start : start + config.depths[i]],
                    downsample=i < num_stages - 1,
                    eps=eps,
                )
            )
        for i in self.out_stages:
            # The reference ("...-RETINANET" arch) uses an identity, not a norm, after stage 0.
            norm = nn.Identity() if i == 0 else nn.LayerNorm(channels[i], eps=eps)
            self.add_module(f"norm{i}", norm)
        self.apply(_init_weights)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images: (N, in_channels, H, W) -> [(N, C_i, H_i, W_i) for i in out_stages]."""
        x = self.patch_embed(images)  # (N, H/4, W/4, C)
        outputs: list[Tensor] = []
        for i, stage in enumerate(self.layers):
            stage_out, x = stage(x)  # (N, H_i, W_i, C_i), next stage input
            if i in self.out_stages:
                stage_out = getattr(self, f"norm{i}")(stage_out)
                outputs.append(stage_out.permute(0, 3, 1, 2).contiguous())  # (N, C_i, H_i, W_i)
        return outputs


def _init_weights(module: nn.Module) -> None:
    """The reference `init_weights`: truncated-normal linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
