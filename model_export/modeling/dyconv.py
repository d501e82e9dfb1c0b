"""Visual path of one GLIP DyHead layer: deformable convs across levels, scale attention, DyReLU.

Matches the reference `DyConv` (`maskrcnn_benchmark/modeling/rpn/vldyhead.py`) as GLIP-T/L build
it: `use_deform=True`, `use_dyfuse=True`, `use_dyrelu=True`, `Conv3x3Norm` = modulated deformable
3x3 conv + GroupNorm, and `DYReLU` (`maskrcnn_benchmark/layers/dyrelu.py`) with its defaults
(reduction 4, lambda_a 1 -> 2, init_a (1, 0), init_b (0, 0), K2, bias, no spatial branch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.modeling.deform_conv import ModulatedDeformConv2d

__all__ = [
    "Glipv2Conv3x3Norm",
    "Glipv2DyConv",
    "Glipv2DyReLU",
    "HardSigmoid",
    "dyrelu_squeeze_channels",
    "hard_sigmoid",
]

_KERNEL_TAPS = 9  # 3x3 deformable kernels: 18 offset channels + 9 mask channels

# DYReLU defaults of the reference (`DYReLU(inp, oup)` is all GLIP uses).
_DYRELU_LAMBDA_A = 2.0  # reference stores lambda_a * 2 with lambda_a = 1.0
_DYRELU_INIT_A = (1.0, 0.0)  # the two slopes start at 1 and 0 ...
_DYRELU_INIT_B = (0.0, 0.0)  # ... and the two intercepts at 0: max(x, 0) = ReLU at init


def hard_sigmoid(x: Tensor) -> Tensor:
    """relu6(x + 3) / 6, written as the reference does (not F.hardsigmoid's x/6 + 1/2 rounding)."""
    return F.relu6(x + 3.0) / 6.0


class HardSigmoid(nn.Module):
    """Module form of `hard_sigmoid`, the reference `h_sigmoid` with h_max = 1."""

    def forward(self, x: Tensor) -> Tensor:
        return hard_sigmoid(x)


def dyrelu_squeeze_channels(channels: int, reduction: int) -> int:
    """Hidden width of DyReLU's MLP, with the reference's rule.

    Reduction 4 divides exactly (256 -> 64); any other reduction rounds channels // reduction to a
    multiple of 4 (at least 4, never more than 10% below), as the reference `_make_divisible`.
    """
    if reduction == 4:
        return channels // reduction
    target = channels // reduction
    divisor = 4
    rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * target:
        rounded += divisor
    return rounded


class Glipv2DyReLU(nn.Module):
    """Dynamic ReLU: out = max(a1 * x + b1, a2 * x + b2) with per-sample, per-channel a, b.

    The coefficients come from global average pooling -> Linear(C, C/r) -> ReLU ->
    Linear(C/r, 4C) -> hard sigmoid, split as [a1, b1, a2, b2] (C each), then
    a1 = 2 (s - 0.5) + 1, a2 = 2 (s - 0.5), b = s - 0.5. Names `fc.0`, `fc.2` match the reference.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.channels = channels
        squeeze = dyrelu_squeeze_channels(channels, reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, squeeze),
            nn.ReLU(),
            nn.Linear(squeeze, 4 * channels),
            HardSigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) -> (N, C, H, W)."""
        n, c = x.shape[0], x.shape[1]
        pooled = F.adaptive_avg_pool2d(x, 1).reshape(n, c)  # (N, C, 1, 1) -> (N, C)
        coeffs = self.fc(pooled).reshape(n, 4 * c, 1, 1)  # (N, 4C) -> (N, 4C, 1, 1)
        a1, b1, a2, b2 = torch.split(coeffs, c, dim=1)  # 4 x (N, C, 1, 1)
        a1 = (a1 - 0.5) * _DYRELU_LAMBDA_A + _DYRELU_INIT_A[0]
        a2 = (a2 - 0.5) * _DYRELU_LAMBDA_A + _DYRELU_INIT_A[1]
        b1 = b1 - 0.5 + _DYRELU_INIT_B[0]
        b2 = b2 - 0.5 + _DYRELU_INIT_B[1]
        return torch.maximum(x * a1 + b1, x * a2 + b2)


class Glipv2Conv3x3Norm(nn.Module):
    """Modulated deformable 3x3 conv (padding 1, with bias) followed by GroupNorm.

    The reference `Conv3x3Norm(deformable=True, bn_type=["gn", groups])`; names `conv`, `bn`.
    """

    def __init__(self, channels: int, stride: int, group_norm_groups: int) -> None:
        super().__init__()
        self.conv = ModulatedDeformConv2d(
            channels, channels, kernel_size=3, stride=stride, padding=1
        )
        self.bn = nn.GroupNorm(num_groups=group_norm_groups, num_channels=channels)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """x (N, C, H, W), offset (N, 18, h, w), mask (N, 9, h, w) -> (N, C, Ho, Wo)."""
        return self.bn(self.conv(x, offset, mask))


class Glipv2DyConv(nn.Module):
    """The visual part of one DyHead layer over all FPN levels.

    For level l, offsets (18 channels, dy/dx per tap) and a sigmoid mask (9 channels) are computed
    from level l by `offset`, and shared by three deformable convs whose results are fused:
    `DyConv.1` (stride 1) on level l; `DyConv.2` (stride 2) on the finer level l-1 (if any);
    `DyConv.0` (stride 1) on the coarser level l+1 (if any), upsampled bilinearly with
    align_corners=True to level l's size. `DyConv.0` gets level l's (larger) offset maps and reads
    them with the reference's size quirk (see `deform_conv.offset_mask_for_output`). Scale
    attention weighs each result by hard_sigmoid(ReLU(conv1x1(avgpool(result)))) and averages
    them; DyReLU follows.

    Attribute names (`DyConv`, `AttnConv`, `offset`, `relu`) are the reference's, awkward as they
    are, so that the state_dict keys equal the reference's `rpn.head.dyhead_tower.{3i+2}.*`
    keys after a pure prefix rename: `DyConv.{0,1,2}.conv.{weight,bias}`,
    `DyConv.{0,1,2}.bn.{weight,bias}`, `AttnConv.1.{weight,bias}`, `offset.{weight,bias}`,
    `relu.fc.0.{weight,bias}`, `relu.fc.2.{weight,bias}`.

    Initialisation is the reference's: the reference's `init_weights` draws N(0, 0.01) only for
    `nn.Conv2d` modules inside `DyConv` and `AttnConv`; the deformable convs are not `nn.Conv2d`,
    so they keep `ModulatedDeformConv`'s own init (uniform +-1/sqrt(9C), bias 0). `AttnConv.1` is
    N(0, 0.01) with bias 0; `offset` and `relu.fc` keep PyTorch's default init (the reference
    does not zero the offsets); GroupNorm starts at weight 1, bias 0.
    """

    def __init__(self, channels: int, group_norm_groups: int, dyrelu_reduction: int) -> None:
        super().__init__()
        self.channels = channels
        self.DyConv = nn.ModuleList(
            [
                Glipv2Conv3x3Norm(channels, 1, group_norm_groups),  # on the coarser level l+1
                Glipv2Conv3x3Norm(channels, 1, group_norm_groups),  # on level l itself
                Glipv2Conv3x3Norm(channels, 2, group_norm_groups),  # on the finer level l-1
            ]
        )
        self.AttnConv = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, 1, kernel_size=1),
            nn.ReLU(),
        )
        self.offset = nn.Conv2d(channels, 3 * _KERNEL_TAPS, kernel_size=3, stride=1, padding=1)
        self.relu = Glipv2DyReLU(channels, dyrelu_reduction)
        self._init_weights()

    def _init_weights(self) -> None:
        attn_conv = self.AttnConv[1]
        assert isinstance(attn_conv, nn.Conv2d)
        nn.init.normal_(attn_conv.weight, 0.0, 0.01)
        assert attn_conv.bias is not None
        nn.init.zeros_(attn_conv.bias)

    def offset_and_mask(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """feature (N, C, H, W) -> offset (N, 18, H, W), mask (N, 9, H, W) in (0, 1)."""
        offset_mask = self.offset(feature)  # (N, 27, H, W)
        offset = offset_mask[:, : 2 * _KERNEL_TAPS]  # (N, 27, H, W) -> (N, 18, H, W)
        mask = offset_mask[:, 2 * _KERNEL_TAPS :].sigmoid()  # (N, 27, H, W) -> (N, 9, H, W)
        return offset, mask

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: one (N, C, H_l, W_l) per FPN level, finest first -> same shapes."""
        fused_per_level = []
        num_levels = len(features)
        for level, feature in enumerate(features):
            offset, mask = self.offset_and_mask(feature)
            # Same order as the reference (it matters only for float rounding of the mean).
            results = [self.DyConv[1](feature, offset, mask)]
            if level > 0:
                results.append(self.DyConv[2](features[level - 1], offset, mask))
            if level < num_levels - 1:
                coarser = self.DyConv[0](features[level + 1], offset, mask)
                results.append(
                    F.interpolate(
                        coarser,
                        size=(feature.shape[2], feature.shape[3]),
                        mode="bilinear",
                        align_corners=True,  # F.upsample_bilinear in the reference
                    )
                )
            stacked = torch.stack(results)  # R x (N, C, H, W) -> (R, N, C, H, W)
            attention = hard_sigmoid(
                torch.stack([self.AttnConv(result) for result in results])
            )  # R x (N, 1, 1, 1) -> (R, N, 1, 1, 1)
            fused_per_level.append(torch.mean(stacked * attention, dim=0))  # (N, C, H, W)
        return [self.relu(fused) for fused in fused_per_level]
