"""Modulated deformable conv against a direct, loop-based port of the reference CUDA formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model_export.modeling.deform_conv import (
    ModulatedDeformConv2d,
    modulated_deform_conv2d,
    offset_mask_for_output,
)


def _pixel(image: list[list[float]], y: int, x: int) -> float:
    """One input pixel; 0 outside the image."""
    if 0 <= y < len(image) and 0 <= x < len(image[0]):
        return image[y][x]
    return 0.0


def _bilinear(image: list[list[float]], y: float, x: float) -> float:
    """Scalar bilinear sample with the CUDA rule: 0 unless -1 < y < H and -1 < x < W."""
    height, width = len(image), len(image[0])
    if not (-1 < y < height and -1 < x < width):
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    fy, fx = y - y0, x - x0
    return (
        (1 - fy) * (1 - fx) * _pixel(image, y0, x0)
        + (1 - fy) * fx * _pixel(image, y0, x0 + 1)
        + fy * (1 - fx) * _pixel(image, y0 + 1, x0)
        + fy * fx * _pixel(image, y0 + 1, x0 + 1)
    )


def _loop_deform_conv(
    inp: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    pad: int,
    dilation: int = 1,
) -> torch.Tensor:
    """out[n, o, y, x] = bias[o] + sum_{c, i, j} w[o, c, i, j] * m * bilinear(in[n, c], p).

    offset (N, 2K, Ho, Wo) with channel 2k = dy, 2k+1 = dx; everything in Python floats.
    """
    n_batch, channels = inp.shape[:2]
    out_channels, _, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    image, off, msk, wgt = (t.detach().tolist() for t in (inp, offset, mask, weight))
    bias_list = None if bias is None else bias.detach().tolist()
    out = torch.zeros(n_batch, out_channels, ho, wo, dtype=torch.float64)
    for n in range(n_batch):
        for o in range(out_channels):
            for y in range(ho):
                for x in range(wo):
                    total = 0.0 if bias_list is None else bias_list[o]
                    for i in range(kh):
                        for j in range(kw):
                            k = i * kw + j
                            py = y * stride - pad + i * dilation + off[n][2 * k][y][x]
                            px = x * stride - pad + j * dilation + off[n][2 * k + 1][y][x]
                            m = msk[n][k][y][x]
                            for c in range(channels):
                                total += wgt[o][c][i][j] * m * _bilinear(image[n][c], py, px)
                    out[n, o, y, x] = total
    return out


def _random_case(
    seed: int, n: int = 2, c: int = 3, o: int = 2, hw: tuple[int, int] = (5, 6), ho_wo=None
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    ho, wo = ho_wo or hw
    inp = torch.randn(n, c, *hw, generator=gen, dtype=torch.float64)
    weight = torch.randn(o, c, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(o, generator=gen, dtype=torch.float64)
    offset = (torch.rand(n, 18, ho, wo, generator=gen, dtype=torch.float64) - 0.5) * 4.0
    mask = torch.rand(n, 9, ho, wo, generator=gen, dtype=torch.float64)
    return inp, offset, mask, weight, bias


@pytest.mark.parametrize(("stride", "dilation"), [(1, 1), (2, 1), (1, 2)])
def test_zero_offsets_unit_mask_is_conv2d(stride: int, dilation: int) -> None:
    inp, _, _, weight, bias = _random_case(0, hw=(7, 9))
    pad = dilation
    out = F.conv2d(inp, weight, bias, stride=stride, padding=pad, dilation=dilation)
    offset = torch.zeros(2, 18, *out.shape[2:], dtype=torch.float64)
    mask = torch.ones(2, 9, *out.shape[2:], dtype=torch.float64)
    got = modulated_deform_conv2d(inp, offset, mask, weight, bias, stride, pad, dilation)
    torch.testing.assert_close(got, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
def test_fractional_offsets_match_loop(stride: int) -> None:
    hw = (5, 6)
    ho_wo = ((hw[0] - 1) // stride + 1, (hw[1] - 1) // stride + 1)
    inp, offset, mask, weight, bias = _random_case(stride, hw=hw, ho_wo=ho_wo)
    got = modulated_deform_conv2d(inp, offset, mask, weight, bias, stride, 1, 1)
    expected = _loop_deform_conv(inp, offset, mask, weight, bias, stride, 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_float32_matches_float64_loop() -> None:
    inp, offset, mask, weight, bias = _random_case(7)
    got = modulated_deform_conv2d(
        inp.float(), offset.float(), mask.float(), weight.float(), bias.float(), 1, 1, 1
    )
    expected = _loop_deform_conv(inp, offset, mask, weight, bias, 1, 1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_offset_channel_order_is_dy_then_dx() -> None:
    """A +1 offset in channel 0 (dy of tap 0) moves the sample one row down, not one column."""
    image = torch.arange(20, dtype=torch.float64).view(1, 1, 4, 5)
    weight = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    weight[0, 0, 0, 0] = 1.0  # only tap (0, 0), which samples (y - 1, x - 1) with padding 1
    offset = torch.zeros(1, 18, 4, 5, dtype=torch.float64)
    offset[:, 0] = 1.0  # dy of tap 0 -> samples (y, x - 1)
    offset[:, 1] = 1.0  # dx of tap 0 -> samples (y, x)
    mask = torch.ones(1, 9, 4, 5, dtype=torch.float64)
    got = modulated_deform_conv2d(image, offset, mask, weight, None, 1, 1, 1)
    torch.testing.assert_close(got, image)
    offset[:, 1] = 0.0
    got = modulated_deform_conv2d(image, offset, mask, weight, None, 1, 1, 1)
    expected = F.pad(image, (1, 0))[..., :5]  # (y, x - 1), zero in column 0
    torch.testing.assert_close(got, expected)


def test_border_samples_match_loop_and_kernel_rule() -> None:
    """Absolute sample positions around and beyond the border, incl. (-1, 0) and (H-1, H)."""
    height, width = 4, 5
    targets = [-2.0, -1.0, -0.999, -0.5, -0.25, 0.0, 0.5, 2.3, 3.0, 3.25, 3.5, 3.999, 4.0, 4.5]
    gen = torch.Generator().manual_seed(3)
    inp = torch.randn(1, 2, height, width, generator=gen, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    mask = torch.rand(1, 9, height, width, generator=gen, dtype=torch.float64)
    offset = torch.zeros(1, 18, height, width, dtype=torch.float64)
    ys = torch.arange(height, dtype=torch.float64).view(height, 1)
    xs = torch.arange(width, dtype=torch.float64).view(1, width)
    for k in range(9):
        i, j = divmod(k, 3)
        # Pick target absolute positions that differ per tap and per output pixel.
        ty = torch.tensor(targets, dtype=torch.float64)[(ys.long() * 3 + xs.long() + k) % 14]
        tx = torch.tensor(targets, dtype=torch.float64)[(ys.long() + 5 * xs.long() + 2 * k) % 14]
        offset[0, 2 * k] = ty - (ys - 1 + i)
        offset[0, 2 * k + 1] = tx - (xs - 1 + j) * height / width  # rescaled to reach past W-1
    got = modulated_deform_conv2d(inp, offset, mask, weight, None, 1, 1, 1)
    expected = _loop_deform_conv(inp, offset, mask, weight, None, 1, 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)

    # Hand values of the kernel rule on a single channel, single tap.
    image = torch.arange(1.0, 21.0, dtype=torch.float64).view(1, 1, height, width)
    one_tap = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    one_tap[0, 0, 1, 1] = 1.0  # centre tap samples (y + dy, x + dx)
    cases = {
        (-0.5, 0.0): 0.5 * image[0, 0, 0, 0].item(),  # half of row 0, the other corner is 0
        (-1.0, 0.0): 0.0,  # h <= -1 reads nothing
        (-1.5, 0.0): 0.0,
        (3.5, 0.0): 0.5 * image[0, 0, 3, 0].item(),  # between H-1 and H
        (4.0, 0.0): 0.0,  # h >= H reads nothing
        (0.0, -0.25): 0.75 * image[0, 0, 0, 0].item(),
        (0.0, 4.75): 0.25 * image[0, 0, 0, 4].item(),
        (0.0, 5.0): 0.0,
        (3.0, 4.0): image[0, 0, 3, 4].item(),  # the last pixel exactly
    }
    for (py, px), value in cases.items():
        offset = torch.zeros(1, 18, height, width, dtype=torch.float64)
        offset[0, 8] = py  # tap 4 dy, relative to output pixel (0, 0)
        offset[0, 9] = px
        ones = torch.ones(1, 9, height, width, dtype=torch.float64)
        got = modulated_deform_conv2d(image, offset, ones, one_tap, None, 1, 1, 1)
        assert got[0, 0, 0, 0].item() == pytest.approx(value, abs=1e-12), (py, px)


def test_offset_quirk_reads_per_sample_prefix() -> None:
    """Offset maps (5, 7), output (3, 4): the kernel reads each sample's first 18*h*w values."""
    gen = torch.Generator().manual_seed(11)
    inp = torch.randn(2, 3, 3, 4, generator=gen, dtype=torch.float64)
    offset_mask = torch.randn(2, 27, 5, 7, generator=gen, dtype=torch.float64)
    offset = offset_mask[:, :18]  # a non-contiguous channel slice, as in the reference
    mask = offset_mask[:, 18:].sigmoid()
    conv = ModulatedDeformConv2d(3, 2, kernel_size=3, stride=1, padding=1).double()
    with torch.no_grad():
        conv.bias.normal_(generator=gen)
        got = conv(inp, offset, mask)
    assert got.shape == (2, 2, 3, 4)

    expected_per_sample = []
    for b in range(2):
        offset_b = offset[b].contiguous().flatten()[: 18 * 12].view(1, 18, 3, 4)
        mask_b = mask[b].flatten()[: 9 * 12].view(1, 9, 3, 4)
        expected_per_sample.append(
            _loop_deform_conv(inp[b : b + 1], offset_b, mask_b, conv.weight, conv.bias, 1, 1)
        )
    torch.testing.assert_close(got, torch.cat(expected_per_sample), rtol=1e-12, atol=1e-12)

    q_offset, q_mask = offset_mask_for_output(offset, mask, (3, 4))
    assert q_offset.shape == (2, 18, 3, 4) and q_mask.shape == (2, 9, 3, 4)
    torch.testing.assert_close(q_offset[1].flatten(), offset[1].flatten()[: 18 * 12])


def test_offset_quirk_identity_and_too_small() -> None:
    offset, mask = torch.randn(1, 18, 3, 4), torch.rand(1, 9, 3, 4)
    same_offset, same_mask = offset_mask_for_output(offset, mask, (3, 4))
    assert same_offset is offset and same_mask is mask
    with pytest.raises(ValueError, match="smaller"):
        offset_mask_for_output(offset, mask, (4, 4))


def test_shape_errors() -> None:
    inp, offset, mask, weight, bias = _random_case(0)
    with pytest.raises(ValueError, match="offset"):
        modulated_deform_conv2d(inp, offset[:, :9], mask, weight, bias, 1, 1, 1)
    with pytest.raises(ValueError, match="mask"):
        modulated_deform_conv2d(inp, offset, mask[:, :4], weight, bias, 1, 1, 1)


def test_gradcheck() -> None:
    gen = torch.Generator().manual_seed(5)
    inp = torch.randn(1, 2, 4, 4, generator=gen, dtype=torch.float64)
    # Fractional offsets well away from integer sample positions (where bilinear has kinks).
    offset = torch.rand(1, 18, 2, 2, generator=gen, dtype=torch.float64) * 0.6 + 0.2
    offset = offset * torch.where(torch.rand(1, 18, 2, 2, generator=gen) > 0.5, 1.0, -1.0)
    mask = torch.rand(1, 9, 2, 2, generator=gen, dtype=torch.float64)
    weight = torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(2, generator=gen, dtype=torch.float64)
    tensors = [t.requires_grad_() for t in (inp, offset, mask, weight, bias)]

    def fn(*args: torch.Tensor) -> torch.Tensor:
        return modulated_deform_conv2d(*args, stride=2, padding=1, dilation=1)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6, fast_mode=True)


def test_module_init_and_repr() -> None:
    conv = ModulatedDeformConv2d(16, 8)
    bound = 1 / math.sqrt(16 * 9)
    assert conv.weight.shape == (8, 16, 3, 3) and conv.bias.shape == (8,)
    assert conv.weight.abs().max() <= bound and torch.count_nonzero(conv.bias) == 0
    assert sorted(conv.state_dict()) == ["bias", "weight"]
    assert "stride=1" in repr(conv)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_trace_generalises_to_other_sizes() -> None:
    """A trace (the legacy ONNX exporter's front end) keeps sizes dynamic, quirk included."""
    torch.manual_seed(12)

    class WithOffsets(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = ModulatedDeformConv2d(4, 3, stride=1)

        def forward(self, x: torch.Tensor, offset_mask: torch.Tensor) -> torch.Tensor:
            return self.conv(x, offset_mask[:, :18], offset_mask[:, 18:].sigmoid())

    module = WithOffsets()
    traced = torch.jit.trace(module, (torch.randn(1, 4, 5, 7), torch.randn(1, 27, 10, 14)))
    x, offset_mask = torch.randn(2, 4, 4, 6), torch.randn(2, 27, 8, 12)
    with torch.no_grad():
        torch.testing.assert_close(traced(x, offset_mask), module(x, offset_mask))
