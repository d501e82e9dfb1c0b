"""Pretrained text-encoder weights that ship inside Python packages (no model hub at run time)."""

from __future__ import annotations

import importlib
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

from model_export.modeling.config import PRETRAINED_LANGUAGE, LanguageConfig

# Packaged checkpoint keys that GLIP's encoder (built without a pooler) does not have.
_UNUSED_PREFIXES = ("pooler.",)


def pretrained_language_state(config: LanguageConfig) -> dict[str, Tensor]:
    """The packaged BERT weights for `config.pretrained`, keyed like `Glipv2LanguageBackbone.bert`.

    Raises ValueError when the package's architecture does not match the config.
    """
    if config.pretrained is None:
        raise ValueError("language.pretrained is not set")
    package = importlib.import_module(PRETRAINED_LANGUAGE[config.pretrained])
    path = Path(package.get_model_path()) / "model.safetensors"
    state = load_file(str(path))
    return {
        key: value for key, value in state.items()
        if not key.startswith(_UNUSED_PREFIXES) and key != "embeddings.position_ids"
    }
