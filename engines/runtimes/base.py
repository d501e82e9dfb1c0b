"""The runtime interface: named graphs in, named tensors out, whatever runs them.

The graphs and their tensor names are those of `engines.graphs` (the ONNX boundary), so a
caller written against one runtime runs unchanged on every other, and parity is checked graph by
graph. Tensors cross the interface as CPU `torch.Tensor`s (zero-copy to and from NumPy); a GPU
runtime copies in and out itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from engines.kinds import OrtProvider, Precision, RuntimeKind
from model_export.modeling.config import Glipv2Config


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a model.

    kind: "pytorch" runs `model_dir` eagerly; "onnxruntime" and "tensorrt" run the exported
        graphs in `engine_dir` (`glipv2 export`, then `glipv2 build-engines` for TensorRT).
    engine_cache_dir: where "onnxruntime" without `engine_dir` finds its export of `model_dir`,
        made on first use (`engines.cache`).
    provider: ONNX Runtime execution provider.
    precision: reduced precision of `vision` and `fusion`: "bf16" (PyTorch autocast) or "int8"
        (the ONNX Runtime variant `glipv2 export --variants int8` writes).
    threads: intra-op threads (0: the library's default).
    device: PyTorch device ("cpu", "cuda").
    """

    kind: RuntimeKind = RuntimeKind.PYTORCH
    model_dir: Path | None = None
    engine_dir: Path | None = None
    engine_cache_dir: Path | None = None
    provider: OrtProvider = OrtProvider.CPU
    precision: Precision = Precision.FP32
    threads: int = 0
    device: str = "cpu"


class Runtime(ABC):
    """Runs the exported graphs by name. Thread-safe for one caller per graph at a time."""

    #: what /v1/models reports, e.g. "pytorch", "onnxruntime-cpu-fp32", "tensorrt-fp16"
    name: str
    #: the model's configuration (tokenizer, pre-processing, heads)
    config: Glipv2Config
    #: graphs this runtime can run (a model without a head has no graph for it)
    graphs: frozenset[str]

    @abstractmethod
    def run(self, graph: str, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run one graph on a batch: input name -> tensor, output name -> CPU tensor."""

    def close(self) -> None:  # noqa: B027 - optional hook; most runtimes hold nothing to free
        """Release sessions and device memory (default: nothing to release)."""

    def _check_graph(self, graph: str) -> None:
        if graph not in self.graphs:
            raise KeyError(f"runtime {self.name!r} has no graph {graph!r}; it has "
                           f"{sorted(self.graphs)}")


def open_runtime(options: RuntimeOptions) -> Runtime:
    """The runtime `options` ask for, loaded and validated (clear errors, nothing half-built)."""
    if options.kind == RuntimeKind.PYTORCH:
        from engines.runtimes.torch_eager import TorchRuntime

        if options.model_dir is None:
            raise ValueError("the pytorch runtime needs a model folder")
        return TorchRuntime.from_dir(options.model_dir, device=options.device,
                                     threads=options.threads, precision=options.precision)
    if options.kind == RuntimeKind.ONNXRUNTIME:
        from engines.runtimes.onnx_runtime import OnnxRuntime

        engine_dir, cache = options.engine_dir, options.engine_cache_dir
        if engine_dir is None and cache is not None and options.model_dir is not None:
            from engines.cache import cached_engines

            engine_dir = cached_engines(options.model_dir, cache)
        if engine_dir is None:
            raise ValueError("the onnxruntime runtime needs an engine folder (glipv2 export), "
                             "or a model folder and an engine cache folder to export it into")
        return OnnxRuntime(engine_dir, provider=options.provider,
                           precision=options.precision, threads=options.threads)
    if options.engine_dir is None:
        raise ValueError(f"the {options.kind} runtime needs an engine folder (glipv2 export, "
                         "then glipv2 build-engines)")
    if options.kind == RuntimeKind.TENSORRT:
        from engines.runtimes.tensorrt import TensorRtRuntime

        return TensorRtRuntime(options.engine_dir)
    raise ValueError(f"unknown runtime {options.kind!r}")
