"""ONNX export of the engine graphs (`engines.graphs`), their int8 variants, and the manifest.

The TorchScript-based exporter is used (`dynamo=False`, opset 19). Modulated deformable
convolution becomes ONNX `DeformConv` through `export_mode()`; the reference's offset size quirk
(`offset_mask_for_output`) stays ordinary reshapes and slices in front of it.

`export_model(model_dir, out_dir)` writes one `.onnx` file per graph, `manifest.json`
(`engines.manifest`: model id, preset, tokenizer, pre-processing, each graph's inputs/outputs with
dynamic axes, opset, checksums) and a copy of the model's `config.json`.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor

from engines.graphs import (
    HEAVY_GRAPHS,
    LEVELS,
    GraphSignature,
    VisionGraph,
    graph_signatures,
)
from engines.manifest import DEFAULT_OPSET, graph_entry, sha256_file, write_manifest
from model_export.checkpoints.weights import CONFIG_FILE, load_model
from model_export.modeling.deform_conv import ModulatedDeformConv2d, _pair, modulated_deform_conv2d
from model_export.modeling.model import Glipv2Model

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


# --- example inputs for tracing -------------------------------------------------------------


@dataclass
class GraphSpec(GraphSignature):
    """A graph to export: its signature and the example inputs tracing runs it on."""

    inputs: tuple[Tensor, ...]


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
        token_boxes = _dummy_token_boxes(ids.shape)
        prefix = model.caption_prefix(states, ids, mask, token_boxes)
        inputs["caption_image"] = (*visual, *extra)
        inputs["caption_prefix"] = (ids, mask, token_boxes, *states.tensors())
        # The next token of both rows after the prefixes as a cache (9 and 5 real positions).
        inputs["caption_step"] = (ids[:, 1:2], mask, token_boxes[:, 1:2], prefix.keys,
                                  prefix.values, *states.tensors())
        inputs["caption_ground"] = (*caption_visual, prefix.fused_text)
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
VARIANT_GRAPHS = HEAVY_GRAPHS
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
        graphs[spec.name] = graph_entry(path, opset)
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
    return write_manifest(out, model_dir.resolve().name, config, opset, graphs)
