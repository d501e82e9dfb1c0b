"""An engine folder's `manifest.json`: written by `glipv2 export`, read and checked by runtimes.

A runtime refuses a folder it cannot trust, before building any session, with one message that
says what is wrong and how to fix it: a missing or altered file (checksum), an opset it was not
exported for, a preset other than the one asked for, a config that does not match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model_export.checkpoints.weights import CONFIG_FILE, load_config
from model_export.modeling.config import Glipv2Config

if TYPE_CHECKING:
    import onnx

DEFAULT_OPSET = 19  # the first opset with DeformConv
MANIFEST_FILE = "manifest.json"
# The graphs' interface: 2 added caption_step's token_boxes and caption_image's region centres;
# 3 decodes captions with a key/value cache (caption_prefix, incremental caption_step) and
# renamed caption_image's states.
MANIFEST_FORMAT = "glipv2-onnx/3"
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


# --- writing ------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (graphs can be hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_entries(values: Sequence[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
    import onnx

    """ONNX graph inputs/outputs -> [{name, dtype, shape}]; a dynamic axis is its name."""
    entries = []
    for value in values:
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        shape: list[int | str] = [
            dim.dim_param if dim.HasField("dim_param") else int(dim.dim_value)
            for dim in tensor_type.shape.dim
        ]
        entries.append({"name": value.name, "dtype": dtype, "shape": shape})
    return entries


def graph_entry(path: Path, opset: int) -> dict[str, Any]:
    """One exported graph's manifest entry: file, checksum, opset, tensors and dynamic axes."""
    import onnx  # here, not at module level: runtimes read manifests without onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs, outputs = _tensor_entries(graph.input), _tensor_entries(graph.output)
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "opset": opset,
        "inputs": inputs,
        "outputs": outputs,
        "dynamic_axes": {
            entry["name"]: {str(axis): dim for axis, dim in enumerate(entry["shape"])
                            if isinstance(dim, str)}
            for entry in (*inputs, *outputs)
        },
    }


def write_manifest(out: Path, model_id: str, config: Glipv2Config, opset: int,
                   graphs: dict[str, Any]) -> Path:
    """Write `out/manifest.json` for graphs exported into `out` (beside a copy of the model's
    `config.json`); returns its path."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "model_id": model_id,
        "preset": config.preset,
        "tokenizer": config.language.tokenizer,
        "max_query_len": config.language.max_query_len,
        "preprocess": dataclasses.asdict(config.preprocess),
        "opset": opset,
        "config": CONFIG_FILE,
        "config_sha256": sha256_file(out / CONFIG_FILE),
        "exporter": f"torch {torch.__version__} (TorchScript-based torch.onnx.export)",
        "graphs": graphs,
    }
    path = out / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


# --- reading ------------------------------------------------------------------------------------


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
