"""ONNX export: every graph of a random-weight `small` model against PyTorch in ONNX Runtime.

The graphs are exported once (2 x 3 x 256 x 320 images, 9 tokens) and run here on other sizes,
batch sizes and token counts, so a size frozen into a graph by tracing fails the parity check.
Each graph gets the PyTorch model's own intermediate tensors as inputs and is compared with the
model's own methods (not the export wrappers), max abs difference <= 1e-3 per output.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor

from engines.export import export_mode, export_model, onnx_deform_conv2d
from engines.graphs import LEVELS
from engines.manifest import MANIFEST_FILE
from model_export.checkpoints.weights import load_pretrained_language, save_model
from model_export.modeling.config import get_preset
from model_export.modeling.deform_conv import ModulatedDeformConv2d, modulated_deform_conv2d
from model_export.modeling.model import Glipv2Model, Glipv2Output

# Export (~40 s) dominates: > 60 s in all on this 2-core machine under load.
pytestmark = pytest.mark.slow

TOLERANCE = 1e-3
GRAPHS = ("vision", "language", "fusion", "mask", "vqa", "caption_image", "caption_prefix",
          "caption_step", "caption_ground")


@dataclass
class Exported:
    model: Glipv2Model
    model_dir: Path
    out_dir: Path
    manifest: dict
    sessions: dict[str, ort.InferenceSession]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    torch.manual_seed(0)
    model = Glipv2Model(get_preset("small"))
    load_pretrained_language(model)
    # Zero in a fresh model: weight them so parity covers positions, the image values, the
    # pixel colours, the coloured levels and the FPN's lateral skips.
    grown = (".positions.", ".out_image_proj.", ".values_colour_proj.", ".skip_blocks.",
             ".colour_levels.")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in grown):
                parameter.normal_(std=0.5 if ".positions." in name else 0.05)
    fusion = model.config.fusion
    assert fusion.image_values and fusion.position_encoding and fusion.pixel_colours
    assert fusion.colour_levels
    assert model.config.fpn.lateral_skip
    model.eval()
    root = tmp_path_factory.mktemp("export")
    model_dir = save_model(model, root / "small-random", external_language=True)
    out_dir = root / "engine"
    manifest_path = export_model(model_dir, out_dir)
    manifest = json.loads(manifest_path.read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the test machine is shared; results do not depend on it
    sessions = {
        name: ort.InferenceSession(str(out_dir / entry["file"]), options,
                                   providers=["CPUExecutionProvider"])
        for name, entry in manifest["graphs"].items()
    }
    return Exported(model, model_dir, out_dir, manifest, sessions)


@dataclass
class Case:
    """Inputs of one parity case, and the PyTorch model's outputs on them."""

    images: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    token_counts: tuple[int, ...]


def _case(batch: int, height: int, width: int, token_counts: tuple[int, ...],
          vocab: int) -> Case:
    generator = torch.Generator().manual_seed(batch * 1000 + height)
    images = torch.randn(batch, 3, height, width, generator=generator)
    length = max(token_counts)
    ids = torch.randint(1000, vocab, (batch, length), generator=generator)
    mask = torch.zeros_like(ids)
    for row, count in enumerate(token_counts):
        ids[row, 0], ids[row, count - 1], ids[row, count:] = 101, 102, 0
        mask[row, :count] = 1
    return Case(images, ids, mask, token_counts)


CASES = {
    # export used N=2, 256 x 320, T=9 (rows of 9 and 5 tokens)
    "one_image_3_tokens": (1, 320, 256, (3,)),
    "two_images_padded_tokens": (2, 224, 288, (6, 4)),
}


def _run(session: ort.InferenceSession, feeds: dict[str, Tensor]) -> list[np.ndarray]:
    return session.run(None, {name: value.numpy() for name, value in feeds.items()})


def _assert_close(name: str, got: np.ndarray, expected: Tensor) -> float:
    expected_np = expected.detach().numpy()
    assert got.shape == expected_np.shape, f"{name}: {got.shape} != {expected_np.shape}"
    diff = float(np.abs(got - expected_np).max()) if got.size else 0.0
    assert diff <= TOLERANCE, f"{name}: max abs diff {diff:.3g} > {TOLERANCE}"
    return diff


def _levels(tensors: list[Tensor], prefix: str = "") -> dict[str, Tensor]:
    """First len(tensors) levels, named as the graphs' inputs (`p3`.. or `fused_p3`..)."""
    return {f"{prefix}{level}": tensor for level, tensor in zip(LEVELS, tensors, strict=False)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest, exported: Exported) -> tuple[Case, Glipv2Output]:
    batch, height, width, counts = CASES[request.param]
    model = exported.model
    case = _case(batch, height, width, counts, model.config.language.vocab_size)
    with torch.no_grad():
        visual = model.encode_image(case.images)
        text = model.encode_text(case.input_ids, case.attention_mask)
        out = model.fuse(visual, text, colours=model.image_colours(case.images))
    return case, out


def test_manifest(exported: Exported) -> None:
    manifest = exported.manifest
    config = exported.model.config
    assert manifest["model_id"] == "small-random"
    assert manifest["preset"] == "small"
    assert manifest["tokenizer"] == config.language.tokenizer
    assert manifest["max_query_len"] == config.language.max_query_len
    assert manifest["preprocess"]["size_divisibility"] == 32
    assert manifest["preprocess"]["pixel_mean"] == list(config.preprocess.pixel_mean)
    assert manifest["opset"] == 19
    assert set(manifest["graphs"]) == set(GRAPHS)
    copied = exported.out_dir / "config.json"
    assert copied.read_bytes() == (exported.model_dir / "config.json").read_bytes()
    assert manifest["config_sha256"] == hashlib.sha256(copied.read_bytes()).hexdigest()
    for name, entry in manifest["graphs"].items():
        path = exported.out_dir / entry["file"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), name
        assert entry["opset"] == 19
        session = exported.sessions[name]
        assert [i["name"] for i in entry["inputs"]] == [i.name for i in session.get_inputs()]
        assert [o["name"] for o in entry["outputs"]] == [o.name for o in session.get_outputs()]
    vision = manifest["graphs"]["vision"]
    assert vision["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert vision["dynamic_axes"]["images"] == {"0": "batch", "2": "height", "3": "width"}
    language = manifest["graphs"]["language"]
    assert language["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "tokens"}
    assert (exported.out_dir / MANIFEST_FILE).is_file()


def test_deform_conv_nodes(exported: Exported) -> None:
    """Every deformable conv is one ONNX DeformConv: 5 + 4 + 4 per fusion layer (P3..P7)."""
    expected = 13 * exported.model.config.fusion.num_layers
    for name in ("fusion", "caption_image"):
        path = exported.out_dir / exported.manifest["graphs"][name]["file"]
        graph = onnx.load(str(path), load_external_data=False).graph
        ops = [node.op_type for node in graph.node]
        assert ops.count("DeformConv") == expected, name
        assert "GridSample" not in ops, name  # the PyTorch formulation did not leak in


def test_export_mode_swaps_and_restores() -> None:
    torch.manual_seed(0)
    conv = ModulatedDeformConv2d(4, 5, stride=2)
    x, offset, mask = torch.randn(1, 4, 7, 9), torch.randn(1, 18, 4, 5), torch.rand(1, 9, 4, 5)
    expected = conv(x, offset, mask)
    with export_mode():
        assert ModulatedDeformConv2d.op is onnx_deform_conv2d
        torch.testing.assert_close(conv(x, offset, mask), expected)
    assert ModulatedDeformConv2d.op is modulated_deform_conv2d


def test_vision_language_fusion(exported: Exported, case: tuple[Case, Glipv2Output]) -> None:
    inputs, out = case
    model = exported.model
    with torch.no_grad():
        visual = model.encode_image(inputs.images)
        colours = model.image_colours(inputs.images)
        text = model.encode_text(inputs.input_ids, inputs.attention_mask)
    got = _run(exported.sessions["vision"], {"images": inputs.images})
    assert colours is not None and colours.shape[-2:] == visual[0].shape[-2:]
    for name, value, expected in zip([*LEVELS, "colours"], got, [*visual, colours], strict=True):
        _assert_close(f"vision {name}", value, expected)

    mask = inputs.attention_mask
    got = _run(exported.sessions["language"], {"input_ids": inputs.input_ids,
                                               "attention_mask": mask})
    _assert_close("language hidden", got[0], text.hidden)
    _assert_close("language embedded", got[1], text.embedded)

    got = _run(exported.sessions["fusion"],
               {**_levels(visual), "hidden": text.hidden, "attention_mask": mask,
                "colours": colours})
    expected = [*out.box_regression, *out.centerness, *out.token_logits, *out.fused_visual,
                out.fused_text]
    names = [o.name for o in exported.sessions["fusion"].get_outputs()]
    for name, value, reference in zip(names, got, expected, strict=True):
        _assert_close(f"fusion {name}", value, reference)


def test_mask(exported: Exported, case: tuple[Case, Glipv2Output]) -> None:
    inputs, out = case
    model = exported.model
    batch, tokens = inputs.input_ids.shape
    phrase_map = torch.zeros(batch, 3, tokens)  # (N, P=3, T), export used P=2
    phrase_map[:, 0, 1] = 1.0
    phrase_map[:, 1, : min(tokens, 3)] = 1.0 / min(tokens, 3)
    height, width = inputs.images.shape[-2:]
    boxes = torch.tensor([[8.0, 8.0, 100.0, 60.0], [0.0, 0.0, float(width), float(height)]])
    boxes = boxes.expand(batch, 3, 2, 4).contiguous()  # (N, P, K=2, 4), export used K=3
    box_valid = torch.tensor([True, False]).expand(batch, 3, 2).contiguous()
    with torch.no_grad():
        expected = model.mask_head(out.fused_visual, out.fused_text, phrase_map, boxes, box_valid)
    feeds = {**_levels(out.fused_visual[:3], "fused_"), "fused_text": out.fused_text,
             "phrase_map": phrase_map, "boxes": boxes, "box_valid": box_valid}
    (got,) = _run(exported.sessions["mask"], feeds)
    _assert_close("mask logits", got, expected)
    assert got.shape[-2:] == (height // 4, width // 4)


def test_vqa(exported: Exported, case: tuple[Case, Glipv2Output]) -> None:
    inputs, out = case
    model = exported.model
    with torch.no_grad():
        expected = model.vqa_head(out.fused_text, inputs.attention_mask)
    (got,) = _run(exported.sessions["vqa"], {"fused_text": out.fused_text,
                                             "attention_mask": inputs.attention_mask})
    _assert_close("vqa logits", got, expected)


def test_caption(exported: Exported, case: tuple[Case, Glipv2Output]) -> None:
    inputs, _ = case
    model = exported.model
    fusion = model.fusion
    with torch.no_grad():
        visual = model.encode_image(inputs.images)
        colours = model.image_colours(inputs.images)
        states, fused_visual = fusion.caption_image_states(visual, colours)
    got = _run(exported.sessions["caption_image"], {**_levels(visual), "colours": colours})
    names = [o.name for o in exported.sessions["caption_image"].get_outputs()]
    for name, value, expected in zip(names, got, [*states.tensors(), *fused_visual],
                                     strict=True):
        _assert_close(f"caption_image {name}", value, expected)
    state_feeds = dict(zip(names, states.tensors(), strict=False))
    assert not any(name.startswith("fused_") for name in state_feeds)

    ids, mask = inputs.input_ids, inputs.attention_mask
    # Row 0's tokens 1-2 read only a box, as a caption phrase given its object does.
    token_boxes = torch.zeros(*ids.shape, 4)
    token_boxes[0, 1:3] = torch.tensor([16.0, 8.0, 120.0, 100.0])
    next_logits, fused_text, keys, values = _run(
        exported.sessions["caption_prefix"],
        {"input_ids": ids, "attention_mask": mask, "token_boxes": token_boxes, **state_feeds})
    with torch.no_grad():
        batched = model.caption_prefix(states, ids, mask, token_boxes)
    _assert_close("caption_prefix fused_text", fused_text, batched.fused_text)
    _assert_close("caption_prefix keys", keys, batched.keys)
    _assert_close("caption_prefix values", values, batched.values)
    for row, count in enumerate(inputs.token_counts):
        # What the PyTorch predictor computes for this caption alone, unpadded.
        row_ids = ids[row:row + 1, :count]
        with torch.no_grad():
            row_states = fusion.caption_states([s[row:row + 1] for s in states.tensors()])
            alone = model.caption_prefix(row_states, row_ids, torch.ones_like(row_ids),
                                         token_boxes[row:row + 1, :count])
            expected = model.lm_logits(alone.fused_text[:, -1:])[0, -1]
        _assert_close(f"caption_prefix logits row {row}", next_logits[row], expected)
    with torch.no_grad():
        free = model.caption_prefix(states, ids, mask).fused_text
    assert not torch.allclose(free[0, 1:3], batched.fused_text[0, 1:3], atol=1e-3), \
        "the box changed nothing"

    # One step after the prefixes as caches: rows of different lengths, so right padded.
    new_ids = torch.randint(1000, model.config.language.vocab_size, (ids.shape[0], 1),
                            generator=torch.Generator().manual_seed(7))
    new_boxes = token_boxes[:, 1:2]
    step_logits, new_keys, new_values = _run(exported.sessions["caption_step"], {
        "input_ids": new_ids, "past_mask": mask, "token_boxes": new_boxes,
        "past_keys": batched.keys, "past_values": batched.values, **state_feeds})
    with torch.no_grad():
        step = model.caption_step(states, new_ids, mask, new_boxes, batched.keys,
                                  batched.values)
        expected = model.lm_logits(step.fused_text[:, 0])
    _assert_close("caption_step logits", step_logits, expected)
    _assert_close("caption_step new_keys", new_keys, step.keys)
    _assert_close("caption_step new_values", new_values, step.values)

    with torch.no_grad():
        expected = model.head(fused_visual, batched.fused_text)
    got = _run(exported.sessions["caption_ground"],
               {**_levels(fused_visual, "fused_"), "fused_text": batched.fused_text})
    for i, (value, reference) in enumerate(zip(got, [t for part in expected for t in part],
                                               strict=True)):
        _assert_close(f"caption_ground output {i}", value, reference)
