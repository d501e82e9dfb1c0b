"""Runtimes: where the exported graphs run (DESIGN.md, "Engines").

One interface, `Runtime.run(graph, inputs) -> outputs`, and one implementation per backend:
`TorchRuntime` (PyTorch eager: development and the parity reference), `OnnxRuntime` (ONNX Runtime
with the CPU, CUDA or TensorRT execution provider) and `TensorRtRuntime` (native TensorRT engines
built by `glipv2 build-engines`). `open_runtime` picks one from configuration.
"""

from engines.errors import RuntimeUnavailableError
from engines.manifest import EngineManifest, ManifestError, load_manifest
from engines.runtimes.base import (
    OrtProvider,
    Precision,
    Runtime,
    RuntimeKind,
    RuntimeOptions,
    open_runtime,
)

__all__ = ["EngineManifest", "ManifestError", "OrtProvider", "Precision", "Runtime",
           "RuntimeKind", "RuntimeOptions", "RuntimeUnavailableError", "load_manifest",
           "open_runtime"]
