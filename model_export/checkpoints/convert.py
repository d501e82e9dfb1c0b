"""Convert a released GLIP checkpoint (`{'model': state_dict}`, `module.` prefixes) to our format.

Strict by design, unlike the reference loader (which matches by suffix and skips mismatches
silently): every checkpoint key is either mapped to exactly one of our parameters, verified equal to
a buffer our model derives itself, or on a short list of keys that are unused at inference (and
reported as ignored). Anything unmapped, missing or mis-shaped fails with the keys named as the
checkpoint file names them (its `module.` prefix included), next to our names, so they can be
found in the file.
"""

from __future__ import annotations

import dataclasses
import functools
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


@dataclass(frozen=True)
class _Rename:
    """One naming rule, read both ways: checkpoint name (without `module.`) <-> our name.

    `{rest}` stands for the same tail on both sides and `{i}` for an index that is
    `scale * i + offset` in the checkpoint: GLIP numbers its FPN blocks from 2 and puts the
    three modules of fusion layer i in DyHead towers 3i (VLFuse), 3i+1 (BERT layer) and 3i+2
    (DyConv).
    """

    theirs: str
    ours: str
    scale: int = 1
    offset: int = 0

    def to_ours(self, key: str) -> str | None:
        return _rewrite(key, self.theirs, self.ours, self._our_index)

    def to_theirs(self, key: str) -> str | None:
        return _rewrite(key, self.ours, self.theirs, lambda i: self.scale * i + self.offset)

    def _our_index(self, their_index: int) -> int | None:
        index, remainder = divmod(their_index - self.offset, self.scale)
        return None if remainder or index < 0 else index


def _rewrite(key: str, source: str, target: str,
             index: Callable[[int], int | None]) -> str | None:
    m = _template_regex(source).fullmatch(key)
    if m is None:
        return None
    fields = m.groupdict()
    if "i" in fields:
        new_index = index(int(fields["i"]))
        if new_index is None:
            return None
        fields["i"] = str(new_index)
    return target.format(**fields)


@functools.cache
def _template_regex(template: str) -> re.Pattern[str]:
    # No leading zeros in an index: `fpn_inner02` must not become a second name for `fpn_inner2`.
    fields = {"{rest}": "(?P<rest>.+)", "{i}": "(?P<i>0|[1-9][0-9]*)"}
    parts = re.split(r"(\{rest\}|\{i\})", template)
    return re.compile("".join(fields.get(part, re.escape(part)) for part in parts))


# The one name mapping, used both ways; the first rule that applies wins. Derived buffers
# (relative_position_index, position_ids, cell anchors) get the names `derived_buffers` uses.
_RENAMES: tuple[_Rename, ...] = (
    _Rename("backbone.body.{rest}", "backbone.{rest}"),
    _Rename("backbone.fpn.fpn_inner{i}.{rest}", "fpn.inner_blocks.{i}.{rest}", offset=2),
    _Rename("backbone.fpn.fpn_layer{i}.{rest}", "fpn.layer_blocks.{i}.{rest}", offset=2),
    _Rename("backbone.fpn.top_blocks.p{i}.{rest}", "fpn.p{i}.{rest}"),
    _Rename("language_backbone.body.model.{rest}", "language.bert.{rest}"),
    _Rename("rpn.head.dyhead_tower.{i}.b_attn.{rest}", "fusion.layers.{i}.vl_fuse.{rest}",
            scale=3),
    _Rename("rpn.head.dyhead_tower.{i}.{rest}", "fusion.layers.{i}.text_layer.{rest}",
            scale=3, offset=1),
    _Rename("rpn.head.dyhead_tower.{i}.{rest}", "fusion.layers.{i}.dyconv.{rest}",
            scale=3, offset=2),
    _Rename("rpn.head.mlm_head.{rest}", "mlm_head.{rest}"),
    _Rename("rpn.tunable_linear.weight", "prompt_offset"),
    _Rename("rpn.anchor_generator.cell_anchors.{i}", "anchors.{i}"),
    _Rename("rpn.head.{rest}", "head.{rest}"),
)


def our_name(checkpoint_key: str) -> str | None:
    """Our name for a checkpoint key (without `module.`), or None when no rule maps it."""
    for rule in _RENAMES:
        name = rule.to_ours(checkpoint_key)
        if name is not None:
            return name
    return None


def checkpoint_name(our_key: str) -> str | None:
    """The checkpoint key (without `module.`) that `our_name` maps onto `our_key`, or None."""
    for rule in _RENAMES:
        name = rule.to_theirs(our_key)
        if name is not None:
            return name
    return None


class ConversionError(ValueError):
    """The checkpoint does not match the preset; the message names every offending key."""


# Lines the summary prints per kind of problem: a wrong preset fails on hundreds of keys, and the
# first line has every count.
SUMMARY_LINES_PER_KIND = 10


@dataclass
class ConversionReport:
    """What happened to every checkpoint key. Checkpoint keys are as the file names them
    (`module.` prefix included, if it has one)."""

    mapped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> our key
    verified: list[str] = field(default_factory=list)  # derived buffers found equal to ours
    ignored: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why unused
    unmapped: list[str] = field(default_factory=list)  # no rule maps these onto our model
    # our key the checkpoint lacks -> the checkpoint key that would fill it (None: no rule)
    missing: dict[str, str | None] = field(default_factory=dict)
    # checkpoint key -> what is wrong, e.g. "[256, 256, 1, 1] vs ours fusion... [256, 256, 3, 3]"
    mismatched: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.unmapped or self.missing or self.mismatched)

    def summary(self) -> str:
        """A counts line, then one line per ignored or offending key, each kind capped at
        `SUMMARY_LINES_PER_KIND`."""
        lines = [
            f"mapped {len(self.mapped)}, derived buffers verified {len(self.verified)}, "
            f"ignored {len(self.ignored)}, unmapped {len(self.unmapped)}, "
            f"missing {len(self.missing)}, mismatched {len(self.mismatched)}"
        ]
        missing = [f"{theirs} for ours {ours}" if theirs else
                   f"ours {ours} (no checkpoint key maps onto it)"
                   for ours, theirs in self.missing.items()]
        for title, entries in (
            ("ignored", [f"{key} ({why})" for key, why in self.ignored.items()]),
            ("unmapped", self.unmapped),
            ("missing", missing),
            ("mismatched", [f"{key} {problem}" for key, problem in self.mismatched.items()]),
        ):
            shown = sorted(entries)[:SUMMARY_LINES_PER_KIND]
            lines.extend(f"  {title}: {entry}" for entry in shown)
            if len(entries) > len(shown):
                lines.append(f"  ... and {len(entries) - len(shown)} more {title}")
        return "\n".join(lines)


def read_checkpoint(path: str | Path, trust_pickle: bool = False
                    ) -> tuple[dict[str, Tensor], str]:
    """Load a released checkpoint's state_dict; strip `module.` when every key carries it.

    Returns the state_dict and the prefix stripped (`"module."` or `""`).
    """
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
    if state and all(prefixed):
        return {k[len("module."):]: v for k, v in state.items()}, "module."
    return state, ""


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
    """Buffers our model computes from its config, under the names `our_name` gives theirs."""
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


def map_state_dict(state: dict[str, Tensor], config: Glipv2Config, prefix: str = ""
                   ) -> tuple[dict[str, Tensor], ConversionReport]:
    """Rename, check and collect the checkpoint tensors for a model of `config`.

    `state` has keys without `prefix`, the prefix its file's keys carry (`read_checkpoint`
    strips it); the report names checkpoint keys with it. A key maps only when our name for it
    maps back to it, so no two keys fill one parameter and a missing parameter's checkpoint key
    is exact. Returns our state_dict (every persistent key of the model) and the report; never
    skips silently. The model is only instantiated on the meta device, for its key names and
    shapes.
    """
    report = ConversionReport()
    with torch.device("meta"):
        ours = Glipv2Model(config).state_dict()
    derived = derived_buffers(config)
    out: dict[str, Tensor] = {}
    claimed: set[str] = set()  # our keys some checkpoint key named, fitting or not
    for key in sorted(state):
        tensor, named = state[key], prefix + key
        why = next((w for p, w in IGNORED_PATTERNS.items() if re.fullmatch(p, key)), None)
        if why is not None:
            report.ignored[named] = why
            continue
        target = our_name(key)
        if target is None or checkpoint_name(target) != key:
            report.unmapped.append(named)
        elif target in derived:
            _verify_derived(named, tensor, target, derived[target], report)
        elif target not in ours:
            report.unmapped.append(named)
        elif tuple(ours[target].shape) != tuple(tensor.shape):
            claimed.add(target)
            report.mismatched[named] = (f"{list(tensor.shape)} vs ours {target} "
                                        f"{list(ours[target].shape)}")
        else:
            claimed.add(target)
            out[target] = tensor.to(ours[target].dtype).contiguous()
            report.mapped[named] = target
    for target in sorted(set(ours) - claimed):
        theirs = checkpoint_name(target)
        report.missing[target] = None if theirs is None else prefix + theirs
    return out, report


def _verify_derived(named: str, tensor: Tensor, target: str, expected: Tensor,
                    report: ConversionReport) -> None:
    if tuple(expected.shape) != tuple(tensor.shape):
        report.mismatched[named] = (f"{list(tensor.shape)} vs ours {target} "
                                    f"{list(expected.shape)} (a buffer this model builds)")
    elif not torch.equal(expected.to(tensor.dtype), tensor):
        report.mismatched[named] = f"values differ from ours {target} (a buffer this model builds)"
    else:
        report.verified.append(named)


def convert_checkpoint(checkpoint: str | Path, preset: str, out_dir: str | Path,
                       trust_pickle: bool = False) -> ConversionReport:
    """Read, map and verify a reference checkpoint, then write config.json + model.safetensors."""
    state, prefix = read_checkpoint(checkpoint, trust_pickle=trust_pickle)
    config = config_for_checkpoint(preset, state)
    mapped, report = map_state_dict(state, config, prefix)
    if not report.ok:
        raise ConversionError(f"{checkpoint} does not fit preset {preset!r}:\n{report.summary()}")
    save_weights(config, mapped, out_dir)
    return report
