"""DyHead visual layer: reference key layout, wiring across levels, DyReLU, batching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from model_export.modeling.deform_conv import modulated_deform_conv2d
from model_export.modeling.dyconv import Glipv2DyConv, Glipv2DyReLU, dyrelu_squeeze_channels

REFERENCE_SHAPES = Path(__file__).parent / "fixtures" / "reference" / "glip_t_state_dict.json"
PREFIX = "rpn.head.dyhead_tower.2."  # the DyConv of the first fusion layer
# GLIP-T's P3-P7 sizes for an 800x1120 input are (100,140) ... (7,9); these are scaled down but
# keep the odd sizes, so DyConv.0's offset maps are larger than its output on every level.
LEVEL_SIZES = [(20, 28), (10, 14), (5, 7), (3, 4), (2, 2)]


def _features(batch: int, channels: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=gen) for h, w in LEVEL_SIZES]


def _small_layer(seed: int = 0) -> Glipv2DyConv:
    """32 channels, 8 groups, with non-trivial norm and offset parameters."""
    torch.manual_seed(seed)
    layer = Glipv2DyConv(32, 8, 4).eval()
    with torch.no_grad():
        for block in layer.DyConv:
            block.bn.weight.uniform_(0.5, 1.5)
            block.bn.bias.normal_(0.0, 0.2)
            block.conv.bias.normal_(0.0, 0.2)
        layer.offset.weight.mul_(10.0)  # offsets of a few pixels
        layer.AttnConv[1].weight.normal_(0.0, 0.3)
        layer.AttnConv[1].bias.fill_(0.5)
    return layer


def _dyrelu_formula(relu: Glipv2DyReLU, x: torch.Tensor) -> torch.Tensor:
    """max(a1 x + b1, a2 x + b2) with [a1, b1, a2, b2] = hsigmoid(fc2(relu(fc1(mean(x)))))."""
    c = x.shape[1]
    fc1, fc2 = relu.fc[0], relu.fc[2]
    hidden = torch.relu(x.mean(dim=(2, 3)) @ fc1.weight.T + fc1.bias)
    s = torch.clamp((hidden @ fc2.weight.T + fc2.bias + 3.0) / 6.0, 0.0, 1.0)
    s = s[:, :, None, None]
    a1 = 2.0 * (s[:, :c] - 0.5) + 1.0
    b1 = s[:, c : 2 * c] - 0.5
    a2 = 2.0 * (s[:, 2 * c : 3 * c] - 0.5)
    b2 = s[:, 3 * c :] - 0.5
    return torch.maximum(a1 * x + b1, a2 * x + b2)


def _reference_forward(layer: Glipv2DyConv, feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """The reference DyConv.forward, step by step, from functional ops."""

    def conv_norm(index: int, x: torch.Tensor, offset, mask, stride: int) -> torch.Tensor:
        block = layer.DyConv[index]
        n = x.shape[0]
        h, w = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
        # Reference kernel: per sample, the first 18*h*w / 9*h*w values of the maps.
        offset = torch.stack([offset[b].contiguous().flatten()[: 18 * h * w] for b in range(n)])
        mask = torch.stack([mask[b].flatten()[: 9 * h * w] for b in range(n)])
        y = modulated_deform_conv2d(
            x,
            offset.view(n, 18, h, w),
            mask.view(n, 9, h, w),
            block.conv.weight,
            block.conv.bias,
            stride,
            1,
            1,
        )
        return F.group_norm(y, 8, block.bn.weight, block.bn.bias, eps=1e-5)

    outputs = []
    for level, feature in enumerate(feats):
        offset_mask = F.conv2d(feature, layer.offset.weight, layer.offset.bias, padding=1)
        offset, mask = offset_mask[:, :18], torch.sigmoid(offset_mask[:, 18:])
        results = [conv_norm(1, feature, offset, mask, 1)]
        if level > 0:
            results.append(conv_norm(2, feats[level - 1], offset, mask, 2))
        if level < len(feats) - 1:
            coarse = conv_norm(0, feats[level + 1], offset, mask, 1)
            results.append(
                F.interpolate(coarse, size=feature.shape[2:], mode="bilinear", align_corners=True)
            )
        attn_conv = layer.AttnConv[1]
        weighted = []
        for result in results:
            pooled = result.mean(dim=(2, 3), keepdim=True)
            logit = torch.relu(F.conv2d(pooled, attn_conv.weight, attn_conv.bias))
            weighted.append(result * torch.clamp((logit + 3.0) / 6.0, 0.0, 1.0))
        outputs.append(_dyrelu_formula(layer.relu, sum(weighted) / len(weighted)))
    return outputs


def test_state_dict_matches_reference_keys() -> None:
    reference = json.loads(REFERENCE_SHAPES.read_text())
    expected = {k[len(PREFIX) :]: shape for k, shape in reference.items() if k.startswith(PREFIX)}
    layer = Glipv2DyConv(256, 16, 4)
    got = {k: list(v.shape) for k, v in layer.state_dict().items()}
    assert got == expected
    assert expected["relu.fc.0.weight"] == [64, 256] and expected["relu.fc.2.weight"] == [1024, 64]


def test_output_shapes_on_five_levels() -> None:
    layer = _small_layer()
    with torch.no_grad():
        out = layer(_features(1, 32, seed=1))
    assert [tuple(o.shape) for o in out] == [(1, 32, h, w) for h, w in LEVEL_SIZES]
    assert all(torch.isfinite(o).all() for o in out)


def test_matches_functional_reference() -> None:
    layer = _small_layer(seed=2).double()
    feats = [f.double() for f in _features(2, 32, seed=3)]
    with torch.no_grad():
        got = layer(feats)
        expected = _reference_forward(layer, feats)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_dyrelu_matches_formula() -> None:
    torch.manual_seed(4)
    relu = Glipv2DyReLU(32, 4)
    with torch.no_grad():
        for p in relu.parameters():
            p.normal_(0.0, 0.5)  # spread coefficients so both branches of the max are used
        x = torch.randn(2, 32, 5, 7)
        got = relu(x)
    torch.testing.assert_close(got, _dyrelu_formula(relu, x), rtol=1e-5, atol=1e-6)
    assert relu.fc[0].weight.shape == (8, 32) and relu.fc[2].weight.shape == (128, 8)


def test_dyrelu_squeeze_rule() -> None:
    assert dyrelu_squeeze_channels(256, 4) == 64
    assert dyrelu_squeeze_channels(64, 4) == 16
    assert dyrelu_squeeze_channels(256, 8) == 32
    assert dyrelu_squeeze_channels(64, 16) == 4
    assert dyrelu_squeeze_channels(100, 6) == 16  # 16 rounds to a multiple of 4


def test_batched_equals_unbatched() -> None:
    """float64, so that a tight tolerance separates per-sample logic errors from rounding."""
    layer = _small_layer(seed=5).double()
    feats = [f.double() for f in _features(2, 32, seed=6)]
    with torch.no_grad():
        batched = layer(feats)
        singles = [layer([f[i : i + 1] for f in feats]) for i in range(2)]
    for level, out in enumerate(batched):
        expected = torch.cat([single[level] for single in singles])
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_reference_initialisation() -> None:
    torch.manual_seed(7)
    layer = Glipv2DyConv(64, 8, 4)
    attn = layer.AttnConv[1]
    assert torch.count_nonzero(attn.bias) == 0
    assert 0.005 < attn.weight.std().item() < 0.015
    bound = 1 / math.sqrt(64 * 9)
    for block in layer.DyConv:
        assert block.conv.weight.abs().max() <= bound
        assert torch.count_nonzero(block.conv.bias) == 0
        assert torch.all(block.bn.weight == 1) and torch.count_nonzero(block.bn.bias) == 0
    assert layer.DyConv[2].conv.stride == 2 and layer.DyConv[0].conv.stride == 1
    assert torch.count_nonzero(layer.offset.weight) > 0  # the reference does not zero offsets


def test_backward_reaches_every_parameter() -> None:
    layer = _small_layer(seed=8).train()
    out = layer(_features(1, 32, seed=9))
    sum(o.square().mean() for o in out).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
