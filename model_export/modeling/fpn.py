"""Feature pyramid P3-P7 of GLIP's "SWINT-FPN-RETINANET" backbone.

Reproduces `maskrcnn_benchmark/modeling/backbone/fpn.py` (`FPN` + `LastLevelP6P7`) with the
default `MODEL.FPN` options GLIP uses (no GroupNorm, no ReLU, no SPP/PAN; DropBlock is off):

- 1x1 lateral convs and 3x3 output convs, all with bias.
- The top-down path upsamples with nearest neighbour *to the lateral's size* (not by a factor
  of 2), so odd sizes work: e.g. C5 4x5 is resized to C4 7x9 with `src = floor(dst * in/out)`.
- P6 is a 3x3 stride-2 conv on P5 (the reference builds `LastLevelP6P7(out_channels,
  out_channels)`, so its `use_P5` is always true), P7 = 3x3 stride-2 conv on relu(P6).

Reference names map to ours as `fpn_inner{2,3,4}` -> `inner_blocks.{0,1,2}`,
`fpn_layer{2,3,4}` -> `layer_blocks.{0,1,2}`, `top_blocks.p6/p7` -> `p6/p7`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """Conv with 'same' padding, kaiming-uniform(a=1) weight and zero bias, as the reference."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2
    )
    nn.init.kaiming_uniform_(conv.weight, a=1)
    assert conv.bias is not None  # built with a bias
    nn.init.zeros_(conv.bias)
    return conv


class Glipv2FPN(nn.Module):
    """Top-down FPN over (C3, C4, C5) plus P6, P7.

    Input: features `[C3 (N, in_channels[0], H3, W3), C4 (..., H4, W4), C5 (..., H5, W5)]`.
    Output: `[P3, P4, P5, P6, P7]`, each `(N, out_channels, h, w)`; P3-P5 keep the sizes of
    C3-C5, P6 is `ceil(H5/2) x ceil(W5/2)`, P7 is `ceil(H6/2) x ceil(W6/2)`.

    `lateral_skip` adds a zero-initialised 1x1 conv of each lateral to P3-P5 (not in GLIP), so a
    model grown with it starts out computing exactly what it did.
    """

    def __init__(self, in_channels: tuple[int, ...], out_channels: int,
                 lateral_skip: bool = False) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(_conv(c, out_channels, 1) for c in in_channels)
        self.layer_blocks = nn.ModuleList(_conv(out_channels, out_channels, 3) for _ in in_channels)
        self.skip_blocks = None
        if lateral_skip:
            skips = [_conv(out_channels, out_channels, 1) for _ in in_channels]
            for conv in skips:
                nn.init.zeros_(conv.weight)
            self.skip_blocks = nn.ModuleList(skips)
        self.p6 = _conv(out_channels, out_channels, 3, stride=2)
        self.p7 = _conv(out_channels, out_channels, 3, stride=2)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: [C3, C4, C5] -> [P3, P4, P5, P6, P7] (see the class docstring for shapes)."""
        last_inner = self.inner_blocks[-1](features[-1])  # (N, out, H5, W5)
        results = [self._output(-1, last_inner, last_inner)]
        for level in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[level](features[level])  # (N, out, H_l, W_l)
            # Resize to the lateral's size: with odd sizes this differs from scale_factor=2.
            # (The reference skips the call when sizes already match; resizing to the same size
            # is an exact identity, so always calling it keeps the graph static.)
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            last_inner = lateral + top_down
            results.insert(0, self._output(level, last_inner, lateral))
        p6 = self.p6(results[-1])  # (N, out, ceil(H5/2), ceil(W5/2))
        p7 = self.p7(F.relu(p6))  # (N, out, ceil(H6/2), ceil(W6/2))
        return [*results, p6, p7]

    def _output(self, level: int, merged: Tensor, lateral: Tensor) -> Tensor:
        """P_level from lateral + top-down (and the lateral's skip, if any)."""
        out = self.layer_blocks[level](merged)
        if self.skip_blocks is not None:
            out = out + self.skip_blocks[level](lateral)
        return out
