"""Modulated deformable convolution (DCNv2) in plain torch, matching GLIP's CUDA kernel.

The reference (`maskrcnn_benchmark/layers/deform_conv.py`, `ModulatedDeformConv`, backed by
`modulated_deformable_im2col_gpu_kernel` in `csrc/cuda/deform_conv_kernel_cuda.cu`) has no CPU path.
This module reproduces its forward pass exactly:

- offsets: for kernel tap k = i * kw + j (row-major), channel 2k is the vertical offset dy and
  channel 2k + 1 the horizontal offset dx; the same layout as torchvision's `deform_conv2d` and
  ONNX `DeformConv`.
- sampling position: (y * stride - pad + i * dilation + dy, x * stride - pad + j * dilation + dx).
- bilinear sampling as `dmcn_im2col_bilinear`: a position with h <= -1, w <= -1, h >= H or w >= W
  reads 0; otherwise each of the four corners outside the image contributes 0.
- the sample is multiplied by the mask (already through a sigmoid), then contracted with the
  weight as one (O, C*kh*kw) x (C*kh*kw, Ho*Wo) matrix product, then the bias is added.

It also reproduces the reference's missing size check on offsets (`offset_mask_for_output`), which
released GLIP weights depend on. Everything is differentiable by autograd (training works) and
traceable: the only Python loop runs over the kh*kw kernel taps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ModulatedDeformConv2d",
    "conv_output_size",
    "modulated_deform_conv2d",
    "offset_mask_for_output",
]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def conv_output_size(
    in_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> tuple[int, int]:
    """Output (Ho, Wo) of a convolution, with the same integer arithmetic as the reference."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = kernel_hw
    ho = (in_hw[0] + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (in_hw[1] + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    return ho, wo


def _bilinear_sample(input: Tensor, pos_y: Tensor, pos_x: Tensor) -> Tensor:
    """Sample `input` (N, C, H, W) at pixel positions `pos_y`, `pos_x` (N, K, Ho, Wo).

    Returns (N, C, K, Ho, Wo). Boundary rule of the reference `dmcn_im2col_bilinear` plus its
    caller's range check: the sample is 0 unless -1 < y < H and -1 < x < W, and inside that
    range a corner outside the image contributes 0 — exactly `grid_sample`'s bilinear sampling
    with zero padding, whose fused kernel (and backward) is far faster than gathering corners.
    `align_corners=False` maps pixel x to (2x + 1) / W - 1, which needs no division by W - 1.
    """
    n, taps, ho, wo = pos_y.shape
    height, width = input.shape[-2:]
    grid_x = (2 * pos_x + 1) / width - 1
    grid_y = (2 * pos_y + 1) / height - 1
    grid = torch.stack((grid_x, grid_y), dim=-1).view(n, taps * ho, wo, 2)  # (N, K*Ho, Wo, 2)
    sampled = F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # (N, C, K*Ho, Wo)
    return sampled.view(n, input.shape[1], taps, ho, wo)


def offset_mask_for_output(
    offset: Tensor, mask: Tensor, out_hw: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Reproduce the reference kernel's reading of offset/mask maps that are too large.

    GLIP's DyConv computes offsets and masks at level l (H_l, W_l) and also feeds them to
    `DyConv.0` applied to the coarser level l+1, whose output (h, w) is smaller. The CUDA kernel
    never checks the size: for each sample b it reads the first 2K*h*w values of `offset[b]`
    (and K*h*w of `mask[b]`) from memory as if they were laid out [2K, h, w] / [K, h, w]
    (GLIP issue #62). Released weights were trained with this, so it is reproduced exactly:
    flatten each sample (contiguous NCHW order), take the prefix, reshape.

    Args:
        offset: (N, 2K, H_l, W_l). A channel slice of a larger tensor is fine: its per-sample
            prefix is the same as the reference's raw-memory read.
        mask: (N, K, H_l, W_l).
        out_hw: the conv output size (h, w).

    Returns:
        (offset (N, 2K, h, w), mask (N, K, h, w)); the inputs themselves when already (h, w).
    """
    h, w = out_hw  # no int(): under tracing these are traced sizes and must stay dynamic
    if tuple(offset.shape[-2:]) == (h, w) and tuple(mask.shape[-2:]) == (h, w):
        return offset, mask
    n, offset_channels = offset.shape[0], offset.shape[1]
    mask_channels = mask.shape[1]
    if offset.shape[2] * offset.shape[3] < h * w or mask.shape[2] * mask.shape[3] < h * w:
        # The kernel would read past the sample (undefined memory); nothing to reproduce.
        raise ValueError(
            f"offset/mask maps {tuple(offset.shape[-2:])} are smaller than the output {(h, w)}"
        )
    offset = offset.reshape(n, -1)[:, : offset_channels * h * w]  # (N, 2K*H_l*W_l) -> (N, 2K*h*w)
    mask = mask.reshape(n, -1)[:, : mask_channels * h * w]  # (N, K*H_l*W_l) -> (N, K*h*w)
    return (
        offset.reshape(n, offset_channels, h, w),  # (N, 2K*h*w) -> (N, 2K, h, w)
        mask.reshape(n, mask_channels, h, w),  # (N, K*h*w) -> (N, K, h, w)
    )


def modulated_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """Modulated deformable convolution (DCNv2), groups = deformable_groups = 1.

    Args:
        input: (N, C, H, W).
        offset: (N, 2*kh*kw, Ho, Wo); channel 2k is dy and 2k+1 is dx of tap k = i*kw + j.
        mask: (N, kh*kw, Ho, Wo), modulation already through a sigmoid.
        weight: (O, C, kh, kw).
        bias: (O,) or None.

    Returns:
        (N, O, Ho, Wo).

    This plain function is the single entry point of the op: the ONNX exporter can wrap it in an
    `autograd.Function` whose `symbolic` emits ONNX `DeformConv` (opset 19, same offset layout)
    and whose `forward` calls this function. Offsets must already have the output size; the
    reference size quirk is `offset_mask_for_output`'s job.
    """
    if input.dim() != 4:
        raise ValueError(f"expected a 4-D input (N, C, H, W), got shape {tuple(input.shape)}")
    n, c, height, width = input.shape
    out_channels, weight_channels, kh, kw = weight.shape
    if weight_channels != c:
        raise ValueError(f"weight expects {weight_channels} input channels, input has {c}")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    ho, wo = conv_output_size((height, width), (kh, kw), stride, padding, dilation)
    taps = kh * kw
    if tuple(offset.shape) != (n, 2 * taps, ho, wo):
        # Also rejects deformable_groups > 1 (offset would have 2*taps*groups channels).
        raise ValueError(
            f"offset must be {(n, 2 * taps, ho, wo)} (deformable_groups=1), got "
            f"{tuple(offset.shape)}"
        )
    if tuple(mask.shape) != (n, taps, ho, wo):
        raise ValueError(f"mask must be {(n, taps, ho, wo)}, got {tuple(mask.shape)}")

    dtype, device = input.dtype, input.device
    # Undeformed top-left corner of each output position's window, in input pixels.
    base_y = (torch.arange(ho, device=device, dtype=dtype) * sh - ph).view(1, 1, ho, 1)
    base_x = (torch.arange(wo, device=device, dtype=dtype) * sw - pw).view(1, 1, 1, wo)
    tap_y = (torch.arange(kh, device=device, dtype=dtype) * dh).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=device, dtype=dtype) * dw).repeat(kh)
    # (N, 2K, Ho, Wo) -> dy, dx of each tap (N, K, Ho, Wo); sampling positions in input pixels.
    offset = offset.view(n, taps, 2, ho, wo)
    pos_y = base_y + tap_y.view(1, taps, 1, 1) + offset[:, :, 0]
    pos_x = base_x + tap_x.view(1, taps, 1, 1) + offset[:, :, 1]
    sampled = _bilinear_sample(input, pos_y, pos_x)  # (N, C, K, Ho, Wo)
    columns = sampled * mask.view(n, 1, taps, ho, wo)
    # Column row c*K + k matches weight.reshape(O, C*K) (weight is (O, C, kh, kw) row-major).
    columns = columns.reshape(n, c * taps, ho * wo)  # (N, C, K, Ho, Wo) -> (N, C*K, Ho*Wo)
    output = torch.matmul(weight.reshape(out_channels, c * taps), columns)  # (N, O, Ho*Wo)
    if bias is not None:
        output = output + bias.view(1, out_channels, 1)
    return output.reshape(n, out_channels, ho, wo)  # (N, O, Ho*Wo) -> (N, O, Ho, Wo)


class ModulatedDeformConv2d(nn.Module):
    """DCNv2 layer with the parameters of the reference `ModulatedDeformConv` (`weight`, `bias`).

    Offsets and masks are inputs (GLIP computes them once per level with a separate conv and
    shares them between three deformable convs). When they are larger than this conv's output,
    the reference's size quirk is applied (see `offset_mask_for_output`).
    """

    # Export hook: the op `forward` runs, class-wide. `engines.export.export_mode()` swaps in
    # one whose ONNX symbolic is `DeformConv` while exporting; nothing else should change it.
    op = staticmethod(modulated_deform_conv2d)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference init: weight ~ U(-1/sqrt(C*kh*kw), +1/sqrt(C*kh*kw)), bias = 0."""
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.zero_()

    def output_size(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        return conv_output_size(in_hw, self.kernel_size, self.stride, self.padding, self.dilation)

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """input (N, C, H, W), offset (N, 2K, h', w'), mask (N, K, h', w') -> (N, O, Ho, Wo).

        (h', w') is (Ho, Wo), or larger (the reference quirk, reproduced).
        """
        out_hw = self.output_size((input.shape[-2], input.shape[-1]))
        offset, mask = offset_mask_for_output(offset, mask, out_hw)
        return self.op(
            input, offset, mask, self.weight, self.bias, self.stride, self.padding, self.dilation
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )
