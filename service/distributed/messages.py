"""What an ingress replica and an engine replica send each other, besides the tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray import ObjectRef

from model_export.modeling.config import Glipv2Config


@dataclass(frozen=True)
class Stage:
    """What every engine call of a request carries.

    bucket: its image's padded (H, W) (or the text bucket), as `EngineClient.resume` takes it.
    priority: online or batch work. deadline_ms: what is left of its deadline when the call
    leaves the ingress (None: job work, no deadline); the engine counts it from arrival, so no
    two clocks are compared. home: the engine replica holding the request's image features,
    which `routing.FeatureAffinityRouter` prefers (None until a stage has computed them).
    """

    bucket: object
    priority: int
    deadline_ms: float | None
    home: str | None = None


@dataclass(frozen=True)
class RemoteFeatures:
    """Tensors an engine replica keeps in its node's object store: a request's image features,
    or a fusion row's fused levels for the mask engine.

    The ingress holds only this reference and hands it back to the engines as it came; the
    object lives until the last reference goes (the request ends), or with the replica that
    owns it (then a later stage gets `ObjectLostError`: the request is re-run elsewhere).
    """

    ref: ObjectRef
    replica: str  # unique id of the replica that computed them


@dataclass(frozen=True)
class Pixels:
    """A request's prepared (3, H, W) pixels, sent with the first of its stages that needs the
    image's features: the engine runs `vision` on them first, in the same call."""

    pixels: Any


@dataclass(frozen=True)
class StageResult:
    """What a stage taking the image returns: its value, and the image's features when this
    call computed them (from `Pixels`), which the request's later stages then refer to."""

    value: Any
    features: RemoteFeatures | None = None


@dataclass(frozen=True)
class EngineInfo:
    """What an engine replica serves: the ingress builds its `ServedModel` from it."""

    runtime_name: str
    config: Glipv2Config
    graphs: frozenset[str]
