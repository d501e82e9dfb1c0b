"""Native TensorRT: the engines `glipv2 build-engines` built, every other graph on ONNX Runtime.

`engines.tensorrt.build_engines` writes `vision` and `fusion` (by default) as
serialised engines with one optimisation profile each. This runtime deserialises them and runs
them on torch CUDA tensors: TensorRT reads and writes the tensors' device memory directly, on a
CUDA stream of each graph's own (no pycuda). A graph the manifest has but no engine was built for
runs on ONNX Runtime (CUDA provider where this onnxruntime has it, else CPU), so callers see the
same graphs as with any other runtime.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from engines.errors import RuntimeUnavailableError
from engines.manifest import ManifestError, load_manifest
from engines.runtimes.base import OrtProvider, Runtime
from engines.runtimes.onnx_runtime import OnnxRuntime
from engines.tensorrt import import_tensorrt, register_plugins, require_cuda

# TensorRT data types, by enum member name, -> dtypes of the torch buffers bound to them.
_TORCH_DTYPES = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
    "INT32": torch.int32, "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class _Engine:
    """One deserialised engine with what `run` needs to drive it.

    One execution context, so one batch at a time: `lock` serialises callers of this graph.
    """

    context: Any  # listed before `engine`, so it is released first: it uses the engine
    engine: Any
    inputs: dict[str, torch.dtype]  # input name -> dtype the engine reads
    outputs: dict[str, torch.dtype]  # output name -> dtype the engine writes
    profile: dict[str, dict[str, list[int]]]  # input -> {"min", "opt", "max"} (manifest)
    stream: torch.cuda.Stream
    lock: threading.Lock = field(default_factory=threading.Lock)


class TensorRtRuntime(Runtime):
    """Runs the TensorRT engines of a validated engine folder; ONNX Runtime runs the rest.

    Needs the `tensorrt` package, a CUDA device, and engines built by the same TensorRT version
    on the same GPU model; each is checked with a `RuntimeUnavailableError` that says so.
    """

    def __init__(self, engine_dir: str | Path) -> None:
        trt = import_tensorrt()
        self.device = require_cuda("the tensorrt runtime")
        self.manifest = load_manifest(engine_dir)
        self.config = self.manifest.config
        built = self.manifest.tensorrt_engines()
        if not built:
            raise RuntimeUnavailableError(
                f"{engine_dir} has no TensorRT engines; build them on this GPU host with "
                "`glipv2 build-engines` (engines.tensorrt.build_engines)")
        record = self.manifest.data["tensorrt"]
        if record.get("version") != trt.__version__:
            raise RuntimeUnavailableError(
                f"the engines in {engine_dir} were built with TensorRT {record.get('version')}, "
                f"but this is TensorRT {trt.__version__}, and an engine loads only in the "
                "version that built it; rebuild them here with `glipv2 build-engines`")
        for graph, entry in built.items():
            if entry.get("onnx_sha256") != self.manifest.graphs.get(graph, {}).get("sha256"):
                raise ManifestError(
                    f"the {graph!r} engine in {engine_dir} was not built from this folder's "
                    f"{graph!r} graph (re-exported since?); rebuild with `glipv2 build-engines`")

        # The TensorRT runtime and logger must outlive the engines deserialised through them.
        self._logger = trt.Logger(trt.Logger.WARNING)
        register_plugins(trt, self._logger)
        self._trt_runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self._engines = {graph: self._load(trt, graph, entry, record)
                             for graph, entry in built.items()}
        rest = [graph for graph in self.manifest.graphs if graph not in self._engines]
        self._fallback = (OnnxRuntime(engine_dir, provider=_fallback_provider(), graphs=rest)
                          if rest else None)
        self.graphs = frozenset(self.manifest.graphs)
        precisions = sorted({entry["precision"] for entry in built.values()})
        self.name = f"tensorrt-{'+'.join(precisions)}"

    def _load(self, trt: ModuleType, graph: str, entry: Mapping[str, Any],
              record: Mapping[str, Any]) -> _Engine:
        path = self.manifest.directory / entry["file"]
        engine = self._trt_runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            here = torch.cuda.get_device_name(self.device)
            raise RuntimeUnavailableError(
                f"TensorRT {trt.__version__} could not load {path} (built on "
                f"{record.get('device')!r}, this GPU is {here!r}; its errors are logged above); "
                "an engine runs only on the GPU model that built it: rebuild the engines here")
        context = engine.create_execution_context()
        if context is None:
            raise RuntimeUnavailableError(
                f"TensorRT could not create an execution context for {path} (out of GPU memory?)")
        inputs: dict[str, torch.dtype] = {}
        outputs: dict[str, torch.dtype] = {}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            dtype = _torch_dtype(engine.get_tensor_dtype(name), graph, name)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs)[name] = dtype
        return _Engine(context=context, engine=engine, inputs=inputs, outputs=outputs,
                       profile=entry["profile"], stream=torch.cuda.Stream(self.device))

    def run(self, graph: str, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self._check_graph(graph)
        engine = self._engines.get(graph)
        if engine is None:
            assert self._fallback is not None  # built whenever a graph has no engine
            return self._fallback.run(graph, inputs)
        missing = [name for name in engine.inputs if name not in inputs]
        if missing:
            raise KeyError(f"graph {graph!r} needs inputs {missing}")
        # The copies in, the engine and the copies out all go on the graph's stream, in order.
        with engine.lock, torch.cuda.device(self.device), torch.cuda.stream(engine.stream):
            return self._execute(graph, engine, inputs)

    def _execute(self, graph: str, engine: _Engine, inputs: Mapping[str, Tensor]
                 ) -> dict[str, Tensor]:
        context = engine.context
        # Held until the stream is synchronised: TensorRT reads these buffers asynchronously.
        device_inputs: dict[str, Tensor] = {}
        for name, dtype in engine.inputs.items():
            tensor = inputs[name].to(self.device, dtype).contiguous()
            if not context.set_input_shape(name, tuple(tensor.shape)):
                bounds = engine.profile.get(name, {})
                raise ValueError(
                    f"graph {graph!r} input {name!r} has shape {list(tensor.shape)}, which the "
                    f"engine's profile does not cover (min {bounds.get('min')}, max "
                    f"{bounds.get('max')}); rebuild the engines with larger bounds, or run this "
                    "size on the onnxruntime runtime")
            context.set_tensor_address(name, tensor.data_ptr())
            device_inputs[name] = tensor
        outputs: dict[str, Tensor] = {}
        for name, dtype in engine.outputs.items():
            shape = tuple(context.get_tensor_shape(name))
            if any(size < 0 for size in shape):
                raise RuntimeError(f"graph {graph!r} output {name!r} has no static shape for "
                                   f"these inputs ({shape}); data-dependent shapes are not "
                                   "supported")
            output = torch.empty(shape, dtype=dtype, device=self.device)
            context.set_tensor_address(name, output.data_ptr())
            outputs[name] = output
        stream = torch.cuda.current_stream(self.device)  # the graph's own, made current by `run`
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the {graph!r} engine (its errors are "
                               "logged above)")
        stream.synchronize()
        return {name: value.cpu() for name, value in outputs.items()}

    def close(self) -> None:
        self._engines.clear()
        if self._fallback is not None:
            self._fallback.close()


def _torch_dtype(trt_dtype: Any, graph: str, name: str) -> torch.dtype:
    dtype = _TORCH_DTYPES.get(trt_dtype.name)
    if dtype is None:
        raise TypeError(f"graph {graph!r} tensor {name!r} has TensorRT type {trt_dtype.name}, "
                        f"which has no torch buffer type here (supported: {sorted(_TORCH_DTYPES)})")
    return dtype


def _fallback_provider() -> OrtProvider:
    """ONNX Runtime's CUDA provider when this onnxruntime build has it (it stays on the GPU the
    engines use), else its CPU provider."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return OrtProvider.CUDA if "CUDAExecutionProvider" in available else OrtProvider.CPU
