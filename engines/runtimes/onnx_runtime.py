"""ONNX Runtime: the exported graphs on the CPU, CUDA or TensorRT execution provider."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engines.errors import RuntimeUnavailableError
from engines.graphs import HEAVY_GRAPHS
from engines.manifest import load_manifest
from engines.runtimes.base import OrtProvider, Precision, Runtime

# Our provider names -> ONNX Runtime's, in preference order (fallbacks after the first).
PROVIDERS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
class OnnxRuntime(Runtime):
    """One `InferenceSession` per graph of a validated engine folder.

    precision: "fp32", or "int8" to run the `vision` and `fusion` variants the export wrote
        (the other graphs stay fp32). A variant the folder lacks is an error, not a fallback
        (bf16 is the PyTorch runtime's: ONNX Runtime's x86 CPU provider has no bf16 kernels).
    threads: intra-op threads per session (0: ONNX Runtime's default, one per core).
    graphs: load only these graphs (default: all the manifest has), e.g. the ones another
        runtime does not cover.
    """

    def __init__(self, engine_dir: str | Path, provider: OrtProvider = OrtProvider.CPU,
                 precision: Precision = Precision.FP32, threads: int = 0,
                 graphs: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        self.manifest = load_manifest(engine_dir)
        self.config = self.manifest.config
        available = ort.get_available_providers()
        wanted = PROVIDERS[provider]
        if wanted[0] not in available:
            raise RuntimeUnavailableError(
                f"ONNX Runtime provider {provider!r} ({wanted[0]}) is not available here; this "
                f"onnxruntime build has {available} (CUDA and TensorRT need onnxruntime-gpu and "
                "an NVIDIA GPU)")
        for graph in HEAVY_GRAPHS:
            if (graphs is None or graph in graphs) and not self.manifest.has_variant(
                    graph, precision):
                raise RuntimeUnavailableError(
                    f"{engine_dir} has no {precision} variant of {graph!r}; export one with "
                    f"`glipv2 export --variants {precision}`")
        options = session_options(threads)
        providers = [(name, _provider_options(name, self.manifest.directory))
                     for name in wanted if name in available]
        self._sessions: dict[str, Any] = {}
        for graph in self.manifest.graphs if graphs is None else graphs:
            variant = precision if graph in HEAVY_GRAPHS else "fp32"
            path = self.manifest.graph_path(graph, variant)
            self._sessions[graph] = ort.InferenceSession(str(path), options, providers=providers)
        self._inputs = {g: {i.name: i.type for i in s.get_inputs()}
                        for g, s in self._sessions.items()}
        self._outputs = {g: [o.name for o in s.get_outputs()] for g, s in self._sessions.items()}
        self.graphs = frozenset(self._sessions)
        self.name = f"onnxruntime-{provider}-{precision}"

    def run(self, graph: str, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self._check_graph(graph)
        expected = self._inputs[graph]
        missing = [name for name in expected if name not in inputs]
        if missing:
            raise KeyError(f"graph {graph!r} needs inputs {missing}")
        feed = {name: _to_numpy(inputs[name], expected[name]) for name in expected}
        values = self._sessions[graph].run(self._outputs[graph], feed)
        return {name: torch.from_numpy(np.asarray(value))
                for name, value in zip(self._outputs[graph], values, strict=True)}

    def close(self) -> None:
        self._sessions.clear()


def session_options(threads: int = 0) -> Any:
    """The serving sessions' options: every graph optimisation, `threads` intra-op threads
    (0: one per core), no spinning."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    # One session per graph, each with its own thread pool: spinning idle workers would
    # steal the cores the running graph needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


def _to_numpy(tensor: Tensor, ort_type: str) -> np.ndarray:
    """A CPU tensor as the contiguous array of the dtype the graph declares."""
    array = tensor.detach().cpu().numpy()
    dtype = _ORT_TYPES.get(ort_type)
    if dtype is not None and array.dtype != dtype:
        array = array.astype(dtype)
    return np.ascontiguousarray(array)


def _provider_options(name: str, engine_dir: Path) -> dict[str, Any]:
    if name == "TensorrtExecutionProvider":
        cache = engine_dir / "ort-tensorrt-cache"
        return {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache)}
    return {}
