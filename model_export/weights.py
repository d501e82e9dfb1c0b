"""Our on-disk model format: `config.json` (a Glipv2Config) + `model.safetensors` (strict)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model_export.config import Glipv2Config
from model_export.model import Glipv2Model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_model(model: Glipv2Model, out_dir: str | Path) -> Path:
    """Write the model's config and weights into `out_dir` (created if needed)."""
    return save_weights(model.config, model.state_dict(), out_dir)


def save_weights(config: Glipv2Config, state: dict[str, torch.Tensor], out_dir: str | Path
                 ) -> Path:
    """Write a config and a full state_dict for it into `out_dir` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(_untie(tensors), str(out / WEIGHTS_FILE), metadata={"format": "glipv2"})
    return out


def load_config(model_dir: str | Path) -> Glipv2Config:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {model_dir}: not a converted GLIPv2 model")
    return Glipv2Config.from_dict(json.loads(path.read_text()))


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> Glipv2Model:
    """Build the model from `config.json` and load `model.safetensors` strictly, in eval mode."""
    config = load_config(model_dir)
    model = Glipv2Model(config)
    state = load_file(str(Path(model_dir) / WEIGHTS_FILE), device=str(device))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): give each key its own copy."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out
