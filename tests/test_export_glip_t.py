"""The `glip-t` preset (random weights) exports and runs in ONNX Runtime at full size: one
800x1344 image and a 256-token prompt, every output of vision, language and fusion within 1e-3
(max abs) of PyTorch. The small-preset parity tests cannot show that nothing in the graphs breaks
or drifts at GLIP-T's width, depth and sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engines.export import export_model
from engines.runtimes.onnx_runtime import OnnxRuntime
from engines.runtimes.torch_eager import TorchRuntime
from model_export.checkpoints.weights import save_model
from model_export.modeling.config import get_preset
from model_export.modeling.model import Glipv2Model

pytestmark = pytest.mark.slow  # exports ~0.7 GB of graphs and runs GLIP-T twice (~3 min)

TOLERANCE = 1e-3
HEIGHT, WIDTH, TOKENS = 800, 1344, 256


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory) -> tuple[TorchRuntime, OnnxRuntime]:
    torch.manual_seed(0)
    model = Glipv2Model(get_preset("glip-t")).eval()
    root = tmp_path_factory.mktemp("glip-t")
    model_dir = save_model(model, root / "glip-t-random")
    export_model(model_dir, root / "engine")
    return TorchRuntime(model), OnnxRuntime(Path(root / "engine"))


def test_glip_t_full_size_parity(runtimes: tuple[TorchRuntime, OnnxRuntime]) -> None:
    reference, onnx = runtimes
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, HEIGHT, WIDTH, generator=generator)
    ids = torch.randint(1000, 30522, (1, TOKENS), generator=generator)
    ids[0, 0], ids[0, -1] = 101, 102
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    visual = reference.run("vision", {"images": images})
    hidden = reference.run("language", text)
    fusion_inputs = {**visual, "hidden": hidden["hidden"],
                     "attention_mask": text["attention_mask"]}
    expected = {"vision": visual, "language": hidden,
                "fusion": reference.run("fusion", fusion_inputs)}
    inputs = {"vision": {"images": images}, "language": text, "fusion": fusion_inputs}
    for graph, outputs in expected.items():
        got = onnx.run(graph, inputs[graph])
        for name, value in outputs.items():
            assert got[name].shape == value.shape, (graph, name)
            diff = (got[name] - value).abs().max().item()
            assert diff <= TOLERANCE, f"{graph}.{name}: max abs diff {diff:.3g}"
    assert visual["p3"].shape[-2:] == (HEIGHT // 8, WIDTH // 8)
    assert expected["fusion"]["token_logits_p3"].shape == (1, HEIGHT * WIDTH // 64, TOKENS)
