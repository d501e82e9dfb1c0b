"""PyTorch eager runtime: the export wrappers run as ordinary modules (development, parity)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from engines.errors import RuntimeUnavailableError
from engines.graphs import HEAVY_GRAPHS, graph_signatures
from engines.runtimes.base import Runtime
from model_export.checkpoints.weights import load_model
from model_export.modeling.model import Glipv2Model


class TorchRuntime(Runtime):
    """Runs each graph's wrapper (`engines.graphs`) on the model in eval mode.

    The wrappers are exactly what ONNX export traces, so this runtime's outputs are the
    reference the others are compared with, tensor name by tensor name.

    precision "bf16" runs `vision` and `fusion` under autocast to bfloat16 (CPU: AVX-512 bf16
    matrix products; CUDA: tensor cores), outputs returned as float32; "fp32" runs everything
    in float32.
    """

    def __init__(self, model: Glipv2Model, device: str = "cpu", threads: int = 0,
                 precision: str = "fp32") -> None:
        if precision not in ("fp32", "bf16"):
            raise RuntimeUnavailableError(
                f"the pytorch runtime runs fp32 or bf16, not {precision!r} (int8 is an ONNX "
                "Runtime variant: glipv2 export --variants int8)")
        if threads:
            torch.set_num_threads(threads)
        model = model.eval()
        self._graphs: dict[str, tuple[nn.Module, list[str], list[str]]] = {
            graph.name: (graph.module, graph.input_names, graph.output_names)
            for graph in graph_signatures(model)
        }
        self.model = model.to(device)
        self.config = model.config
        self.device = torch.device(device)
        self.precision = precision
        self.name = "pytorch" if self.device.type == "cpu" else f"pytorch-{self.device.type}"
        if precision != "fp32":
            self.name += f"-{precision}"
        self.graphs = frozenset(self._graphs)

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "cpu", threads: int = 0,
                 precision: str = "fp32") -> TorchRuntime:
        return cls(load_model(model_dir), device=device, threads=threads, precision=precision)

    @torch.no_grad()
    def run(self, graph: str, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self._check_graph(graph)
        module, input_names, output_names = self._graphs[graph]
        missing = [name for name in input_names if name not in inputs]
        if missing:
            raise KeyError(f"graph {graph!r} needs inputs {missing}")
        reduced = self.precision == "bf16" and graph in HEAVY_GRAPHS
        context = (torch.autocast(self.device.type, dtype=torch.bfloat16) if reduced
                   else contextlib.nullcontext())
        with context:
            outputs = module(*(inputs[name].to(self.device) for name in input_names))
        if isinstance(outputs, Tensor):
            outputs = (outputs,)
        return {name: _float32(value.cpu())
                for name, value in zip(output_names, outputs, strict=True)}


def _float32(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor
