"""ONNX export of GLIPv2 as separate graphs, with a manifest (DESIGN.md, "Engines").

Each graph is a thin `nn.Module` over the model's own methods, so the exported math is the model's:

- `vision`: images (N, 3, H, W) -> P3..P7 (`Glipv2Model.encode_image`), and with
  `fusion.pixel_colours` the mean pixel per P3 cell, `colours` (`image_colours`): together the
  vision outputs (`vision_outputs`) that `fusion` and `caption_image` take.
- `language`: input_ids, attention_mask (N, T) -> hidden, embedded (N, T, D) (`encode_text`).
- `fusion`: vision outputs + hidden + attention_mask -> per level box regression, centerness,
  region-token logits and fused features, plus fused tokens (`fuse`, without the MLM logits).
- `mask`: fused P3..P5 + fused tokens + phrase map + boxes -> per-box mask logits (`mask_head`).
- `vqa`: fused tokens + attention_mask -> answer logits (`vqa_head`).
- captioning, decoded step by step without recomputing the image side per token:
  `caption_image` (vision outputs -> each fusion layer's region states and the final fused levels,
  `fusion.caption_image_states`), `caption_step` (token ids + mask + region states -> next-token
  logits and fused tokens: causal `encode_text`, `fusion.caption_text`, `lm_logits`) and
  `caption_ground` (final fused levels + fused caption tokens -> the ATSS head's outputs, to ground
  the caption's phrases).

The TorchScript-based exporter is used (`dynamo=False`, opset 19). Modulated deformable
convolution becomes ONNX `DeformConv` through `export_mode()`; the reference's offset size quirk
(`offset_mask_for_output`) stays ordinary reshapes and slices in front of it.

`export_model(model_dir, out_dir)` writes one `.onnx` file per graph, `manifest.json` (model id,
preset, tokenizer, pre-processing, each graph's inputs/outputs with dynamic axes, opset,
checksums) and a copy of the model's `config.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from model_export.checkpoints.weights import CONFIG_FILE, load_model
from model_export.modeling.config import Glipv2Config
from model_export.modeling.deform_conv import ModulatedDeformConv2d, _pair, modulated_deform_conv2d
from model_export.modeling.language import TextFeatures
from model_export.modeling.model import Glipv2Model

__all__ = [
    "DEFAULT_OPSET",
    "MANIFEST_FILE",
    "GraphSignature",
    "GraphSpec",
    "export_mode",
    "export_model",
    "graph_signatures",
    "graph_specs",
    "onnx_deform_conv2d",
    "sha256_file",
    "vision_outputs",
]

DEFAULT_OPSET = 19  # the first opset with DeformConv
MANIFEST_FILE = "manifest.json"
# The graphs' interface: 2 added caption_step's token_boxes and caption_image's region centres.
MANIFEST_FORMAT = "glipv2-onnx/2"
LEVELS = ("p3", "p4", "p5", "p6", "p7")  # FPN levels, strides 8..128
COLOURS = "colours"  # the vision graph's mean pixel per P3 cell, with fusion.pixel_colours

# Representative export inputs (DESIGN.md: images padded to multiples of 32). Parity tests run
# other sizes, which is what shows that no size was frozen into a graph.
DUMMY_IMAGE_SHAPE = (2, 3, 256, 320)
DUMMY_TOKEN_COUNTS = (9, 5)  # two prompts padded to 9 tokens: the second has 4 padded slots


# --- deformable convolution as ONNX DeformConv ---------------------------------------------------


class _DeformConvFunction(torch.autograd.Function):
    """`modulated_deform_conv2d` in PyTorch; ONNX `DeformConv` (opset 19) when exported.

    Semantics agree (checked by the parity tests): offset channels (2k, 2k + 1) = (dy, dx) of
    tap k, row-major taps; bilinear sampling where a corner outside the input reads 0; the
    sample times the mask; groups = offset groups = 1.
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                bias: Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int]) -> Tensor:
        return modulated_deform_conv2d(input, offset, mask, weight, bias, stride, padding,
                                       dilation)

    @staticmethod
    def symbolic(g: Any, input: Any, offset: Any, mask: Any, weight: Any, bias: Any,
                 stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int]) -> Any:
        if bias is None:
            raise ValueError("DeformConv export expects a bias (every GLIP deform conv has one)")
        # ONNX input order: X, W, offset, B, mask.
        return g.op("DeformConv", input, weight, offset, bias, mask,
                    strides_i=list(stride), pads_i=[padding[0], padding[1]] * 2,
                    dilations_i=list(dilation), group_i=1, offset_group_i=1)


def onnx_deform_conv2d(input: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                       bias: Tensor | None = None, stride: int | tuple[int, int] = 1,
                       padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1
                       ) -> Tensor:
    """Drop-in for `modulated_deform_conv2d` whose trace exports as one ONNX `DeformConv`."""
    return _DeformConvFunction.apply(input, offset, mask, weight, bias, _pair(stride),
                                     _pair(padding), _pair(dilation))


@contextlib.contextmanager
def export_mode() -> Iterator[None]:
    """Route every `ModulatedDeformConv2d` through `onnx_deform_conv2d` (restored on exit)."""
    previous = ModulatedDeformConv2d.__dict__["op"]
    ModulatedDeformConv2d.op = staticmethod(onnx_deform_conv2d)
    try:
        yield
    finally:
        ModulatedDeformConv2d.op = previous


# --- the graphs ----------------------------------------------------------------------------------


class VisionGraph(nn.Module):
    """images (N, 3, H, W) -> P3..P7, each (N, C, H_l, W_l), then the colour map if any."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        colours = self.model.image_colours(images)
        extra = () if colours is None else (colours,)
        return (*self.model.encode_image(images), *extra)


class LanguageGraph(nn.Module):
    """input_ids, attention_mask (N, T) int64 -> hidden, embedded (N, T, D); bidirectional."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        text = self.model.encode_text(input_ids, attention_mask)
        return text.hidden, text.embedded


class FusionGraph(nn.Module):
    """P3..P7, hidden (N, T, D), attention_mask (N, T) [, colours] -> box regression x5,
    centerness x5, region-token logits x5, fused levels x5, fused tokens (see `Glipv2Output`)."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, p3: Tensor, p4: Tensor, p5: Tensor, p6: Tensor, p7: Tensor, hidden: Tensor,
                attention_mask: Tensor, *colours: Tensor) -> tuple[Tensor, ...]:
        # The tower reads `hidden` and `mask` only; `embedded` is filled to satisfy the type
        # (the parity test compares against `fuse` on the real `encode_text` features).
        text = TextFeatures(hidden=hidden, embedded=hidden, mask=attention_mask)
        fused_visual, fused_text = self.model.fusion([p3, p4, p5, p6, p7], text,
                                                     colours=_optional(colours))
        box_regression, centerness, token_logits = self.model.head(fused_visual, fused_text)
        return (*box_regression, *centerness, *token_logits, *fused_visual, fused_text)


class MaskGraph(nn.Module):
    """fused P3..P5, fused tokens, phrase_map (N, P, T), boxes (N, P, K, 4), box_valid (N, P, K)
    -> mask logits (N, P, K, 2 H_3, 2 W_3) (see `Glipv2MaskHead.forward`).

    Known hazard (in `mask_head.py`): its `torch.full_like(logits, OUTSIDE_BOX_LOGIT)` branch is
    frozen to the export image size by the exporter; a scalar `torch.where` branch fixes it.
    """

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, fused_p3: Tensor, fused_p4: Tensor, fused_p5: Tensor, fused_text: Tensor,
                phrase_map: Tensor, boxes: Tensor, box_valid: Tensor) -> Tensor:
        assert self.model.mask_head is not None
        return self.model.mask_head([fused_p3, fused_p4, fused_p5], fused_text, phrase_map,
                                    boxes, box_valid)


class VqaGraph(nn.Module):
    """fused tokens (N, T, D), attention_mask (N, T) -> answer logits (N, A)."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, fused_text: Tensor, attention_mask: Tensor) -> Tensor:
        assert self.model.vqa_head is not None
        return self.model.vqa_head(fused_text, attention_mask)


class CaptionImageGraph(nn.Module):
    """P3..P7 [, colours] -> region states (N, R, C) (see `caption_image_states`), then the
    final fused levels x5."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, p3: Tensor, p4: Tensor, p5: Tensor, p6: Tensor, p7: Tensor,
                *colours: Tensor) -> tuple[Tensor, ...]:
        states, fused_visual = self.model.fusion.caption_image_states(
            [p3, p4, p5, p6, p7], _optional(colours))
        return (*states, *fused_visual)


def _optional(colours: tuple[Tensor, ...]) -> Tensor | None:
    """The graphs' optional trailing `colours` input (models with `fusion.pixel_colours`)."""
    return colours[0] if colours else None


class CaptionStepGraph(nn.Module):
    """input_ids, attention_mask (N, T), token_boxes (N, T, 4), region states -> next-token
    logits (N, vocab) and the fused caption tokens (N, T, D).

    token_boxes: the box each token's attention over regions stays inside, in resized-image
    pixels; zeros for none (`Glipv2FusionTower.caption_text`).

    The logits are those of each row's last real token (position sum(mask) - 1), so a batch of
    right-padded captions of different lengths decodes together; with causal attention, padded
    slots never change the real tokens' features.
    """

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_boxes: Tensor,
                *states: Tensor) -> tuple[Tensor, Tensor]:
        text = self.model.encode_text(input_ids, attention_mask, causal=True)
        fused_text = self.model.fusion.caption_text(list(states), text, token_boxes)
        last = attention_mask.sum(dim=1) - 1  # (N,) index of each row's last real token
        index = last.view(-1, 1, 1).expand(-1, 1, fused_text.shape[2])  # (N, 1, D)
        fused_last = fused_text.gather(1, index)[:, 0]  # (N, T, D) -> (N, 1, D) -> (N, D)
        # 2-D input: the tied decoder exports as Gemm(transB) on the word-embedding initializer
        # the encoder already holds, instead of a second, transposed copy of it.
        return self.model.lm_logits(fused_last), fused_text


class CaptionGroundGraph(nn.Module):
    """Final fused levels x5 (from `caption_image`) + fused caption tokens (N, T, D) -> box
    regression x5, centerness x5, region-token logits x5 (the ATSS head, `Glipv2AtssHead`)."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, fused_p3: Tensor, fused_p4: Tensor, fused_p5: Tensor, fused_p6: Tensor,
                fused_p7: Tensor, fused_text: Tensor) -> tuple[Tensor, ...]:
        box_regression, centerness, token_logits = self.model.head(
            [fused_p3, fused_p4, fused_p5, fused_p6, fused_p7], fused_text)
        return (*box_regression, *centerness, *token_logits)


# --- graph specs: names, dynamic axes, export inputs --------------------------------------------


@dataclass
class GraphSignature:
    """One graph: its wrapper module, tensor names and dynamic axes, all that running it needs."""

    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


@dataclass
class GraphSpec(GraphSignature):
    """A graph to export: its signature and the example inputs tracing runs it on."""

    inputs: tuple[Tensor, ...]


def vision_outputs(config: Glipv2Config) -> list[str]:
    """The vision graph's outputs, in order: P3..P7, then `colours` with `fusion.pixel_colours`.
    `fusion` and `caption_image` take them under the same names."""
    return [*LEVELS, *([COLOURS] if config.fusion.pixel_colours else [])]


def _level_axes(prefix: str = "") -> dict[str, dict[int, str]]:
    return {f"{prefix}{level}": {0: "batch", 2: f"h{level[1]}", 3: f"w{level[1]}"}
            for level in LEVELS}


def _head_axes() -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for level in LEVELS:
        size = {0: "batch", 2: f"h{level[1]}", 3: f"w{level[1]}"}
        axes[f"box_regression_{level}"] = size
        axes[f"centerness_{level}"] = size
        axes[f"token_logits_{level}"] = {0: "batch", 1: f"regions_{level}", 2: "tokens"}
    return axes


def _head_names() -> list[str]:
    return [f"{kind}_{level}" for kind in ("box_regression", "centerness", "token_logits")
            for level in LEVELS]


def _dummy_text(model: Glipv2Model) -> tuple[Tensor, Tensor]:
    """(N, T) token ids and mask: [CLS] w ... [SEP] then padding (id 0), one row per count."""
    generator = torch.Generator().manual_seed(0)
    length = max(DUMMY_TOKEN_COUNTS)
    vocab = model.config.language.vocab_size
    ids = torch.randint(1000, vocab, (len(DUMMY_TOKEN_COUNTS), length), generator=generator)
    mask = torch.zeros_like(ids)
    for row, count in enumerate(DUMMY_TOKEN_COUNTS):
        ids[row, 0], ids[row, count - 1], ids[row, count:] = 101, 102, 0
        mask[row, :count] = 1
    return ids, mask


def _dummy_token_boxes(shape: torch.Size) -> Tensor:
    """(N, T, 4) token boxes for (N, T) tokens: tokens 1-3 on a box, the rest on none, so the
    traced graph keeps both branches of `box_bias`."""
    boxes = torch.zeros(*shape, 4)
    boxes[:, 1:4] = torch.tensor([40.0, 32.0, 200.0, 160.0])
    return boxes


def graph_signatures(model: Glipv2Model) -> list[GraphSignature]:
    """Every graph `model` has, without running it (the PyTorch runtime's start-up)."""
    token_axes = {0: "batch", 1: "tokens"}
    fused_level_names = [f"fused_{level}" for level in LEVELS]
    fused_level_axes = _level_axes("fused_")
    vision_names = vision_outputs(model.config)
    vision_axes = {**_level_axes(), COLOURS: {0: "batch", 2: "h3", 3: "w3"}}
    vision_axes = {name: vision_axes[name] for name in vision_names}
    graphs = [
        GraphSignature("vision", VisionGraph(model), ["images"], vision_names,
                       {"images": {0: "batch", 2: "height", 3: "width"}, **vision_axes}),
        GraphSignature("language", LanguageGraph(model), ["input_ids", "attention_mask"],
                       ["hidden", "embedded"],
                       {name: token_axes for name in ("input_ids", "attention_mask", "hidden",
                                                      "embedded")}),
        GraphSignature("fusion", FusionGraph(model),
                       [*LEVELS, "hidden", "attention_mask", *vision_names[len(LEVELS):]],
                       [*_head_names(), *fused_level_names, "fused_text"],
                       {**vision_axes, "hidden": token_axes, "attention_mask": token_axes,
                        **_head_axes(), **fused_level_axes, "fused_text": token_axes}),
    ]
    if model.mask_head is not None:
        graphs.append(GraphSignature(
            "mask", MaskGraph(model),
            [*fused_level_names[:3], "fused_text", "phrase_map", "boxes", "box_valid"],
            ["mask_logits"],
            {**{k: v for k, v in fused_level_axes.items() if k in fused_level_names[:3]},
             "fused_text": token_axes, "phrase_map": {0: "batch", 1: "phrases", 2: "tokens"},
             "boxes": {0: "batch", 1: "phrases", 2: "boxes"},
             "box_valid": {0: "batch", 1: "phrases", 2: "boxes"},
             "mask_logits": {0: "batch", 1: "phrases", 2: "boxes", 3: "h_mask", 4: "w_mask"}}))
    if model.vqa_head is not None:
        graphs.append(GraphSignature(
            "vqa", VqaGraph(model), ["fused_text", "attention_mask"], ["answer_logits"],
            {"fused_text": token_axes, "attention_mask": token_axes,
             "answer_logits": {0: "batch"}}))
    if model.mlm_head is not None:
        fusion = model.fusion
        # each layer's regions [, input regions] [, colours], the region centres
        states = len(fusion.layers) + int(fusion.image_values) + int(fusion.pixel_colours) + 1
        state_names = [f"state_{i}" for i in range(states)]
        state_axes = {name: {0: "batch", 1: "regions"} for name in state_names}
        graphs += [
            GraphSignature("caption_image", CaptionImageGraph(model), vision_names,
                           [*state_names, *fused_level_names],
                           {**vision_axes, **state_axes, **fused_level_axes}),
            GraphSignature("caption_step", CaptionStepGraph(model),
                           ["input_ids", "attention_mask", "token_boxes", *state_names],
                           ["next_token_logits", "fused_text"],
                           {"input_ids": token_axes, "attention_mask": token_axes,
                            "token_boxes": token_axes, **state_axes,
                            "next_token_logits": {0: "batch"}, "fused_text": token_axes}),
            GraphSignature("caption_ground", CaptionGroundGraph(model),
                           [*fused_level_names, "fused_text"], _head_names(),
                           {**fused_level_axes, "fused_text": token_axes, **_head_axes()}),
        ]
    return graphs


@torch.no_grad()
def graph_specs(model: Glipv2Model) -> list[GraphSpec]:
    """Every graph `model` has, with export inputs computed by the model itself."""
    model = model.eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(DUMMY_IMAGE_SHAPE, generator=generator)
    ids, mask = _dummy_text(model)
    vision = VisionGraph(model)(images)
    visual, extra = list(vision[:len(LEVELS)]), vision[len(LEVELS):]
    colours = extra[0] if extra else None
    text = model.encode_text(ids, mask)
    out = model.fuse(visual, text, colours=colours)
    inputs: dict[str, tuple[Tensor, ...]] = {
        "vision": (images,), "language": (ids, mask),
        "fusion": (*visual, text.hidden, mask, *extra)}
    if model.mask_head is not None:
        batch = images.shape[0]
        phrase_map = torch.zeros(batch, 2, ids.shape[1])  # (N, P, T): each phrase 2 tokens
        phrase_map[:, 0, 1:3] = 0.5
        phrase_map[:, 1, 3:5] = 0.5
        boxes = torch.tensor([[10.0, 20.0, 120.0, 200.0], [0.0, 0.0, 320.0, 256.0],
                              [50.5, 60.5, 51.5, 99.0]]).expand(batch, 2, 3, 4)  # (N, P, K, 4)
        box_valid = torch.tensor([[True, True, True], [True, False, False]]).expand(batch, 2, 3)
        inputs["mask"] = (*out.fused_visual[:3], out.fused_text, phrase_map, boxes.contiguous(),
                          box_valid.contiguous())
    if model.vqa_head is not None:
        inputs["vqa"] = (out.fused_text, mask)
    if model.mlm_head is not None:
        states, caption_visual = model.fusion.caption_image_states(visual, colours)
        caption_text = model.encode_text(ids, mask, causal=True)
        inputs["caption_image"] = (*visual, *extra)
        inputs["caption_step"] = (ids, mask, _dummy_token_boxes(ids.shape), *states)
        inputs["caption_ground"] = (*caption_visual,
                                    model.fusion.caption_text(states, caption_text))
    specs = []
    for signature in graph_signatures(model):
        spec = GraphSpec(**vars(signature), inputs=inputs[signature.name])
        if len(spec.inputs) != len(spec.input_names):
            raise RuntimeError(f"{spec.name}: {len(spec.inputs)} example inputs for "
                                 f"{spec.input_names}")
        specs.append(spec)
    return specs


# --- export --------------------------------------------------------------------------------------


def export_graph(spec: GraphSpec, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Trace `spec.module` on its inputs and write one self-contained ONNX file."""
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset {opset} has no DeformConv; use {DEFAULT_OPSET} or later")
    with export_mode(), torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings flag Python-side shape logic; the parity tests at other sizes are the
        # check that no size was frozen, so they are noise here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.onnx")
        torch.onnx.export(
            spec.module, spec.inputs, str(path), dynamo=False, opset_version=opset,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes, do_constant_folding=True,
            # Inlining the traced body of `_DeformConvFunction` (its PyTorch forward) crashes
            # the exporter's peephole pass ("Argument passed to at() was not in the map"); not
            # inlining is also what makes its `symbolic` replace it as one node.
            autograd_inlining=False,
        )
    onnx.checker.check_model(str(path))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (graphs can be hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_entries(values: Sequence[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
    """ONNX graph inputs/outputs -> [{name, dtype, shape}]; a dynamic axis is its name."""
    entries = []
    for value in values:
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        shape: list[int | str] = [
            dim.dim_param if dim.HasField("dim_param") else int(dim.dim_value)
            for dim in tensor_type.shape.dim
        ]
        entries.append({"name": value.name, "dtype": dtype, "shape": shape})
    return entries


def _graph_entry(spec: GraphSpec, path: Path, opset: int) -> dict[str, Any]:
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs, outputs = _tensor_entries(graph.input), _tensor_entries(graph.output)
    return {
        "file": spec.file,
        "sha256": sha256_file(path),
        "opset": opset,
        "inputs": inputs,
        "outputs": outputs,
        "dynamic_axes": {
            entry["name"]: {str(axis): dim for axis, dim in enumerate(entry["shape"])
                            if isinstance(dim, str)}
            for entry in (*inputs, *outputs)
        },
    }


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of a graph's weight MatMuls (ONNX Runtime): weights int8 per
    output channel, activations uint8 quantised at run time, so the CPU's VNNI u8 x s8 dot
    products run them. No calibration data is needed. Products of two activations (attention,
    region-token logits) stay fp32, as do convolutions and DeformConv."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    # 2-D weights only: a MatMul by a vector (the head's bias projection) has no output
    # channels to quantise per channel.
    weights = {i.name for i in graph.initializer if len(i.dims) == 2}
    weight_matmuls = [node.name for node in graph.node
                      if node.op_type == "MatMul" and node.input[1] in weights]
    quantize_dynamic(source, target, per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], nodes_to_quantize=weight_matmuls)


# Reduced-precision variants `export_model` can add, and the graphs that get them (the heavy
# ones, issue 4); a runtime picks one by configuration.
VARIANT_GRAPHS = ("vision", "fusion")
VARIANTS: dict[str, Callable[[Path, Path], None]] = {"int8": quantize_int8}


def export_model(model_dir: str | Path, out_dir: str | Path, opset: int = DEFAULT_OPSET,
                 progress: Callable[[str], None] | None = None,
                 variants: Sequence[str] = ()) -> Path:
    """Export every graph of the model in `model_dir` into `out_dir`; returns the manifest path.

    `out_dir` gets `<graph>.onnx` per graph (`mask`, `vqa` and the caption graphs only when the
    model has those heads), `<graph>.<variant>.onnx` for each of `variants` ("int8") of the
    `VARIANT_GRAPHS`, `config.json` (copied) and `manifest.json`. `progress` is called with
    each graph's name before it is exported.
    """
    model_dir, out = Path(model_dir), Path(out_dir)
    model = load_model(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    graphs: dict[str, Any] = {}
    for spec in graph_specs(model):
        if progress is not None:
            progress(spec.name)
        path = out / spec.file
        export_graph(spec, path, opset)
        graphs[spec.name] = _graph_entry(spec, path, opset)
        if spec.name in VARIANT_GRAPHS:
            for variant in variants:
                if variant not in VARIANTS:
                    raise ValueError(f"unknown variant {variant!r}; available: {sorted(VARIANTS)}")
                if progress is not None:
                    progress(f"{spec.name} ({variant})")
                target = out / f"{spec.name}.{variant}.onnx"
                VARIANTS[variant](path, target)
                graphs[spec.name].setdefault("variants", {})[variant] = {
                    "file": target.name, "sha256": sha256_file(target)}
    shutil.copyfile(model_dir / CONFIG_FILE, out / CONFIG_FILE)
    manifest = {
        "format": MANIFEST_FORMAT,
        "model_id": model_dir.resolve().name,
        "preset": config.preset,
        "tokenizer": config.language.tokenizer,
        "max_query_len": config.language.max_query_len,
        "preprocess": dataclasses.asdict(config.preprocess),
        "opset": opset,
        "config": CONFIG_FILE,
        "config_sha256": sha256_file(out / CONFIG_FILE),
        "exporter": f"torch {torch.__version__} (TorchScript-based torch.onnx.export)",
        "graphs": graphs,
    }
    path = out / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
