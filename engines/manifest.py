"""Loading and validating an engine folder's `manifest.json` (written by `glipv2 export`).

A runtime refuses a folder it cannot trust, before building any session, with one message that
says what is wrong and how to fix it: a missing or altered file (checksum), an opset it was not
exported for, a preset other than the one asked for, a config that does not match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.export import DEFAULT_OPSET, MANIFEST_FILE, MANIFEST_FORMAT, sha256_file
from model_export.checkpoints.weights import CONFIG_FILE, load_config
from model_export.modeling.config import Glipv2Config

REQUIRED_GRAPHS = ("vision", "language", "fusion")


class ManifestError(ValueError):
    """The engine folder does not match its manifest (or has none)."""


@dataclass(frozen=True)
class EngineManifest:
    """A validated engine folder: its manifest, the model config, and where each file is."""

    directory: Path
    data: dict[str, Any]
    config: Glipv2Config

    @property
    def model_id(self) -> str:
        return str(self.data["model_id"])

    @property
    def graphs(self) -> dict[str, dict[str, Any]]:
        return self.data["graphs"]

    def graph_path(self, graph: str, precision: str = "fp32") -> Path:
        """The ONNX file of `graph` in `precision` (fp32, or a variant the export wrote)."""
        entry = self.graphs[graph]
        if precision != "fp32":
            entry = entry.get("variants", {}).get(precision, entry)
        return self.directory / entry["file"]

    def has_variant(self, graph: str, precision: str) -> bool:
        return precision == "fp32" or precision in self.graphs[graph].get("variants", {})

    def tensorrt_engines(self) -> dict[str, dict[str, Any]]:
        """Graph -> built TensorRT engine entry (`glipv2 build-engines`), empty if none."""
        return self.data.get("tensorrt", {}).get("engines", {})


def load_manifest(directory: str | Path, *, expected_preset: str | None = None,
                  verify_checksums: bool = True) -> EngineManifest:
    """Read and check `directory/manifest.json`; raises `ManifestError` saying what is wrong."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_FILE} in {directory}: not an engine folder; create one "
                            "with `glipv2 export --model MODEL_DIR --out ENGINE_DIR`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ManifestError(f"{path}: format {found!r}, expected {MANIFEST_FORMAT!r}; re-export "
                            "the model with this version's `glipv2 export`")
    for key in ("model_id", "preset", "opset", "config", "config_sha256", "graphs"):
        if key not in data:
            raise ManifestError(f"{path}: missing field {key!r}")

    preset = data["preset"]
    if expected_preset is not None and preset != expected_preset:
        raise ManifestError(f"{directory} holds a {preset!r} model, but {expected_preset!r} was "
                            "asked for")
    if data["config"] != CONFIG_FILE:
        raise ManifestError(f"{path}: config {data['config']!r}, expected {CONFIG_FILE!r}")
    config_path = directory / CONFIG_FILE
    _check_file(config_path, data["config_sha256"], verify_checksums)
    config = load_config(directory)
    if config.preset != preset:
        raise ManifestError(f"{config_path} is preset {config.preset!r} but the manifest says "
                            f"{preset!r}")

    graphs = data["graphs"]
    missing = [g for g in REQUIRED_GRAPHS if g not in graphs]
    if missing:
        raise ManifestError(f"{path}: no {', '.join(missing)} graph; re-export the model")
    for name, entry in graphs.items():
        opset = entry.get("opset")
        if not isinstance(opset, int) or opset < DEFAULT_OPSET or opset != data["opset"]:
            raise ManifestError(
                f"graph {name!r} has opset {opset!r}; this runtime needs the manifest's opset "
                f"{data['opset']} and at least {DEFAULT_OPSET} (ONNX DeformConv)")
        for variant in (entry, *entry.get("variants", {}).values()):
            _check_file(directory / variant["file"], variant["sha256"], verify_checksums)
    for entry in data.get("tensorrt", {}).get("engines", {}).values():
        _check_file(directory / entry["file"], entry["sha256"], verify_checksums,
                    fix="rebuild the engines with `glipv2 build-engines`")
    return EngineManifest(directory=directory, data=data, config=config)


def _check_file(path: Path, sha256: str, verify: bool, fix: str = "re-export the model") -> None:
    if not path.is_file():
        raise ManifestError(f"{path} is listed in the manifest but missing; {fix}")
    if verify and sha256_file(path) != sha256:
        raise ManifestError(f"{path} does not match its manifest checksum (altered or "
                            f"truncated); {fix}")
