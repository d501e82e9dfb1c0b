"""Fusion tower parts: cross-attention masking, the text layer against transformers' BertLayer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.models.bert.modeling_bert import BertLayer

from model_export.modeling.config import FusionConfig, LanguageConfig, get_preset
from model_export.modeling.cross_attention import (
    Glipv2BiAttention,
    Glipv2VLFuse,
    LevelPositions,
    region_centres,
)
from model_export.modeling.fusion import Glipv2FusionTower, box_bias, colour_regions
from model_export.modeling.language import TextFeatures, bert_config, extended_attention_mask
from model_export.modeling.text_layer import Glipv2TextLayer

LANG = LanguageConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
FUSION = FusionConfig(num_layers=2, channels=16, embed_dim=32, num_heads=4, group_norm_groups=4)


def _mask(valid: list[int], length: int) -> torch.Tensor:
    return torch.tensor([[1] * v + [0] * (length - v) for v in valid])


def test_bi_attention_matches_per_head_formula() -> None:
    torch.manual_seed(0)
    attn = Glipv2BiAttention(16, 32, 32, 4, dropout=0.0, clamp=50000.0).eval()
    v, lang, mask = torch.randn(2, 7, 16), torch.randn(2, 5, 32), _mask([5, 3], 5)
    delta_v, delta_l = attn(v, lang, mask)

    heads, d = 4, 8
    q = (attn.v_proj(v) * d**-0.5).view(2, 7, heads, d)
    k = attn.l_proj(lang).view(2, 5, heads, d)
    vv = attn.values_v_proj(v).view(2, 7, heads, d)
    vl = attn.values_l_proj(lang).view(2, 5, heads, d)
    scores = torch.einsum("nrhd,nthd->nhrt", q, k)
    masked = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    out_v = torch.einsum("nhrt,nthd->nrhd", masked.softmax(-1), vl).reshape(2, 7, 32)
    out_l = torch.einsum("nhrt,nrhd->nthd", scores.softmax(2), vv).reshape(2, 5, 32)
    torch.testing.assert_close(delta_v, attn.out_v_proj(out_v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta_l, attn.out_l_proj(out_l), atol=1e-5, rtol=1e-5)


def test_vl_fuse_ignores_padding_and_its_amount() -> None:
    """Valid outputs do not depend on pad features or on how many pad slots a batch adds."""
    torch.manual_seed(1)
    fuse = Glipv2VLFuse(16, 32, FUSION).eval()
    visual = [torch.randn(1, 16, 4, 6), torch.randn(1, 16, 2, 3)]
    text = torch.randn(1, 4, 32)
    short_v, short_l = fuse(visual, text, _mask([4], 4))
    padded = torch.cat([text, 100 * torch.randn(1, 9, 32)], dim=1)
    long_v, long_l = fuse(visual, padded, _mask([4], 13))
    for a, b in zip(short_v, long_v, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short_l, long_l[:, :4], atol=1e-5, rtol=1e-5)
    assert [tuple(x.shape) for x in long_v] == [(1, 16, 4, 6), (1, 16, 2, 3)]


def test_text_layer_equals_transformers_bert_layer() -> None:
    torch.manual_seed(2)
    ours = Glipv2TextLayer(LANG, clamp=50000.0).eval()
    theirs = BertLayer(bert_config(LANG)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=False)
    missing = set(theirs.state_dict()) - set(ours.state_dict())
    assert not missing, f"text layer lacks BERT parameters {missing}"
    hidden, mask = torch.randn(2, 6, 32), _mask([6, 2], 6)
    expected = theirs(hidden, attention_mask=extended_attention_mask(mask, hidden.dtype))
    expected = expected[0] if isinstance(expected, tuple) else expected  # a tuple before v5
    torch.testing.assert_close(ours(hidden, mask), expected, atol=1e-5, rtol=1e-5)


def test_text_layer_clamps_overflow() -> None:
    layer = Glipv2TextLayer(LANG, clamp=5.0).eval()
    with torch.no_grad():
        layer.output.LayerNorm.weight.fill_(100.0)
    out = layer(torch.randn(1, 3, 32), _mask([3], 3))
    assert out.abs().max() <= 5.0


def test_causal_mode_is_unidirectional_and_image_ignores_text() -> None:
    """Captioning mode: token i sees only tokens <= i; the image side never depends on text."""
    torch.manual_seed(3)
    tower = Glipv2FusionTower(FUSION, LANG).eval()
    visual = [torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 4), torch.randn(1, 16, 2, 2),
              torch.randn(1, 16, 1, 1), torch.randn(1, 16, 1, 1)]
    mask = _mask([6], 6)
    text = torch.randn(1, 6, 32)
    changed = text.clone()
    changed[:, 4:] = torch.randn(1, 2, 32)
    with torch.no_grad():
        v_a, l_a = tower(visual, TextFeatures(text, text, mask), causal=True)
        v_b, l_b = tower(visual, TextFeatures(changed, changed, mask), causal=True)
        v_c, _ = tower(visual, TextFeatures(changed, changed, mask), causal=False)
    torch.testing.assert_close(l_a[:, :4], l_b[:, :4], atol=1e-5, rtol=1e-5)
    assert (l_a[:, 4:] - l_b[:, 4:]).abs().max() > 1e-3
    for a, b in zip(v_a, v_b, strict=True):
        torch.testing.assert_close(a, b)
    assert max((a - c).abs().max() for a, c in zip(v_a, v_c, strict=True)) > 1e-4


def test_caption_prefix_equals_full_causal_pass() -> None:
    """Decoding with the image side computed once gives the full causal pass's outputs, and
    keys and values of every text layer for the cache."""
    torch.manual_seed(4)
    tower = Glipv2FusionTower(FUSION, LANG).eval()
    visual = [torch.randn(2, 16, 6, 6), torch.randn(2, 16, 3, 3), torch.randn(2, 16, 2, 2),
              torch.randn(2, 16, 1, 1), torch.randn(2, 16, 1, 1)]
    text = TextFeatures(torch.randn(2, 5, 32), torch.randn(2, 5, 32), _mask([5, 3], 5))
    with torch.no_grad():
        full_visual, full_text = tower(visual, text, causal=True)
        states, cached_visual = tower.caption_image_states(visual)
        cached_text, keys, values = tower.caption_prefix(states, text)
    torch.testing.assert_close(cached_text, full_text)
    for a, b in zip(cached_visual, full_visual, strict=True):
        torch.testing.assert_close(a, b)
    assert keys.shape == values.shape == (2, FUSION.num_layers, LANG.num_heads, 5, 8)
    assert len(states.tensors()) == FUSION.num_layers + 1  # regions per layer, centres
    rebuilt = tower.caption_states(states.tensors())
    assert [t.data_ptr() for t in rebuilt.tensors()] == [t.data_ptr() for t in states.tensors()]


def test_attend_regions_equals_projected_attention() -> None:
    """The folded token side gives what projecting every region gives: `forward`'s delta_l
    (update_visual False), and with a region bias the per-head formula with it added."""
    torch.manual_seed(6)
    attn = Glipv2BiAttention(16, 32, 32, 4, dropout=0.0, clamp=50000.0, image_values=True,
                             pixel_colours=True).eval()
    with torch.no_grad():  # zero-initialised paths: weight them so they count
        for linear in (attn.out_image_proj, attn.values_colour_proj):
            assert linear is not None
            linear.weight.normal_()
            linear.bias.normal_()
        attn.v_proj.bias.normal_()
        attn.values_v_proj.bias.normal_()
    v, lang, mask = torch.randn(2, 7, 16), torch.randn(2, 5, 32), _mask([5, 5], 5)
    image, colours = torch.randn(2, 7, 16), torch.randn(2, 7, 3)
    with torch.no_grad():
        _, expected = attn(v, lang, mask, update_visual=False, image=image, colours=colours)
        got = attn.attend_regions(v, lang, image, colours)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

        bias = torch.where(torch.rand(2, 5, 7) < 0.5, -1e4, 0.0)
        heads, d = 4, 8
        q = (attn.v_proj(v) * d**-0.5).view(2, 7, heads, d)
        k = attn.l_proj(lang).view(2, 5, heads, d)
        scores = torch.einsum("nrhd,nthd->nhtr", q, k) + bias[:, None]
        probs = scores.softmax(-1)
        values = {"v": attn.values_v_proj(v).view(2, 7, heads, d),
                  "image": (attn.values_image_proj(image)
                            + attn.values_colour_proj(colours)).view(2, 7, heads, d)}
        pooled = {name: torch.einsum("nhtr,nrhd->nthd", probs, value).reshape(2, 5, 32)
                  for name, value in values.items()}
        expected = attn.out_l_proj(pooled["v"]) + attn.out_image_proj(pooled["image"])
        got = attn.attend_regions(v, lang, image, colours, bias)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pixel_colours needs the regions' colours"):
        attn.attend_regions(v, lang, image)


def test_region_centres_are_cell_centres_in_flatten_order() -> None:
    centres = region_centres([(2, 3), (1, 2)], (8, 16))
    assert centres.tolist() == [[4.0, 4.0], [12.0, 4.0], [20.0, 4.0], [4.0, 12.0], [12.0, 12.0],
                                [20.0, 12.0], [8.0, 8.0], [24.0, 8.0]]


def test_box_bias_keeps_a_token_inside_its_box() -> None:
    """A boxed token scores 0 at the centres inside [x0, x1) x [y0, y1) and far below
    elsewhere; an all-zero box, or a box holding no centre, changes no token's attention."""
    centres = region_centres([(2, 3)], (8,)).unsqueeze(0)  # (1, 6, 2)
    boxes = torch.tensor([[[0.0, 0.0, 12.0, 16.0], [0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 6.0, 6.0]]])
    bias = box_bias(centres, boxes)
    assert bias.shape == (1, 3, 6)
    assert (bias[0, 0] == 0).tolist() == [True, False, False, True, False, False]
    assert bias[0, 0].min() <= -1e4
    outside = bias[0, 2]
    assert bool((bias[0, 1] == 0).all()) and bool((outside == outside[0]).all())


def test_caption_prefix_token_boxes_read_only_their_box() -> None:
    """A token on a box reads the regions inside it only: changing the image outside the box
    leaves its features alone but changes a free token's; zero boxes are the plain pass."""
    torch.manual_seed(5)
    # One layer: its regions are the input's, which DyConv has not mixed with their neighbours.
    tower = Glipv2FusionTower(dataclasses.replace(FUSION, num_layers=1), LANG).eval()
    visual = [torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 4), torch.randn(1, 16, 2, 2),
              torch.randn(1, 16, 1, 1), torch.randn(1, 16, 1, 1)]
    text = TextFeatures(torch.randn(1, 3, 32), torch.randn(1, 3, 32), _mask([3], 3))
    boxes = torch.zeros(1, 3, 4)
    boxes[0, 0] = torch.tensor([0.0, 0.0, 32.0, 32.0])  # the top-left P3 and P4 cells only
    changed = [v.clone() for v in visual]
    changed[0][..., 4:, 4:] = torch.randn(1, 16, 4, 4)  # P3 cells outside the box
    with torch.no_grad():
        states, _ = tower.caption_image_states(visual)
        moved, _ = tower.caption_image_states(changed)
        fused = tower.caption_prefix(states, text, boxes)[0]
        fused_moved = tower.caption_prefix(moved, text, boxes)[0]
        torch.testing.assert_close(tower.caption_prefix(states, text, torch.zeros(1, 3, 4))[0],
                                   tower.caption_prefix(states, text)[0])
    torch.testing.assert_close(fused[0, 0], fused_moved[0, 0])
    assert (fused[0, 1] - fused_moved[0, 1]).abs().max() > 1e-3


def _positions(channels: int = 16) -> LevelPositions:
    torch.manual_seed(0)
    positions = LevelPositions(channels, strides=(8, 16, 32, 64, 128))
    with torch.no_grad():
        positions.proj.weight.normal_()
        positions.proj.bias.normal_()
    return positions


def test_level_positions_do_not_depend_on_padding() -> None:
    """A cell keeps its position features whatever the padded size of the batch around it."""
    positions = _positions()
    small = [(4, 6), (2, 3), (1, 2), (1, 1), (1, 1)]
    padded = [(5, 8), (3, 4), (2, 2), (1, 1), (1, 1)]
    a, b = positions(small)[0], positions(padded)[0]
    assert a.shape == (sum(h * w for h, w in small), 16)
    for level in range(5):
        (h, w), (ph, pw) = small[level], padded[level]
        start_a = sum(y * x for y, x in small[:level])
        start_b = sum(y * x for y, x in padded[:level])
        grid_a = a[start_a:start_a + h * w].view(h, w, -1)
        grid_b = b[start_b:start_b + ph * pw].view(ph, pw, -1)
        torch.testing.assert_close(grid_a, grid_b[:h, :w])


def test_level_positions_tell_left_from_right_and_levels_apart() -> None:
    positions = _positions()
    features = positions([(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)])[0]
    p3 = features[:6].view(2, 3, -1)
    assert not torch.allclose(p3[0, 0], p3[0, 1])  # neighbours along x
    assert not torch.allclose(p3[0, 0], p3[1, 0])  # neighbours along y
    assert not torch.allclose(features[6], p3[0, 0])  # P4's first cell is elsewhere (stride 16)


def test_vl_fuse_with_fresh_positions_computes_what_it_did_without() -> None:
    """Zero-initialised: a model grown from one without positions starts out unchanged."""
    torch.manual_seed(0)
    plain = Glipv2VLFuse(16, 32, FUSION).eval()
    grown = Glipv2VLFuse(16, 32, dataclasses.replace(FUSION, position_encoding=True),
                         strides=(8, 16, 32, 64, 128)).eval()
    missing = set(grown.load_state_dict(plain.state_dict(), strict=False).missing_keys)
    assert missing == {"positions.proj.weight", "positions.proj.bias"}
    visual = [torch.randn(2, 16, 4 // 2**i or 1, 6 // 2**i or 1) for i in range(5)]
    lang, mask = torch.randn(2, 5, 32), _mask([5, 3], 5)
    for causal in (False, True):
        (v_plain, l_plain), (v_grown, l_grown) = (
            module(visual, lang, mask, causal) for module in (plain, grown))
        torch.testing.assert_close(l_grown, l_plain)
        for a, b in zip(v_grown, v_plain, strict=True):
            torch.testing.assert_close(a, b)
    with torch.no_grad():
        grown.positions.proj.bias.fill_(1.0)
    assert not torch.allclose(grown(visual, lang, mask)[1], l_plain)


def test_fresh_image_values_compute_what_the_fusion_did_without() -> None:
    """Zero-initialised: a tower grown with image_values starts out unchanged; once trained,
    tokens read the tower's input regions in every layer, in both modes."""
    torch.manual_seed(0)
    plain = Glipv2FusionTower(FUSION, LANG).eval()
    grown = Glipv2FusionTower(dataclasses.replace(FUSION, image_values=True), LANG).eval()
    missing = set(grown.load_state_dict(plain.state_dict(), strict=False).missing_keys)
    assert missing == {f"layers.{i}.vl_fuse.{name}" for i in range(2) for name in (
        "layer_norm_image.weight", "layer_norm_image.bias", "attn.values_image_proj.weight",
        "attn.values_image_proj.bias", "attn.out_image_proj.weight", "attn.out_image_proj.bias")}
    visual = [torch.randn(2, 16, h, w) for h, w in [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]]
    hidden, mask = torch.randn(2, 5, 32), _mask([5, 3], 5)
    text = TextFeatures(hidden=hidden, embedded=hidden * mask[..., None], mask=mask)
    for causal in (False, True):
        torch.testing.assert_close(grown(visual, text, causal)[1], plain(visual, text, causal)[1])
    states, _ = grown.caption_image_states(visual)
    assert len(states.input_regions) == 2 and len(states.tensors()) == 5  # + regions, centres
    torch.testing.assert_close(grown.caption_prefix(states, text)[0],
                               grown(visual, text, True)[1])
    with torch.no_grad():
        grown.layers[1].vl_fuse.attn.out_image_proj.bias.fill_(1.0)
    changed = grown(visual, text)[1]
    assert not torch.allclose(changed, plain(visual, text)[1])
    torch.testing.assert_close(grown.caption_prefix(states, text)[0],
                               grown(visual, text, True)[1])


def test_fresh_pixel_colours_compute_what_the_fusion_did_without() -> None:
    """Zero-initialised: a tower grown with pixel_colours starts out unchanged; once trained,
    tokens read the colours in every layer and both modes, and the caption cache carries them."""
    torch.manual_seed(0)
    with_values = dataclasses.replace(FUSION, image_values=True)
    plain = Glipv2FusionTower(with_values, LANG).eval()
    grown = Glipv2FusionTower(dataclasses.replace(with_values, pixel_colours=True), LANG).eval()
    missing = set(grown.load_state_dict(plain.state_dict(), strict=False).missing_keys)
    assert missing == {f"layers.{i}.vl_fuse.attn.values_colour_proj.{p}" for i in range(2)
                       for p in ("weight", "bias")}
    with torch.no_grad():  # trained image values, so the colours' path reaches the tokens
        for layer in plain.layers:
            layer.vl_fuse.attn.out_image_proj.weight.normal_()
    grown.load_state_dict(plain.state_dict(), strict=False)
    visual = [torch.randn(2, 16, h, w) for h, w in [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]]
    colours = torch.randn(2, 3, 8, 12)
    hidden, mask = torch.randn(2, 5, 32), _mask([5, 3], 5)
    text = TextFeatures(hidden=hidden, embedded=hidden * mask[..., None], mask=mask)
    for causal in (False, True):
        torch.testing.assert_close(grown(visual, text, causal, colours)[1],
                                   plain(visual, text, causal)[1])
    with pytest.raises(ValueError, match="pass the image's colour map"):
        grown(visual, text)
    with torch.no_grad():
        for layer in grown.layers:
            layer.vl_fuse.attn.values_colour_proj.weight.normal_()
    red, blue = colours.clone(), colours.clone()
    red[:, :, :4, :6], blue[:, :, :4, :6] = 2.0, -2.0
    assert not torch.allclose(grown(visual, text, False, red)[1],
                              grown(visual, text, False, blue)[1])
    states, _ = grown.caption_image_states(visual, colours)
    assert states.colours is not None and len(states.tensors()) == 6
    assert states.colours.shape == (2, 8 * 12 + 4 * 6 + 2 * 3 + 2 + 1, 3)
    torch.testing.assert_close(grown.caption_prefix(states, text)[0],
                               grown(visual, text, True, colours)[1])


def test_fresh_colour_levels_compute_what_the_fusion_did_without() -> None:
    """Zero-initialised: a tower grown with colour_levels starts out unchanged; once trained,
    the fused P3-P5 levels carry their cells' colours in both modes (P6, P7 and the tokens do
    not change), and the colour map is required."""
    torch.manual_seed(0)
    with_colours = dataclasses.replace(FUSION, image_values=True, pixel_colours=True)
    plain = Glipv2FusionTower(with_colours, LANG).eval()
    grown = Glipv2FusionTower(dataclasses.replace(with_colours, colour_levels=True), LANG).eval()
    missing = set(grown.load_state_dict(plain.state_dict(), strict=False).missing_keys)
    assert missing == {f"colour_levels.embed.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    visual = [torch.randn(2, 16, h, w) for h, w in [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]]
    colours = torch.randn(2, 3, 8, 12)
    hidden, mask = torch.randn(2, 5, 32), _mask([5, 3], 5)
    text = TextFeatures(hidden=hidden, embedded=hidden * mask[..., None], mask=mask)
    for causal in (False, True):
        for got, want in zip(grown(visual, text, causal, colours)[0],
                             plain(visual, text, causal, colours)[0], strict=True):
            torch.testing.assert_close(got, want)
    with torch.no_grad():
        grown.colour_levels.embed[2].weight.normal_()
    red, blue = colours.clone(), colours.clone()
    red[:, :, :4, :6], blue[:, :, :4, :6] = 2.0, -2.0
    for causal in (False, True):
        (red_levels, red_text), (blue_levels, blue_text) = (
            grown(visual, text, causal, c) for c in (red, blue))
        for level in range(3):  # the changed cells are under P3-P5's top-left quarter
            assert not torch.allclose(red_levels[level][..., :1, :1],
                                      blue_levels[level][..., :1, :1])
            torch.testing.assert_close(red_levels[level][..., -1:, -1:],
                                       blue_levels[level][..., -1:, -1:])
        for level in (3, 4):
            torch.testing.assert_close(red_levels[level], blue_levels[level])
        torch.testing.assert_close(red_text, blue_text)
    _, fused = grown.caption_image_states(visual, red)
    for got, want in zip(fused, grown(visual, text, True, red)[0], strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="pass the image's colour map"):
        grown(visual, text)


def test_colour_regions_average_p3_cells_per_level() -> None:
    """P3 cells as they are, P4 and P5 the mean of 2x2 and 4x4 of them, P6 and P7 zeros; a colour
    map of another size than P3 is an error."""
    colours = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    regions = colour_regions(colours, sizes)
    assert regions.shape == (2, 96 + 24 + 6 + 2 + 1, 3)
    torch.testing.assert_close(regions[:, :96], colours.flatten(2).transpose(1, 2))
    torch.testing.assert_close(regions[1, 96], colours[1, :, :2, :2].mean(dim=(1, 2)))
    torch.testing.assert_close(regions[0, 96 + 24 + 5], colours[0, :, 4:, 8:].mean(dim=(1, 2)))
    assert not regions[:, 126:].any()
    with pytest.raises(ValueError, match="does not match level P3"):
        colour_regions(colours[..., :10], sizes)
    with pytest.raises(ValueError, match=r"pixel_colours needs fusion\.image_values"):
        small = get_preset("small")
        small.fusion = dataclasses.replace(small.fusion, image_values=False)
        small.validate()
    with pytest.raises(ValueError, match=r"colour_levels needs fusion\.pixel_colours"):
        small = get_preset("small")
        small.fusion = dataclasses.replace(small.fusion, pixel_colours=False)
        small.validate()
