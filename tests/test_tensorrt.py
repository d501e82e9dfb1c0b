"""Native TensorRT path: optimisation profiles and clear errors (CPU), and FP16 engines against
ONNX Runtime on the CPU (only on a GPU host with TensorRT; skipped elsewhere, saying why).

The profiles are derived from the manifest of a real export of a tiny random model (vision,
language, fusion and the caption graphs; about 10 s to export), so the dynamic dimension names
are the exporter's own, and the FPN level ranges are checked against the level sizes the exported
vision graph really produces at the profile's corners.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import Tensor

from engines.export import export_model
from engines.manifest import MANIFEST_FILE
from engines.runtimes import RuntimeOptions, RuntimeUnavailableError, open_runtime
from engines.runtimes.onnx_runtime import OnnxRuntime
from engines.runtimes.tensorrt import TensorRtRuntime
from engines.tensorrt import build_engines, engine_profiles
from model_export.checkpoints.weights import save_model
from model_export.modeling.config import (
    FPNConfig,
    FusionConfig,
    Glipv2Config,
    LanguageConfig,
    SwinConfig,
    TaskHeadsConfig,
    get_preset,
)
from model_export.modeling.model import Glipv2Model

MAX_BATCH = 4
# FP16 engines: max abs difference relative to the output's largest magnitude. FP32 engines still
# use TF32 matrix products on Ampere and later (TensorRT's default), hence not 1e-5 either.
FP16_TOLERANCE = 2e-2
FP32_TOLERANCE = 5e-3


def _tiny_config() -> Glipv2Config:
    """The small preset (pre-processing 288/576, 256 tokens, tied LM head) at toy widths."""
    config = get_preset("small")
    config.swin = SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
    config.fpn = FPNConfig(out_channels=16)
    config.language = LanguageConfig(hidden_size=32, num_layers=1, num_heads=2,
                                     intermediate_size=64)
    config.fusion = FusionConfig(num_layers=1, channels=16, embed_dim=32, num_heads=2,
                                 group_norm_groups=4, image_values=True, pixel_colours=True,
                                 colour_levels=True)
    config.tasks = TaskHeadsConfig()  # no mask / VQA heads: their dims have no profile rule
    config.validate()
    return config


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = Glipv2Model(_tiny_config()).eval()
    root = tmp_path_factory.mktemp("tensorrt")
    export_model(save_model(model, root / "tiny"), root / "engine")
    return root / "engine"


@pytest.fixture(scope="module")
def manifest(engine_dir: Path) -> dict:
    return json.loads((engine_dir / MANIFEST_FILE).read_text())


def _named_ranges(manifest: dict, graph: str) -> dict[str, tuple[int, int, int]]:
    """Dynamic dimension name -> its (min, opt, max) in `graph`'s profile, checking that every
    input naming the dimension got the same range."""
    profiles = engine_profiles(manifest, _tiny_config(), graph, MAX_BATCH)
    ranges: dict[str, tuple[int, int, int]] = {}
    for entry in manifest["graphs"][graph]["inputs"]:
        low, opt, high = profiles[entry["name"]]
        for axis, dim in enumerate(entry["shape"]):
            triple = (low[axis], opt[axis], high[axis])
            if isinstance(dim, str):
                assert ranges.setdefault(dim, triple) == triple, f"{graph}: {dim} disagrees"
    return ranges


# --- profiles (CPU) -----------------------------------------------------------------------------


def test_every_exported_graph_gets_an_ordered_profile(manifest: dict) -> None:
    config = _tiny_config()
    for graph, entry in manifest["graphs"].items():
        profiles = engine_profiles(manifest, config, graph, MAX_BATCH)
        assert sorted(profiles) == sorted(i["name"] for i in entry["inputs"]), graph
        for tensor in entry["inputs"]:
            low, opt, high = profiles[tensor["name"]]
            assert len(low) == len(opt) == len(high) == len(tensor["shape"])
            for axis, dim in enumerate(tensor["shape"]):
                assert 1 <= low[axis] <= opt[axis] <= high[axis], (graph, tensor["name"], axis)
                if isinstance(dim, int):  # static dims stay as exported
                    assert low[axis] == opt[axis] == high[axis] == dim


def test_batch_tokens_and_image_ranges_follow_the_preset(manifest: dict) -> None:
    vision = _named_ranges(manifest, "vision")
    assert vision["batch"] == (1, 1, MAX_BATCH)
    # small preset: min_size 288, max_size 576, sides padded to multiples of 32
    assert vision["height"] == (32, 288, 576)
    assert vision["width"] == (32, 576, 576)
    language = _named_ranges(manifest, "language")
    assert language["tokens"] == (1, 64, 256)
    fusion = _named_ranges(manifest, "fusion")
    assert fusion["batch"] == (1, 1, MAX_BATCH) and fusion["tokens"] == (1, 64, 256)
    for level in range(3, 8):
        for side, name in (("height", f"h{level}"), ("width", f"w{level}")):
            assert fusion[name] == tuple(math.ceil(s / 2**level) for s in vision[side]), name


def test_level_ranges_match_what_the_vision_graph_produces(engine_dir: Path,
                                                           manifest: dict) -> None:
    """At the profile's min, opt and max image, the exported vision graph's P3..P7 have exactly
    the fusion profile's min, opt and max level sizes, and caption_image's region states the
    caption_step profile's region counts."""
    vision = _named_ranges(manifest, "vision")
    fusion = _named_ranges(manifest, "fusion")
    regions = _named_ranges(manifest, "caption_step")["regions"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the test machine is shared
    sessions = {graph: ort.InferenceSession(str(engine_dir / f"{graph}.onnx"), options,
                                            providers=["CPUExecutionProvider"])
                for graph in ("vision", "caption_image")}
    for corner in range(3):
        image = np.zeros((1, 3, vision["height"][corner], vision["width"][corner]), np.float32)
        names = [output.name for output in sessions["vision"].get_outputs()]
        outputs = dict(zip(names, sessions["vision"].run(names, {"images": image}), strict=True))
        for level in range(3, 8):
            assert outputs[f"p{level}"].shape[2:] == (fusion[f"h{level}"][corner],
                                                      fusion[f"w{level}"][corner])
        state = sessions["caption_image"].run(["regions_0"], outputs)
        assert state[0].shape[1] == regions[corner]


def test_profiles_reject_bad_arguments(manifest: dict) -> None:
    config = _tiny_config()
    with pytest.raises(ValueError, match="max_batch"):
        engine_profiles(manifest, config, "vision", 0)
    with pytest.raises(KeyError, match="no graph 'mask'"):
        engine_profiles(manifest, config, "mask", MAX_BATCH)
    edited = copy.deepcopy(manifest)
    edited["graphs"]["fusion"]["inputs"][-1]["shape"] = ["batch", "phrases"]
    with pytest.raises(ValueError, match=r"'phrases'.*no TensorRT profile rule"):
        engine_profiles(edited, config, "fusion", MAX_BATCH)


# --- without TensorRT (CPU) ---------------------------------------------------------------------


def test_no_tensorrt_package_is_a_clear_error(engine_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    expected = r"`tensorrt` Python package.*NVIDIA GPU host with TensorRT"
    with pytest.raises(RuntimeUnavailableError, match=expected):
        build_engines(engine_dir)
    with pytest.raises(RuntimeUnavailableError, match=expected):
        TensorRtRuntime(engine_dir)
    with pytest.raises(RuntimeUnavailableError, match=expected):
        open_runtime(RuntimeOptions(kind="tensorrt", engine_dir=engine_dir))


def test_no_cuda_device_is_a_clear_error(engine_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeUnavailableError, match="building TensorRT engines needs an NVIDIA"):
        build_engines(engine_dir)
    with pytest.raises(RuntimeUnavailableError, match="tensorrt runtime needs an NVIDIA GPU"):
        TensorRtRuntime(engine_dir)


# --- engines against ONNX Runtime (GPU with TensorRT) -------------------------------------------


def _assert_close(graph: str, got: dict[str, Tensor], expected: dict[str, Tensor],
                  tolerance: float) -> None:
    assert sorted(got) == sorted(expected), graph
    for name, reference in expected.items():
        value = got[name].float()
        assert value.shape == reference.shape, f"{graph}.{name}: {value.shape}"
        scale = max(float(reference.abs().max()), 1e-6)
        error = float((value - reference).abs().max()) / scale
        assert error <= tolerance, f"{graph}.{name}: relative max abs diff {error:.3g}"


def test_engines_match_onnxruntime_cpu(engine_dir: Path, tmp_path: Path) -> None:
    trt = pytest.importorskip(
        "tensorrt", reason="the tensorrt package is not installed: native TensorRT engines are "
        "built and run only on an NVIDIA GPU host with TensorRT")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: TensorRT engines build and run only on an NVIDIA GPU")
    work = tmp_path / "engine"
    shutil.copytree(engine_dir, work)  # the module's export stays engine-free for other tests
    fp16 = hasattr(trt.BuilderFlag, "FP16")  # TensorRT 11 removed weakly typed FP16
    build_engines(work, fp16=fp16, max_batch=MAX_BATCH)
    tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    runtime = TensorRtRuntime(work)
    reference = OnnxRuntime(work, provider="cpu", threads=1)
    try:
        assert runtime.name == ("tensorrt-fp16" if fp16 else "tensorrt-fp32")
        assert runtime.graphs == reference.graphs
        # Not the profile's opt point: 2 images of 224 x 288, prompts of 7 and 4 tokens.
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(2, 3, 224, 288, generator=generator)
        input_ids = torch.randint(1000, 30000, (2, 7), generator=generator)
        attention_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
        text_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}

        visual = reference.run("vision", {"images": images})
        _assert_close("vision", runtime.run("vision", {"images": images}), visual, tolerance)
        text = reference.run("language", text_inputs)  # no engine: runs on the fallback
        _assert_close("language", runtime.run("language", text_inputs), text, 1e-4)
        fusion_inputs = {**visual, "hidden": text["hidden"], "attention_mask": attention_mask}
        _assert_close("fusion", runtime.run("fusion", fusion_inputs),
                      reference.run("fusion", fusion_inputs), tolerance)

        with pytest.raises(ValueError, match="profile does not cover"):
            runtime.run("vision", {"images": torch.zeros(MAX_BATCH + 1, 3, 64, 64)})
    finally:
        runtime.close()
        reference.close()
