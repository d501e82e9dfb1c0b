"""Native TensorRT engines built from the exported ONNX graphs (DESIGN.md, "Engines"; issue 4).

`build_engines(engine_dir)` parses `<graph>.onnx` of an engine folder (`glipv2 export`) with
TensorRT's ONNX parser and builds one serialised engine, `<graph>.plan`, per graph, with one
optimisation profile over batch, image size and token count (`engine_profiles`). The plans are
recorded in the folder's `manifest.json` under "tensorrt"; `engines.runtimes.tensorrt` runs them.
By default only `vision` and `fusion` get engines: they hold nearly all of the model's FLOPs.

What it needs, each checked with an error that says so: the `tensorrt` Python package and an
NVIDIA GPU. ONNX `DeformConv` (the fusion tower's modulated deformable convolutions, opset 19) is
imported by the ONNX parser of TensorRT >= 10.1 as the `ModulatedDeformConv2d` plugin of
TensorRT's plugin library (libnvinfer_plugin), so that library's plugins are registered before
parsing, and again before deserialising (the plans reference the plugin by name). Older parsers
have no DeformConv importer. A plan loads only on the GPU model and TensorRT version that built
it, so the manifest records both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from engines.errors import RuntimeUnavailableError
from engines.graphs import HEAVY_GRAPHS
from engines.manifest import MANIFEST_FILE, load_manifest, sha256_file
from model_export.modeling.config import Glipv2Config

__all__ = [
    "DEFAULT_ENGINE_GRAPHS",
    "TIMING_CACHE_FILE",
    "EngineBuildError",
    "build_engines",
    "engine_profiles",
    "import_tensorrt",
    "register_plugins",
    "require_cuda",
]

DEFAULT_ENGINE_GRAPHS = HEAVY_GRAPHS  # the GPU-heavy graphs (DESIGN.md, "Engines")
TIMING_CACHE_FILE = "tensorrt-timing.cache"  # kernel timings, reused by the next build
PLAN_SUFFIX = ".plan"
DEFAULT_WORKSPACE_BYTES = 4 << 30  # scratch memory a layer may use while running, 4 GiB
FPN_LEVELS = (3, 4, 5, 6, 7)  # P3..P7, stride 2**level
# Optimisation points: TensorRT picks its kernels for the `opt` shape and runs any shape in the
# profile's range. One image with one prompt chunk is what a server under light load sends; a
# dozen class names are about 64 tokens.
OPT_BATCH = 1
OPT_TOKENS = 64

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max) shape


class EngineBuildError(RuntimeError):
    """TensorRT could not parse a graph or build an engine from it; says why."""


# --- optimisation profiles (pure Python) ---------------------------------------------------------


def engine_profiles(manifest_data: Mapping[str, Any], config: Glipv2Config, graph: str,
                    max_batch: int) -> Profile:
    """Input name -> (min, opt, max) shape of `graph`'s optimisation profile.

    `manifest_data` is the parsed `manifest.json`; each dynamic dimension its inputs name gets the
    range the service can send with `config`'s pre-processing: `batch` 1..`max_batch`; padded
    image sides (`height`, `width`) from one `size_divisibility` step to `max_size` rounded up to
    a step; FPN level sides (`h3`..`w7`) that follow from those; `tokens` 1..`max_query_len`;
    the caption graphs' `regions` (every level's positions, flattened) and `past` (a caption
    step's cached tokens, as `tokens`). Inputs that share a dimension name share its range, so
    e.g. `p3`'s `h3` always fits `images`' `height`.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    graphs = manifest_data["graphs"]
    if graph not in graphs:
        raise KeyError(f"the manifest has no graph {graph!r}; it has {sorted(graphs)}")
    ranges = _dim_ranges(config, max_batch)
    profiles: Profile = {}
    for entry in graphs[graph]["inputs"]:
        dims: list[tuple[int, int, int]] = []
        for dim in entry["shape"]:
            if isinstance(dim, int) and dim > 0:
                dims.append((dim, dim, dim))
            elif dim in ranges:
                dims.append(ranges[dim])
            else:
                raise ValueError(
                    f"graph {graph!r} input {entry['name']!r} has dimension {dim!r}, for which "
                    f"there is no TensorRT profile rule (known: {sorted(ranges)}); leave this "
                    "graph to ONNX Runtime (the tensorrt runtime falls back to it)")
        low, opt, high = (tuple(dim[i] for dim in dims) for i in range(3))
        profiles[entry["name"]] = (low, opt, high)
    return profiles


def _dim_ranges(config: Glipv2Config, max_batch: int) -> dict[str, tuple[int, int, int]]:
    """Dynamic dimension name (as `engines.graphs` names them) -> (min, opt, max)."""
    pre = config.preprocess
    step = pre.size_divisibility
    longest = _round_up(pre.max_size, step)
    # Resizing makes the shorter side min_size unless the longer one would pass max_size, and
    # padding rounds both up to a step: a very elongated image leaves its short side at one step.
    # The opt point is the preset's typical landscape image.
    height = (step, _round_up(pre.min_size, step), longest)
    width = (step, longest, longest)
    query = config.language.max_query_len
    ranges: dict[str, tuple[int, int, int]] = {
        "batch": (1, OPT_BATCH, max_batch),
        "height": height,
        "width": width,
        "tokens": (1, min(OPT_TOKENS, query), query),
    }
    # caption_step's cached positions: a caption holds at most as many tokens as a prompt.
    ranges["past"] = ranges["tokens"]
    for level in FPN_LEVELS:
        ranges[f"h{level}"] = _triple(_level_size(side, level) for side in height)
        ranges[f"w{level}"] = _triple(_level_size(side, level) for side in width)
    ranges["regions"] = _triple(
        sum(_level_size(h, level) * _level_size(w, level) for level in FPN_LEVELS)
        for h, w in zip(height, width, strict=True))
    return ranges


def _level_size(side: int, level: int) -> int:
    """Side of FPN level `level` for a padded image side: exact for P3..P5 (the side is a
    multiple of 32), and ceil for P6, P7, which are stride-2 3x3 convs with padding 1 on the
    level below (`model_export.modeling.fpn`); ceil(ceil(s / 32) / 2) == ceil(s / 64)."""
    return -(-side // 2**level)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _triple(values: Any) -> tuple[int, int, int]:
    low, opt, high = values
    return low, opt, high


# --- TensorRT plumbing shared with the runtime ---------------------------------------------------


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, or `RuntimeUnavailableError` saying where to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"native TensorRT needs the `tensorrt` Python package, which is not importable here "
            f"({exc}); run on an NVIDIA GPU host with TensorRT >= 10.1 installed (e.g. `pip "
            "install tensorrt` or NVIDIA's TensorRT container), or use the onnxruntime runtime"
        ) from None
    return tensorrt


def require_cuda(purpose: str) -> torch.device:
    """The current CUDA device, or `RuntimeUnavailableError`: `purpose` needs an NVIDIA GPU."""
    if not torch.cuda.is_available():
        raise RuntimeUnavailableError(
            f"{purpose} needs an NVIDIA GPU, but PyTorch sees no CUDA device here (torch "
            f"{torch.__version__}, CUDA {torch.version.cuda or 'not built in'}); run on a GPU "
            "host, or use the onnxruntime runtime")
    return torch.device("cuda", torch.cuda.current_device())


def register_plugins(trt: ModuleType, logger: Any) -> None:
    """Register TensorRT's own plugins: the parser turns ONNX DeformConv into their
    `ModulatedDeformConv2d`, and a plan that uses it needs it again when deserialised."""
    if not trt.init_libnvinfer_plugins(logger, ""):
        raise RuntimeUnavailableError(
            "TensorRT's plugin library (libnvinfer_plugin) could not be initialised; the fusion "
            "graph's ONNX DeformConv runs on its ModulatedDeformConv2d plugin")


# --- building ------------------------------------------------------------------------------------


def build_engines(engine_dir: str | Path, graphs: Sequence[str] = DEFAULT_ENGINE_GRAPHS,
                  fp16: bool = True, max_batch: int = 8,
                  workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                  timing_cache: str | Path | None = None,
                  progress: Callable[[str], None] | None = None) -> Path:
    """Build `<graph>.plan` for each of `graphs` into `engine_dir`; returns the manifest's path.

    engine_dir: an engine folder written by `glipv2 export` (validated, checksums included).
    fp16: let TensorRT run layers in FP16 (inputs and outputs stay as exported); TensorRT 11
        removed this switch (strongly typed networks only), so there it needs `fp16=False`.
    max_batch: the largest batch (images x prompt chunks for `fusion`) the engines accept.
    workspace_bytes: scratch GPU memory one layer may use; too little rules out fast kernels.
    timing_cache: file of measured kernel timings, read if present and rewritten after each
        build, which makes rebuilds much faster (default: `engine_dir/tensorrt-timing.cache`).
    progress: called with each graph's name before it is built (builds take minutes).

    `manifest.json` gets "tensorrt": {"version", "device", "engines": {graph: {"file",
    "sha256", "precision", "onnx_sha256", "profile": {input: {"min", "opt", "max"}}}}},
    rewritten after each engine so engines already built survive a later failure. Engines of
    an earlier build with another TensorRT version or GPU are dropped from it: they cannot load.
    """
    trt = import_tensorrt()
    device = require_cuda("building TensorRT engines")
    if fp16 and not hasattr(trt.BuilderFlag, "FP16"):
        raise RuntimeUnavailableError(
            f"TensorRT {trt.__version__} builds strongly typed networks only (BuilderFlag.FP16 "
            "was removed in TensorRT 11): FP16 would have to be written into the ONNX graphs "
            "(e.g. with ModelOpt AutoCast), which `glipv2 export` does not do; build FP32 "
            "engines (fp16=False) or use TensorRT 10.x")
    manifest = load_manifest(engine_dir)
    unknown = [graph for graph in graphs if graph not in manifest.graphs]
    if unknown:
        raise ValueError(f"{engine_dir} has no graph {unknown}; it has {sorted(manifest.graphs)}")
    directory = manifest.directory
    cache_path = Path(timing_cache) if timing_cache is not None else directory / TIMING_CACHE_FILE
    data = dict(manifest.data)
    device_name = torch.cuda.get_device_name(device)
    previous = data.get("tensorrt", {})
    same_host = previous.get("version") == trt.__version__ and previous.get("device") == device_name
    engines: dict[str, Any] = dict(previous.get("engines", {})) if same_host else {}

    logger = trt.Logger(trt.Logger.WARNING)
    register_plugins(trt, logger)
    for graph in graphs:
        if progress is not None:
            progress(graph)
        profile = engine_profiles(data, manifest.config, graph, max_batch)
        onnx_path = directory / data["graphs"][graph]["file"]
        plan = _build_plan(trt, logger, onnx_path, profile, fp16, workspace_bytes, cache_path)
        plan_path = directory / f"{graph}{PLAN_SUFFIX}"
        _write_atomic(plan_path, plan)
        engines[graph] = {
            "file": plan_path.name,
            "sha256": sha256_file(plan_path),
            "precision": "fp16" if fp16 else "fp32",
            "onnx_sha256": data["graphs"][graph]["sha256"],
            "profile": {name: {"min": list(low), "opt": list(opt), "max": list(high)}
                        for name, (low, opt, high) in profile.items()},
        }
        data["tensorrt"] = {"version": trt.__version__, "device": device_name, "engines": engines}
        _write_atomic(directory / MANIFEST_FILE, (json.dumps(data, indent=2) + "\n").encode())
    return directory / MANIFEST_FILE


def _build_plan(trt: ModuleType, logger: Any, onnx_path: Path, profile: Profile, fp16: bool,
                workspace_bytes: int, cache_path: Path) -> Any:
    """Parse one ONNX graph and build its serialised engine (a buffer, `trt.IHostMemory`)."""
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # From the file, not from bytes, so weights stored as ONNX external data are found.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(_parse_failure(onnx_path, errors, trt.__version__))
    names = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if names != sorted(profile):
        raise EngineBuildError(f"{onnx_path} has inputs {names} but its manifest entry lists "
                               f"{sorted(profile)}; re-export the model")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    optimisation = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimisation.set_shape(name, low, opt, high)
    if config.add_optimization_profile(optimisation) < 0:
        raise EngineBuildError(f"TensorRT refused the optimisation profile of {onnx_path}: "
                               f"{profile}")
    _load_timing_cache(config, cache_path)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(
            f"TensorRT could not build an engine from {onnx_path} (its errors are logged "
            f"above); if it ran out of memory, lower max_batch or the workspace "
            f"({workspace_bytes} bytes). Profile: {profile}")
    _write_atomic(cache_path, config.get_timing_cache().serialize())
    return plan


def _network_flags(trt: ModuleType) -> int:
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated and ignored there);
    # 8.x must be asked for it.
    if int(trt.__version__.split(".")[0]) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _parse_failure(onnx_path: Path, errors: list[str], version: str) -> str:
    lines = errors or ["(the parser recorded no error)"]
    message = f"TensorRT {version}'s ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(lines)
    if any("DeformConv" in error for error in errors):
        message += (
            "\nONNX DeformConv (opset 19) is parsed only by TensorRT >= 10.1, which maps it to "
            "the ModulatedDeformConv2d plugin of libnvinfer_plugin (registered before parsing; "
            "check that this library came with TensorRT); an older TensorRT needs a plugin "
            "registered under the name DeformConv")
    return message


def _load_timing_cache(config: Any, path: Path) -> None:
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    # A cache from another TensorRT version or GPU is refused (its timings do not hold here):
    # start an empty one, which replaces the file after the build.
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _write_atomic(path: Path, data: Any) -> None:
    """Write a bytes-like object through a temporary file and a rename, so that an interrupted
    build never leaves a truncated plan, cache or manifest behind."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        handle.write(memoryview(data))
    os.replace(temporary, path)
