"""PyTorch eager runtime: the export wrappers run as ordinary modules (development, parity)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from model_export.export import graph_specs
from model_export.model import Glipv2Model
from model_export.weights import load_model
from service.runtimes.base import Runtime


class TorchRuntime(Runtime):
    """Runs each graph's export wrapper (`model_export.export`) on the model in eval mode.

    The wrappers are exactly what ONNX export traces, so this runtime's outputs are the
    reference the others are compared with, tensor name by tensor name.
    """

    def __init__(self, model: Glipv2Model, device: str = "cpu", threads: int = 0) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval().to(device)
        self.config = model.config
        self.device = torch.device(device)
        self.name = "pytorch" if self.device.type == "cpu" else f"pytorch-{self.device.type}"
        self._graphs: dict[str, tuple[nn.Module, list[str], list[str]]] = {
            spec.name: (spec.module, spec.input_names, spec.output_names)
            for spec in graph_specs(self.model)
        }
        self.graphs = frozenset(self._graphs)

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "cpu", threads: int = 0
                 ) -> TorchRuntime:
        return cls(load_model(model_dir), device=device, threads=threads)

    @torch.no_grad()
    def run(self, graph: str, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self._check_graph(graph)
        module, input_names, output_names = self._graphs[graph]
        missing = [name for name in input_names if name not in inputs]
        if missing:
            raise KeyError(f"graph {graph!r} needs inputs {missing}")
        outputs = module(*(inputs[name].to(self.device) for name in input_names))
        if isinstance(outputs, Tensor):
            outputs = (outputs,)
        return {name: value.cpu() for name, value in zip(output_names, outputs, strict=True)}
