"""A safetensors file with its metadata: each hop of the GPU round trip keeps the weights' own
metadata (the model's step and config hash), so every script reads both."""

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor


def read_state(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a safetensors file and its metadata."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return load_file(str(path)), metadata
