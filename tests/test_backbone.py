"""Swin backbone and FPN: reference key layout, shapes, shifted-window mask, batching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model_export.modeling.backbone import (
    Glipv2SwinBackbone,
    Glipv2SwinBlock,
    relative_position_index,
    shifted_window_mask,
)
from model_export.modeling.config import SwinConfig, get_preset
from model_export.modeling.fpn import Glipv2FPN

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
BODY = "backbone.body."
FPN = "backbone.fpn."
TINY = SwinConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=7)


def _reference_shapes(preset: str, prefix: str) -> dict[str, list[int]]:
    name = {"glip-t": "glip_t_state_dict.json", "glip-l": "glip_l_state_dict.json"}[preset]
    shapes = json.loads((REFERENCE / name).read_text())
    return {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Large random weights, so windows, masks and padding all change the numbers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.3 * noise)
            else:
                param.copy_(0.5 * noise)


def _tiny_backbone(seed: int = 0) -> Glipv2SwinBackbone:
    torch.manual_seed(seed)
    model = Glipv2SwinBackbone(TINY).eval()
    _randomize(model, seed)
    return model


# --- (a) shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(96, 160), (100, 132), (64, 64), (33, 47), (7, 9), (1, 1)])
def test_output_shapes_round_up_at_every_stride(size: tuple[int, int]) -> None:
    model = _tiny_backbone()
    h, w = size
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, h, w))
    assert len(outputs) == 3
    for out, stage in zip(outputs, TINY.out_stages, strict=True):
        stride = 4 * 2**stage
        # every padding step (patch, merge) rounds up, so this is ceil(size / stride)
        expected = (2, TINY.embed_dim * 2**stage, math.ceil(h / stride), math.ceil(w / stride))
        assert tuple(out.shape) == expected
        assert torch.isfinite(out).all()


def test_glip_t_stage_channels() -> None:
    config = get_preset("glip-t").swin
    assert [config.stage_channels()[i] for i in config.out_stages] == [192, 384, 768]


# --- (b) reference key names and shapes --------------------------------------------------------


@pytest.mark.parametrize("preset", ["glip-t", "glip-l"])
def test_state_dict_matches_reference_keys(preset: str) -> None:
    with torch.device("meta"):
        model = Glipv2SwinBackbone(get_preset(preset).swin)
    expected = _reference_shapes(preset, BODY)
    index_keys = {k for k in expected if k.endswith("attn.relative_position_index")}
    assert index_keys  # the reference stores it; we derive it (non-persistent buffer)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: v for k, v in expected.items() if k not in index_keys}
    buffers = {k: list(v.shape) for k, v in model.named_buffers()}
    assert {k: v for k, v in expected.items() if k in index_keys} == buffers


def test_reference_state_dict_loads_strictly() -> None:
    model = Glipv2SwinBackbone(TINY)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    assert not any(k.endswith("relative_position_index") for k in state)


# --- (c) shifted windows against a direct per-token computation ------------------------------


def _direct_block(block: Glipv2SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """One Swin block, token by token, without windows tensors, rolls or masks.

    Each query at (r, c) of the zero-padded map attends to the keys of its (shifted) window,
    except that after the cyclic shift a key is excluded when exactly one of the two tokens was
    wrapped around (original row < shift, or column < shift): such tokens were not neighbours.
    """
    ws, s = block.window_size, block.shift_size
    attn = block.attn
    heads = attn.num_heads
    n, h, w, c = x.shape
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    normed = F.pad(block.norm1(x), (0, 0, 0, wp - w, 0, hp - h))  # zeros after the norm
    q, k, v = attn.qkv(normed).view(n, hp, wp, 3, heads, c // heads).unbind(3)  # (N,Hp,Wp,h,Ch)
    table = attn.relative_position_bias_table  # ((2ws-1)^2, heads)

    rows, cols = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()  # (Hp*Wp,) original coordinates
    srow, scol = (rows - s) % hp, (cols - s) % wp  # coordinates after the cyclic shift
    window = (srow // ws) * (wp // ws) + scol // ws
    wrap_r, wrap_c = rows < s, cols < s
    keys_q, keys_k, keys_v = (t.reshape(n, hp * wp, heads, -1) for t in (q, k, v))

    out = torch.zeros(n, hp * wp, c)
    for p in range(hp * wp):
        allowed = (window == window[p]) & (wrap_r == wrap_r[p]) & (wrap_c == wrap_c[p])
        idx = allowed.nonzero().flatten()
        d_row = srow[p] % ws - srow[idx] % ws + ws - 1
        d_col = scol[p] % ws - scol[idx] % ws + ws - 1
        bias = table[d_row * (2 * ws - 1) + d_col]  # (K, heads)
        logits = torch.einsum("nhd,nkhd->nhk", keys_q[:, p], keys_k[:, idx]) * attn.scale
        weights = (logits + bias.T).softmax(-1)  # (N, heads, K)
        out[:, p] = torch.einsum("nhk,nkhd->nhd", weights, keys_v[:, idx]).reshape(n, c)
    out = attn.proj(out).view(n, hp, wp, c)[:, :h, :w]
    x = x + out
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize(("shift", "size"), [(2, (6, 9)), (0, (6, 9)), (2, (8, 4)), (2, (3, 3))])
def test_block_matches_direct_token_loop(shift: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    ws = 4
    block = Glipv2SwinBlock(8, 2, ws, shift, 2.0, drop_path=0.0, eps=1e-5).eval()
    _randomize(block, 1)
    with torch.no_grad():
        block.attn.relative_position_bias_table.mul_(4.0)
    h, w = size
    x = torch.randn(2, h, w, 8)
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    mask = shifted_window_mask(hp, wp, ws, max(shift, 1), x.device, x.dtype)
    with torch.no_grad():
        expected = _direct_block(block, x)
        got = block(x, mask)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        if shift:
            # the check is sensitive: without the mask tokens leak across regions
            unmasked = block(x, torch.zeros_like(mask))
            assert (unmasked - expected).abs().max() > 1e-2


def test_shift_mask_regions() -> None:
    # 14x14 padded map, window 7, shift 3: only the last window row/column is split.
    mask = shifted_window_mask(14, 14, 7, 3, torch.device("cpu"), torch.float32)
    assert mask.shape == (4, 49, 49)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert (mask[0] == 0).all()  # top-left window: one region
    local = torch.arange(49)
    lr, lc = local // 7, local % 7
    # window (0, 1): columns split at local column 4 (= 7 - 3) into two regions
    same_col_part = (lc[:, None] >= 4) == (lc[None, :] >= 4)
    assert torch.equal(mask[1] == 0, same_col_part)
    # window (1, 1): four regions
    same_row_part = (lr[:, None] >= 4) == (lr[None, :] >= 4)
    assert torch.equal(mask[3] == 0, same_col_part & same_row_part)


# --- (d) relative position index ---------------------------------------------------------------


@pytest.mark.parametrize("ws", [7, 12])
def test_relative_position_index_formula(ws: int) -> None:
    index = relative_position_index(ws)
    assert index.shape == (ws * ws, ws * ws)
    assert index.dtype == torch.int64
    for i in range(0, ws * ws, 5):
        for j in range(0, ws * ws, 3):
            (ri, ci), (rj, cj) = divmod(i, ws), divmod(j, ws)
            assert index[i, j] == (ri - rj + ws - 1) * (2 * ws - 1) + (ci - cj + ws - 1)
    assert index.min() == 0 and index.max() == (2 * ws - 1) ** 2 - 1
    assert torch.equal(index.diagonal(), torch.full((ws * ws,), (2 * ws - 1) * (ws - 1) + ws - 1))


def test_relative_position_index_is_not_persistent() -> None:
    model = Glipv2SwinBackbone(TINY)
    assert "layers.0.blocks.0.attn.relative_position_index" in dict(model.named_buffers())
    assert "layers.0.blocks.0.attn.relative_position_index" not in model.state_dict()


# --- (e) FPN -----------------------------------------------------------------------------------


def _fpn_features(sizes: list[tuple[int, int]], channels: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    pairs = zip(channels, sizes, strict=True)
    return [torch.randn(1, ch, h, w, generator=gen) for ch, (h, w) in pairs]


def test_fpn_glip_t_level_sizes() -> None:
    fpn = Glipv2FPN((192, 384, 768), 256).eval()
    feats = _fpn_features([(100, 140), (50, 70), (25, 35)], (192, 384, 768))  # 800x1120 input
    with torch.no_grad():
        levels = fpn(feats)
    sizes = [tuple(t.shape[-2:]) for t in levels]
    assert sizes == [(100, 140), (50, 70), (25, 35), (13, 18), (7, 9)]
    assert all(t.shape[:2] == (1, 256) for t in levels)


def _nearest_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize by explicit index: out[i] = in[floor(i * in_size / out_size)]."""
    rows = torch.arange(size[0]) * x.shape[-2] // size[0]
    cols = torch.arange(size[1]) * x.shape[-1] // size[1]
    return x[..., rows[:, None], cols[None, :]]


def test_fpn_odd_sizes_upsample_to_the_lateral_size() -> None:
    channels = (8, 16, 32)
    torch.manual_seed(0)
    fpn = Glipv2FPN(channels, 12).eval()
    _randomize(fpn, 2)
    feats = _fpn_features([(13, 17), (7, 9), (4, 5)], channels)  # a 100x132 input
    with torch.no_grad():
        levels = fpn(feats)
        inner = [conv(f) for conv, f in zip(fpn.inner_blocks, feats, strict=True)]
        top5 = inner[2]
        top4 = inner[1] + _nearest_to(top5, (7, 9))
        top3 = inner[0] + _nearest_to(top4, (13, 17))
        p3, p4, p5 = (conv(t) for conv, t in zip(fpn.layer_blocks, (top3, top4, top5), strict=True))
        p6 = fpn.p6(p5)  # from P5, not C5 (the reference's use_P5 is always true here)
        p7 = fpn.p7(torch.relu(p6))
    assert [tuple(t.shape[-2:]) for t in levels] == [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)]
    for got, expected in zip(levels, [p3, p4, p5, p6, p7], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_fpn_lateral_skip_starts_as_the_plain_fpn_and_adds_each_lateral() -> None:
    """Zero-initialised, a grown FPN computes what it did; weighted, P3-P5 gain a 1x1 conv of
    their own lateral (P6, P7 follow P5)."""
    channels = (8, 16, 32)
    torch.manual_seed(0)
    plain = Glipv2FPN(channels, 12).eval()
    _randomize(plain, 2)
    grown = Glipv2FPN(channels, 12, lateral_skip=True).eval()
    missing, unexpected = grown.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == {f"skip_blocks.{i}.{leaf}" for i in range(3)
                            for leaf in ("weight", "bias")} and not unexpected
    feats = _fpn_features([(13, 17), (7, 9), (4, 5)], channels)
    with torch.no_grad():
        before = plain(feats)
        for got, expected in zip(grown(feats), before, strict=True):
            torch.testing.assert_close(got, expected, atol=0, rtol=0)
        for conv in grown.skip_blocks:
            conv.weight.normal_()
        after = grown(feats)
        inner = [conv(f) for conv, f in zip(grown.inner_blocks, feats, strict=True)]
        for level in range(3):
            torch.testing.assert_close(after[level] - before[level],
                                       grown.skip_blocks[level](inner[level]),
                                       atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(after[3], grown.p6(after[2]), atol=1e-5, rtol=1e-5)


def test_fpn_keys_match_reference_shapes() -> None:
    fpn = Glipv2FPN((192, 384, 768), 256)
    reference = _reference_shapes("glip-t", FPN)
    rename = {f"fpn_inner{i + 2}": f"inner_blocks.{i}" for i in range(3)}
    rename |= {f"fpn_layer{i + 2}": f"layer_blocks.{i}" for i in range(3)}
    rename |= {"top_blocks.p6": "p6", "top_blocks.p7": "p7"}
    expected = {}
    for key, shape in reference.items():
        module, leaf = key.rsplit(".", 1)
        expected[f"{rename[module]}.{leaf}"] = shape
    assert {k: list(v.shape) for k, v in fpn.state_dict().items()} == expected


# --- (f) batching, stochastic depth ------------------------------------------------------------


def test_batched_equals_unbatched() -> None:
    model = _tiny_backbone(3)
    images = torch.randn(3, 3, 100, 132)
    with torch.no_grad():
        batched = model(images)
        single = [model(images[i : i + 1]) for i in range(3)]
    for level, out in enumerate(batched):
        expected = torch.cat([s[level] for s in single])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_drop_path_only_in_training() -> None:
    model = _tiny_backbone(4)
    model.layers[3].blocks[0].drop_path.drop_prob = 0.5
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        eval_a, eval_b = model(images), model(images)
        torch.testing.assert_close(eval_a, eval_b, atol=0.0, rtol=0.0)
        model.train()
        torch.manual_seed(0)
        train = model(images)
    assert (train[-1] - eval_a[-1]).abs().max() > 1e-3
    with torch.device("meta"):
        glip_t = Glipv2SwinBackbone(get_preset("glip-t").swin)
    rates = [block.drop_path.drop_prob for stage in glip_t.layers for block in stage.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert rates == sorted(rates)
