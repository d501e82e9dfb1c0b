"""The ONNX export cache (`engines.cache`) and serving from it: export once, reuse while the model
is unchanged, export again when it changes or its files are corrupt, once for concurrent starts."""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

import engines.export
from engines.cache import cache_key, cached_engines
from engines.manifest import MANIFEST_FILE, load_manifest
from model_export.checkpoints.weights import CONFIG_FILE, WEIGHTS_FILE, save_model
from service.app import create_app
from service.settings import ServiceSettings

from conftest import tiny_serving_model

WORLD_PNG = Path(__file__).parent / "fixtures" / "world" / "000000.png"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tiny_serving_model(), tmp_path_factory.mktemp("model") / "tiny",
                      external_language=True)


@pytest.fixture(scope="module")
def prebuilt(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real export through the cache (~20 s on 2 cores); `exports` copies it instead of
    exporting again."""
    return cached_engines(model_dir, tmp_path_factory.mktemp("cache"))


class FakeExport:
    """Stands in for `export_model`: copies `prebuilt` in milliseconds, records each call, and
    can be held at its start (`gate`) so that concurrent callers overlap."""

    def __init__(self, prebuilt: Path) -> None:
        self.prebuilt = prebuilt
        self.calls: list[Path] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, model_dir: Path, out_dir: Path, **kwargs: Any) -> Path:
        self.calls.append(Path(out_dir))
        self.started.set()
        self.gate.wait(30)
        shutil.copytree(self.prebuilt, out_dir, dirs_exist_ok=True)
        return Path(out_dir) / MANIFEST_FILE


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch, prebuilt: Path) -> FakeExport:
    fake = FakeExport(prebuilt)
    monkeypatch.setattr(engines.export, "export_model", fake)
    return fake


def test_the_real_export_is_a_checked_fp32_and_int8_entry(model_dir: Path,
                                                           prebuilt: Path) -> None:
    assert prebuilt.name == cache_key(model_dir) and prebuilt.name.startswith("tiny-")
    manifest = load_manifest(prebuilt)
    assert manifest.model_id == "tiny"
    assert manifest.has_variant("vision", "int8") and manifest.has_variant("fusion", "int8")
    # only the entry and its lock: the temporary export folder was renamed, nothing left over
    assert sorted(p.name for p in prebuilt.parent.iterdir()) == [prebuilt.name,
                                                                 f"{prebuilt.name}.lock"]


def test_first_call_exports_and_later_calls_reuse(model_dir: Path, tmp_path: Path,
                                                  exports: FakeExport) -> None:
    entry = cached_engines(model_dir, tmp_path / "cache")
    assert entry == tmp_path / "cache" / cache_key(model_dir)
    assert len(exports.calls) == 1 and exports.calls[0].parent == entry.parent
    assert exports.calls[0] != entry  # exported beside the entry, then renamed into place
    assert cached_engines(model_dir, tmp_path / "cache") == entry
    assert len(exports.calls) == 1
    load_manifest(entry)


def test_a_changed_model_or_export_format_gets_a_new_key(model_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         exports: FakeExport) -> None:
    model = shutil.copytree(model_dir, tmp_path / "tiny")
    first = cached_engines(model, tmp_path / "cache")
    assert cache_key(model) == cache_key(model_dir)  # the contents decide, not the path

    config = json.loads((model / CONFIG_FILE).read_text())
    config["postprocess"]["pre_nms_thresh"] = 0.05
    (model / CONFIG_FILE).write_text(json.dumps(config))
    second = cached_engines(model, tmp_path / "cache")
    assert second != first and len(exports.calls) == 2
    assert first.is_dir() and second.is_dir()

    weights = bytearray((model / WEIGHTS_FILE).read_bytes())
    weights[-1] ^= 0xFF
    (model / WEIGHTS_FILE).write_bytes(weights)
    assert cache_key(model) not in (first.name, second.name)

    changed_format = cache_key(model)
    monkeypatch.setattr("engines.cache.MANIFEST_FORMAT", "glipv2-onnx/999")
    assert cache_key(model) != changed_format
    assert cache_key(model, variants=()) != changed_format


def test_a_corrupt_or_partial_entry_is_exported_again(model_dir: Path, tmp_path: Path,
                                                      exports: FakeExport) -> None:
    cache = tmp_path / "cache"
    entry = cached_engines(model_dir, cache)
    vision = entry / "vision.onnx"
    vision.write_bytes(vision.read_bytes()[: vision.stat().st_size // 2])
    assert cached_engines(model_dir, cache) == entry and len(exports.calls) == 2
    load_manifest(entry)  # whole again

    (entry / MANIFEST_FILE).unlink()  # an entry cut short
    stale = cache / f".{entry.name}.dead"  # what an exporter killed mid-way leaves
    stale.mkdir()
    assert cached_engines(model_dir, cache) == entry and len(exports.calls) == 3
    load_manifest(entry)
    assert not stale.exists()


def test_a_failed_export_leaves_nothing_behind(model_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               exports: FakeExport) -> None:
    def broken(model_dir: Path, out_dir: Path, **kwargs: Any) -> Path:
        (Path(out_dir) / "vision.onnx").write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(engines.export, "export_model", broken)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        cached_engines(model_dir, tmp_path / "cache")
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".lock"]

    monkeypatch.setattr(engines.export, "export_model", exports)
    load_manifest(cached_engines(model_dir, tmp_path / "cache"))


def test_concurrent_calls_export_once(model_dir: Path, tmp_path: Path,
                                      exports: FakeExport) -> None:
    exports.gate.clear()  # the first caller holds the lock, mid-export, until all have called
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(cached_engines, model_dir, tmp_path / "cache") for _ in range(4)]
        assert exports.started.wait(30)
        time.sleep(0.3)  # the other three are now waiting on the lock
        exports.gate.set()
        entries = {future.result(60) for future in futures}
    assert len(exports.calls) == 1 and len(entries) == 1
    load_manifest(entries.pop())


def test_tensorrt_still_needs_an_engine_folder() -> None:
    with pytest.raises(ValidationError, match="runtime tensorrt needs engine_dir"):
        ServiceSettings(runtime="tensorrt", engine_dir=None)


def test_onnxruntime_without_engines_serves_the_cached_export(model_dir: Path, tmp_path: Path,
                                                              exports: FakeExport) -> None:
    """/healthz at once, /readyz 503 while the background loader exports, then the detections
    of ONNX Runtime on the export."""
    settings = ServiceSettings(runtime="onnxruntime", model_dir=model_dir, engine_dir=None,
                               engine_cache_dir=tmp_path / "cache", api_keys=[])
    exports.gate.clear()
    with TestClient(create_app(settings)) as client:
        assert exports.started.wait(30)
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        exports.gate.set()
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/readyz").json() == {"status": "ready", "model": "tiny"}
        image = base64.b64encode(WORLD_PNG.read_bytes()).decode()
        response = client.post("/v1/detect", json={"image": image, "classes": ["circle", "star"],
                                                   "threshold": 0.0})
        assert response.status_code == 200, response.text
        assert response.json()["detections"]
        assert client.get("/v1/models").json()["models"][0]["runtime"] == "onnxruntime-cpu-fp32"
    assert len(exports.calls) == 1 and exports.calls[0].parent == tmp_path / "cache"
