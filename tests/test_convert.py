"""`glipv2 convert`: released GLIP checkpoints map strictly onto the glip-t / glip-l presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli.main import main as cli_main
from model_export.checkpoints.convert import config_for_checkpoint, map_state_dict
from model_export.checkpoints.weights import load_model
from model_export.modeling.model import Glipv2Model

from conftest import fake_state

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
    assert "ignored rpn.head.cls_logits.weight" in summary

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


@pytest.mark.parametrize("case", ["drop", "reshape", "extra"])
def test_broken_checkpoint_fails_naming_the_key(case: str, glip_t_state: dict[str, torch.Tensor],
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    state = dict(glip_t_state)
    key = "module.rpn.head.dyhead_tower.8.DyConv.1.conv.weight"
    if case == "drop":
        del state[key]
        expected = "missing: fusion.layers.2.dyconv.DyConv.1.conv.weight"
    elif case == "reshape":
        state[key] = torch.zeros(256, 256, 1, 1)
        expected = f"mismatched: {key[len('module.'):]}: checkpoint [256, 256, 1, 1]"
    else:
        key = "module.rpn.head.some_new_layer.weight"
        state[key] = torch.zeros(3)
        expected = f"unmapped: {key[len('module.'):]}"
    path = _write(state, tmp_path / "broken.pth")
    code = cli_main(["convert", str(path), "--preset", "glip-t", "--out", str(tmp_path / "out")])
    assert code != 0
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


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
    assert report.mismatched == ["rpn.anchor_generator.cell_anchors.2: values differ from the "
                                 "buffer this model builds"]


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
