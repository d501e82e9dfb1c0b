"""Convert a released GLIP checkpoint (`{'model': state_dict}`, `module.` prefixes) to our format.

Strict by design, unlike the reference loader (which matches by suffix and skips mismatches
silently): every checkpoint key is either mapped to exactly one of our parameters, verified equal to
a buffer our model derives itself, or on a short list of keys that are unused at inference (and
reported as ignored). Anything unmapped, missing or mis-shaped fails with the keys named.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from model_export.checkpoints.weights import save_weights
from model_export.modeling.backbone import relative_position_index
from model_export.modeling.config import Glipv2Config, get_preset
from model_export.modeling.model import Glipv2Model
from model_export.processing.anchors import AnchorGenerator

# Keys present in released checkpoints that inference does not use: accepted, reported, dropped.
IGNORED_PATTERNS: dict[str, str] = {
    r"rpn\.head\.cls_logits\.(weight|bias)": "class-logit conv of closed-set training",
    r"language_backbone\.body\.model\.pooler\.dense\.(weight|bias)": "BERT pooler (GLIP has none)",
}

# Buffers our model builds itself; a checkpoint copy must equal ours.
_DERIVED_PATTERNS: dict[str, Callable[[re.Match[str]], str]] = {
    r"backbone\.body\.(layers\.\d+\.blocks\.\d+\.attn\.relative_position_index)":
        lambda m: "backbone." + m[1],
    r"language_backbone\.body\.model\.(embeddings\.position_ids)":
        lambda m: "language.bert." + m[1],
    r"rpn\.anchor_generator\.cell_anchors\.(\d+)": lambda m: f"anchors.{m[1]}",
}


def _tower(m: re.Match[str]) -> str:
    index, rest = int(m[1]), m[2]
    layer, part = divmod(index, 3)
    if part == 0:
        if not rest.startswith("b_attn."):
            return ""
        return f"fusion.layers.{layer}.vl_fuse.{rest[len('b_attn.'):]}"
    name = "text_layer" if part == 1 else "dyconv"
    return f"fusion.layers.{layer}.{name}.{rest}"


# Reference name (without `module.`) -> our name. The first matching pattern wins.
_RENAMES: list[tuple[str, Callable[[re.Match[str]], str]]] = [
    (r"backbone\.body\.(.+)", lambda m: "backbone." + m[1]),
    (r"backbone\.fpn\.fpn_(inner|layer)([234])\.(.+)",
     lambda m: f"fpn.{m[1]}_blocks.{int(m[2]) - 2}.{m[3]}"),
    (r"backbone\.fpn\.top_blocks\.(p6|p7)\.(.+)", lambda m: f"fpn.{m[1]}.{m[2]}"),
    (r"language_backbone\.body\.model\.(.+)", lambda m: "language.bert." + m[1]),
    (r"rpn\.head\.dyhead_tower\.(\d+)\.(.+)", _tower),
    (r"rpn\.head\.mlm_head\.(.+)", lambda m: "mlm_head." + m[1]),
    (r"rpn\.tunable_linear\.weight", lambda m: "prompt_offset"),
    (r"rpn\.head\.(.+)", lambda m: "head." + m[1]),
]


class ConversionError(ValueError):
    """The checkpoint does not match the preset; the message names every offending key."""


@dataclass
class ConversionReport:
    """What happened to every checkpoint key."""

    mapped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> our key
    verified: list[str] = field(default_factory=list)  # derived buffers found equal to ours
    ignored: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why unused
    unmapped: list[str] = field(default_factory=list)  # no rule maps these
    missing: list[str] = field(default_factory=list)  # our keys the checkpoint lacks
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint [..] vs ours [..]"

    @property
    def ok(self) -> bool:
        return not (self.unmapped or self.missing or self.mismatched)

    def summary(self) -> str:
        lines = [
            f"mapped {len(self.mapped)}, derived buffers verified {len(self.verified)}, "
            f"ignored {len(self.ignored)}, unmapped {len(self.unmapped)}, "
            f"missing {len(self.missing)}, mismatched {len(self.mismatched)}"
        ]
        for key, why in sorted(self.ignored.items()):
            lines.append(f"  ignored {key}: {why}")
        for title, keys in (("unmapped", self.unmapped), ("missing", self.missing),
                            ("mismatched", self.mismatched)):
            lines.extend(f"  {title}: {key}" for key in sorted(keys))
        return "\n".join(lines)


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """Load a released checkpoint's state_dict; strip `module.` when every key carries it."""
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:
        if trust_pickle:
            raise
        raise ConversionError(
            f"{path}: cannot be read as tensors only ({exc}); if you trust this file, "
            "pass --trust-pickle to unpickle its other objects"
        ) from exc
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected {{'model': state_dict}} or a state_dict")
    prefixed = [k.startswith("module.") for k in state]
    if any(prefixed) and not all(prefixed):
        raise ConversionError(f"{path}: some keys carry the 'module.' prefix and some do not")
    if all(prefixed):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def config_for_checkpoint(preset: str, state: dict[str, Tensor]) -> Glipv2Config:
    """The preset's config, with the optional parts (MLM head, prompt offset) the checkpoint has."""
    config = get_preset(preset)
    if any(k.startswith("rpn.head.mlm_head.") for k in state):
        config.head = dataclasses.replace(config.head, mlm_head=True)
    offset = state.get("rpn.tunable_linear.weight")
    if offset is not None:
        config.language = dataclasses.replace(config.language, prompt_offset_len=offset.shape[0])
    return config


def derived_buffers(config: Glipv2Config) -> dict[str, Tensor]:
    """Buffers our model computes from its config, under the names `_DERIVED_PATTERNS` yields."""
    window_index = relative_position_index(config.swin.window_size)
    buffers = {
        f"backbone.layers.{stage}.blocks.{block}.attn.relative_position_index": window_index
        for stage, depth in enumerate(config.swin.depths)
        for block in range(depth)
    }
    positions = config.language.max_position_embeddings
    buffers["language.bert.embeddings.position_ids"] = torch.arange(positions)[None, :]
    cells = AnchorGenerator.from_config(config.head).cell_anchors()
    buffers.update({f"anchors.{level}": cell for level, cell in enumerate(cells)})
    return buffers


def map_state_dict(state: dict[str, Tensor], config: Glipv2Config
                   ) -> tuple[dict[str, Tensor], ConversionReport]:
    """Rename, check and collect the checkpoint tensors for a model of `config`.

    Returns our state_dict (every persistent key of the model) and the report; never skips
    silently. The model is only instantiated on the meta device, for its key names and shapes.
    """
    report = ConversionReport()
    with torch.device("meta"):
        ours = Glipv2Model(config).state_dict()
    derived = derived_buffers(config)
    out: dict[str, Tensor] = {}
    claimed: set[str] = set()  # our keys some checkpoint key named, fitting or not
    for key in sorted(state):
        tensor = state[key]
        why = next((w for p, w in IGNORED_PATTERNS.items() if re.fullmatch(p, key)), None)
        if why is not None:
            report.ignored[key] = why
            continue
        target = _match(_DERIVED_PATTERNS.items(), key)
        if target is not None:
            _verify_derived(key, tensor, derived.get(target), report)
            continue
        target = _match(_RENAMES, key)
        if not target or target not in ours:
            report.unmapped.append(key)
            continue
        if target in claimed:
            report.mismatched.append(f"{key}: maps onto {target}, which another key filled")
            continue
        claimed.add(target)
        if tuple(ours[target].shape) != tuple(tensor.shape):
            report.mismatched.append(
                f"{key}: checkpoint {list(tensor.shape)} vs model {list(ours[target].shape)}"
            )
            continue
        out[target] = tensor.to(ours[target].dtype).contiguous()
        report.mapped[key] = target
    report.missing = sorted(set(ours) - claimed)
    return out, report


def _verify_derived(key: str, tensor: Tensor, expected: Tensor | None,
                    report: ConversionReport) -> None:
    if expected is None:
        report.unmapped.append(key)
    elif tuple(expected.shape) != tuple(tensor.shape):
        report.mismatched.append(
            f"{key}: checkpoint {list(tensor.shape)} vs built buffer {list(expected.shape)}"
        )
    elif not torch.equal(expected.to(tensor.dtype), tensor):
        report.mismatched.append(f"{key}: values differ from the buffer this model builds")
    else:
        report.verified.append(key)


def _match(rules, key: str) -> str | None:
    for pattern, rename in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return rename(m)
    return None


def convert_checkpoint(checkpoint: str | Path, preset: str, out_dir: str | Path,
                       trust_pickle: bool = False) -> ConversionReport:
    """Read, map and verify a reference checkpoint, then write config.json + model.safetensors."""
    state = read_checkpoint(checkpoint, trust_pickle=trust_pickle)
    config = config_for_checkpoint(preset, state)
    mapped, report = map_state_dict(state, config)
    if not report.ok:
        raise ConversionError(f"{checkpoint} does not fit preset {preset!r}:\n{report.summary()}")
    save_weights(config, mapped, out_dir)
    return report
