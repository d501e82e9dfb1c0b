"""`glipv2 convert`: released GLIP checkpoints map strictly onto the glip-t / glip-l presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli.main import main as cli_main
from model_export.checkpoints.convert import (
    SUMMARY_LINES_PER_KIND,
    ConversionReport,
    checkpoint_name,
    config_for_checkpoint,
    map_state_dict,
    our_name,
)
from model_export.checkpoints.weights import load_model
from model_export.modeling.config import get_preset
from model_export.modeling.model import Glipv2Model

from conftest import fake_state, reference_shapes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def glip_t_state(glip_t_vector_checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(glip_t_vector_checkpoint, weights_only=True)["model"]


def _write(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"model": state}, path)
    return path


def test_glip_t_converts_and_loads_strictly(glip_t_vector_checkpoint: Path,
                                            glip_t_state: dict[str, torch.Tensor],
                                            tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["convert", str(glip_t_vector_checkpoint), "--preset", "glip-t",
                     "--out", str(tmp_path)]) == 0
    summary = capsys.readouterr().out
    assert ("mapped 726, derived buffers verified 18, ignored 2, unmapped 0, missing 0, "
            "mismatched 0") in summary
    assert ("  ignored: module.rpn.head.cls_logits.weight (class-logit conv of closed-set "
            "training)") in summary.splitlines()

    model = load_model(tmp_path)  # strict: raises on any missing or unexpected key
    ours = model.state_dict()
    pairs = {
        "module.backbone.body.layers.2.blocks.5.attn.qkv.weight":
            "backbone.layers.2.blocks.5.attn.qkv.weight",
        "module.backbone.fpn.fpn_inner3.weight": "fpn.inner_blocks.1.weight",
        "module.backbone.fpn.top_blocks.p7.bias": "fpn.p7.bias",
        "module.language_backbone.body.model.encoder.layer.11.output.dense.weight":
            "language.bert.encoder.layer.11.output.dense.weight",
        "module.rpn.head.dyhead_tower.15.b_attn.attn.values_l_proj.weight":
            "fusion.layers.5.vl_fuse.attn.values_l_proj.weight",
        "module.rpn.head.dyhead_tower.16.attention.self.key.bias":
            "fusion.layers.5.text_layer.attention.self.key.bias",
        "module.rpn.head.dyhead_tower.17.relu.fc.2.weight":
            "fusion.layers.5.dyconv.relu.fc.2.weight",
        "module.rpn.head.scales.4.scale": "head.scales.4.scale",
        "module.rpn.head.bias0": "head.bias0",
    }
    for theirs, mine in pairs.items():
        assert torch.equal(glip_t_state[theirs], ours[mine]), theirs
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert set(stored) == set(ours)


def test_glip_l_maps_every_key_and_loads_strictly() -> None:
    state = {k[len("module."):]: v for k, v in fake_state("glip-l", seed=1).items()}
    config = config_for_checkpoint("glip-l", state)
    mapped, report = map_state_dict(state, config)
    assert report.ok, report.summary()
    assert (len(report.mapped), len(report.verified)) == (1022 - 2 - 24 - 1 - 5, 24 + 1 + 5)
    assert set(report.ignored) == {"rpn.head.cls_logits.weight", "rpn.head.cls_logits.bias"}
    with torch.device("meta"):
        model = Glipv2Model(config)
    model.load_state_dict(mapped, strict=True, assign=True)
    assert torch.equal(model.fusion.layers[7].vl_fuse.gamma_l,
                       state["rpn.head.dyhead_tower.21.b_attn.gamma_l"])


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_broken_checkpoint_fails_naming_the_keys_as_the_file_does(
        prefix: str, glip_t_state: dict[str, torch.Tensor], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    """A key removed, a key added and a key reshaped: each named as in the file, next to ours."""
    state = {prefix + k[len("module."):]: v for k, v in glip_t_state.items()}
    del state[f"{prefix}rpn.head.dyhead_tower.7.attention.self.key.weight"]
    state[f"{prefix}rpn.head.some_new_layer.weight"] = torch.zeros(3)
    state[f"{prefix}rpn.head.dyhead_tower.8.DyConv.1.conv.weight"] = torch.zeros(256, 256, 1, 1)
    path = _write(state, tmp_path / "broken.pth")
    code = cli_main(["convert", str(path), "--preset", "glip-t", "--out", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == [
        f"conversion failed: {path} does not fit preset 'glip-t':",
        "mapped 724, derived buffers verified 18, ignored 2, unmapped 1, missing 1, mismatched 1",
    ]
    assert err[2:] == [
        f"  ignored: {prefix}rpn.head.cls_logits.bias (class-logit conv of closed-set training)",
        f"  ignored: {prefix}rpn.head.cls_logits.weight (class-logit conv of closed-set training)",
        f"  unmapped: {prefix}rpn.head.some_new_layer.weight",
        f"  missing: {prefix}rpn.head.dyhead_tower.7.attention.self.key.weight "
        "for ours fusion.layers.2.text_layer.attention.self.key.weight",
        f"  mismatched: {prefix}rpn.head.dyhead_tower.8.DyConv.1.conv.weight [256, 256, 1, 1] "
        "vs ours fusion.layers.2.dyconv.DyConv.1.conv.weight [256, 256, 3, 3]",
    ]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_long_key_lists_are_capped(glip_t_state: dict[str, torch.Tensor]) -> None:
    state = {k[len("module."):]: v for k, v in glip_t_state.items()
             if ".dyhead_tower." not in k}
    state.update({f"rpn.head.extra.{n}": torch.zeros(1) for n in range(12)})
    _, report = map_state_dict(state, config_for_checkpoint("glip-t", state), "module.")
    assert len(report.missing) > SUMMARY_LINES_PER_KIND
    assert all(key.startswith("fusion.layers.") for key in report.missing)
    assert report.missing["fusion.layers.5.dyconv.relu.fc.2.weight"] == (
        "module.rpn.head.dyhead_tower.17.relu.fc.2.weight")
    lines = report.summary().splitlines()
    missing = [line for line in lines if line.startswith("  missing: ")]
    assert len(missing) == SUMMARY_LINES_PER_KIND
    assert all(line.startswith("  missing: module.rpn.head.dyhead_tower.") for line in missing)
    assert f"  ... and {len(report.missing) - SUMMARY_LINES_PER_KIND} more missing" in lines
    assert f"  ... and {12 - SUMMARY_LINES_PER_KIND} more unmapped" in lines
    assert "  unmapped: module.rpn.head.extra.0" in lines

    unnamed = ConversionReport(missing={"head.new_part.weight": None}).summary()
    assert unnamed.splitlines()[1:] == [
        "  missing: ours head.new_part.weight (no checkpoint key maps onto it)"]


@pytest.mark.parametrize("preset", ["glip-t", "glip-l"])
def test_one_rename_table_reads_both_ways(preset: str) -> None:
    """Every reference key and every key of ours round-trips, so a missing key's name is exact."""
    theirs = set(reference_shapes(preset))
    with torch.device("meta"):
        ours = set(Glipv2Model(get_preset(preset)).state_dict())
    mapped = {our_name(key): key for key in theirs}
    assert all(checkpoint_name(mine) == key for mine, key in mapped.items() if mine is not None)
    assert ours <= set(mapped)
    assert {checkpoint_name(mine) for mine in ours} <= theirs
    assert our_name("backbone.fpn.fpn_inner02.weight") is None  # no second name for fpn_inner2
    assert checkpoint_name("fusion.layers.2.text_layer.attention.self.key.weight") == (
        "rpn.head.dyhead_tower.7.attention.self.key.weight")


def test_optional_keys_are_handled(glip_t_state: dict[str, torch.Tensor]) -> None:
    """position_ids may be absent (newer transformers); the pooler is accepted and reported;
    a wrong derived buffer is an error."""
    state = {k[len("module."):]: v for k, v in glip_t_state.items()}
    del state["language_backbone.body.model.embeddings.position_ids"]
    state["language_backbone.body.model.pooler.dense.weight"] = torch.zeros(768, 768)
    state["language_backbone.body.model.pooler.dense.bias"] = torch.zeros(768)
    config = config_for_checkpoint("glip-t", state)
    _, report = map_state_dict(state, config)
    assert report.ok and len(report.ignored) == 4 and len(report.verified) == 17

    state["rpn.anchor_generator.cell_anchors.2"] = torch.zeros(1, 4)
    _, report = map_state_dict(state, config)
    assert report.mismatched == {"rpn.anchor_generator.cell_anchors.2": "values differ from ours "
                                 "anchors.2 (a buffer this model builds)"}


def test_tuned_prompt_and_mlm_head_are_mapped(glip_t_state: dict[str, torch.Tensor]) -> None:
    state = {k[len("module."):]: v for k, v in glip_t_state.items()}
    state["rpn.tunable_linear.weight"] = torch.randn(1000, 768)
    for name, shape in {"transform.dense.weight": (768, 768), "transform.dense.bias": (768,),
                        "transform.LayerNorm.weight": (768,), "transform.LayerNorm.bias": (768,),
                        "decoder.weight": (30522, 768), "decoder.bias": (30522,),
                        "bias": (30522,)}.items():
        state[f"rpn.head.mlm_head.{name}"] = torch.randn(shape)
    config = config_for_checkpoint("glip-t", state)
    assert config.language.prompt_offset_len == 1000 and config.head.mlm_head
    mapped, report = map_state_dict(state, config)
    assert report.ok, report.summary()
    assert torch.equal(mapped["prompt_offset"], state["rpn.tunable_linear.weight"])
