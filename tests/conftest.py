"""Shared fixtures: reference files and deterministic fake GLIP checkpoints."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
VECTOR_OPTIONS = {"log_scale": -2.0, "bias0": -32.0, "head_std": 0.8}


def fake_ckpt_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fake_glip_ckpt", REFERENCE / "fake_glip_ckpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_shapes(preset: str) -> dict[str, list[int]]:
    name = {"glip-t": "glip_t_state_dict.json", "glip-l": "glip_l_state_dict.json"}[preset]
    return json.loads((REFERENCE / name).read_text())


def fake_state(preset: str, seed: int = 0, **options: float) -> dict[str, torch.Tensor]:
    """A released-layout state_dict ({'module.' + key: tensor}) of random tensors."""
    module = fake_ckpt_module()
    return module.build(reference_shapes(preset), seed, module._resolve(options))


@pytest.fixture(scope="session")
def glip_t_vector_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake GLIP-T checkpoint the reference test vector was produced with."""
    path = tmp_path_factory.mktemp("ckpt") / "glip_t_fake.pth"
    torch.save({"model": fake_state("glip-t", 0, **VECTOR_OPTIONS)}, path)
    return path
