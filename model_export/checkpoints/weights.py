"""Our on-disk model format: `config.json` (a Glipv2Config) + `model.safetensors` (strict).

A model whose text encoder is a frozen, packaged pretrained one (`language.pretrained`) may leave
those weights out of its file: the file's metadata names the left-out prefix and `load_model`
takes them from the package. Every parameter still comes from exactly one place, checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model_export.checkpoints.pretrained import pretrained_language_state
from model_export.modeling.config import Glipv2Config
from model_export.modeling.model import Glipv2Model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LANGUAGE_PREFIX = "language.bert."
_EXTERNAL_KEY = "external_prefixes"


def save_model(model: Glipv2Model, out_dir: str | Path, external_language: bool = False) -> Path:
    """Write the model's config and weights into `out_dir` (created if needed).

    `external_language` leaves the text encoder out: only valid when it is the unchanged
    packaged encoder named by `config.language.pretrained`.
    """
    state = model.state_dict()
    if external_language:
        if model.config.language.pretrained is None:
            raise ValueError("external_language needs config.language.pretrained")
        state = {k: v for k, v in state.items() if not k.startswith(LANGUAGE_PREFIX)}
    prefixes = [LANGUAGE_PREFIX] if external_language else []
    return save_weights(model.config, state, out_dir, prefixes)


def save_weights(config: Glipv2Config, state: dict[str, torch.Tensor], out_dir: str | Path,
                 external_prefixes: list[str] | None = None) -> Path:
    """Write a config and a state_dict for it into `out_dir` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {"format": "glipv2", _EXTERNAL_KEY: json.dumps(external_prefixes or [])}
    save_file(_untie(tensors), str(out / WEIGHTS_FILE), metadata=metadata)
    return out


def save_config(config: Glipv2Config, model_dir: str | Path) -> Path:
    """Write `config.json` into an existing model folder (its weights untouched)."""
    path = Path(model_dir) / CONFIG_FILE
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return path


def load_config(model_dir: str | Path) -> Glipv2Config:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {model_dir}: not a converted GLIPv2 model")
    return Glipv2Config.from_dict(json.loads(path.read_text()))


def load_pretrained_language(model: Glipv2Model) -> None:
    """Copy the packaged pretrained text encoder into `model` (strict)."""
    state = pretrained_language_state(model.config.language)
    model.language.bert.load_state_dict(state, strict=True)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> Glipv2Model:
    """Build the model from `config.json` and load its weights strictly, in eval mode."""
    config = load_config(model_dir)
    model = Glipv2Model(config)
    path = Path(model_dir) / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    external = json.loads(metadata.get(_EXTERNAL_KEY, "[]"))
    state = load_file(str(path))
    if external:
        if external != [LANGUAGE_PREFIX]:
            raise ValueError(f"{path}: unsupported external weights {external}")
        load_pretrained_language(model)
        expected = {k for k in model.state_dict() if not k.startswith(LANGUAGE_PREFIX)}
        if set(state) != expected:
            missing, unexpected = expected - set(state), set(state) - expected
            raise ValueError(f"{path}: missing {sorted(missing)[:10]}, "
                             f"unexpected {sorted(unexpected)[:10]}")
        model.load_state_dict(state, strict=False)
    else:
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
