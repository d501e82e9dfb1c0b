"""Registered tuned prompts: a fixed class list and the text-feature offset learned for it.

A tuned prompt is position-bound: its class names in one order, one caption, and a (T, D)
offset for the caption's T tokens (GLIP's `tunable_linear`), added to the text encoder's
features. `glipv2 tune-prompt` writes them (`model_export/training/prompt_tuning.py`); the
service loads a folder of them as its `prompt_id`s, checked against the model it serves.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from model_export.processing.prompt import build_detection_prompt, load_tokenizer

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SUFFIX = ".safetensors"


class PromptRegistryError(ValueError):
    """A tuned prompt that this model cannot use (the message says which file and why)."""


@dataclass
class TunedPrompt:
    """A registered prompt: class names in their tuned order and the offset of its tokens.

    offset: (T, D) added to the text encoder's features of `caption`, whose T tokens include
    [CLS] and [SEP]; D is the encoder width.
    """

    name: str
    classes: list[str]
    offset: Tensor
    description: str = ""

    @property
    def caption(self) -> str:
        return build_detection_prompt(self.classes).caption


def save_tuned_prompt(prompt: TunedPrompt, directory: str | Path) -> Path:
    """Write `NAME.safetensors` (the offset, with the classes in its metadata)."""
    if not NAME_PATTERN.match(prompt.name):
        raise ValueError(f"prompt name {prompt.name!r} must match {NAME_PATTERN.pattern}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{prompt.name}{SUFFIX}"
    metadata = {"format": "glipv2-tuned-prompt", "classes": json.dumps(prompt.classes),
                "description": prompt.description}
    save_file({"offset": prompt.offset.detach().cpu().contiguous()}, str(path), metadata=metadata)
    return path


def load_tuned_prompts(directory: str | Path, hidden_size: int, max_tokens: int,
                       tokenizer_name: str = "bert-base-uncased") -> dict[str, TunedPrompt]:
    """Every `*.safetensors` of `directory`, checked against the model it will serve with."""
    folder = Path(directory)
    if not folder.is_dir():
        raise PromptRegistryError(f"prompt folder {folder} does not exist")
    tokenizer = load_tokenizer(tokenizer_name).backend_tokenizer
    prompts: dict[str, TunedPrompt] = {}
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        name = path.name[: -len(SUFFIX)]
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                offset = handle.get_tensor("offset")
            classes = json.loads(metadata["classes"])
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise PromptRegistryError(f"{path}: not a tuned prompt ({exc})") from None
        if metadata.get("format") != "glipv2-tuned-prompt":
            raise PromptRegistryError(f"{path}: format is {metadata.get('format')!r}, expected "
                                      "'glipv2-tuned-prompt'")
        prompt = TunedPrompt(name, list(classes), offset.float(), metadata.get("description", ""))
        tokens = len(tokenizer.encode(prompt.caption).ids)
        if tokens > max_tokens:
            raise PromptRegistryError(f"{path}: the prompt is {tokens} tokens, more than the "
                                      f"model's limit of {max_tokens}")
        if tuple(offset.shape) != (tokens, hidden_size):
            raise PromptRegistryError(
                f"{path}: offset is {tuple(offset.shape)}, the prompt needs ({tokens}, "
                f"{hidden_size}) (tokens of its caption, text-encoder width)")
        prompts[name] = prompt
    return prompts
