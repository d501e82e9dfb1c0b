"""ATSS head on fused features: box regression, centerness and region-token dot-product logits.

Classification is matching: a region's logit for a token is the dot product of the region feature
with the projected, L2-normalised fused token feature, plus a per-token bias. The head stops at raw
tensors; decoding, thresholds and NMS live in `postprocess`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.modeling.config import HeadConfig


class Glipv2Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level for the box deltas)."""

    def __init__(self, init_value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class Glipv2AtssHead(nn.Module):
    """Per-level box deltas and centerness; region-token logits against the fused tokens."""

    def __init__(self, config: HeadConfig, channels: int, text_dim: int) -> None:
        super().__init__()
        self.logit_clamp = config.logit_clamp
        num_levels = len(config.anchor_strides)
        self.bbox_pred = nn.Conv2d(channels, 4, kernel_size=1)
        self.centerness = nn.Conv2d(channels, 1, kernel_size=1)
        self.scales = nn.ModuleList(Glipv2Scale(1.0) for _ in range(num_levels))
        self.dot_product_projection_text = nn.Linear(text_dim, channels)
        self.log_scale = nn.Parameter(torch.tensor([config.log_scale_init]))
        self.bias_lang = nn.Parameter(torch.zeros(text_dim))
        prior = config.prior_prob
        self.bias0 = nn.Parameter(torch.tensor([-math.log((1 - prior) / prior)]))
        for conv in (self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            assert conv.bias is not None  # built with a bias
            nn.init.zeros_(conv.bias)

    def token_projection(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """text: (N, T, D) fused tokens -> (projected tokens (N, T, C), token bias (N, T))."""
        embedding = F.normalize(text, p=2, dim=-1)
        projected = self.dot_product_projection_text(embedding / 2.0)
        bias = torch.matmul(embedding, self.bias_lang) + self.bias0
        return projected, bias

    def forward(self, visual: list[Tensor], text: Tensor
                ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """visual: per level (N, C, H, W); text: (N, T, D).

        Returns per level: box deltas (N, 4, H, W) after the level's scale, centerness logits
        (N, 1, H, W), and region-token logits (N, H*W, T) in row-major (y, x) order, clamped.
        """
        tokens, token_bias = self.token_projection(text)
        temperature = self.log_scale.exp()
        box_regression, centerness, token_logits = [], [], []
        for feature, scale in zip(visual, self.scales, strict=True):
            box_regression.append(scale(self.bbox_pred(feature)))
            centerness.append(self.centerness(feature))
            regions = feature.flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, HW, C)
            logits = torch.matmul(regions, tokens.transpose(-1, -2)) / temperature
            logits = logits + token_bias[:, None, :]
            token_logits.append(logits.clamp(min=-self.logit_clamp, max=self.logit_clamp))
        return box_regression, centerness, token_logits
